"""harness.quant.launch: the first launch of a kind goes through Triton, the later ones of the
same kind call the compiled kernel's launcher directly, with the same arguments; anything that
may change Triton's choice of compiled kernel goes through Triton again."""

from __future__ import annotations

import pytest
import torch

from harness.quant import kernels, launch

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton")


class Compiled:
    """Stands in for Triton's CompiledKernel: records the launches made on it."""

    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.launches = []

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream, args)

    @property
    def run(self):
        return lambda *call: self.launches.append(call)


@pytest.fixture
def kernel(monkeypatch):
    """A real JITFunction (params `a, n, x, B: constexpr, C: constexpr = 7`) whose Triton launch
    is replaced by a record of its calls, returning one Compiled per call."""
    triton, tl = kernels.triton, kernels.tl

    def k(a, n, x, B: tl.constexpr, C: tl.constexpr = 7):
        pass

    fn = triton.runtime.jit.JITFunction(k)
    fn.triton_calls, fn.compiled = [], []

    def run(*args, grid, warmup, **kwargs):
        fn.triton_calls.append((grid, args, kwargs))
        fn.compiled.append(Compiled())
        return fn.compiled[-1]

    fn.run = run
    monkeypatch.setattr(launch, "fast_path", True)
    monkeypatch.setattr(launch, "host_tensors_direct", True)  # (these CPU tensors stand in for a GPU's)
    monkeypatch.setattr(launch, "_COMPILED", {})
    monkeypatch.setattr(launch, "current_stream", lambda device: f"stream{device}")
    return fn


def test_a_repeated_launch_calls_the_compiled_launcher_with_every_parameter_in_order(kernel):
    a = torch.zeros(64)
    launch.launch(kernel, (3, 2), a, 100, 0.5, B=4, num_warps=2)
    assert len(kernel.triton_calls) == 1 and not kernel.compiled[0].launches  # Triton launched it
    b = torch.ones(64)
    launch.launch(kernel, (5,), b, 200, 1.5, B=4, num_warps=2)
    assert len(kernel.triton_calls) == 1  # not Triton again
    (call,) = kernel.compiled[0].launches
    # the tensor as its data pointer (the launcher takes an int as it is), the keyword
    # constexpr, then C's default
    bound = (b.data_ptr(), 200, 1.5, 4, 7)
    # no launch hook set: no metadata and no hooks, which Triton's launcher skips
    assert call[:9] == (5, 1, 1, "stream0", "function", "packed", None, None, None)
    assert call[9:] == bound
    assert launch.cached_launches() == 1


def test_a_direct_launch_hands_each_tensor_s_own_pointer(kernel):
    """A view's pointer is where its elements start (its offset in), an empty tensor's 0, and
    another tensor of the same kind launched after it gets its own."""
    buffer = torch.zeros(128)
    launch.launch(kernel, (1,), buffer, 32, 0.5, B=4)
    for a in (buffer[16:], torch.zeros(64), torch.zeros(0), buffer):
        launch.launch(kernel, (1,), a, 32, 0.5, B=4)
    launches = kernel.compiled[0].launches
    assert [call[9] for call in launches] == [buffer.data_ptr() + 64, launches[1][9], 0, buffer.data_ptr()]
    assert launches[1][9] not in (0, buffer.data_ptr()) and all(type(call[9]) is int for call in launches)
    assert len(kernel.triton_calls) == 1


def test_a_host_tensor_always_goes_through_triton_s_own_launch(kernel, monkeypatch):
    """A direct launch hands the launcher a pointer it does not check; Triton's own launch asks
    the driver about each tensor's and refuses a host one. So, as on a GPU, a launch with a CPU
    tensor among its arguments is never direct: each goes through Triton, the first of a kind
    with only GPU tensors too."""
    monkeypatch.setattr(launch, "host_tensors_direct", False)
    a = torch.zeros(64)
    for _ in range(3):
        launch.launch(kernel, (1,), a, 32, 0.5, B=4)
    assert len(kernel.triton_calls) == 3 and not any(c.launches for c in kernel.compiled)
    assert launch.cached_launches() == 0


@pytest.mark.parametrize("hook", ["launch_enter_hook", "launch_exit_hook"])
def test_a_launch_hook_gets_triton_s_launch_metadata_on_a_direct_launch(kernel, monkeypatch, hook):
    """Where a hook is in Triton's chains (a profiler's), the direct launch hands the launcher
    the compiled kernel's launch metadata and both chains, as Triton's launch does."""
    hooks = kernels.triton.knobs.runtime
    a = torch.zeros(64)
    launch.launch(kernel, (3, 2), a, 100, 0.5, B=4)
    seen = []
    getattr(hooks, hook).add(seen.append)
    try:
        launch.launch(kernel, (3, 2), a, 100, 0.5, B=4)
    finally:
        getattr(hooks, hook).remove(seen.append)
    (call,) = kernel.compiled[0].launches
    assert call[6] == ("metadata", (3, 2), "stream0", (a, 100, 0.5, 4, 7))
    assert call[7] is hooks.launch_enter_hook and call[8] is hooks.launch_exit_hook
    assert call[9] is a  # the tensor itself, as Triton gives it, where a hook may see it
    monkeypatch.setattr(hooks, "launch_enter_hook", None)  # not a chain: Triton's metadata, as given
    launch.launch(kernel, (3, 2), a, 100, 0.5, B=4)
    assert kernel.compiled[0].launches[1][6:9] == (("metadata", (3, 2), "stream0", (a, 100, 0.5, 4, 7)), None,
                                                   hooks.launch_exit_hook)  # fmt: skip
    assert len(kernel.triton_calls) == 1


@pytest.mark.parametrize(
    "changed",
    [
        "misaligned tensor",
        "dtype",
        "int equal to 1",
        "int not divisible by 16",
        "int divisible by 16",
        "int of 1 becomes 17",
        "int beyond int32",
        "constexpr",
        "constexpr True for 1",
        "constexpr 4.0 for 4",
        "launch option",
        "bool for int",
        "True for 1",
        "float for int",
        "int divisible by 16 for a tensor",
    ],
)
def test_what_may_change_tritons_compiled_kernel_goes_through_triton_again(kernel, changed):
    buffer = torch.zeros(128)
    first_int = {"int divisible by 16": 33, "int of 1 becomes 17": 1}.get(changed, 32)
    args, kwargs = [buffer[:64], first_int, 0.5], {"B": 4, "num_warps": 2}
    launch.launch(kernel, (1,), *args, **kwargs)
    if changed == "misaligned tensor":
        args[0] = buffer[1:65]  # 4 bytes past a 16-byte boundary
    elif changed == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif changed == "int equal to 1":
        args[1] = 1
    elif changed == "int not divisible by 16":
        args[1] = 33
    elif changed == "int divisible by 16":  # from 33
        args[1] = 48
    elif changed == "int of 1 becomes 17":
        args[1] = 17
    elif changed == "int beyond int32":
        args[1] = 1 << 32
    elif changed == "constexpr":
        kwargs["B"] = 8
    elif changed == "constexpr True for 1":
        kwargs["B"] = 1
        launch.launch(kernel, (1,), *args, **kwargs)
        kwargs["B"] = True
    elif changed == "constexpr 4.0 for 4":
        kwargs["B"] = 4.0
    elif changed == "launch option":
        kwargs["num_warps"] = 4
    elif changed == "bool for int":
        args[1] = True
    elif changed == "float for int":
        args[1] = 32.0
    elif changed == "int divisible by 16 for a tensor":  # (a flat key must not confuse the two)
        args[0] = 32
    elif changed == "True for 1":  # True == 1 in Python; Triton takes one as i1, the other as constexpr 1
        args[1] = 1
        launch.launch(kernel, (1,), *args, **kwargs)
        args[1] = True
    launch.launch(kernel, (1,), *args, **kwargs)
    assert len(kernel.triton_calls) == (3 if changed in ("True for 1", "constexpr True for 1") else 2)
    assert not any(compiled.launches for compiled in kernel.compiled)


def test_no_direct_launch_where_the_fast_path_does_not_apply(kernel, monkeypatch):
    a = torch.zeros(64)
    for _ in range(2):
        launch.launch(kernel, (1,), a, 32, 0.5)  # B not given: Triton's to refuse
        launch.launch(kernel, (1,), a, 32, (0.5,), B=4)  # a tuple: not an argument kind known here
        launch.launch(kernel, lambda meta: (1,), a, 32, 0.5, B=4)  # a callable grid
    assert len(kernel.triton_calls) == 6 and launch.cached_launches() == 0
    launch.launch(kernel, (1,), a, 32, 0.5, B=4)
    launch.launch(kernel, (1,), a, 32, 0.5, B=4)  # direct
    kernel.pre_run_hooks.append(lambda *args, **kwargs: None)
    launch.launch(kernel, (1,), a, 32, 0.5, B=4)  # Triton runs the hook
    assert len(kernel.triton_calls) == 8 and launch.cached_launches() == 1
    kernel.pre_run_hooks.clear()
    monkeypatch.setattr(launch, "fast_path", False)
    for _ in range(2):
        launch.launch(kernel, (1,), a, 32, 0.5, B=4)
    assert len(kernel.triton_calls) == 10 and launch.cached_launches() == 1


def test_a_bound_kernel_launches_as_the_kernel_with_its_keywords(kernel, monkeypatch):
    """`launch(bind(kernel, **kw), grid, *args)` is `launch(kernel, grid, *args, **kw)`: one
    cached launch for both; other keywords, or the same values of another type, go through
    Triton again; a bound kernel takes no keywords of its own."""
    a = torch.zeros(64)
    launch.launch(launch.bind(kernel, B=4, num_warps=2), (1,), a, 32, 0.5)
    launch.launch(kernel, (2,), a, 32, 0.5, B=4, num_warps=2)  # direct: the same kind
    assert len(kernel.triton_calls) == 1 and launch.cached_launches() == 1
    assert kernel.compiled[0].launches[0][9:] == (a.data_ptr(), 32, 0.5, 4, 7)
    for other in ({"B": 8, "num_warps": 2}, {"B": 4, "num_warps": 4}, {"B": 4.0, "num_warps": 2}, {"B": 4}):
        launch.launch(launch.bind(kernel, **other), (1,), a, 32, 0.5)
    assert len(kernel.triton_calls) == 5 and launch.cached_launches() == 5
    with pytest.raises(TypeError):
        launch.launch(launch.bind(kernel, B=4), (1,), a, 32, 0.5, num_warps=2)
    monkeypatch.setattr(launch, "fast_path", False)  # Triton's launch, with the bound keywords
    launch.launch(launch.bind(kernel, B=4, num_warps=2), (1,), a, 32, 0.5)
    assert kernel.triton_calls[-1][2] == {"B": 4, "num_warps": 2}


def test_the_fast_path_is_off_under_the_interpreter_and_on_known_triton_versions_only():
    if kernels.interpreting():
        assert not launch.fast_path
    version = tuple(int(p) for p in kernels.triton.__version__.split(".")[:2])
    if version not in launch.KNOWN_TRITON:
        assert not launch.fast_path


@pytest.mark.cuda(real=True)
def test_cuda_direct_launches_compute_what_triton_launches_compute(monkeypatch):
    """The decode ops on the GPU: the first call through Triton, the later ones direct, all bit
    for bit alike, and alike with the fast path off."""
    from harness.quant import fused

    assert launch.fast_path, f"no fast path on this GPU (triton {kernels.triton.__version__})"
    x = torch.randn(3, 4096, device="cuda")
    w = torch.randn(4096, device="cuda")
    first = torch.ops.harness.rms_norm(x, w, 1e-5)
    before = launch.cached_launches()
    again = [torch.ops.harness.rms_norm(x, w, 1e-5) for _ in range(3)]
    assert launch.cached_launches() == before  # the same kind: no new entry
    monkeypatch.setattr(launch, "fast_path", False)
    slow = torch.ops.harness.rms_norm(x, w, 1e-5)
    for out in again:
        assert torch.equal(out, first) and torch.equal(out, slow)
    assert fused.runs_on(x.device)


@pytest.mark.cuda(real=True)
def test_cuda_decode_steps_with_direct_launches_are_bit_identical_to_tritons(tmp_path, monkeypatch):
    """Every kernel of a decode step (norms, q/k/v, rope and attention, routing, the experts,
    the head), launched directly after its first launch, gives the logits Triton's own launches
    give, bit for bit, step after step."""
    from harness.model.mixtral import Mixtral
    from harness.synth import synthesize

    path = synthesize(tmp_path / "tiny.gguf", "tiny", file_type="Q4_K_M", seed=5)
    model = Mixtral.from_gguf(path, device="cuda", max_seq_len=32)
    prompt = torch.tensor([3, 17, 99, 250, 7], device="cuda")
    runs = {}
    for fast in (False, True, True):  # the second direct run: every launch a repeat
        monkeypatch.setattr(launch, "fast_path", fast)
        with torch.inference_mode():
            model.reset()
            logits = [model(prompt, 0)[-1:]]
            for pos in range(5, 12):
                logits.append(model(logits[-1].argmax(-1), pos))
        runs.setdefault(fast, []).append(torch.cat(logits))
    assert launch.cached_launches() > 0
    for direct in runs[True]:
        assert torch.equal(direct, runs[False][0])
