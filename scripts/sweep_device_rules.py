"""Sweep PyTorch's OpInfo database for device rules, comparing real CUDA with the emulation.

For each op of `torch.testing._internal.common_methods_invocations.op_db` and a few of its sample
inputs, every tensor argument is put on the CPU in turn while the others are on the accelerator.
Real CUDA either accepts the call or refuses it for devices; the emulated accelerator
(`harness.trace.emulated`) must do the same, and so must the tracer without help from the error:
its own rule (`refused()`, which judges the devices it recorded) or a device error it saw come out
of a module before any aten op ran.
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

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Disagreements known and left alone (ops far from inference code); the sweep lists them apart.
KNOWN_DIFFERENCES = {
    "nn.functional.ctc_loss": "CUDA's CTC loss moves targets and lengths from any device itself",
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


def _verdict(exc: BaseException | None) -> tuple[str, str | None]:
    from harness.trace.conformance import is_refusal

    if exc is None:
        return "accepts", None
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return ("refuses" if is_refusal(exc) else "error"), text


def _describe(leaves, places) -> str:
    parts = []
    for t, place in zip(leaves, places, strict=True):
        dims = "x".join(map(str, t.shape)) if t.dim() else "0-dim"
        parts.append(f"{place}[{dims}]{'' if t.dtype.is_floating_point else ' ' + str(t.dtype)[6:]}")
    return ", ".join(parts)


def _call(op, sample, spec, places, device_of):
    """Run the op (or a module calling it) with each tensor leaf on the device its place names."""
    import torch
    from torch.utils._pytree import tree_unflatten

    flat, tensor_at = sample
    moved = list(flat)
    for i, place in zip(tensor_at, places, strict=True):
        moved[i] = flat[i].to(device_of(place))
    inp, args, kwargs = tree_unflatten(moved, spec)
    try:
        with torch.no_grad():
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
        row = {"sample": k, "devices": _describe([flat[i] for i in tensor_at], ["gpu"] * len(tensor_at))}
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
            row["error"] = _verdict(failed)[1]
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


def sweep_op(op, dtype, backend: str) -> dict:
    """Every variant of a few samples of one op on the backends asked for."""
    import torch

    from harness.trace import Tracer
    from harness.trace.classify import refused
    from harness.trace.emulated import EmulatedCuda
    from harness.trace.events import RAISED

    record, samples = _start(op, dtype)
    if samples is None:
        return record
    variants = []  # (sample index, places)
    for k, ((_, tensor_at), _) in enumerate(samples):
        n = len(tensor_at)
        variants.append((k, ["gpu"] * n))
        for j in range(min(n, MAX_LEAVES)):
            variants.append((k, ["gpu"] * j + ["cpu"] + ["gpu"] * (n - j - 1)))
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")

    def device_of(place):
        return gpu if place == "gpu" else cpu

    results = {}
    if backend in ("cuda", "both"):
        for v, (k, places) in enumerate(variants):
            (sample, spec) = samples[k]
            exc = _call(op, sample, spec, places, device_of)
            torch.cuda.synchronize()  # an asynchronous failure shows here, and ends the worker
            results.setdefault(v, {})["cuda"] = _verdict(exc)
    if backend in ("emulated", "both"):
        with EmulatedCuda(device_count=1):
            for v, (k, places) in enumerate(variants):
                (sample, spec) = samples[k]
                module = _op_module(op)  # errors come out of a module, as in a model
                with Tracer(module, keep_events=True) as tracer:
                    exc = _call(module, sample, spec, places, device_of)
                results.setdefault(v, {})["emulated"] = _verdict(exc)
                # The tracer's own rule (`refused`, on the recorded devices) for the ops it saw.
                seen = [e for e in tracer.events if refused(e) or e.op == RAISED]
                text = f"{seen[0].op} refused" if seen else None
                results[v]["tracer"] = ("refuses" if seen else "accepts", text)
    record["variants"] = []
    for v, (k, places) in enumerate(variants):
        flat, tensor_at = samples[k][0]
        leaves = [flat[i] for i in tensor_at]
        row = {"sample": k, "devices": _describe(leaves, places)}
        for b, (verdict, text) in results[v].items():
            row[b] = verdict
            if text:
                row[f"{b}_error"] = text
        record["variants"].append(row)
    return record


def _worker(args) -> int:
    """Sweep ops [start, stop) of the selection, one JSON line each, into args.part."""
    ops = _ops(args.ops.split(",") if args.ops else None)[args.start : args.stop]
    with open(args.part, "a") as f:
        for i, (op, dtype) in enumerate(ops, args.start):
            f.write(json.dumps({"index": i, "started": op.name}) + "\n")
            f.flush()
            try:
                if args.check == "syncs":
                    record = sweep_syncs(op, dtype)
                else:
                    record = sweep_op(op, dtype, args.backend)
            except Exception as exc:  # the CUDA context is gone: say so and stop
                f.write(
                    json.dumps({"index": i, "op": op.name, "poisoned": f"{type(exc).__name__}: {exc}"[:300]})
                    + "\n"
                )
                return 3
            record["index"] = i
            f.write(json.dumps(record) + "\n")
            f.flush()
    return 0


def _summarize(records: list[dict], check: str, backend: str) -> dict:
    """Counts and lists over every call; `agree` where the backends (or, for syncs, the host's
    wait and the tracer) say the same."""
    known_ops = KNOWN_SYNC_DIFFERENCES if check == "syncs" else KNOWN_DIFFERENCES
    out = {
        "ops": 0,
        "variants": 0,
        "compared": 0,
        "agree": 0,
        "disagreements": [],
        "known": [],  # disagreements of ops listed as known
        "skipped": [],
        "poisoned": [],  # ops after which the CUDA context was gone (CUDA read memory it should not)
    }
    if check == "syncs":
        out["syncs"] = 0  # calls where the host waited
    for r in records:
        if "poisoned" in r:
            out["poisoned"].append({"op": r["op"], "error": r["poisoned"]})
            continue
        if "skipped" in r:
            out["skipped"].append({"op": r["op"], "why": r["skipped"]})
            continue
        out["ops"] += 1
        for v in r["variants"]:
            out["variants"] += 1
            if check == "syncs":
                if "waited" not in v:
                    continue  # the call failed
                out["syncs"] += v["waited"]
                same = v["waited"] == v["tracer_sync"]
            else:
                a, b, c = v.get("cuda"), v.get("emulated"), v.get("tracer")
                if backend != "both" or "error" in (a, b):
                    continue  # one backend only, or the sample itself fails somewhere
                same = a == b == c
            out["compared"] += 1
            if same:
                out["agree"] += 1
            else:
                out["known" if r["op"] in known_ops else "disagreements"].append({"op": r["op"], **v})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backend", choices=("both", "cuda", "emulated"), default=None, help="default: both with a GPU"
    )
    p.add_argument("--ops", default=None, help="comma-separated OpInfo names (default: all)")
    p.add_argument(
        "--check",
        choices=("devices", "syncs"),
        default="devices",
        help="devices: a tensor on the CPU in turn (above); syncs: all on the GPU, does the host wait",
    )
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--out", default="sweep.json")
    p.add_argument("--deadline", type=float, default=1e9, help="seconds; then report what is done")
    p.add_argument("--start", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.backend is None:
        args.backend = "both" if torch.cuda.is_available() else "emulated"
    if args.part:
        return _worker(args)

    t0 = time.perf_counter()
    n = len(_ops(args.ops.split(",") if args.ops else None))
    tmp = Path(tempfile.mkdtemp(prefix="sweep-"))
    bounds = [(n * w // args.workers, n * (w + 1) // args.workers) for w in range(args.workers)]
    running = {}  # part -> (stop, process)

    def launch(start: int, stop: int, part: Path) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--backend",
            args.backend,
            "--check",
            args.check,
            "--start",
            str(start),
            "--stop",
            str(stop),
        ]
        cmd += ["--part", str(part)] + (["--ops", args.ops] if args.ops else [])
        running[part] = (stop, subprocess.Popen(cmd))

    for w, (start, stop) in enumerate(bounds):
        if stop > start:
            launch(start, stop, tmp / f"part{w}.jsonl")
    while running and time.perf_counter() - t0 < args.deadline:
        time.sleep(0.5)
        for part, (stop, proc) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[part]
            if code == 0:
                continue
            lines = [json.loads(x) for x in part.read_text().splitlines()] if part.exists() else []
            last = max((x["index"] for x in lines), default=-1)
            if not any(x["index"] == last and "op" in x for x in lines):  # it died inside an op
                started = next((x["started"] for x in lines if x["index"] == last), f"#{last}")
                with part.open("a") as f:
                    f.write(
                        json.dumps({"index": last, "op": started, "poisoned": f"worker exit {code}"}) + "\n"
                    )
            if last + 1 < stop:
                launch(last + 1, stop, part)
    timed_out = bool(running)
    for _, proc in running.values():
        proc.kill()
    records = []
    for part in sorted(tmp.glob("part*.jsonl")):
        records += [r for r in map(json.loads, part.read_text().splitlines()) if "op" in r]
    summary = _summarize(records, args.check, args.backend)
    result = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.backend != "emulated" else None,
        "backend": args.backend if args.check == "devices" else "cuda",
        "check": args.check,
        "seconds": round(time.perf_counter() - t0, 1),
        "timed_out": timed_out,
        **summary,
        "records": records if args.backend == "emulated" and args.check == "devices" else None,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{summary['ops']} ops, {summary['variants']} calls; compared {summary['compared']}, agree {summary['agree']}, "
        f"disagree {len(summary['disagreements'])} (+{len(summary['known'])} known); "
        f"skipped {len(summary['skipped'])}, "
        f"poisoned {len(summary['poisoned'])} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
