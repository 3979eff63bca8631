"""The held-out cases of `tests/unseen.py` in CI, and the mechanisms they showed wrong, one fact each.

Each case runs once, in one grad mode (rotated over the cases, so all three are covered), with
its placement inferred (or the one it names); `scripts/unseen_bugs.py` runs every case in every
grad mode with the placement inferred and given. They are `cuda` tests: real CUDA where there is a GPU
(`pytest -m cuda`), else the emulated accelerator with two devices.

Before the fixes these cases showed (`scripts/unseen_bugs.py` on main): host bookkeeping in a
device module (`int(batch_sizes[0])` of a packed sequence, `torch.tensor(2.0).sqrt()`, an empty
tensor) read as stray; a download in the model's own forward that it does not return (logging
with `.cpu().numpy()`) passed as the run's output; CUDA's refusal of device lengths in
`pack_padded_sequence` was unknown to the rules; a TorchScript submodule or a lazy module could
not be moved onto the emulated device, and a traced lazy module crashed the tracer.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.trace import Tracer, rules
from harness.trace.events import ALLOWED, MISMATCH, OK, STRAY, SYNC, TRANSFER
from harness.trace.placement import ModulePlacement
from harness.trace.store import load_trace
from tests.thirdparty import one_thread  # noqa: F401
from tests.unseen import CASES, GRAD_MODES, Case, Unavailable, trace_case, transformers_classes

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]

MODES = list(GRAD_MODES)


def _needs(case: Case) -> None:
    if case.devices > torch.cuda.device_count():
        pytest.skip(f"{case.name} needs {case.devices} CUDA devices")
    if case.name.startswith(("hf-", "gpt2-")) or case.name.endswith("-offload"):
        pytest.importorskip("transformers")
        pytest.importorskip("accelerate")


@pytest.mark.parametrize(
    "name, mode", [(name, MODES[i % len(MODES)]) for i, name in enumerate(CASES)], ids=lambda v: v
)
def test_held_out_case(name, mode):
    case = CASES[name]
    _needs(case)
    emulated = torch.cuda.get_device_name().startswith("Emulated")
    known = case.known_in(mode)
    if known and not emulated and not case.cuda_checked:
        pytest.skip(f"a known limit, on real CUDA too: {known}")
    try:
        o = trace_case(name, mode, case.placements[0] if case.placements else "inferred")
    except Unavailable as exc:  # an older transformers on the GPU machine
        pytest.skip(str(exc))
    if known and emulated:  # a limit of the emulation: the run is never judged clean
        assert o.crashed or o.verdict != "clean", o.describe()
        return
    assert not o.crashed, o.describe()
    expect = case.expect_in(mode)
    if expect is None:
        assert o.verdict == "clean", o.describe()
        assert o.counts.get(OK, 0) > 0, o.describe()  # it saw the model's ops
    else:
        assert o.first[:2] == expect, f"{o.describe()} ({case.why})"
        assert f" in {case.where}" in o.first[2], o.describe()


def test_a_case_needing_a_class_this_transformers_lacks_is_unavailable_not_a_crash():
    pytest.importorskip("transformers")
    with pytest.raises(Unavailable, match="has no NoSuchModelForCausalLM"):
        transformers_classes("LlamaConfig", "NoSuchModelForCausalLM")
    (config,) = transformers_classes("LlamaConfig")
    assert config.__name__ == "LlamaConfig"


# ---- the mechanisms, one fact each -----------------------------------------------------------------


class _Host(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.make = make

    def forward(self, x):
        return self.proj(x) * self.make(x)


@pytest.mark.parametrize(
    "make, cls",
    [
        (lambda x: torch.tensor(2.0).sqrt() * torch.tensor(3.0), OK),  # host scalars: CUDA takes them
        (lambda x: torch.empty(0, 4).sum(), OK),  # an empty tensor computes nothing
        (lambda x: torch.arange(4).float(), STRAY),  # a 4-element tensor computed on the host
    ],
    ids=["host-scalars", "empty", "host-vector"],
)
def test_only_real_host_compute_in_a_device_module_is_stray(make, cls):
    model = nn.Sequential(_Host(make)).to("cuda:0")
    # (the host vector then meets the device output: CUDA refuses)
    with torch.no_grad(), Tracer(model, keep_events=True) as t, contextlib.suppress(RuntimeError):
        model(torch.ones(2, 4, device="cuda:0"))
    on_host = [e.cls for e in t.events if e.module == "0" and e.outputs and e.outputs[0].device == "cpu"]
    assert on_host and set(on_host) == {cls}, [(e.op, e.cls) for e in t.events]


class _Logs(nn.Module):
    """The model's own forward: `how` the result or a logged activation goes to the host."""

    def __init__(self, how: str):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.how = how

    def forward(self, x):
        y = self.proj(x)
        if self.how == "log":
            self.logged = y.detach().cpu().numpy().mean()  # read back, not returned
            return y
        if self.how == "tuple":
            return y, y.detach().cpu().double()  # a host copy made from the download, returned
        if self.how == "numpy":
            return y.detach().cpu().numpy()
        return y.cpu()


@pytest.mark.parametrize(
    "how, cls", [("log", SYNC), ("tuple", ALLOWED), ("numpy", ALLOWED), ("result", ALLOWED)]
)
def test_a_download_in_the_models_forward_is_allowed_only_when_returned(how, cls):
    model = _Logs(how).to("cuda:0")
    with torch.no_grad(), Tracer(model, keep_events=True) as t:
        model(torch.ones(2, 4, device="cuda:0"))
    downloads = [e for e in t.events if e.transfer and e.transfer["to"] == "cpu" and e.module == ""]
    assert [e.cls for e in downloads] == [cls]
    assert t.summary.verdict == ("dirty" if cls == SYNC else "clean")
    if cls == SYNC:
        assert t.summary.first_offence["source"].endswith("in _Logs.forward")


def test_packed_sequences_want_their_lengths_on_the_host():
    """CUDA: "'lengths' argument should be a 1D CPU int64 tensor" whatever the data's device."""
    x = torch.ones(2, 3, 4, device="cuda:0")
    with pytest.raises(RuntimeError, match="should be a 1D CPU int64 tensor, but got 1D cuda:0 Long"):
        nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 2], device="cuda:0"), batch_first=True)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 2]), batch_first=True)
    assert packed.data.device == x.device and packed.batch_sizes.device.type == "cpu"


def test_the_rule_for_host_lengths():
    data = rules.Operand("input", "cuda:0", "float32", (2, 3, 4))
    host, device = (rules.Operand("lengths", d, "int64", (2,)) for d in ("cpu", "cuda:0"))
    assert rules.refusal("aten._pack_padded_sequence.default", [data, host]) is None
    message = rules.refusal("aten._pack_padded_sequence.default", [data, device])
    assert message == "'lengths' argument should be a 1D CPU int64 tensor, but got 1D cuda:0 Long tensor"
    assert rules.refusal("aten.add.Tensor", [data, data]) is None  # one device suffices elsewhere


def test_a_torchscript_model_is_moved_and_traced():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.GELU())).to("cuda:0")
    assert {p.device for p in scripted.parameters()} == {torch.device("cuda:0")}
    model = nn.Sequential(nn.Linear(3, 3), torch.jit.script(nn.Linear(3, 2))).to("cuda:0")
    for traced in (scripted, model):
        with torch.no_grad(), Tracer(traced) as t:  # a ScriptModule as the root takes no hooks of its own
            y = traced(torch.ones(2, 3, device="cuda:0"))
        assert y.device == torch.device("cuda:0")
        assert t.summary.verdict == "clean" and t.summary.inside > 0, t.summary.counts
        assert t.summary.traffic["calls"] == 1  # the root's calls are seen (the global hooks)


def test_a_lazy_module_is_made_on_its_device_inside_the_trace():
    model = nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(4)).to("cuda:0")
    with torch.no_grad(), Tracer(model, keep_events=True) as t:  # the first call makes the weights
        model(torch.ones(2, 3, device="cuda:0"))
    assert model[1].weight.device == torch.device("cuda:0") and model[1].weight.shape == (4, 3)
    assert t.summary.verdict == "clean", t.summary.first_offence
    assert t.placement.device_of("1") == "cuda:0"  # no CPU place read off the uninitialized weight


def test_held_out_bugs_are_found_in_every_grad_mode():
    """The same first offence (class, module, line) in the three grad modes, for a bug of each class."""
    for name in ("mask-without-device", "mask-uploaded-per-call", "cpu-numpy-in-forward", "buffer-after-to"):
        firsts = {mode: trace_case(name, mode, "given").first for mode in MODES}
        assert len(set(firsts.values())) == 1, firsts
        assert next(iter(firsts.values()))[0] in (STRAY, TRANSFER, SYNC, MISMATCH)


def test_an_offloaded_models_modules_run_where_the_hooks_run_them():
    """accelerate's cpu_offload hooks the modules that hold weights (now on meta); a module
    without weights or a hook of its own is expected where its submodules run, not on meta."""
    accelerate = pytest.importorskip("accelerate")
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    model = accelerate.cpu_offload(model, execution_device=torch.device("cuda:0"))
    placement = ModulePlacement.inferred(model)
    assert {path: placement.device_of(path) for path in ("", "0", "0.0", "0.1", "1")} == dict.fromkeys(
        ("", "0", "0.0", "0.1", "1"), "cuda:0"
    )
    with torch.no_grad(), Tracer(model) as t:
        model(torch.ones(2, 4, device="cuda:0"))
    assert t.summary.verdict == "clean", t.summary.first_offence
    assert t.summary.traffic["offload"] == (16 + 4 + 8 + 2) * 4  # every weight brought in once


class _Waits(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        y = self.proj(x)
        torch.cuda.synchronize(y.device)  # left in from timing it
        return y


def test_the_host_waiting_without_a_tensor_op_is_a_sync_inside_the_model(tmp_path):
    model = nn.Sequential(_Waits()).to("cuda:0")
    real = torch.cuda.synchronize
    with torch.no_grad(), Tracer(model, path=tmp_path / "t.jsonl", keep_events=True) as t:
        torch.cuda.synchronize()  # the caller's own wait, outside the model: allowed
        model(torch.ones(2, 4, device="cuda:0"))
    assert torch.cuda.synchronize is real  # put back
    waits = [(e.module, e.cls, e.devices) for e in t.events if e.op == "cuda::synchronize"]
    assert waits == [(None, ALLOWED, ["cuda:0"]), ("0", SYNC, ["cuda:0"])]
    first = t.summary.first_offence
    assert (first["class"], first["module"], first["op"]) == (SYNC, "0", "cuda::synchronize")
    assert first["source"].endswith("in _Waits.forward")
    assert load_trace(tmp_path / "t.jsonl").summary.verdict == "dirty"


def _padded_encoder_on(device):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).eval().to(device)
    pad = torch.tensor([[False, False, False], [False, False, True]], device=device)
    return model, torch.randn(2, 3, 8).to(device), pad


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_the_encoders_nested_tensor_fast_path(device):
    """In eval without grad, nn.TransformerEncoder with a padding mask runs on nested tensors (the
    emulation takes the path real CUDA takes: its own function mode does not count as a
    `__torch_function__` override). The tracer reads them (no single shape); on a GPU the mask is
    checked on the host first (a sync); the emulation cannot hold nested tensors and says so."""
    from harness.errors import EmulationUnsupported

    model, x, pad = _padded_encoder_on(device)
    emulated = device != "cpu" and torch.cuda.get_device_name().startswith("Emulated")
    with torch.no_grad(), Tracer(model, keep_events=True) as t:
        if emulated:
            with pytest.raises(EmulationUnsupported, match="_nested_tensor_from_mask.*nested tensor"):
                model(x, src_key_padding_mask=pad)
        else:
            model(x, src_key_padding_mask=pad)
    ops = [e.op for e in t.events]
    assert "aten._nested_tensor_from_mask_left_aligned.default" in ops
    if device == "cpu":
        assert "aten._transformer_encoder_layer_fwd.default" in ops  # the fused fast path, traced
        assert t.summary.verdict == "clean"
    else:
        first = t.summary.first_offence
        assert (first["class"], first["op"]) == (SYNC, "aten._nested_tensor_from_mask_left_aligned.default")


# ---- round three --------------------------------------------------------------------------------


def test_side_streams_and_events_run_and_a_wait_on_an_event_is_a_sync():
    """torch.cuda.Stream / Event / stream() / record_stream work on the emulated devices as on a
    GPU; an event's synchronize() inside the model is the host waiting (a sync)."""

    class Side(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            side = torch.cuda.Stream(device=x.device)
            with torch.cuda.stream(side):
                assert torch.cuda.current_stream(x.device) == side
                y = self.proj(x)
            assert torch.cuda.current_stream(x.device) != side
            torch.cuda.current_stream(x.device).wait_stream(side)
            y.record_stream(torch.cuda.current_stream(x.device))
            done = side.record_event()
            done.synchronize()
            return y

    model = nn.Sequential(Side()).to("cuda:0")
    with torch.no_grad(), Tracer(model, keep_events=True) as t:
        model(torch.ones(2, 4, device="cuda:0"))
    first = t.summary.first_offence
    assert (first["class"], first["module"], first["op"]) == (SYNC, "0", "cuda::synchronize")
    assert t.summary.counts[SYNC] == 1, t.summary.counts


def test_pinned_host_memory_and_its_non_blocking_upload():
    x = torch.arange(6.0).pin_memory()
    assert x.is_pinned() and x[2:].is_pinned() and not torch.ones(2).is_pinned()
    assert torch.empty(3, pin_memory=True).is_pinned()
    model = nn.Sequential(nn.Linear(6, 2)).to("cuda:0")
    with torch.no_grad(), Tracer(model) as t:
        model(x.to("cuda:0", non_blocking=True)[None])
    assert t.summary.verdict == "clean" and t.summary.inside > 0


def test_a_gradient_sent_to_the_host_by_a_tensor_hook_is_a_recorded_device_error():
    """PyTorch checks what a tensor hook returns (check_variable_result) after the hook; the
    error comes out of backward(), outside every module: recorded even when caught."""
    model = nn.Sequential(nn.Linear(4, 4)).to("cuda:0")
    with Tracer(model, keep_events=True) as t:
        y = model(torch.ones(2, 4, device="cuda:0", requires_grad=True))
        y.register_hook(lambda grad: grad.cpu())
        with pytest.raises(RuntimeError) as raised:
            y.sum().backward()
    message = (
        "hook '<lambda>' has changed the type of value (was torch.cuda.FloatTensor got torch.FloatTensor)"
    )
    assert str(raised.value) == message
    first = t.summary.first_offence
    assert (first["class"], first["module"]) == (MISMATCH, None), first
    assert "test_a_gradient_sent_to_the_host" in first["source"]


def test_inputs_and_outputs_nested_in_a_users_own_objects_are_the_runs_edge():
    """Uploads of tensors the call was given inside a dataclass or a dict of lists, and
    downloads returned inside a dataclass, are the run's inputs and outputs; a tensor held by
    another object passed in (a cache, say) is state: its upload is the model's own."""
    from dataclasses import dataclass

    @dataclass
    class Out:
        y: torch.Tensor
        kept: dict

    class Box:
        def __init__(self, t):
            self.t = t

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, batch, box):
            x = batch["x"][0].to("cuda:0") + box.t.to("cuda:0")
            y = self.proj(x)
            return Out(y, {"host": [y.detach().cpu()]})

    model = Model().to("cuda:0")
    with torch.no_grad(), Tracer(model, keep_events=True) as t:
        model({"x": [torch.ones(2, 4)]}, Box(torch.ones(4)))
    assert t.summary.first_offence["source"].endswith("Model.forward"), t.summary.first_offence
    moved = sorted((e.transfer["from"], e.transfer["to"], e.cls) for e in t.events if e.transfer)
    assert moved == [("cpu", "cuda:0", ALLOWED), ("cpu", "cuda:0", TRANSFER), ("cuda:0", "cpu", ALLOWED)]


def test_a_module_spread_over_two_devices_may_compute_on_either():
    """Expert parallelism: the module that hands experts on cuda:1 their tokens may weigh their
    results there; a module placed on one device computing on another is still a stray."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")

    class Combine(nn.Module):
        def __init__(self):
            super().__init__()
            self.near, self.far = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            w = x.sum(-1, keepdim=True)
            far = self.far(x.to("cuda:1")) * w.to("cuda:1")  # weighed on cuda:1, in this module
            return self.near(x) + far.to("cuda:0")

    class Leaf(nn.Module):
        def forward(self, x):
            return (x.to("cuda:1") * 2).to("cuda:0")  # placed on cuda:0, computes on cuda:1

    model = nn.Sequential(Combine(), Leaf()).to("cuda:0")
    model[0].far.to("cuda:1")
    placement = {"": "cuda:0", "0.far": "cuda:1"}
    with torch.no_grad(), Tracer(model, placement=placement, keep_events=True) as t:
        model(torch.ones(2, 4, device="cuda:0"))
    strays = [(e.module, e.op) for e in t.events if e.cls == STRAY]
    assert strays == [("1", "aten.mul.Tensor")], strays


class _CTCLoss(nn.Module):
    def forward(self, log_probs, targets, input_lengths, target_lengths, reduction):
        return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction=reduction)


def _traced_ctc(mode: str, lengths_device: str, reduction: str):
    """F.ctc_loss inside a module on cuda:0 (log_probs and targets there), traced in a grad mode
    (with grad, through a backward pass): (loss, log_probs' grad or None, the tracer, the
    untraced loss and grad on the CPU)."""
    torch.manual_seed(0)
    logits = torch.randn(9, 2, 5)
    targets = torch.tensor([[1, 2, 3], [2, 3, 4]])
    lengths = torch.tensor([9, 7]), torch.tensor([3, 2])
    want_in = logits.clone().requires_grad_()
    want = F.ctc_loss(want_in.log_softmax(-1), targets, *lengths, reduction=reduction)
    want.backward()
    model = _CTCLoss().to("cuda:0")
    x = logits.to("cuda:0").requires_grad_(mode == "grad")
    with GRAD_MODES[mode](), Tracer(model, keep_events=True) as t:
        got = model(
            x.log_softmax(-1), targets.to("cuda:0"), *(n.to(lengths_device) for n in lengths), reduction
        )
        if mode == "grad":
            got.backward()
    return got, x.grad, t, want.detach(), want_in.grad


def _length_reads(t: Tracer) -> list[tuple]:
    """(op, class, module) of the traced copies of a [2] int64 tensor (the lengths) to the host."""
    return [
        (e.op, e.cls, e.module)
        for e in t.events
        if e.inputs
        and e.inputs[0].device != "cpu"
        and (e.inputs[0].dtype, e.inputs[0].shape) == ("int64", (2,))
        and [o.device for o in e.outputs or ()] == ["cpu"]
    ]


@pytest.mark.parametrize("mode", MODES)
def test_ctc_loss_takes_host_lengths_as_untraced_cuda_does(mode):
    """Untraced, `ctc_loss` with length tensors copies them to the host and calls the int-list
    overload; under any dispatch mode (a tracer, the emulation) PyTorch's C++ would call
    `_ctc_loss.Tensor` instead, whose CUDA wrapper refuses host lengths (torch 2.11 on an H100),
    and divide by the host lengths on the device. Traced, the call runs as untraced CUDA runs it:
    host lengths with log_probs on the device are accepted, forward and backward, and nothing
    reads the lengths off the device."""
    lp = rules.Operand("log_probs", "cuda:0", "float32", (9, 2, 5))
    tg = rules.Operand("targets", "cuda:0", "int64", (2, 3))
    host = [rules.Operand(n, "cpu", "int64", (2,)) for n in ("input_lengths", "target_lengths")]
    assert "input_lengths is on cpu" in rules.refusal("aten._ctc_loss.Tensor", [lp, tg, *host])
    assert (
        rules.refusal("aten._ctc_loss.Tensor", [lp, tg, *(o._replace(device="cuda:0") for o in host)]) is None
    )
    for reduction in ("mean", "sum"):
        got, grad, t, want, want_grad = _traced_ctc(mode, "cpu", reduction)
        assert got.device == torch.device("cuda:0") and torch.allclose(got.detach().cpu(), want)
        if mode == "grad":
            assert grad.device == torch.device("cuda:0") and torch.allclose(grad.cpu(), want_grad, atol=1e-6)
        ops = [e.op for e in t.events]
        assert "aten._ctc_loss.Tensor" not in ops and "aten._ctc_loss_backward.Tensor" not in ops
        assert any(op in ops for op in ("aten._ctc_loss.default", "aten._cudnn_ctc_loss.default")), ops
        assert [e.op for e in t.events if e.cls == MISMATCH] == [] and t.summary.error is None
        assert _length_reads(t) == []


@pytest.mark.parametrize("mode", MODES)
def test_ctc_loss_reads_device_lengths_on_the_host(mode):
    """Length tensors on the device are copied to the host by `ctc_loss` itself (untraced too):
    the tracer records each copy, inside the model a `sync`, as it records `nonzero`."""
    got, grad, t, want, want_grad = _traced_ctc(mode, "cuda:0", "mean")
    assert got.device == torch.device("cuda:0") and torch.allclose(got.detach().cpu(), want)
    if mode == "grad":
        assert torch.allclose(grad.cpu(), want_grad, atol=1e-6)
    assert _length_reads(t) == [("aten._to_copy.default", SYNC, "")] * 2
    assert [e.op for e in t.events if e.cls == MISMATCH] == [] and t.summary.error is None


def test_ctc_loss_in_cudnn_form_takes_host_targets():
    """Host int32 targets, concatenated, with every input length the full length and blank 0:
    real CUDA runs `_cudnn_ctc_loss`, which wants the targets on the host (checkBackend), not on
    log_probs' device; traced, that is no mismatch (the emulation, as CUDA without cuDNN, runs
    `_ctc_loss` on targets it uploads)."""
    lp = rules.Operand("log_probs", "cuda:0", "float32", (9, 2, 5))
    tg = rules.Operand("targets", "cpu", "int32", (5,))
    assert rules.refusal("aten._cudnn_ctc_loss.default", [lp, tg]) is None
    assert "CPU Backend" in rules.refusal("aten._cudnn_ctc_loss.default", [lp, tg._replace(device="cuda:0")])
    torch.manual_seed(0)
    log_probs = torch.randn(9, 2, 5).log_softmax(-1)
    targets = torch.tensor([1, 2, 3, 2, 4], dtype=torch.int32)
    lengths = torch.tensor([9, 9], dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32)
    want = F.ctc_loss(log_probs, targets, *lengths, reduction="sum")
    model = _CTCLoss().to("cuda:0")
    with torch.no_grad(), Tracer(model, keep_events=True) as t:
        got = model(log_probs.to("cuda:0"), targets, *lengths, "sum")
    assert torch.allclose(got.cpu(), want, rtol=1e-4)
    assert [e.op for e in t.events if e.cls == MISMATCH] == [] and t.summary.error is None
    assert any(e.op in ("aten._ctc_loss.default", "aten._cudnn_ctc_loss.default") for e in t.events)


def test_an_in_place_restride_of_a_device_tensor_is_followed():
    """transpose_, t_, unsqueeze_, squeeze_, as_strided_ change a tensor's sizes and strides in
    place (stft ends with one): the emulated tensor follows, as CUDA's would."""
    x = torch.arange(24.0).reshape(2, 3, 4)
    y = x.to("cuda:0")
    y.transpose_(0, 2)
    y.unsqueeze_(0)
    assert y.shape == (1, 4, 3, 2) and torch.equal(y.cpu(), x.transpose(0, 2)[None])
    wave = torch.sin(torch.arange(64.0))
    spec = torch.stft(wave.to("cuda:0"), 8, window=torch.hann_window(8, device="cuda:0"), return_complex=True)
    # cuFFT and the CPU's FFT round differently: bins near 0 differ by about 1e-7
    want = torch.stft(wave, 8, window=torch.hann_window(8), return_complex=True)
    assert torch.allclose(spec.cpu(), want, atol=1e-5)
