"""The emulated CUDA accelerator: devices, values, CUDA's device rules, the tiny Mixtral on it."""

from __future__ import annotations

import pytest
import torch

from harness.device_tables import TABLES
from harness.errors import EmulationUnsupported
from harness.model.mixtral import Mixtral
from harness.quant import dequant
from harness.quant.qtensor import QTensor
from harness.quant.types import GGMLType
from harness.synth import synthesize
from harness.trace import emulated
from harness.trace.emulated import EmulatedCuda, EmulatedTensor

C0, C1, C2 = (torch.device("cuda", i) for i in range(3))
CPU = torch.device("cpu")
SAME_DEVICE = "Expected all tensors to be on the same device"
TOKENS = [1, 5, 9, 3, 7, 2, 8, 4]

# Real CUDA here would also be fine for most tests, but "back to False" is a CPU-only fact.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the state of a machine without CUDA")


@pytest.fixture
def emu():
    with EmulatedCuda(device_count=4) as ctx:
        yield ctx


# -- factories and moves ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.zeros(2, 3, device="cuda:1"), torch.zeros(2, 3)),
        (lambda: torch.ones(3, device="cuda:1", dtype=torch.float16), torch.ones(3, dtype=torch.float16)),
        (lambda: torch.full((2,), 3.5, device="cuda:1"), torch.full((2,), 3.5)),
        (lambda: torch.arange(5, device="cuda:1"), torch.arange(5)),
        (lambda: torch.arange(1, 7, 2, device=C1), torch.arange(1, 7, 2)),
        (lambda: torch.tensor([[1.0, 2.0]], device="cuda:1"), torch.tensor([[1.0, 2.0]])),
        (lambda: torch.as_tensor([3, 4], device="cuda:1"), torch.tensor([3, 4])),
        (lambda: torch.eye(2, device="cuda:1"), torch.eye(2)),
        (lambda: torch.tensor([1.0], device="cuda:1").new_tensor([5.0, 6.0]), torch.tensor([5.0, 6.0])),
    ],
    ids=["zeros", "ones-f16", "full", "arange", "arange-step", "tensor", "as_tensor", "eye", "new_tensor"],
)
def test_factories_make_cuda_tensors_with_values(emu, make, expected):
    t = make()
    assert isinstance(t, EmulatedTensor)
    assert t.device == C1 and t.is_cuda and t.dtype == expected.dtype
    assert torch.equal(t.cpu(), expected)


def test_bare_cuda_means_the_current_device(emu):
    assert torch.empty(2, device="cuda").device == C0
    torch.cuda.set_device(2)
    assert torch.cuda.current_device() == 2
    assert torch.zeros(1, device="cuda").device == C2
    assert torch.ones(1).cuda().device == C2
    with torch.cuda.device(1):
        assert torch.cuda.current_device() == 1
        assert torch.ones(1).to("cuda").device == C1
    assert torch.cuda.current_device() == 2


def test_randn_uses_the_cpu_generator(emu):
    torch.manual_seed(7)
    a = torch.randn(4, device="cuda:1")
    torch.manual_seed(7)
    assert a.device == C1 and torch.equal(a.cpu(), torch.randn(4))
    g = torch.Generator(device="cuda:1")
    assert g.device == C1 and isinstance(g, torch.Generator)
    g.manual_seed(3)
    b = torch.randn(4, device="cuda:1", generator=g)
    assert torch.equal(b.cpu(), torch.randn(4, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
        torch.randn(4, device="cuda", generator=torch.Generator())


def test_moves_between_devices(emu):
    x = torch.arange(6.0).view(2, 3)
    y = x.to("cuda:1")
    assert y.device == C1 and torch.equal(y.cpu(), x)
    assert x.cuda().device == C0 and x.cuda(2).device == C2
    assert y.to(C1) is y  # no move, no copy
    z = y.to("cuda:3")
    assert z.device == torch.device("cuda", 3) and torch.equal(z.cpu(), x)
    assert y.to(torch.ones(1, device="cuda:2")).device == C2
    back = z.cpu()
    assert type(back) is torch.Tensor and back.device == CPU and torch.equal(back, x)
    assert z.to("cpu").device == CPU
    assert y.tolist() == x.tolist() and float(y[1, 2]) == 5.0 and y.sum().item() == 15.0
    with pytest.raises(TypeError, match="can't convert cuda:1 device type tensor to numpy"):
        y.numpy()


def test_device_numbers_name_the_accelerator(emu):
    # On a CUDA build a bare number is a CUDA device: accelerate's device maps use them.
    assert torch.device(2) == C2
    assert torch.nn.Linear(2, 2).to(1).weight.device == C1
    assert torch.nn.Linear(2, 2).to(2, torch.float16).weight.dtype == torch.float16
    assert torch.ones(2).to(3).device == torch.device("cuda", 3)
    assert torch.zeros(2, device=1).device == C1


def test_jobs_of_a_thread_pool_run_on_the_emulated_devices(emu):
    # transformers' from_pretrained moves weights to their devices in a pool; torch's modes are per thread
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        moved = pool.submit(lambda t: t.to("cuda:1"), torch.arange(3.0)).result()
        made = pool.submit(torch.ones, 2, device="cuda:2").result()
        refused = pool.submit(torch.add, moved, torch.ones(3))
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            refused.result()
    assert moved.device == C1 and torch.equal(moved.cpu(), torch.arange(3.0))
    assert made.device == C2


def test_a_move_copies(emu):
    x = torch.zeros(3)
    y = x.to("cuda:1")
    y.add_(1)
    z = y.to("cuda:0")
    z.add_(1)
    assert x.tolist() == [0, 0, 0] and y.tolist() == [1, 1, 1] and z.tolist() == [2, 2, 2]


def test_views_share_values_and_keep_the_device(emu):
    x = torch.zeros(4, 3, device="cuda:1")
    x[1:3, 0] = 5.0
    x[0] = torch.tensor([1.0, 2.0, 3.0])  # a CPU value copied in
    row = x[3]
    row.fill_(7.0)
    assert row.device == C1 and x.t().device == C1 and x.view(-1).device == C1
    assert x.cpu().tolist() == [[1, 2, 3], [5, 0, 0], [5, 0, 0], [7, 7, 7]]
    assert x[torch.tensor([3, 0])].cpu().tolist() == [[7, 7, 7], [1, 2, 3]]
    assert x[x > 4].device == C1 and x[x > 4].cpu().tolist() == [5, 5, 7, 7, 7]


def test_cuda_queries(emu):
    assert torch.cuda.is_available()
    assert torch.cuda.device_count() == 4
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize()
    assert emulated.active() is emu
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.zeros(1, device="cuda:4")


# -- CUDA's device rules ------------------------------------------------------------------------------


def test_mixed_devices_are_refused_as_cuda_refuses(emu):
    a, b = torch.ones(2, 2, device="cuda"), torch.ones(2, 2)
    with pytest.raises(
        RuntimeError, match=f"{SAME_DEVICE}.*mat2 is on cpu, different from other tensors on cuda:0"
    ):
        torch.mm(a, b)
    with pytest.raises(
        RuntimeError, match=f"{SAME_DEVICE}, but found at least two devices, cuda:0 and cuda:1!"
    ):
        a + a.to("cuda:1")
    with pytest.raises(RuntimeError, match=SAME_DEVICE):
        a @ b.to("cuda:1")
    x = torch.zeros(5, 2, device="cuda")
    with pytest.raises(RuntimeError, match=f"{SAME_DEVICE}.*index is on cpu"):
        x.index_add_(0, torch.tensor([0, 1]), torch.ones(2, 2, device="cuda"))
    with pytest.raises(RuntimeError, match=SAME_DEVICE):
        torch.cat([a, b])


def test_what_cuda_accepts_passes(emu):
    x = torch.arange(6.0, device="cuda").view(2, 3)
    assert (x * torch.tensor(2.0)).cpu().tolist() == [[0, 2, 4], [6, 8, 10]]  # a 0-dim CPU scalar
    assert (torch.tensor(1.0) + x).device == C0
    assert x[torch.tensor([1])].device == C0  # a CPU index is moved by CUDA
    assert torch.where(torch.tensor(True), x, x).device == C0
    y = torch.zeros(2, 3, device="cuda:1")
    y.copy_(x)  # copies cross devices
    assert y.cpu().tolist() == x.cpu().tolist()


def test_refusal_answers_without_running(emu):
    a = torch.ones(2, 2, device="cuda")
    mm = torch.ops.aten.mm.default
    assert emulated.refusal(mm, (a, a)) is None
    assert SAME_DEVICE in emulated.refusal(mm, (a, torch.ones(2, 2)))
    assert emulated.refusal(torch.ops.aten.add.Tensor, (a, torch.tensor(1.0))) is None


def test_size_changes_in_place_are_refused_restrides_followed(emu):
    x = torch.zeros(2, 3, device="cuda")
    x.resize_(2, 3)  # same shape: fine
    with pytest.raises(EmulationUnsupported, match="aten::resize_: would change the shape"):
        x.resize_(4, 3)
    x.unsqueeze_(0)  # a restride in place: the wrapper follows its data
    assert x.shape == x.data_cpu.shape == (1, 2, 3) and x.stride() == x.data_cpu.stride()


def test_without_a_device_guard_autograd_is_refused_not_aborted(monkeypatch):
    """Where torch gives no way to stand in a CUDA device guard, recording a graph through an
    emulated device raises EmulationUnsupported (never the process abort it would be)."""
    from harness.errors import EmulationUnsupported
    from harness.trace import emulated_autograd

    monkeypatch.setattr(emulated_autograd, "install_guard", lambda: False)
    with EmulatedCuda(device_count=2):
        w = torch.ones(3, device="cuda", requires_grad=True)
        with pytest.raises(EmulationUnsupported, match="autograd cannot record"):
            w * 2
        with pytest.raises(EmulationUnsupported, match="autograd cannot record"):
            torch.ones(3, requires_grad=True).to("cuda")
        with torch.no_grad():
            assert (w * 2).device == C0
        lin = torch.nn.Linear(3, 2).to("cuda:1")
        assert isinstance(lin.weight, torch.nn.Parameter) and lin.weight.device == C1
        with torch.inference_mode():
            assert lin(torch.ones(3, device="cuda:1")).device == C1


def test_gpu_kernels_are_switched_off_and_the_torch_path_runs(emu):
    from harness.quant import kernels

    assert not kernels.supports(GGMLType.Q4_K)
    raw = torch.randint(0, 256, (4 * 144,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw.view(4, 144)[:, 0:4] = torch.tensor([0, 0x3C, 0, 0x38], dtype=torch.uint8)  # f16 d = 1, dmin = 0.5
    expected = dequant.dequantize(raw, GGMLType.Q4_K, (4, 256))
    got = QTensor(raw.to("cuda:1"), GGMLType.Q4_K, (4, 256)).dequantize()
    assert got.device == C1 and torch.equal(got.cpu(), expected)


# -- state --------------------------------------------------------------------------------------------


@cpu_only
def test_state_is_restored_after_the_block():
    real_generator = torch.Generator
    with pytest.raises(ZeroDivisionError), EmulatedCuda(device_count=2):
        assert torch.cuda.is_available() and torch.Generator is not real_generator
        x = torch.ones(2, device="cuda:1")
        dequant.constants(C1)
        1 / 0  # noqa: B018
    assert emulated.active() is None
    assert not torch.cuda.is_available()
    assert torch.cuda.device_count() == 0
    assert torch.Generator is real_generator
    assert not TABLES.has(dequant.DEQUANT_TABLE, C1)  # no emulated tensors left in the constant tables
    with pytest.raises((RuntimeError, AssertionError, NotImplementedError)):
        torch.zeros(1, device="cuda")
    assert x.device == C1  # what was made inside still says so
    with EmulatedCuda():  # and a new block starts afresh
        assert torch.cuda.device_count() == 1


@pytest.mark.cuda(real=True)
def test_real_cuda_tensors_keep_working_inside_and_after():
    real = torch.arange(4.0, device="cuda")
    with EmulatedCuda(device_count=3):
        doubled = real * 2
        assert type(doubled) is torch.Tensor and doubled.device == C0  # real CUDA, computed there
        fake = torch.ones(4, device="cuda:2")
        mixed = real + fake.to("cuda:0")
        assert isinstance(mixed, EmulatedTensor) and mixed.cpu().tolist() == [1, 2, 3, 4]
        assert torch.cuda.device_count() == 3
    assert (real + 1).cpu().tolist() == [1, 2, 3, 4]
    assert torch.cuda.is_available() and torch.cuda.device_count() >= 1
    assert type(torch.zeros(1, device="cuda")) is torch.Tensor


def test_blocks_do_not_nest():
    with EmulatedCuda(), pytest.raises(RuntimeError, match="does not nest"), EmulatedCuda():
        pass
    assert emulated.active() is None


def test_dispatch_modes_entered_first_see_emulated_devices():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            devices = [str(a.device) for a in args if isinstance(a, torch.Tensor)]
            seen.append((str(func), devices, str((kwargs or {}).get("device"))))
            return func(*args, **(kwargs or {}))

    with Recorder(), EmulatedCuda(device_count=2):
        a = torch.zeros(2, device="cuda:1")
        (a + 1).cpu()
    assert ("aten.zeros.default", [], "cuda:1") in seen
    assert ("aten.add.Tensor", ["cuda:1"], "None") in seen
    assert any(op == "aten._to_copy.default" and d == ["cuda:1"] for op, d, _ in seen)


# -- the tiny Mixtral -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = synthesize(tmp_path_factory.mktemp("emulated") / "tiny.gguf", "tiny", file_type="Q4_K_M", seed=5)
    model = Mixtral.from_gguf(path, max_seq_len=32)
    with torch.inference_mode():
        prefill = model(torch.tensor(TOKENS))
        decode = model(torch.tensor([11]), len(TOKENS))
    return path, prefill, decode


PLACEMENTS = {
    "cuda": {"device": "cuda"},
    "map-cuda0-cuda1": {
        "device_map": {"embed": "cpu", "layers.0": "cuda:0", "layers.1": "cuda:1", "head": "cuda:1"}
    },
    "map-cuda1-cpu-head": {"device_map": {"embed": "cuda:1", "layers.0-1": "cuda:0", "head": "cpu"}},
    "n_gpu_layers=1": {"n_gpu_layers": 1},
    "n_gpu_layers=3": {"n_gpu_layers": 3},
}


@pytest.mark.parametrize("placement", list(PLACEMENTS), ids=list(PLACEMENTS))
def test_tiny_mixtral_runs_and_matches_the_cpu(tiny, placement):
    path, prefill, decode = tiny
    with EmulatedCuda(device_count=2):
        model = Mixtral.from_gguf(path, max_seq_len=32, **PLACEMENTS[placement])
        with torch.inference_mode():
            logits = model(torch.tensor(TOKENS))
            step = model(torch.tensor([11]), len(TOKENS))
        assert logits.device == model.placement.head
        assert torch.equal(logits.cpu(), prefill)  # bit-identical: the same CPU kernels
        assert torch.equal(step.cpu(), decode)
        if model.placement.layers[-1].type == "cuda":
            experts = model.layers[-1].moe.experts
            assert experts.w1.device == model.placement.layers[-1]


def test_tiny_mixtral_with_grad_enabled(tiny):
    path, prefill, _ = tiny
    with EmulatedCuda():
        model = Mixtral.from_gguf(path, max_seq_len=32, device="cuda")
        assert torch.equal(model(torch.tensor(TOKENS)).cpu(), prefill)


def test_router_left_on_the_cpu_fails_as_on_cuda(tiny):
    """candle#1815: only the router (ffn_gate_inp, F16/F32, never quantized) stayed on the CPU."""
    path = tiny[0]
    with EmulatedCuda():
        model = Mixtral.from_gguf(path, max_seq_len=32, device="cuda")
        router = model.layers[0].moe.router
        name = "weight" if router.weight is not None else "qweight"
        setattr(router, name, getattr(router, name).cpu())
        tokens = torch.tensor(TOKENS)
        with (
            torch.inference_mode(),
            pytest.raises(RuntimeError, match=f"{SAME_DEVICE}.*other tensors on cuda:0"),
        ):
            model(tokens)


def test_the_device_generic_accelerator_api_answers_for_cuda(emu):
    accelerator = torch.accelerator
    assert accelerator.current_accelerator() == torch.device("cuda") and accelerator.is_available()
    assert accelerator.device_count() == 4 and accelerator.current_device_index() == 0
    with accelerator.device_index(2):
        assert accelerator.current_device_index() == 2
        assert torch.empty(1, device="cuda").device == C2
    assert accelerator.current_device_index() == 0
    accelerator.synchronize()
    # each device's one stream, nothing pending (optimizers ask whether a graph is being captured)
    assert not accelerator.current_stream().is_capturing() and torch.cuda.current_stream(1).device == C1
    assert torch.cuda.current_stream().query() and not torch.cuda.is_current_stream_capturing()


def test_a_graph_reaches_cuda_however_python_reuses_the_ids_of_freed_node_objects():
    """torch makes an autograd node's Python object afresh on each access and frees it when unused,
    so a node deeper in the graph can take a freed one's id(). The walk that decides whether a
    backward goes to the emulated engine must not mistake it for a node already seen: on the
    H100 it did, for a CUDA input three nodes below the root (slice_scatter of a CPU tensor and a
    CUDA source, then sum, then `0 +`), and PyTorch's own engine ran the backward unchecked."""
    import types

    from torch.autograd.graph import GradientEdge

    from harness.trace.emulated_autograd import reaches_cuda

    class Node:
        def __init__(self, device: str, child: Node | None = None):
            self.device, self.child = device, child

    class View:  # like torch's: made on each access of next_functions, freed when dropped
        def __init__(self, node: Node):
            self.node = node

        @property
        def _input_metadata(self):
            return [types.SimpleNamespace(device=torch.device(self.node.device))]

        @property
        def next_functions(self):
            return () if self.node.child is None else ((View(self.node.child), 0),)

    for depth in range(1, 9):
        node = Node("cuda")
        for _ in range(depth):
            node = Node("cpu", node)
        assert reaches_cuda([GradientEdge(View(node), 0)]), depth
        assert not reaches_cuda([GradientEdge(View(Node("cpu", Node("cpu", Node("cpu")))), 0)])
