"""The tracer against another version of itself, in one process: stubbed eager decode steps of a
4-layer Mixtral-8x7B Q4_K_M (as `bench_host.py --stub-launches --decode-step --trace`) untraced,
under the base tree's `Tracer` and under this tree's, in turn, each writing a trace. On a shared,
noisy machine two processes differ by more than a tracer change does; runs in turn in one process
do not. The base is another checkout's `harness/trace/tracer.py` and `store.py` (the rest of
harness is this tree's), e.g. `git archive <rev> | tar -x -C /tmp/base`.

    python benchmarks/bench_tracer_ab.py --base /tmp/base --out benchmarks/results/tracer_ab_cpu.json

Per op added over untraced, microseconds: `steady` from the median step (a tracer's first step
apart: it writes each new kind of event's line), `run` from whole runs of `--steps` steps; the
first traced step's ms apart. Asserts nothing but that every traced run is clean.

`--floors` also times, in the same turns, what any tracer of this design pays before its own
bookkeeping: `nop` (a dispatch mode that only runs each op, bench_trace.py's), `facts` (one that
also reads every tensor's device, dtype and shape, bench_tracer_per_op.py's) and `modules` (this
tree's `Tracer` with a dispatch that only runs each op: its module-call watch, root hooks and
per-call flush, no per-op work). `this - facts - (modules - nop)` is the tracer's per-op
bookkeeping (module, source line, weight names, matching a repeat, writing).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the launches are stubbed

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_host  # noqa: E402
from bench_trace import NopMode  # noqa: E402
from bench_tracer_per_op import FactsMode  # noqa: E402

import harness.trace.tracer as this  # noqa: E402


def load_base(base: Path):
    """The base tree's tracer module, with its own store module."""

    def load(name: str, path: Path, replace: tuple[str, str] | None = None):
        source = path.read_text()
        if replace is not None:
            source = source.replace(*replace)
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
        module.__file__ = str(path)
        sys.modules[name] = module
        exec(compile(source, str(path), "exec"), module.__dict__)
        return module

    trace = base / "harness" / "trace"
    load("base_store", trace / "store.py")
    tracer = load(
        "base_tracer", trace / "tracer.py", ("from harness.trace.store import", "from base_store import")
    )
    tracer._ACTIVE = this._ACTIVE  # (the model asks harness's `is_tracing()`)
    tracer._TRACE_DIR = str(trace) + os.sep  # (its frames are the tracer's, not model code)
    return tracer


class _ModulesOnly(this.Tracer):
    """This tree's tracer without its per-op work: each op only runs (the `modules` floor)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func._op(*args, **kwargs) if kwargs else func._op(*args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="a checkout holding the base harness/trace")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--runs", type=int, default=11)
    p.add_argument("--out", default=None)
    p.add_argument("--floors", action="store_true", help="also time the nop, facts and modules floors")
    args = p.parse_args(argv)
    base = load_base(args.base)
    bench_host.stub_launches()
    with bench_host.synthesized_model(args.layers, "cpu") as (model, tmp, _):
        token = torch.tensor([1])
        make = {
            "untraced": contextlib.nullcontext,
            "base": lambda: base.Tracer(model, path=tmp / "base.jsonl"),
            "this": lambda: this.Tracer(model, path=tmp / "this.jsonl"),
        }
        if args.floors:
            make |= {
                "nop": NopMode,
                "facts": FactsMode,
                "modules": lambda: _ModulesOnly(model, path=tmp / "modules.jsonl"),
            }
        steps: dict[str, list[float]] = {m: [] for m in make}
        first: dict[str, list[float]] = {m: [] for m in make}
        runs: dict[str, list[float]] = {m: [] for m in make}
        events: dict[str, float] = {}

        def run(mode: str) -> None:
            tracer = make[mode]()
            with tracer:
                marks = [time.perf_counter()]
                for pos in range(args.steps):
                    model(token, pos)
                    marks.append(time.perf_counter())
            ms = [(b - a) * 1e3 for a, b in zip(marks[:-1], marks[1:], strict=True)]
            first[mode].append(ms[0])
            steps[mode].extend(ms[1:])
            runs[mode].append(sum(ms) / len(ms))
            if mode in ("base", "this"):
                if tracer.verdict != "clean":
                    raise SystemExit(f"{mode}: {tracer.verdict}, not clean")
                events[mode] = tracer.summary.events / args.steps

        with torch.inference_mode():
            for pos in range(3):
                model(token, pos)
            for mode in make:  # warm-up
                run(mode)
            for series in (*steps.values(), *first.values(), *runs.values()):
                series.clear()
            for r in range(args.runs):
                for mode in list(make) if r % 2 == 0 else list(make)[::-1]:
                    run(mode)
    if events["base"] != events["this"]:
        raise SystemExit(f"the two tracers saw different ops: {events}")
    per_step = events["this"]
    step = {m: statistics.median(v) for m, v in steps.items()}
    whole = {m: statistics.median(v) for m, v in runs.items()}
    result = {
        "events_per_step": per_step,
        "us_per_op_added": {
            kind: {m: round((med[m] - med["untraced"]) * 1e3 / per_step, 2) for m in make if m != "untraced"}
            for kind, med in (("steady", step), ("run", whole))
        },
        "first_step_ms": {m: round(statistics.median(v), 3) for m, v in first.items()},
        # (with --floors) this tree's tracer's own per-op work, steady: over the facts floor, the
        # module-call watch's share (modules - nop) apart
        "bookkeeping_us_per_op": (
            round((step["this"] - step["facts"] - step["modules"] + step["nop"]) * 1e3 / per_step, 2)
            if args.floors
            else None
        ),
        "step_ms": {m: round(v, 4) for m, v in step.items()},
        "layers": args.layers,
        "steps_per_run": args.steps,
        "runs": args.runs,
        "torch": torch.__version__,
        "command": "python benchmarks/bench_tracer_ab.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
