"""What the sweeps over PyTorch's databases share (`sweep_device_rules.py` over the OpInfo
database, `sweep_modules.py` over the module database): verdicts, the description of a call's
devices, placing a tensor in a grad mode, the pool of worker processes that survives a CUDA
context an op broke, and the summary of the three-way comparison (real CUDA, emulation, tracer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.trace.conformance import GRAD, GRAD_MODES, grad_context  # noqa: E402

__all__ = [
    "GRAD",
    "GRAD_MODES",
    "describe",
    "parse",
    "parser",
    "grad_context",
    "place",
    "run_pool",
    "summarize",
    "traced",
    "verdict",
    "worker_loop",
]


def parser(doc: str, select: tuple[str, str], out: str) -> argparse.ArgumentParser:
    """The options both sweeps take: `select` is (option, help) choosing what to sweep."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backend", choices=("both", "cuda", "emulated"), default=None, help="default: both with a GPU"
    )
    p.add_argument(select[0], default=None, help=select[1])
    p.add_argument(
        "--grad-modes",
        default=",".join(GRAD_MODES),
        help=f"comma-separated grad modes each call runs in (default: {','.join(GRAD_MODES)})",
    )
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--out", default=out)
    p.add_argument("--deadline", type=float, default=1e9, help="seconds; then report what is done")
    p.add_argument("--start", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parsed options; `backend` defaults to both where there is a GPU, else the emulation."""
    args = p.parse_args(argv)
    if set(args.grad_modes.split(",")) - set(GRAD_MODES):
        p.error(f"--grad-modes: each of {', '.join(GRAD_MODES)}")
    if args.backend is None:
        import torch

        args.backend = "both" if torch.cuda.is_available() else "emulated"
    return args


def verdict(exc: BaseException | None) -> tuple[str, str | None]:
    """("accepts" | "refuses" | "error", the exception's first line) of a call's outcome."""
    from harness.trace.conformance import is_refusal

    if exc is None:
        return "accepts", None
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return ("refuses" if is_refusal(exc) else "error"), text


def describe(leaves, places) -> str:
    """`gpu[2x3], cpu[0-dim] int64, ...`: where each tensor of a call is, its shape and non-float dtype."""
    parts = []
    for t, place in zip(leaves, places, strict=True):
        dims = "x".join(map(str, t.shape)) if t.dim() else "0-dim"
        parts.append(f"{place}[{dims}]{'' if t.dtype.is_floating_point else ' ' + str(t.dtype)[6:]}")
    return ", ".join(parts)


def place(t, device, grad_mode: str):
    """`t` on `device`; in GRAD mode a floating tensor becomes a non-leaf that requires grad (a
    leaf would refuse in-place ops, whatever its device)."""
    if grad_mode != GRAD or not (t.dtype.is_floating_point or t.dtype.is_complex):
        return t.to(device)
    leaf = t.detach().clone().requires_grad_()
    return leaf.to(device) if leaf.device != device else leaf.clone()


def traced(module, call: Callable[[], BaseException | None]) -> dict:
    """Runs `call()` (which calls `module`, catching what it raises) under a Tracer of `module`, on
    the emulation: {"emulated": the call's verdict, "tracer": whether the tracer's own rule
    (`classify.refused` on the devices it recorded), or a device error it saw come out before any
    aten op, refuses it; "error" where the call raised something else and nothing was refused}."""
    from harness.trace import Tracer
    from harness.trace.classify import refused
    from harness.trace.events import RAISED

    with Tracer(module, keep_events=True) as tracer:
        exc = call()
    seen = [e for e in tracer.events if refused(e) or e.op == RAISED]
    emulated = verdict(exc)
    if seen:
        judged = ("refuses", f"{seen[0].op} refused")
    elif emulated[0] == "error":
        # The call broke for another reason (autograd refusing an input that requires grad, say):
        # a traced run that raised is never judged "accepts".
        judged = ("error", f"not judged: {emulated[1]}")
    else:
        judged = ("accepts", None)
    return {"emulated": emulated, "tracer": judged}


def worker_loop(items: list, start: int, part: str, sweep_one: Callable, name: Callable = str) -> int:
    """Sweeps items [start, start + len(items)), one JSON line each, into `part`; an exception
    that escapes `sweep_one` means the CUDA context is gone: it is written down and the worker
    stops (exit 3) so that the pool starts a new one after it."""
    with open(part, "a") as f:
        for i, item in enumerate(items, start):
            label = name(item)
            f.write(json.dumps({"index": i, "started": label}) + "\n")
            f.flush()
            try:
                record = sweep_one(item)
            except Exception as exc:
                f.write(
                    json.dumps({"index": i, "op": label, "poisoned": f"{type(exc).__name__}: {exc}"[:300]})
                    + "\n"
                )
                return 3
            record["index"] = i
            f.write(json.dumps(record) + "\n")
            f.flush()
    return 0


def run_pool(
    n: int, workers: int, deadline: float, command: Callable[[int, int, Path], list[str]]
) -> tuple[list, bool]:
    """Runs `command(start, stop, part)` worker processes over items [0, n) split in `workers`
    ranges; a worker that dies inside an item has that item marked poisoned and a new worker goes
    on after it. Returns the records (those with "op") and whether the deadline cut the sweep."""
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sweep-"))
    bounds = [(n * w // workers, n * (w + 1) // workers) for w in range(workers)]
    running = {}  # part -> (stop, process)

    def launch(start: int, stop: int, part: Path) -> None:
        running[part] = (stop, subprocess.Popen(command(start, stop, part)))

    for w, (start, stop) in enumerate(bounds):
        if stop > start:
            launch(start, stop, tmp / f"part{w}.jsonl")
    while running and time.perf_counter() - t0 < deadline:
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
            if not any(x["index"] == last and "op" in x for x in lines):  # it died inside an item
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
    return records, timed_out


def summarize(records: list[dict], known: dict[str, str], same: Callable[[dict], bool | None]) -> dict:
    """Counts over every call (`variants` of each record): `same(variant)` says whether the
    backends agree on it (None: not comparable, e.g. one backend only or the call itself fails).
    Disagreements of records named in `known` are listed apart, with the reason."""
    out = {
        "ops": 0,
        "variants": 0,
        "compared": 0,
        "agree": 0,
        "by_grad_mode": {},
        "disagreements": [],
        "grad_mode_differences": [],  # calls whose verdict on one backend depends on the grad mode
        "known": [],  # disagreements of ops listed as known
        "skipped": [],
        "poisoned": [],  # ops after which the CUDA context was gone (CUDA read memory it should not)
    }
    for r in records:
        if "poisoned" in r:
            out["poisoned"].append({"op": r["op"], "error": r["poisoned"]})
            continue
        if "skipped" in r:
            out["skipped"].append({"op": r["op"], "why": r["skipped"]})
            continue
        out["ops"] += 1
        by_call: dict = {}
        for v in r["variants"]:
            for b in ("cuda", "emulated", "tracer"):
                if v.get(b) not in (None, "error"):
                    by_call.setdefault((v.get("sample"), v.get("devices"), b), {})[v.get("grad_mode")] = v[b]
        for (sample, devices, b), verdicts in by_call.items():
            if len(set(verdicts.values())) > 1:
                entry = {
                    "op": r["op"],
                    "sample": sample,
                    "devices": devices,
                    "backend": b,
                    "verdicts": verdicts,
                }
                out["known" if r["op"] in known else "grad_mode_differences"].append(entry)
        for v in r["variants"]:
            out["variants"] += 1
            agreed = same(v)
            if agreed is None:
                continue
            mode = out["by_grad_mode"].setdefault(v.get("grad_mode", "no_grad"), {"compared": 0, "agree": 0})
            out["compared"] += 1
            mode["compared"] += 1
            if agreed:
                out["agree"] += 1
                mode["agree"] += 1
            elif r["op"] in known:
                out["known"].append({"op": r["op"], "why": known[r["op"]], **v})
            else:
                out["disagreements"].append({"op": r["op"], **v})
    return out
