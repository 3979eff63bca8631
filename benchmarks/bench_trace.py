"""Tracing overhead: traced / untraced wall time of the same generation, in one process.

Modes, run in turn in every repeat (so drifts of the machine hit them alike), medians over the
repeats:
- untraced: `generate(model, prompt, decode + 1)` in eager mode;
- full: the same under `Tracer(model, path=...)`, every op recorded and written;
- sampledN: `Tracer(..., sample_every=N)`: every Nth forward call traced (the prefill is call 0),
  the others skipped;
- nop (with --nop): a do-nothing TorchDispatchMode, the floor any dispatch-mode tracer pays.

Each mode's garbage collections during its timed runs are counted too (`gc`: per generation,
how many and the seconds they took, over all repeats; `gc_tracked_objects`: the objects the
collector tracks when timing starts, what a full collection walks).

    python benchmarks/bench_trace.py                      # tiny model on the CPU (synthesized)
    python benchmarks/bench_trace.py --model mixtral-8x7b.Q4_K_M.gguf --device cuda --decode 128

Results are merged into `--out` (default benchmarks/results/trace.json) under a name
(`--name`, default "<model>-<device>-d<decode>"), so the CPU and GPU figures live side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.bench import host_hotspots  # noqa: E402
from harness.model.generate import generate  # noqa: E402
from harness.model.mixtral import Mixtral  # noqa: E402
from harness.trace import Tracer, load_trace  # noqa: E402


class GCMeter:
    """Garbage collections while `mode` is set, per mode and generation: [count, seconds]."""

    def __init__(self):
        self.mode: str | None = None
        self.collections: dict[str, dict[str, list]] = {}
        self._start = 0.0

    def __enter__(self) -> GCMeter:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self.mode is not None:
            gens = self.collections.setdefault(self.mode, {})
            entry = gens.setdefault(str(info["generation"]), [0, 0.0])
            entry[0] += 1
            entry[1] = round(entry[1] + time.perf_counter() - self._start, 6)


class NopMode(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # as the tracer's mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the tiny preset, synthesized)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or emulated")
    p.add_argument("--device-map", default=None, help="JSON device map instead of --device")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--decode", type=int, default=32, help="decode steps after the prefill")
    p.add_argument("--repeats", type=int, default=None, help="default 7 (tiny), 3 (a given model)")
    p.add_argument("--sample-every", default="16", help="N, or several: 16,32 (one sampled mode each)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--nop", action="store_true", help="also time a do-nothing dispatch mode")
    p.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="TOP",
        help="after the timings, the TOP Python functions by self time of one untraced and one full run (cProfile)",
    )
    p.add_argument("--name", default=None)
    p.add_argument("--out", default="benchmarks/results/trace.json")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-trace-"))
    stack = contextlib.ExitStack()
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)  # (the traces: tens of MB on a GPU)
    device = args.device
    if device == "emulated":
        from harness.trace.emulated import EmulatedCuda

        stack.enter_context(EmulatedCuda(device_count=8))
        device = "cuda"
    with stack:
        if args.model is None:
            from harness.synth import synthesize

            model_path = synthesize(tmp / "tiny.gguf", "tiny", layout="per-expert", router="f16")
            model_name = "tiny"
        else:
            model_path = Path(args.model)
            model_name = model_path.stem
        repeats = args.repeats or (7 if args.model is None else 3)
        device_map = json.loads(args.device_map) if args.device_map else None
        t0 = time.perf_counter()
        model = Mixtral.from_gguf(
            model_path,
            device=None if device_map else device,
            device_map=device_map,
            max_seq_len=args.prompt_tokens + args.decode + 1,
        )
        load_s = time.perf_counter() - t0
        vocab = model.config.vocab_size
        prompt = [1] + [(97 * i + 13) % (vocab - 3) + 3 for i in range(args.prompt_tokens - 1)]
        n_new = args.decode + 1
        head = str(model.placement.head)

        def untraced():
            generate(model, prompt, n_new)
            _sync(head)

        def nop():
            with NopMode():
                generate(model, prompt, n_new)
            _sync(head)

        def full():
            with Tracer(model, path=tmp / "full.jsonl"):
                generate(model, prompt, n_new)
            _sync(head)

        def sampled(n: int):
            def run():
                with Tracer(model, path=tmp / f"sampled{n}.jsonl", sample_every=n):
                    generate(model, prompt, n_new)
                _sync(head)

            return run

        every = [int(n) for n in str(args.sample_every).split(",")]
        modes = {"untraced": untraced, "full": full, **{f"sampled{n}": sampled(n) for n in every}}
        if args.nop:
            modes["nop"] = nop
        for f in modes.values():  # warm up: caches, first-call costs
            f()
        wall: dict[str, list[float]] = {k: [] for k in modes}
        cpu: dict[str, list[float]] = {k: [] for k in modes}
        tracked = len(gc.get_objects())
        meter = stack.enter_context(GCMeter())
        for r in range(repeats):
            order = list(modes)[r % len(modes) :] + list(modes)[: r % len(modes)]
            for k in order:
                meter.mode = k
                w, c = time.perf_counter(), time.process_time()
                modes[k]()
                wall[k].append(time.perf_counter() - w)
                cpu[k].append(time.process_time() - c)
                meter.mode = None
            print(
                f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {wall[k][-1]:.3f}s" for k in modes),
                file=sys.stderr,
            )

        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        full_trace = load_trace(tmp / "full.jsonl")
        sampled_traces = {n: load_trace(tmp / f"sampled{n}.jsonl") for n in every}
        events = full_trace.summary.events
        # Events of the decode steps (forward calls 1.., with the sampling after each), per token;
        # the prefill's apart.
        prefill_events = sum(1 for ev in full_trace.events() if ev.step == 0)
        result = {
            "benchmark": "trace",
            "model": model_name,
            "model_path": str(args.model)
            if args.model
            else "synthesized tiny preset (per-expert, F16 router)",
            "device": args.device,
            "device_name": torch.cuda.get_device_name()
            if device.startswith("cuda") and args.device != "emulated"
            else platform.processor() or platform.machine(),
            "placement": model.placement.describe(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "prompt_tokens": len(prompt),
            "decode_steps": args.decode,
            "sample_every": every,
            "repeats": repeats,
            "load_s": round(load_s, 3),
            "median_wall_s": {k: round(v, 5) for k, v in med.items()},
            "ratio_wall": {k: round(v / med["untraced"], 3) for k, v in med.items() if k != "untraced"},
            # each repeat's traced run over the untraced run next to it, the median of those: a
            # host whose load drifts between repeats moves both runs of a pair alike
            "ratio_wall_paired": {
                k: round(statistics.median(t / u for t, u in zip(v, wall["untraced"], strict=True)), 3)
                for k, v in wall.items()
                if k != "untraced"
            },
            "ratio_cpu_time": {
                k: round(v / med_cpu["untraced"], 3) for k, v in med_cpu.items() if k != "untraced"
            },
            "events_full": events,
            "events_prefill": prefill_events,
            "events_per_decoded_token": round((events - prefill_events) / max(args.decode, 1), 1),
            "events_sampled": {n: t.summary.events for n, t in sampled_traces.items()},
            "steps_sampled": {n: t.summary.steps for n, t in sampled_traces.items()},
            "trace_bytes_full": (tmp / "full.jsonl").stat().st_size,
            "verdict": full_trace.summary.verdict,
            "untraced_us_per_op": round(med["untraced"] / events * 1e6, 2),
            "full_overhead_us_per_op": round((med["full"] - med["untraced"]) / events * 1e6, 2),
            # the same in process CPU time: steadier than wall time on a shared machine
            "median_cpu_s": {k: round(v, 5) for k, v in med_cpu.items()},
            "full_overhead_cpu_us_per_op": round((med_cpu["full"] - med_cpu["untraced"]) / events * 1e6, 2),
            "wall_s": {k: [round(x, 5) for x in v] for k, v in wall.items()},
            "gc_tracked_objects": tracked,
            "gc": {k: meter.collections.get(k, {}) for k in modes},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if args.host_profile:  # where the host time of each goes (cProfile slows both)
            result["host_top_self"] = {
                k: host_hotspots(modes[k], 1, args.host_profile) for k in ("untraced", "full")
            }
    name = args.name or f"{model_name}-{args.device}-d{args.decode}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[name] = result
    out.write_text(json.dumps(results, indent=1) + "\n")
    ratios = ", ".join(
        f"{k} x{v} (paired x{result['ratio_wall_paired'][k]})" for k, v in result["ratio_wall"].items()
    )
    print(
        f"{name}: untraced {med['untraced']:.3f}s; {ratios}; {events} events "
        f"({result['events_per_decoded_token']} per decoded token), "
        f"{result['full_overhead_us_per_op']} us/op ({result['full_overhead_cpu_us_per_op']} in CPU time) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
