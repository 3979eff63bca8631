"""The tracer: each class of event caught and located on the tiny model, on an accelerator.

The accelerator is the emulated CUDA (CUDA's device rules, real values, on the CPU) and, under
`pytest -m cuda` on a GPU runner, real CUDA; the `accel` fixture gives both the same tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from harness.model.generate import generate
from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN, Mixtral, MoE
from harness.quant import fused
from harness.synth import synthesize
from harness.trace import ALLOWED, CLEAN, DIRTY, ERROR, MISMATCH, OK, STRAY, SYNC, TRANSFER, Tracer

CPU = torch.device("cpu")


@dataclass
class Accel:
    name: str
    device: str  # where the model goes
    context: object  # () -> context manager in which the device exists

    def __call__(self):
        return self.context()


def _emulated() -> Accel:
    try:
        from harness.trace.emulated import EmulatedCuda
    except ImportError:
        pytest.skip("the emulated accelerator (harness.trace.emulated) is not here")
    return Accel("emulated", "cuda", lambda: EmulatedCuda(device_count=2))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are small: intra-op threads only contend (badly, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["emulated", pytest.param("cuda", marks=pytest.mark.cuda)])
def accel(request) -> Accel:
    if request.param == "emulated":
        return _emulated()
    return Accel("cuda", "cuda", contextlib.nullcontext)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    # TheBloke's layout: one tensor per expert, the router in F16 (candle#1815's setting).
    return synthesize(
        tmp_path_factory.mktemp("trace") / "tiny.gguf", "tiny", layout="per-expert", router="f16"
    )


@pytest.fixture(scope="module")
def model(accel, tiny_path):
    with accel():
        return Mixtral.from_gguf(tiny_path, device=accel.device, max_seq_len=32)


@pytest.fixture
def on(accel):
    """The accelerator in effect for the test."""
    with accel():
        yield accel


TOKENS = [1, 5, 9]


def _tokens() -> torch.Tensor:
    return torch.tensor(TOKENS)


# -- clean runs ---------------------------------------------------------------------------------


def test_clean_run_on_the_accelerator(model, on):
    with Tracer(model) as tracer:
        out = generate(model, TOKENS, 3)
    s = tracer.summary
    assert len(out.tokens) == 3
    assert s.verdict == CLEAN and s.first_offence is None
    assert s.counts[MISMATCH] == s.counts[STRAY] == s.counts[SYNC] == s.counts[TRANSFER] == 0
    # It saw the model's ops: the torch path runs ~1,400; the fused path (real CUDA) 8 ops a
    # layer and a few around them, per call (a prefill and two decode steps, two layers).
    assert s.counts[OK] > (3 * 2 * 8 if fused.runs_on(torch.device(on.device)) else 1000)
    # The token upload and the reads of each chosen id are the edges of the run.
    upload = [t for t in s.transfers if t["from"] == "cpu"]
    assert upload == [
        {
            "from": "cpu",
            "to": "cuda:0",
            "class": ALLOWED,
            "explicit": True,
            "why": "input",
            "module": "",
            "count": 1,
            "bytes": 8 * len(TOKENS),
        }
    ]
    assert s.steps == {"traced": 3, "skipped": 0}
    # Inside the model only the prompt's upload moved bytes (in the first call); the decode
    # steps take their token on the device.
    assert s.bytes_per_call == {"h2d": 8 * len(TOKENS) / 3, "d2h": 0, "d2d": 0}
    assert s.bytes_per_token == {"h2d": 0, "d2h": 0, "d2d": 0}
    assert set(s.modules["layers.1.moe.experts"]) == {"cuda:0"}


def test_clean_run_on_the_cpu(tiny_path):
    model = Mixtral.from_gguf(tiny_path, device="cpu", max_seq_len=32)
    with Tracer(model) as tracer:
        generate(model, TOKENS, 2)
    s = tracer.summary
    assert s.verdict == CLEAN
    assert s.counts[ALLOWED] == s.counts[TRANSFER] == 0  # nothing crosses a device
    assert s.counts[OK] == s.events


def test_weights_are_named_where_they_are_read(model, on):
    with fused.disabled(), Tracer(model, keep_events=True) as tracer:  # the torch path
        model(_tokens(), 0)  # prefill: the dense expert path (one expert at a time)
        model(torch.tensor([7], device=on.device), 3)  # decode: the gather path
    names: dict[str, set] = {}
    for ev in tracer.events:
        names.setdefault(ev.module, set()).update(ev.tensors or ())
    assert names["embed"] == {"token_embd.weight"}
    assert names["layers.0.attn.wq"] == {"blk.0.attn_q.weight"}
    assert names["layers.1.moe.router"] == {"blk.1.ffn_gate_inp.weight"}
    assert names["layers.1.attn_norm"] == {"blk.1.attn_norm.weight"}
    assert {f"blk.0.ffn_down.{e}.weight" for e in range(4)} <= names["layers.0.moe.experts"]
    # The dense path takes one expert by a view of the stack: the ops reading that view name
    # that expert alone.
    single = {ev.tensors for ev in tracer.events if ev.module == "layers.0.moe.experts" and ev.step == 0}
    assert {("blk.0.ffn_gate.2.weight",), ("blk.0.ffn_down.3.weight",)} <= single
    # Sources point into the model code.
    router_ops = [ev for ev in tracer.events if ev.module == "layers.0.moe.router"]
    assert any(ev.source.startswith("harness/quant/qmatmul.py:") for ev in router_ops)


def test_fused_kernels_are_one_op_that_names_its_weights(model, on):
    if not fused.runs_on(torch.device(on.device)):
        pytest.skip("the fused kernels run on real CUDA (and on the CPU under Triton's interpreter)")
    with Tracer(model, keep_events=True) as tracer:
        model(_tokens(), 0)
    experts = [ev for ev in tracer.events if ev.module == "layers.0.moe.experts"]
    moe = [ev for ev in experts if "moe_ffn" in ev.op]
    assert len(moe) == 1, [ev.op for ev in experts]  # all chosen experts of the layer, one launch
    assert {f"blk.0.ffn_{p}.{e}.weight" for p in ("gate", "up", "down") for e in range(4)} <= set(
        moe[0].tensors
    )
    attn = [ev for ev in tracer.events if ev.module == "layers.0.attn"]  # q, k, v: one product
    assert [ev.tensors for ev in attn if "qkv" in ev.op] == [tuple(f"blk.0.attn_{p}.weight" for p in "qkv")]
    assert tracer.summary.verdict == CLEAN


# -- mismatch -------------------------------------------------------------------------------------


def test_router_dequantized_on_the_cpu_is_a_mismatch(model, on):
    """candle#1815: the F16 router weight left on the CPU; the MoE forward fails on the device."""
    router = model.layers[0].moe.router
    on_device = router.weight
    router.weight = on_device.to(CPU)
    try:
        with Tracer(model, keep_events=True) as tracer:
            with pytest.raises(RuntimeError, match="same device") as raised:
                model(_tokens(), 0)
            after = torch.ones(2, device=on.device) * 2  # outside the model again
    finally:
        router.weight = on_device
    f = tracer.summary.first_offence
    assert tracer.summary.verdict == DIRTY
    assert f["class"] == MISMATCH
    assert f["module"] == "layers.0.moe.router"
    assert f["tensor"] == "blk.0.ffn_gate_inp.weight"
    if fused.runs_on(torch.device(on.device)):  # routing is one op, the router's product inside
        assert f["op"] == "harness.router_topk.default"
        assert f["source"].startswith("harness/model/mixtral.py:") and "Router.forward" in f["source"]
    else:
        assert "mm" in f["op"] or "matmul" in f["op"]
        assert f["source"].startswith("harness/quant/qmatmul.py:")
    assert set(f["devices"]) == {"cuda:0", "cpu"} and f["expected"] == "cuda:0"
    assert f["error"] == f"RuntimeError: {raised.value}"  # recorded, then re-raised unchanged
    assert any("MoE.forward" in frame for frame in f["stack"])
    # The failing op was recorded before it ran (no outputs); the module stack unwound with the
    # exception, so the next op is outside the model.
    failed = next(ev for ev in tracer.events if ev.error)
    assert failed.outputs is None and failed.cls == MISMATCH
    assert tracer.events[-1].module is None and after.device.type == on.device


def test_meta_run_judged_by_cuda_rules(tiny_path):
    """Meta accepts a CPU weight in a matmul where CUDA does not: the tracer still calls it a mismatch."""
    model = Mixtral.from_gguf(tiny_path, device="meta", max_seq_len=32)
    router = model.layers[1].moe.router
    router.weight = torch.zeros(router.weight.shape)
    with Tracer(model) as tracer:
        model(_tokens(), 0)  # runs to the end on meta
    f = tracer.summary.first_offence
    assert (f["class"], f["module"], f["tensor"], f["error"]) == (
        MISMATCH,
        "layers.1.moe.router",
        "blk.1.ffn_gate_inp.weight",
        None,
    )
    assert f["devices"] == ["meta", "cpu"]


# -- sync and stray: faults injected into the routing ----------------------------------------------


def _route(self, x, residual, hook):
    logits = self.router(x)  # [T, E]
    logits = hook(logits)
    probs = logits.float().softmax(-1)
    weights, chosen = probs.topk(self.n_used, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=ROUTER_WEIGHT_SUM_MIN)
    return self.experts(x, weights.to(x.device), chosen.to(x.device), residual)


def _item_in_routing(logits):
    if logits.max().item() > 1e9:  # a host read of routing data
        raise AssertionError
    return logits


def _host_mask(logits):
    mask = torch.zeros(logits.shape, dtype=torch.bool)  # built on the host
    return logits.masked_fill(mask.to(logits.device), float("-inf"))


def _cpu_topk(logits):
    top = logits.cpu().topk(2, dim=-1).values  # a CPU top-k inside the device model
    return logits + F.pad(top, (0, logits.shape[-1] - 2)).to(logits.device) * 0


@pytest.mark.parametrize(
    ("hook", "cls", "op", "line"),
    [
        (_item_in_routing, SYNC, ("aten._local_scalar_dense", "aten.item"), "logits.max().item()"),
        (_host_mask, STRAY, ("aten.zeros",), "torch.zeros(logits.shape"),
        (_cpu_topk, SYNC, ("aten._to_copy", "aten.to"), "logits.cpu().topk"),
    ],
    ids=["item", "host-mask", "cpu-topk"],
)
def test_routing_faults_are_caught_where_they_are(model, on, monkeypatch, hook, cls, op, line):
    monkeypatch.setattr(MoE, "forward", lambda self, x, residual=None: _route(self, x, residual, hook))
    with Tracer(model, keep_events=hook is _cpu_topk) as tracer:
        model(_tokens(), 0)
    s = tracer.summary
    f = s.first_offence
    assert s.verdict == DIRTY and f["class"] == cls
    assert f["module"] == "layers.0.moe"
    assert f["op"].startswith(op)
    assert f["source"].startswith("tests/test_trace_tracer.py:")
    assert line in f["code"]
    assert s.counts[MISMATCH] == 0  # nothing was refused: the run went through
    if hook is _host_mask:
        moved = [t for t in s.transfers if t["class"] == TRANSFER]
        assert moved and moved[0]["from"] == "cpu" and moved[0]["to"] == "cuda:0"
    if hook is _cpu_topk:
        strays = [ev for ev in tracer.events if ev.cls == STRAY]
        assert any(ev.op.startswith("aten.topk") and ev.devices == ["cpu"] for ev in strays)


# -- transfers ------------------------------------------------------------------------------------


def test_device_map_boundary_is_an_allowed_transfer(tiny_path, on):
    device_map = {"embed": "cpu", "layers.0": "cpu", "layers.1": "cuda:0", "head": "cuda:0"}
    model = Mixtral.from_gguf(tiny_path, device_map=device_map, max_seq_len=32)
    with Tracer(model, keep_events=True) as tracer:
        generate(model, TOKENS, 2)
    s = tracer.summary
    assert s.verdict == CLEAN and s.counts[TRANSFER] == 0
    crossing = [ev for ev in tracer.events if ev.transfer and ev.transfer["to"] == "cuda:0"]
    assert crossing and all(ev.cls == ALLOWED and ev.module == "" for ev in crossing)
    assert all(ev.transfer["bytes"] == ev.inputs[0][3] for ev in crossing)
    assert set(s.modules["layers.0.attn"]) == {"cpu"} and set(s.modules["layers.1.attn"]) == {"cuda:0"}


def test_two_device_split(tiny_path, on):
    if on.name != "emulated" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    device_map = {"embed": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:1", "head": "cuda:1"}
    model = Mixtral.from_gguf(tiny_path, device_map=device_map, max_seq_len=32)
    with Tracer(model) as tracer:
        model(_tokens(), 0)
    s = tracer.summary
    assert s.verdict == CLEAN
    d2d = [t for t in s.transfers if (t["from"], t["to"]) == ("cuda:0", "cuda:1")]
    assert d2d and d2d[0]["class"] == ALLOWED


def test_undeclared_move_inside_a_layer_is_a_transfer(model, on, monkeypatch):
    moved = []

    def forward(self, x, residual=None):
        bias = torch.zeros(x.shape[-1]).to(x.device)  # a host-made constant uploaded every call
        moved.append(bias.device.type)
        return _route(self, x + bias, residual, lambda logits: logits)

    monkeypatch.setattr(MoE, "forward", forward)
    with Tracer(model, keep_events=True) as tracer:
        model(_tokens(), 0)
    uploads = [ev for ev in tracer.events if ev.cls == TRANSFER]
    assert moved == [on.device, on.device]
    assert [ev.module for ev in uploads] == ["layers.0.moe", "layers.1.moe"]
    assert uploads[0].transfer == {"from": "cpu", "to": "cuda:0", "bytes": 4 * 256, "explicit": True}


# -- the record and the stack ---------------------------------------------------------------------


def test_the_record_is_made_before_a_raising_op():
    a, b = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(RuntimeError) as plain:
        a @ b
    with Tracer(keep_events=True) as tracer, pytest.raises(RuntimeError) as traced:
        a @ b
    assert type(traced.value) is type(plain.value) and str(traced.value) == str(plain.value)
    ev = tracer.events[-1]
    assert ev.error == f"RuntimeError: {plain.value}"
    assert ev.outputs is None and [s[2] for s in ev.inputs] == [(2, 3), (2, 3)]
    assert ev.cls == OK  # a shape error is no device problem
    assert ev.source.startswith("tests/test_trace_tracer.py:")


def test_sampled_mode_traces_every_nth_forward(model, on, tmp_path):
    with Tracer(model, path=tmp_path / "t.jsonl", sample_every=2) as tracer:
        generate(model, TOKENS, 5)  # 5 forward calls: 0 (prefill) ... 4
    s = tracer.summary
    assert s.steps == {"traced": 3, "skipped": 2}
    assert s.verdict == CLEAN
    from harness.trace import load_trace

    assert {ev.step for ev in load_trace(tmp_path / "t.jsonl").events()} == {0, 2, 4}

    with Tracer(model, sample_every=2, unsampled="count") as counting:
        generate(model, TOKENS, 2)
    assert counting.summary.unrecorded > 0
    assert counting.summary.steps == {"traced": 1, "skipped": 1}


def test_tracer_leaves_no_trace_behind(model, on):
    from torch.nn.modules import module as nn_module
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    modes = list(_get_current_dispatch_mode_stack())
    hooks = (len(nn_module._global_forward_pre_hooks), len(nn_module._global_forward_hooks))
    call = nn_module.Module.__call__
    with Tracer(model, sample_every=2):
        assert nn_module.Module.__call__ is not call  # module calls are watched
        generate(model, TOKENS, 2)
    with pytest.raises(ValueError), Tracer(model, sample_every=2):
        generate(model, TOKENS, 2)
        raise ValueError  # leaving after a skipped step
    assert list(_get_current_dispatch_mode_stack()) == modes
    assert (len(nn_module._global_forward_pre_hooks), len(nn_module._global_forward_hooks)) == hooks
    assert nn_module.Module.__call__ is call
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_two_tracers_at_once_each_keep_their_module_stack(model, on):
    """Module calls are watched for each tracer: a sampled one inside a full one, which goes on
    watching while the inner one skips its steps, see what each sees alone."""

    def seen(tracer):
        return [(e.step, e.module, e.op) for e in tracer.events]

    with Tracer(model, keep_events=True) as alone:
        generate(model, TOKENS, 3)
    with Tracer(model, keep_events=True, sample_every=2) as sampled_alone:
        generate(model, TOKENS, 3)
    with Tracer(model, keep_events=True) as outer, Tracer(model, keep_events=True, sample_every=2) as inner:
        generate(model, TOKENS, 3)
    assert seen(outer) == seen(alone) and seen(inner) == seen(sampled_alone)
    assert {e.step for e in inner.events} == {0, 2} and {e.step for e in outer.events} == {0, 1, 2}
    assert outer.verdict == inner.verdict == CLEAN
    assert outer._stack == [] and inner._stack == []


# -- threads --------------------------------------------------------------------------------------


def test_a_module_call_runs_what_torch_would_run_under_the_tracer():
    """While a tracer watches module calls, a call runs the module's `_call_impl` (its hooks and
    forward) as `nn.Module.__call__` does, or its `_compiled_call_impl` where it has one (what
    `module.compile()` sets), and its ops are named by the module either way."""

    class Inner(torch.nn.Module):
        def forward(self, x):
            return x * 2

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x) + 1

    model, x = Outer(), torch.ones(2)
    hooked = []
    model.inner.register_forward_hook(lambda m, args, out: hooked.append(out.clone()))
    with Tracer(model, keep_events=True) as tracer:
        out = model(x)
    assert out.tolist() == [3.0, 3.0] and [h.tolist() for h in hooked] == [[2.0, 2.0]]
    assert [(ev.module, ev.op) for ev in tracer.events] == [
        ("inner", "aten.mul.Tensor"),
        ("inner", "aten.clone.default"),  # the hook's
        ("", "aten.add.Tensor"),
    ]
    compiled = []

    def compiled_call(*args, **kwargs):  # stands in for what torch.compile would run
        compiled.append(args)
        return torch.nn.Module._call_impl(model.inner, *args, **kwargs) - 5

    model.inner._compiled_call_impl = compiled_call
    with Tracer(model, keep_events=True) as tracer:
        out = model(x)
    assert len(compiled) == 1 and out.tolist() == [-2.0, -2.0]
    assert [(ev.module, ev.op) for ev in tracer.events][2:] == [
        ("inner", "aten.sub.Tensor"),  # compiled_call's own
        ("", "aten.add.Tensor"),
    ]


def test_modules_run_by_another_thread_do_not_disturb_the_module_stack(tiny_path, monkeypatch):
    """Module hooks are global: a module that another thread runs while the model is traced
    must not push or pop the traced model's module stack (its ops are not traced at all)."""
    import threading

    model = Mixtral.from_gguf(tiny_path, device="cpu", max_seq_len=32)
    other = torch.nn.Linear(4, 4)
    entered, release = threading.Event(), threading.Event()

    def blocking_forward(x):
        entered.set()
        release.wait(10)
        return x * 2

    other.forward = blocking_forward
    worker = threading.Thread(target=lambda: other(torch.ones(4)))
    moe_forward = MoE.forward

    def moe_with_the_other_thread(self, x, residual=None):
        release.set()  # the other thread's module ends here, inside layers.N.moe
        worker.join(10)
        return moe_forward(self, x, residual)

    monkeypatch.setattr(MoE, "forward", moe_with_the_other_thread)
    with Tracer(model, keep_events=True) as tracer:
        worker.start()
        assert entered.wait(10)  # its pre-hook ran while the tracer was active
        model(_tokens(), 0)
    assert not worker.is_alive()
    modules = {e.module for e in tracer.events}
    assert "layers.0.moe.router" in modules and "layers.1.moe.experts" in modules
    # The MoE's own ops (after the other thread ended inside it) still belong to it.
    assert any(e.module == "layers.0.moe" and e.op.startswith("aten.topk") for e in tracer.events)
    assert all(e.op != "aten.mul.Tensor" or e.module is not None for e in tracer.events)  # x * 2 untraced
    assert tracer._stack == [] and tracer.summary.verdict == CLEAN


# -- any model, with one expected device ------------------------------------------------------------


class _Scale(torch.nn.Module):
    def __init__(self, through_host: bool):
        super().__init__()
        self.through_host = through_host

    def forward(self, h):
        if self.through_host:
            return (h.cpu() * 2).to(h.device)  # a round trip through the host
        return h * 2


class _Net(torch.nn.Module):
    """A small model that is not a Mixtral: two linear layers around a scaling step."""

    def __init__(self, host_step: bool = False):
        super().__init__()
        self.first = torch.nn.Linear(8, 8)
        self.scale = _Scale(host_step)
        self.second = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.second(self.scale(torch.relu(self.first(x))))


def test_any_model_traced_against_one_device(on):
    net = _Net().to(on.device)
    x = torch.randn(3, 8).to(on.device)
    with torch.no_grad(), Tracer(net, placement=on.device, keep_events=True) as tracer:
        net(x)
    assert tracer.summary.verdict == CLEAN
    assert tracer.placement.describe() == {"": "cuda:0"}
    assert {e.expected for e in tracer.events if e.module} == {"cuda:0"}
    assert {e.module for e in tracer.events} >= {"first", "second"}

    # A weight left on the CPU: the backend refuses the matmul, and the tracer says where.
    net.second.to("cpu")
    with torch.no_grad(), Tracer(net, placement=on.device) as tracer, contextlib.suppress(RuntimeError):
        net(x)
    f = tracer.summary.first_offence
    assert f["class"] == MISMATCH and f["module"] == "second" and set(f["devices"]) == {"cpu", "cuda:0"}

    # A host round trip inside the model: a sync, then a stray CPU op, at the line that did it.
    net = _Net(host_step=True).to(on.device)
    with torch.no_grad(), Tracer(net, placement=on.device, keep_events=True) as tracer:
        net(x)
    f = tracer.summary.first_offence
    assert f["class"] == SYNC and f["module"] == "scale" and "h.cpu() * 2" in f["code"]
    strays = [e for e in tracer.events if e.cls == STRAY]
    assert [(e.op, e.module, e.devices) for e in strays] == [("aten.mul.Tensor", "scale", ["cpu"])]
    assert [t["class"] for t in tracer.summary.transfers] == [SYNC, TRANSFER]  # out and back


# -- device errors raised before any aten op --------------------------------------------------------


class _Attend(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)  # checks devices in C++, before any aten op


class _Grid(torch.nn.Module):
    def forward(self, a, b):
        return torch.meshgrid(a, b, indexing="ij")


class _Outer(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *xs):
        return self.inner(*xs)


@pytest.mark.parametrize(
    ("inner", "make", "line"),
    [
        (
            _Attend,
            lambda d: (torch.randn(2, 3, 4), torch.randn(2, 5, 4).to(d), torch.randn(2, 5, 4).to(d)),
            "scaled_dot_product_attention(q, k, v)",
        ),
        (_Grid, lambda d: (torch.arange(3), torch.arange(2).to(d)), "torch.meshgrid(a, b"),
    ],
    ids=["sdpa", "meshgrid"],
)
def test_a_device_error_raised_before_any_aten_op_is_a_mismatch(on, inner, make, line):
    model = _Outer(inner())
    xs = make(on.device)
    with Tracer(model, placement=on.device) as tracer, pytest.raises(RuntimeError, match="device"):
        model(*xs)
    s = tracer.summary
    f = s.first_offence
    assert s.verdict == DIRTY and s.counts[MISMATCH] == 1  # once, not again for the outer module
    assert f["class"] == MISMATCH and f["module"] == "inner" and f["op"] == "<raised before any aten op>"
    assert set(f["devices"]) == {"cpu", "cuda:0"}
    assert f["source"].startswith("tests/test_trace_tracer.py:") and line in f["code"]
    assert any(line in frame for frame in f["stack"])


def test_an_error_an_op_raised_is_recorded_once(tiny_path, on):
    model = Mixtral.from_gguf(tiny_path, device=on.device, max_seq_len=32)
    router = model.layers[0].moe.router
    router.weight = router.weight.to("cpu")  # candle#1815
    with Tracer(model) as tracer, pytest.raises(RuntimeError):
        model(_tokens(), 0)
    assert tracer.summary.counts[MISMATCH] == 1
    routed_in_one_op = fused.runs_on(torch.device(on.device))
    assert tracer.summary.first_offence["op"].startswith(
        "harness.router_topk" if routed_in_one_op else "aten."
    )


def test_a_non_device_error_makes_the_run_an_error_not_clean(on):
    class Bad(torch.nn.Module):
        def forward(self, x):
            x = x * 2
            raise ValueError("not about devices")

    model = _Outer(Bad())
    with Tracer(model, placement=on.device) as tracer, pytest.raises(ValueError):
        model(torch.ones(2).to(on.device))
    s = tracer.summary
    assert s.verdict == ERROR and s.counts[MISMATCH] == 0 and s.first_offence is None
    assert s.error["error"] == "ValueError: not about devices" and s.error["module"] == "inner"
    assert s.error["source"].startswith("tests/test_trace_tracer.py:")
    assert "ValueError: not about devices" in s.verdict.explanation
    with pytest.raises(AssertionError, match="not a device error"):
        s.assert_clean()

    # Swallowed inside the block, it still left the model: the run did not finish.
    with Tracer(model, placement=on.device) as tracer, contextlib.suppress(ValueError):
        model(torch.ones(2).to(on.device))
    assert tracer.summary.verdict == ERROR


def test_a_tensor_made_on_the_device_from_python_data_is_an_upload(on):
    class Offsets(torch.nn.Module):
        def forward(self, x):
            return x + torch.tensor([1.0, 2.0, 3.0], device=x.device)  # host data, uploaded

    model = _Outer(Offsets())
    with torch.no_grad(), Tracer(model, placement=on.device, keep_events=True) as tracer:
        model(torch.zeros(3).to(on.device))
    moved = [t for t in tracer.summary.transfers if t["class"] == TRANSFER]
    assert moved == [
        {
            "from": "cpu",
            "to": "cuda:0",
            "class": TRANSFER,
            "explicit": True,
            "why": None,
            "module": "inner",
            "count": 1,
            "bytes": 12,
        }
    ]
    upload = next(e for e in tracer.events if e.cls == TRANSFER)
    assert upload.module == "inner" and upload.source.startswith("tests/test_trace_tracer.py:")


@pytest.mark.parametrize("wait", ["torch.cuda", "torch.accelerator"])
def test_a_host_wait_with_no_tensor_op_is_a_sync(on, wait):
    # torch.accelerator.synchronize() reaches the runtime without torch.cuda.synchronize()
    api = torch.cuda if wait == "torch.cuda" else torch.accelerator

    class Timed(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            api.synchronize()  # a leftover timing line: the host waits for the device
            return y

    model = _Outer(Timed())
    with torch.no_grad(), Tracer(model, placement=on.device) as tracer:
        model(torch.zeros(3).to(on.device))
    first = tracer.summary.first_offence
    assert (first["class"], first["module"]) == (SYNC, "inner")
    assert first["source"].startswith("tests/test_trace_tracer.py:")


def test_an_op_dispatched_with_no_python_caller_is_recorded():
    """Autograd runs a CUDA backward's ops on its device threads, straight from C++: the tracer's
    handler is then the outermost Python frame (looking for its caller once raised "call stack
    is not deep enough" in every grad-mode run on a GPU). Here a thread started from C with the
    handler itself as its function stands in for such a thread."""
    import _thread
    import sys
    import time

    model = torch.nn.Linear(4, 4)
    tracer = Tracer(model, keep_events=True)
    a = torch.ones(3)
    errors, done = [], []

    def unraisable(u):
        errors.append(u.exc_value)

    before = sys.unraisablehook
    sys.unraisablehook = unraisable
    try:
        with tracer:
            n = len(tracer.events)
            _thread.start_new_thread(tracer.__torch_dispatch__, (torch.ops.aten.mul.Tensor, (), (a, a)))
            deadline = time.monotonic() + 30
            while len(tracer.events) == n and not errors and time.monotonic() < deadline:
                time.sleep(0.01)
            done.append(len(tracer.events) - n)
    finally:
        sys.unraisablehook = before
    assert not errors, errors
    assert done == [1]
    [ev] = [e for e in tracer.events if e.op == "aten.mul.Tensor"]
    assert ev.source is None and ev.module is None


def test_indexing_with_a_python_list_is_an_upload_on_every_call(on):
    """`h[:, [0, 2, 3]]` makes the list an index tensor on h's device from the host, on every call
    (indexing_tensor_from_data: a host copy uploaded, then its lift_fresh, the op a dispatch mode
    sees; so on an H100): an upload of Python data inside the forward, an offending transfer of
    the index's 24 bytes. An index tensor kept on the device is no upload."""

    class Pick(torch.nn.Module):
        def __init__(self, keep: torch.Tensor | None):
            super().__init__()
            self.keep = keep

        def forward(self, h):
            return h[:, [0, 2, 3] if self.keep is None else self.keep]

    for keep, verdict in ((None, DIRTY), (torch.tensor([0, 2, 3], device=on.device), CLEAN)):
        model = Pick(keep)
        h = torch.randn(2, 8, device=on.device)
        with torch.no_grad(), Tracer(model, placement=on.device, keep_events=True) as tracer:
            out = model(h)
        assert torch.equal(out.cpu(), h.cpu()[:, [0, 2, 3]])
        s = tracer.summary
        assert s.verdict == verdict
        if verdict == DIRTY:
            f = s.first_offence
            assert (f["class"], f["op"], f["module"]) == (TRANSFER, "aten.lift_fresh.default", "")
            assert [t["bytes"] for t in s.transfers if t["class"] == TRANSFER] == [24]


# -- the hot path's caches -------------------------------------------------------------------------


class _Negate(torch.nn.Module):
    def forward(self, x):
        return torch.neg(x)  # one op at one source line, whatever x is


class _Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.step = _Negate()

    def forward(self, x):
        return self.step(x)


def _event_lines(path) -> list[dict]:
    import json

    return [d for d in map(json.loads, path.read_text().splitlines()) if "record" not in d]


def test_an_op_seen_again_on_other_tensors_is_recorded_as_they_are(on, tmp_path):
    """The tracer writes a repeated ok op from what it wrote last time at the same site; the site
    seen again with a tensor on another device, of another dtype or shape, is recorded as that
    tensor is (and judged again), and as before once the tensors are back."""
    model = _Twice()
    xs = [
        torch.ones(2, 4),
        torch.ones(2, 4, device=on.device),
        torch.ones(2, 4, device="meta"),
        torch.ones(2, 4),
        torch.ones(2, 4, dtype=torch.float64),
        torch.ones(3, 4),
        torch.ones(2, 4),
    ]
    path = tmp_path / "t.jsonl"
    with torch.no_grad(), Tracer(model, placement="cpu", path=path) as tracer:
        for x in xs:
            model(x)
    lines = _event_lines(path)
    assert [d["module"] for d in lines] == ["step"] * len(xs)
    assert [d["in"] for d in lines] == [
        [[str(x.device), str(x.dtype).removeprefix("torch."), list(x.shape), x.numel() * x.element_size()]]
        for x in xs
    ]
    assert [d["out"] for d in lines] == [d["in"] for d in lines]
    assert [d["class"] for d in lines] == [OK, STRAY, STRAY, OK, OK, OK, OK]
    assert tracer.summary.counts[OK] == 5 and tracer.summary.counts[STRAY] == 2
    assert tracer.summary.modules == {"step": {"cpu": 5, "cuda:0": 1, "meta": 1}}


def test_counts_stay_whole_when_the_table_of_repeated_events_is_emptied(tiny_path, tmp_path, monkeypatch):
    """The table of repeated ok events is folded into the counters when it is full (every 2
    kinds here): the events counted after that are neither lost nor counted twice, and the
    trace is the one written with the table never full."""
    from harness.trace import tracer as tracer_module

    model = Mixtral.from_gguf(tiny_path, device="cpu", max_seq_len=32)
    summaries, traces = [], []
    for limit in (tracer_module._SEEN_LIMIT, 2):
        monkeypatch.setattr(tracer_module, "_SEEN_LIMIT", limit)
        path = tmp_path / f"limit{limit}.jsonl"
        with Tracer(model, path=path) as tracer:
            generate(model, TOKENS, 3)
        summaries.append(tracer.summary)
        traces.append(_event_lines(path))
    assert traces[0] == traces[1]
    full, folded = summaries
    assert folded.counts == full.counts and folded.modules == full.modules
    assert folded.counts[OK] == full.events == len(traces[0])


def test_repeated_events_are_written_as_the_event_by_event_path_writes_them(model, on, tmp_path):
    """`keep_events=True` sends every event through the classifier and the store's encoder; the
    default writes a repeated ok event from what it wrote the first time. The two traces of the
    same run (the prefill, then decode steps that repeat it op for op) are the same line for
    line, and so are their counts."""
    traces, summaries = [], []
    for keep in (True, False):
        path = tmp_path / f"keep{keep}.jsonl"
        with Tracer(model, path=path, keep_events=keep) as tracer:
            generate(model, TOKENS, 4)
        traces.append(_event_lines(path))
        summaries.append(tracer.summary)
    # a step is about 20 events where the fused ops run (CUDA) and more on the torch path: 4
    # steps and the prefill write at least 50 (100 on the H100)
    assert len(traces[0]) == summaries[0].events >= 50
    assert traces[0] == traces[1]
    assert summaries[0].counts == summaries[1].counts and summaries[0].modules == summaries[1].modules


def test_ops_outside_the_model_are_written_as_the_event_by_event_path_writes_them(on, tmp_path):
    """The caller's own ops between forward calls: an ok op repeated is written from its first
    line, and counted in the summary's modules under its device; a copy across devices stays an
    allowed transfer and an op refused for devices a mismatch every time. The traces with
    `keep_events` (every event through the classifier) and without are the same line for line."""
    model = _Twice()
    here, there = torch.ones(2, 4), torch.ones(2, 4, device=on.device)
    traces, summaries = [], []
    for keep in (True, False):
        path = tmp_path / f"keep{keep}.jsonl"
        with torch.no_grad(), Tracer(model, placement="cpu", path=path, keep_events=keep) as tracer:
            for _ in range(3):
                model(here)
                torch.add(here, here)  # ok, outside the model
                here.to(on.device)  # an upload by the caller: allowed
                with pytest.raises(RuntimeError):
                    torch.add(here, there)  # refused: a mismatch
        traces.append(_event_lines(path))
        summaries.append(tracer.summary)
    assert traces[0] == traces[1]
    outside = [d for d in traces[1] if d["module"] is None]
    assert [d["class"] for d in outside] == [OK, ALLOWED, MISMATCH] * 3
    assert summaries[0].counts == summaries[1].counts
    assert summaries[1].counts[MISMATCH] == 3 and summaries[1].counts[ALLOWED] == 3
    assert summaries[0].modules == summaries[1].modules
    assert summaries[1].modules["<outside>"] == {"cpu": 3 + 3, str(there.device): 3}


def _spec(t: torch.Tensor) -> list:
    return [str(t.device), str(t.dtype).removeprefix("torch."), list(t.shape), t.numel() * t.element_size()]


def test_an_ops_tensors_are_recorded_in_argument_order(tmp_path):
    """An event lists its op's tensors in argument order (inside a list of tensors too, tensors
    given by keyword last), none left out where a Tensor? argument is None or left out, and the
    repeated events written from the first one's line say the same."""
    aten = torch.ops.aten
    x, lo, hi = torch.ones(2, 3), torch.zeros(1, 3), torch.full((2, 1), 2.0, dtype=torch.float64)
    w = torch.ones(3)
    out = torch.empty(2, 3)
    calls = [
        (lambda: aten.clamp.Tensor(x, lo, hi), [x, lo, hi]),
        (lambda: aten.clamp.Tensor(x, None, hi), [x, hi]),  # a None in a Tensor? place
        (lambda: aten.clamp.Tensor(x, lo), [x, lo]),  # a trailing Tensor? left out
        (lambda: aten.cat.default([x, lo], 0), [x, lo]),
        (lambda: aten.add.out(x, lo, out=out), [x, lo, out]),  # by keyword: last
        (lambda: aten.addcmul.default(x, lo, x, value=2), [x, lo, x]),
        (lambda: aten.native_layer_norm.default(x, [3], w, None, 1e-5), [x, w]),  # not side by side
        (lambda: aten.native_layer_norm.default(x, [3], None, w, 1e-5), [x, w]),
    ]
    model = torch.nn.Identity()
    path = tmp_path / "t.jsonl"
    with torch.no_grad(), Tracer(model, placement="cpu", path=path, keep_events=True) as kept:
        for call, _ in calls:
            call()
    fast_path = tmp_path / "fast.jsonl"
    with torch.no_grad(), Tracer(model, placement="cpu", path=fast_path) as fast:
        for _ in range(2):  # the second time, each is a repeat written from the first one's line
            for call, _ in calls:
                call()
    expected = [[_spec(t) for t in tensors] for _, tensors in calls]
    assert [ev.inputs for ev in kept.events] == [
        [tuple(s[:2]) + (tuple(s[2]), s[3]) for s in e] for e in expected
    ]
    assert [d["in"] for d in _event_lines(path)] == expected
    assert [d["in"] for d in _event_lines(fast_path)] == expected * 2
    assert fast.summary.counts == {**kept.summary.counts, OK: 2 * kept.summary.counts[OK]}
