"""Host time of one call of each kind an eager decode step makes, on this machine's host: how an
op is registered (`torch.library.custom_op` against a `torch.library.Library` definition of the
same trivial op), a plain torch op, and the fused decode ops themselves at Mixtral-8x7B's decode
shapes and Q4_K_M types; and (`--decode-step`) whole eager decode steps of a Mixtral-8x7B with
`--layers` layers (synthesized into a temporary folder, deleted after). An eager step, and so a
traced one, is bound by these costs (benchmarks/profile_decode.py's `decode_eager_host`). Writes
JSON; asserts nothing.

`--trace` also times the same decode steps under a `Tracer` writing a trace (`full`: every op
recorded, as benchmarks/bench_trace.py's full mode) and sampled (`sampled<N>`, `--sample-every`:
forward call i recorded when i % N == 0), in turn with the untraced steps in every run: ms per
step inside the `with` block (the tracer's entry and exit apart, `trace_enter_exit_ms`, paid once
a generation), and the ratios to untraced; and, apart, the host time of a sampled tracer's traced
steps and of the steps it skips (`sampled_step_ms`: what sampling costs where it records nothing).
`--profile-trace TOP` then adds the TOP functions by self time of one full-traced run (cProfile).

    python benchmarks/bench_host.py --out benchmarks/results/host.json            # CUDA if present
    python benchmarks/bench_host.py --decode-step --layers 4                      # and decode steps
    python benchmarks/bench_host.py --stub-launches --decode-step --out /tmp/h.json   # no GPU
    python benchmarks/bench_host.py --stub-launches --decode-step --layers 4 --trace --calls 200

`--stub-launches` measures the fused path's own Python on a machine without a GPU: the ops run
on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is
imported) with every kernel launch replaced by a count (nothing computed: the outputs are
garbage, the host path is the real one), so the figures are the ops' host time without
Triton's launch cost, plus `harness.quant.launch`'s own where `--fake-compiled` hands it a
compiled kernel whose launch does nothing.

Each figure is the median over 7 runs of `--calls` calls (decode steps: `--steps`), divided by
the calls, with the device synchronized once at the end of a run: host-bound calls measure their
host time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--stub-launches" in sys.argv:  # before torch and triton are imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.bench import device_name  # noqa: E402
from harness.quant.kernels import tl  # noqa: E402


@torch.library.custom_op("harness_bench::trivial_custom_op", mutates_args=())
def trivial_custom_op(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@trivial_custom_op.register_fake
def _(x):
    return torch.empty_like(x)


_LIBRARY = torch.library.Library("harness_bench", "FRAGMENT")
_LIBRARY.define("trivial_library_op(Tensor x) -> Tensor")
_LIBRARY.impl("trivial_library_op", lambda x: torch.empty_like(x), "CompositeExplicitAutograd")


def per_call_us(fn, calls: int, sync) -> float:
    for _ in range(min(calls, 50)):
        fn()
    sync()
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def random_weight(qtype, rows: int, cols: int, device: torch.device, experts: int = 0):
    """Random blocks of `qtype` ([experts,] rows, row_bytes) whose f16 scales are all 2^-8, as
    a module hands them to the ops (`fused.kernel_weight`: repacked where it packs) -> (blocks, code)."""
    from harness.quant import fused
    from harness.quant.types import F16_FIELDS, block_size, type_size

    lead = (experts,) if experts else ()
    blocks = torch.randint(
        0, 256, (*lead, rows * cols // block_size(qtype), type_size(qtype)), dtype=torch.uint8
    )
    for at in F16_FIELDS[qtype]:
        blocks[..., at : at + 2] = torch.tensor([0x00, 0x1C], dtype=torch.uint8)  # 2^-8, little-endian
    return fused.kernel_weight(blocks.reshape(*lead, rows, -1).to(device), qtype, cols)


def fused_ops(device: torch.device) -> dict:
    """The decode step's fused ops at Mixtral-8x7B's shapes (its Q4_K_M types), one token."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    q4, q6 = GGMLType.Q4_K, GGMLType.Q6_K
    d, ffn, n_experts, n_kv, hd, s_max = 4096, 14336, 8, 8, 128, 4096
    x = torch.randn(1, d, device=device)
    w = torch.ones(d, device=device)
    weight, code = random_weight(q4, d, d, device)
    weight6, code6 = random_weight(q6, d, d, device)
    (wq, _), (wk, _), (wv, code_v) = (
        random_weight(q, rows, d, device) for q, rows in ((q4, d), (q4, 1024), (q6, 1024))
    )
    # q and k in one buffer, as a model has them
    wq, wk, wv = fused.pack_rows([wq, wk, wv], [code, code, code_v])
    gate, code_gu = random_weight(q4, ffn, d, device, n_experts)
    up, _ = random_weight(q4, ffn, d, device, n_experts)
    down, code_down = random_weight(q6, d, ffn, device, n_experts)
    routing = torch.tensor([[0.6, 0.4]], device=device), torch.tensor([[1, 6]], device=device)
    router = torch.randn(8, d, device=device) * 0.05
    cache_k = torch.randn(n_kv, s_max, hd, device=device)
    cache_v = torch.randn_like(cache_k)
    cos, sin = torch.ones(s_max, hd // 2, device=device), torch.zeros(s_max, hd // 2, device=device)
    qkv = torch.randn(1, d + 2 * n_kv * hd, device=device)
    ops = torch.ops.harness
    return {
        "harness::rms_norm": lambda: ops.rms_norm(x, w, 1e-5),
        "harness::add_rms_norm": lambda: ops.add_rms_norm(x, x, w, 1e-5),
        "harness::qmatmul Q4_K 4096x4096": lambda: ops.qmatmul(x, weight, code, d),
        "harness::qmatmul Q6_K 4096x4096": lambda: ops.qmatmul(x, weight6, code6, d),
        "harness::qkv Q4_K 4096+1024, Q6_K 1024": lambda: ops.qkv(x, wq, wk, wv, code, code, code_v),
        "harness::router_topk E=8 k=2": lambda: ops.router_topk(x, router, 2, 1e-6),
        "harness::moe_ffn 2 of 8 experts Q4_K/Q6_K": lambda: ops.moe_ffn(
            x, gate, up, down, *routing, code_gu, code_down
        ),
        "harness::attention 512 keys": lambda: ops.attention(qkv, cache_k, cache_v, cos, sin, None, 511),
    }


class OpCounter(TorchDispatchMode):
    """The ops a tracer would see (harness:: ops and the others apart), counted."""

    def __init__(self):
        super().__init__()
        self.counts = {"harness": 0, "other": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts["harness" if func.namespace == "harness" else "other"] += 1
        return func(*args, **(kwargs or {}))


def stub_launches(fake_compiled: bool = False) -> dict[str, int]:
    """Every Triton launch under the interpreter replaced by a count per kernel (returned, live).
    `fake_compiled`: and `harness.quant.launch`'s direct path taken as on a GPU (`fast_path` on):
    each launch through Triton gives back a compiled kernel whose launcher only counts, which
    `launch` then calls directly (fused's and kernels' kernels made JITFunctions for its check)."""
    import inspect

    import triton
    import triton.runtime.interpreter as interpreter

    from harness.quant import fused, kernels, launch

    if not kernels.interpreting():
        raise SystemExit("--stub-launches: TRITON_INTERPRET did not take (was triton imported first?)")
    counts: dict[str, int] = {}

    class Compiled:
        function = packed_metadata = None

        def __init__(self, name: str):
            self.name = name

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            counts[self.name] = counts.get(self.name, 0) + 1

    def counted(self, *args, grid, warmup, **kwargs):
        counts[self.fn.__name__] = counts.get(self.fn.__name__, 0) + 1
        return Compiled(self.fn.__name__) if fake_compiled else None

    interpreter.InterpretedFunction.run = counted
    if fake_compiled:

        class Direct(interpreter.InterpretedFunction, triton.runtime.jit.JITFunction):
            """An interpreted kernel that `launch` takes for a JITFunction (its `params`)."""

        for module in (fused, kernels):
            for value in vars(module).values():
                if value.__class__ is interpreter.InterpretedFunction:
                    value.__class__ = Direct
                    value.params = list(inspect.signature(value.fn).parameters.values())
        launch.fast_path = True
        launch.host_tensors_direct = True  # (the stand-in launchers take these CPU tensors)
        launch.current_stream = lambda index: 0  # (no GPU: no stream)
    return counts


def decode_steps(
    device: torch.device,
    layers: int,
    steps: int,
    sync,
    launches: dict | None,
    trace_every: list[int] | None = None,
    profile_top: int = 0,
) -> dict:
    """Eager decode steps (`model(token, pos)`, one token) of a synthesized Mixtral-8x7B Q4_K_M
    with `layers` layers on `device`: ms per step (median of 7 runs of `steps`), and the ops
    (and, with stubbed launches, kernel launches) of one step; with `trace_every`, the same
    steps under a full and sampled Tracers (see the module's docstring)."""
    with synthesized_model(layers, device) as (model, tmp, load_s):
        return _time_decode_steps(model, device, steps, sync, launches, trace_every, profile_top, tmp) | {
            "layers": layers,
            "load_s": round(load_s, 2),
        }


@contextlib.contextmanager
def synthesized_model(layers: int, device):
    """(model, its temporary folder, load seconds): a Mixtral-8x7B Q4_K_M with `layers` layers
    synthesized into a temporary folder, loaded on `device`; the folder is deleted after."""
    from harness.gguf_file import PRESETS
    from harness.model.mixtral import Mixtral
    from harness.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="bench-host-"))
    try:
        config = dataclasses.replace(PRESETS["mixtral-8x7b"], block_count=layers)
        path = synthesize(tmp / "model.gguf", config, "Q4_K_M")
        start = time.perf_counter()
        model = Mixtral.from_gguf(path, device=device, max_seq_len=1024)
        yield model, tmp, time.perf_counter() - start
    finally:
        shutil.rmtree(tmp)


def _time_decode_steps(model, device, steps, sync, launches, trace_every, profile_top, tmp: Path) -> dict:
    from harness.quant import launch
    from harness.trace import Tracer

    token = torch.tensor([1], device=device)
    # Triton's own launch against harness.quant.launch's direct one, where that applies
    modes = ["direct", "triton"] if launch.fast_path else ["triton"]
    tracers = {}
    if trace_every is not None:
        tracers["full"] = lambda: Tracer(model, path=tmp / "full.jsonl")
        for n in trace_every:
            tracers[f"sampled{n}"] = functools.partial(
                Tracer, model, path=tmp / f"sampled{n}.jsonl", sample_every=n
            )
        modes += list(tracers)
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    enter_exit: dict[str, list[float]] = {mode: [] for mode in tracers}
    events: dict[str, int] = {}
    every = {f"sampled{n}": n for n in trace_every or ()}
    split: dict[str, dict[str, list[float]]] = {mode: {"traced": [], "skipped": []} for mode in every}
    if every:
        split[modes[0]] = {"untraced": []}

    def run(mode: str) -> float:
        """ms per step of one run of `steps` steps in `mode`."""
        launch.fast_path = mode != "triton" and "direct" in modes
        tracer = tracers[mode]() if mode in tracers else contextlib.nullcontext()
        outer = time.perf_counter()
        with tracer:
            start = time.perf_counter()
            marks = [start]
            for pos in range(steps):
                model(token, pos)
                marks.append(time.perf_counter())
            sync()
            inner = time.perf_counter() - start
        for pos in range(steps):  # a sampled tracer's steps apart: the traced ones and those it skips
            part = "untraced" if mode not in every else "skipped" if pos % every[mode] else "traced"
            if part in split.get(mode, ()):
                split[mode][part].append((marks[pos + 1] - marks[pos]) * 1e3)
        if mode in tracers:
            enter_exit[mode].append((time.perf_counter() - outer - inner) * 1e3)
            events[mode] = tracer.summary.events
            if tracer.verdict != "clean":
                raise SystemExit(f"{mode}: the traced decode steps are {tracer.verdict}, not clean")
        return inner / steps * 1e3

    with torch.inference_mode():
        for pos in range(3):  # warm-up: compiles, plans, tables
            model(token, pos)
        for mode in tracers:
            run(mode)
        for parts in split.values():  # (not the warm-up's)
            for part in parts.values():
                part.clear()
        sync()
        try:
            for _ in range(7):
                for mode in modes:  # in turn: drifts of the machine hit all alike
                    runs[mode].append(run(mode))
            hotspots = None
            if profile_top and tracers:
                from harness.bench import host_hotspots

                hotspots = host_hotspots(lambda: run("full"), 1, profile_top)
        finally:
            launch.fast_path = "direct" in modes
        counter = OpCounter()
        before = dict(launches or {})
        with counter:
            model(token, 3)
        sync()
    med = {mode: statistics.median(r) for mode, r in runs.items()}
    result = {
        "steps_per_run": steps,
        "ms_per_step": med[modes[0]],
        "ms_per_step_by_launch": {mode: med[mode] for mode in modes if mode not in tracers},
        "ms_per_step_runs": runs,
        "ops_per_step": counter.counts,
    }
    if tracers:
        untraced = med[modes[0]]
        result["traced"] = {
            "ms_per_step": {"untraced": untraced} | {mode: med[mode] for mode in tracers},
            "ratio": {mode: round(med[mode] / untraced, 4) for mode in tracers},
            "us_per_op_added_full": round((med["full"] - untraced) * 1e3 / (events["full"] / steps), 2),
            "events_per_run": events,
            "trace_enter_exit_ms": {mode: statistics.median(r) for mode, r in enter_exit.items()},
            # one step's host time (no sync), median over the timed runs' steps: a sampled
            # tracer's traced steps and the steps it skips, and untraced steps
            "sampled_step_ms": {
                mode: {k: statistics.median(v) for k, v in parts.items()} for mode, parts in split.items()
            },
        }
        if hotspots is not None:
            result["traced"]["full_top_self"] = hotspots
    if launches is not None:
        result["launches_per_step"] = {
            k: v - before.get(k, 0) for k, v in launches.items() if v > before.get(k, 0)
        }
        result["launches_per_step_total"] = sum(result["launches_per_step"].values())
    return result


def _matvec_signature(
    x_ptr, w_ptr, u_ptr, out_ptr, experts_ptr, scale_ptr, lut_ptr, N, n_pairs, n_super, chunk, row_bytes,
    expert_bytes, x_stride, x_div, xsum_ptr, xpow_ptr, part_ptr, counter_ptr, out_stride, out_div, res_ptr,
    res_stride, hq_ptr, hscale_ptr, hsum_ptr,
    QT: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr, GATED: tl.constexpr, SCALED: tl.constexpr,
    ROUTED: tl.constexpr, VEC: tl.constexpr, PACKED: tl.constexpr, STAGES: tl.constexpr,
    REDUCE: tl.constexpr, INT: tl.constexpr, INT_X: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr = False,
    UNROLL: tl.constexpr = 1,
    RESIDUAL: tl.constexpr = False, INT_OUT: tl.constexpr = False,
):  # fmt: skip
    """`harness.quant.fused._matvec_kernel`'s parameters, for `direct_launch` (no body: not compiled)."""


def direct_launch() -> dict:
    """harness.quant.launch's own host time for a launch it sends straight to the compiled
    kernel, with `_matvec_kernel`'s arguments (26 positional, 17 by keyword) as a decode
    product passes them (by keyword, and bound once as `fused._matvec` does), where there is no GPU: a JITFunction of that kernel's code whose
    Triton launch gives back a compiled kernel whose launcher does nothing."""
    import triton

    from harness.quant import launch

    class Compiled:
        function = packed_metadata = None

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            pass

    kernel = triton.runtime.jit.JITFunction(_matvec_signature)
    kernel.run = lambda *args, grid, warmup, **kwargs: Compiled()
    launch.current_stream = lambda index: 0  # (no GPU: no stream)
    launch.host_tensors_direct = True  # (CPU tensors, a launcher that does nothing)
    x, out = torch.randn(1, 4096), torch.empty(1, 4096)
    w, experts = torch.zeros(4096, 576, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)
    options = {
        "QT": 12, "NP": 2, "GATED": False, "SCALED": False, "PACKED": False, "ROUTED": False, "VEC": True,
        "STAGES": 1, "UNROLL": 1, "BN": 32, "num_warps": 4, "REDUCE": True, "INT": False, "INT_X": False,
        "PTX": True,
        "RESIDUAL": False, "INT_OUT": False, "PREFETCH": 0,
    }  # fmt: skip
    args = (x, w, w, out, experts, out, out, 4096, 1, 16, 1, 2304, 4096 * 2304, 4096, 1, x, out, out, out)
    args += (torch.zeros(64, dtype=torch.int32), 4096, 1, out, 4096, out, out, out)

    was = launch.fast_path  # (on under --fake-compiled)

    def direct():
        launch.fast_path = True
        try:
            launch.launch(kernel, (128, 1, 4), *args, **options)
        finally:
            launch.fast_path = was

    bound = launch.bind(kernel, **options)

    def direct_bound():  # (as `fused._matvec` launches: its plan's keywords bound once)
        launch.fast_path = True
        try:
            launch.launch(bound, (128, 1, 4), *args)
        finally:
            launch.fast_path = was

    return {
        "launch.launch, direct (matvec's arguments)": direct,
        "launch.launch, direct, bound keywords (matvec's)": direct_bound,
    }


def triton_launch(calls: dict) -> dict:
    """The same calls with harness.quant.launch's fast path off: Triton's own launch."""
    from harness.quant import launch

    def slow(fn):
        def call():
            launch.fast_path = False
            try:
                fn()
            finally:
                launch.fast_path = True

        return call

    return {f"{name} (Triton's launch)": slow(fn) for name, fn in calls.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument(
        "--stub-launches", action="store_true", help="CPU: the interpreter, launches counted, not run"
    )
    p.add_argument(
        "--fake-compiled",
        action="store_true",
        help="with --stub-launches: launch's direct path taken, the compiled kernels doing nothing",
    )
    p.add_argument(
        "--decode-step", action="store_true", help="also time eager decode steps of a synthesized model"
    )
    p.add_argument("--layers", type=int, default=2, help="layers of that model (Mixtral-8x7B's shapes)")
    p.add_argument(
        "--steps", type=int, default=32, help="decode steps per timed run (a multiple of --sample-every)"
    )
    p.add_argument("--trace", action="store_true", help="also time the decode steps traced, full and sampled")
    p.add_argument("--sample-every", default="16", help="N, or several: 16,32 (one sampled mode each)")
    p.add_argument("--profile-trace", type=int, default=0, metavar="TOP", help="cProfile a full-traced run")
    p.add_argument("--out", default="benchmarks/results/host.json")
    args = p.parse_args(argv)
    if args.fake_compiled and not args.stub_launches:
        raise SystemExit("--fake-compiled needs --stub-launches")
    launches = stub_launches(args.fake_compiled) if args.stub_launches else None
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and launches is None:
        print("no CUDA device: only the trivial calls (--stub-launches times the fused ops' host path)")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(1, 4096, device=device)
    calls = {
        "torch.empty_like": lambda: torch.empty_like(x),
        "torch.add": lambda: torch.add(x, x),
        "custom_op (trivial)": lambda: torch.ops.harness_bench.trivial_custom_op(x),
        "Library op (trivial)": lambda: torch.ops.harness_bench.trivial_library_op(x),
    }
    from harness.quant import launch

    if device.type == "cuda" or launches is not None:
        ops = fused_ops(device)
        calls |= ops
        if launch.fast_path:
            calls |= triton_launch(ops)
    if launches is not None:
        calls |= direct_launch()
    import triton

    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "stub_launches": launches is not None,
        "calls_per_run": args.calls,
    }
    with torch.inference_mode():
        result["us_per_call"] = {name: per_call_us(fn, args.calls, sync) for name, fn in calls.items()}
    for name, us in result["us_per_call"].items():
        print(f"{name:45s} {us:8.2f} us", flush=True)
    if args.decode_step:
        every = [int(n) for n in args.sample_every.split(",")] if args.trace else None
        step = result["decode_step"] = decode_steps(
            device, args.layers, args.steps, sync, launches, every, args.profile_trace
        )
        print(
            f"decode step, {args.layers} layers: {step['ms_per_step']:.3f} ms, ops {step['ops_per_step']}"
            + (f", launches {step['launches_per_step_total']}" if launches is not None else ""),
            flush=True,
        )
        if "traced" in step:
            traced = step["traced"]
            print(
                "traced: "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in traced["ms_per_step"].items())
                + "; ratios "
                + ", ".join(f"{k} x{v}" for k, v in traced["ratio"].items())
                + f"; full adds {traced['us_per_op_added_full']} us an op",
                flush=True,
            )
    result["command"] = "python benchmarks/bench_host.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
