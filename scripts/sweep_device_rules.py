"""Sweep PyTorch's OpInfo database for device rules, comparing real CUDA with the emulation.

For each op of `torch.testing._internal.common_methods_invocations.op_db` and a few of its sample
inputs, every tensor argument is put on the CPU in turn while the others are on the accelerator.
Real CUDA either accepts the call or refuses it for devices; the emulated accelerator
(`harness.trace.emulated`) must do the same, and so must the tracer without help from the error:
its own rule (`refused()`, which judges the devices it recorded) or a device error it saw come out
of a module before any aten op ran. Every call runs in each grad mode (`--grad-modes`: inference
mode, no_grad, grad enabled with the floating tensors requiring grad): the verdicts must not
depend on it (`grad_mode_differences` lists any call whose verdict does). Without a GPU the
emulation is compared with the tracer's rule.
The result is JSON: counts, and every disagreement with the call's devices and both messages.
What it finds belongs in the conformance table (`harness.trace.conformance.ROWS`), which the
test suite checks everywhere.

    python scripts/sweep_device_rules.py --out sweep.json                   # on a GPU machine
    python scripts/sweep_device_rules.py --backend emulated --ops add,where  # anywhere: emulation only

`--check syncs` (GPU only) puts every tensor on the GPU instead and asks whether the host waits
for GPU work queued before the call (`torch.cuda._sleep`): the tracer must see a `sync` exactly
there.

The op database imports `expecttest` (pip install expecttest). An op that breaks the CUDA context
(an illegal address is sticky) ends its worker process; the sweep goes on after it in a new one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_common import (  # noqa: E402
    GRAD_MODES,
    describe,
    grad_context,
    parse,
    parser,
    place,
    run_pool,
    summarize,
    traced,
    verdict,
    worker_loop,
)

# Disagreements known and left alone (ops far from inference code); the sweep lists them apart.
KNOWN_DIFFERENCES = {
    "nn.functional.binary_cross_entropy_with_logits": "its decomposition takes a CPU-scalar self only",
    "nn.functional.bilinear": "with zero-size inputs, CUDA skips the device check",
    "linalg.pinv": "with zero-size inputs, CUDA skips the device check",
}
KNOWN_SYNC_DIFFERENCES = {
    "__getitem__": "a Python list index is uploaded inside C++ (no aten op shows it); the upload waits",
    "unravel_index": "its constants are uploaded inside C++ (no aten op shows it); the upload waits",
    "isin": "waits on the sorting path only (large inputs)",
    "linalg.lu": "cuSOLVER or MAGMA by size: some sizes do not wait",
    "linalg.lu_factor_ex": "cuSOLVER or MAGMA by size: some sizes do not wait",
    "lu": "cuSOLVER or MAGMA by size: some sizes do not wait",
    "to": "a non-blocking copy to the host waits when the pinned-memory allocator does",
    **{
        op: "zero-size matrices return before any host read"
        for op in ("cholesky", "linalg.eigh", "linalg.eigvalsh", "linalg.ldl_factor_ex", "linalg.svd")
        + ("linalg.svdvals", "linalg.pinv.hermitian", "pinverse", "svd")
    },
    **{
        f"masked.{op}": "torch.masked's Python code uploads constants inside C++ (no aten op shows it)"
        for op in ("amax", "amin", "argmax", "argmin", "cumprod", "cumsum", "log_softmax", "logaddexp")
        + ("logsumexp", "mean", "median", "norm", "prod", "softmax", "softmin", "std", "sum", "var")
    },
}
BUSY_SECONDS = 0.02  # GPU work queued before a call whose wait is measured (--check syncs)
MAX_SAMPLES = 6  # sample inputs per op (environment: SWEEP_SAMPLES)
MAX_LEAVES = 6  # tensor arguments moved to the CPU per sample, at most
DTYPES = ("float32", "int64", "bool")  # the first one an op supports on CUDA


def _ops(names: list[str] | None):
    import torch
    from torch.testing._internal.common_methods_invocations import op_db

    out = []
    for op in op_db:
        if names and op.name not in names and f"{op.name}.{op.variant_test_name}" not in names:
            continue
        dtype = next(
            (getattr(torch, d) for d in DTYPES if getattr(torch, d) in op.supported_dtypes("cuda")), None
        )
        if dtype is not None:
            out.append((op, dtype))
    return out


def _call(op, sample, spec, places, device_of, grad_mode="no_grad"):
    """Run the op (or a module calling it) with each tensor leaf on the device its place names,
    in a grad mode (`GRAD_MODES`; with grad, floating leaves require grad)."""
    from torch.utils._pytree import tree_unflatten

    flat, tensor_at = sample
    moved = list(flat)
    try:
        with grad_context(grad_mode):
            for i, p in zip(tensor_at, places, strict=True):
                moved[i] = place(flat[i], device_of(p), grad_mode)
            inp, args, kwargs = tree_unflatten(moved, spec)
            op(inp, *args, **kwargs)
        return None
    except Exception as exc:  # what the backend said is the result
        return exc


def _op_module(op):
    import torch

    class OpModule(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return op(*args, **kwargs)

    return OpModule()


def _start(op, dtype) -> tuple[dict, list | None]:
    """An op's record, and its samples (None, with the record saying why, when there are none)."""
    record = {
        "op": op.name + (f".{op.variant_test_name}" if op.variant_test_name else ""),
        "dtype": str(dtype)[6:],
    }
    try:
        return record, _samples(op, dtype)
    except Exception as exc:
        record["skipped"] = f"samples: {type(exc).__name__}: {exc}"[:300]
        return record, None


def _samples(op, dtype):
    import torch
    from torch.utils._pytree import tree_flatten

    out = []
    for s in op.sample_inputs("cpu", dtype, requires_grad=False):
        flat, spec = tree_flatten((s.input, s.args, s.kwargs))
        tensor_at = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        if not tensor_at or len(tensor_at) > 16 or any(flat[i].layout != torch.strided for i in tensor_at):
            continue  # dense tensors only (sparse layouts have their own device rules)
        out.append(((flat, tensor_at), spec))
        if len(out) >= int(os.environ.get("SWEEP_SAMPLES", MAX_SAMPLES)):
            break
    return out


_BUSY: list = []  # (cycles, seconds) of `torch.cuda._sleep` for this worker, measured once


def _busy() -> tuple[int, float]:
    import torch

    if not _BUSY:
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # warm up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(cycles)
        torch.cuda.synchronize()
        cycles = int(cycles * BUSY_SECONDS / max(time.perf_counter() - t0, 1e-6))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(cycles)
        torch.cuda.synchronize()
        _BUSY.append((cycles, time.perf_counter() - t0))
    return _BUSY[0]


def sweep_syncs(op, dtype) -> dict:
    """Each of a few samples of one op with every tensor on the GPU: does the host wait for GPU
    work queued before it (real CUDA), and does the tracer see a sync?"""
    import torch
    from torch.utils._pytree import tree_unflatten

    from harness.trace import SYNC, Tracer

    record, samples = _start(op, dtype)
    if samples is None:
        return record
    gpu = torch.device("cuda", 0)
    cycles, busy = _busy()
    record["variants"] = []
    for k, ((flat, tensor_at), spec) in enumerate(samples):
        row = {"sample": k, "devices": describe([flat[i] for i in tensor_at], ["gpu"] * len(tensor_at))}
        record["variants"].append(row)
        moved = list(flat)
        for i in tensor_at:
            moved[i] = flat[i].to(gpu)  # uploaded before anything is timed (a pageable upload waits)
        inp, args, kwargs = tree_unflatten(moved, spec)

        def run(fn=op, inp=inp, args=args, kwargs=kwargs):
            try:
                with torch.no_grad():
                    fn(inp, *args, **kwargs)
                return None
            except Exception as error:
                return error

        failed = run()  # first-call costs: kernels, memory
        torch.cuda.synchronize()
        if failed is not None:
            row["error"] = verdict(failed)[1]
            continue
        t0 = time.perf_counter()
        run()
        plain = time.perf_counter() - t0  # the host's own time for the call
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        run()
        took = time.perf_counter() - t0
        torch.cuda.synchronize()
        row["waited"] = took - plain > busy / 2
        row["ms"] = [round(plain * 1e3, 2), round(took * 1e3, 2), round(busy * 1e3, 1)]
        module = _op_module(op)
        with Tracer(module, placement=gpu, keep_events=True) as tracer:
            run(module)
        torch.cuda.synchronize()
        syncs = [e.op for e in tracer.events if e.cls == SYNC]
        row["tracer_sync"] = bool(syncs)
        if syncs:
            row["sync_op"] = syncs[0]
    return record


def sweep_op(op, dtype, backend: str, grad_modes=GRAD_MODES) -> dict:
    """Every variant of a few samples of one op on the backends asked for, in each grad mode."""
    import torch

    from harness.trace.emulated import EmulatedCuda

    record, samples = _start(op, dtype)
    if samples is None:
        return record
    variants = []  # (sample index, places, grad mode)
    for k, ((_, tensor_at), _) in enumerate(samples):
        n = len(tensor_at)
        placements = [["gpu"] * n] + [
            ["gpu"] * j + ["cpu"] + ["gpu"] * (n - j - 1) for j in range(min(n, MAX_LEAVES))
        ]
        variants += [(k, places, mode) for places in placements for mode in grad_modes]
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")

    def device_of(where):
        return gpu if where == "gpu" else cpu

    results = {}
    if backend in ("cuda", "both"):
        for v, (k, places, mode) in enumerate(variants):
            (sample, spec) = samples[k]
            exc = _call(op, sample, spec, places, device_of, mode)
            torch.cuda.synchronize()  # an asynchronous failure shows here, and ends the worker
            results.setdefault(v, {})["cuda"] = verdict(exc)
    if backend in ("emulated", "both"):
        with EmulatedCuda(device_count=1):
            for v, (k, places, mode) in enumerate(variants):
                (sample, spec) = samples[k]
                module = _op_module(op)  # errors come out of a module, as in a model
                found = traced(module, lambda: _call(module, sample, spec, places, device_of, mode))  # noqa: B023
                results.setdefault(v, {}).update(found)
    record["variants"] = []
    for v, (k, places, mode) in enumerate(variants):
        flat, tensor_at = samples[k][0]
        leaves = [flat[i] for i in tensor_at]
        row = {"sample": k, "devices": describe(leaves, places), "grad_mode": mode}
        for b, (answer, text) in results[v].items():
            row[b] = answer
            if text:
                row[f"{b}_error"] = text
        record["variants"].append(row)
    return record


def _worker(args) -> int:
    """Sweep ops [start, stop) of the selection, one JSON line each, into args.part."""
    ops = _ops(args.ops.split(",") if args.ops else None)[args.start : args.stop]
    modes = args.grad_modes.split(",")

    def sweep_one(item):
        op, dtype = item
        return sweep_syncs(op, dtype) if args.check == "syncs" else sweep_op(op, dtype, args.backend, modes)

    return worker_loop(ops, args.start, args.part, sweep_one, name=lambda item: item[0].name)


def _same(check: str, backend: str):
    """Whether the backends agree on one call (None: not comparable)."""

    def same(v: dict) -> bool | None:
        if check == "syncs":
            return None if "waited" not in v else v["waited"] == v["tracer_sync"]  # no "waited": it failed
        a, b, c = v.get("cuda"), v.get("emulated"), v.get("tracer")
        if backend == "emulated":  # no GPU: the emulation and the tracer's own rule
            return None if b == "error" else b == c
        if backend != "both" or "error" in (a, b):
            return None  # one backend only, or the sample itself fails somewhere
        return a == b == c

    return same


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, ("--ops", "comma-separated OpInfo names (default: all)"), "sweep.json")
    p.add_argument(
        "--check",
        choices=("devices", "syncs"),
        default="devices",
        help="devices: a tensor on the CPU in turn (above); syncs: all on the GPU, does the host wait",
    )
    args = parse(p, argv)
    if args.part:
        return _worker(args)
    import torch

    t0 = time.perf_counter()
    n = len(_ops(args.ops.split(",") if args.ops else None))

    def command(start: int, stop: int, part: Path) -> list[str]:
        cmd = [sys.executable, __file__, "--backend", args.backend, "--check", args.check]
        cmd += [
            "--grad-modes",
            args.grad_modes,
            "--start",
            str(start),
            "--stop",
            str(stop),
            "--part",
            str(part),
        ]
        return cmd + (["--ops", args.ops] if args.ops else [])

    records, timed_out = run_pool(n, args.workers, args.deadline, command)
    known = KNOWN_SYNC_DIFFERENCES if args.check == "syncs" else KNOWN_DIFFERENCES
    summary = summarize(records, known, _same(args.check, args.backend))
    if args.check == "syncs":
        summary["syncs"] = sum(v.get("waited", False) for r in records for v in r.get("variants", []))
    result = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.backend != "emulated" else None,
        "backend": args.backend if args.check == "devices" else "cuda",
        "check": args.check,
        "grad_modes": args.grad_modes.split(",") if args.check == "devices" else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "timed_out": timed_out,
        **summary,
        "records": records if args.backend == "emulated" and args.check == "devices" else None,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{summary['ops']} ops, {summary['variants']} calls; compared {summary['compared']}, agree {summary['agree']}, "
        f"disagree {len(summary['disagreements'])} (+{len(summary['known'])} known), "
        f"differ by grad mode {len(summary['grad_mode_differences'])}; "
        f"skipped {len(summary['skipped'])}, "
        f"poisoned {len(summary['poisoned'])} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
