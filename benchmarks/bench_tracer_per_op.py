"""The tracer's own cost per op on a workload shaped like the fused decode path, without a model
file: per layer 8 module calls and 13 ops on small static tensors (a product of a named weight,
a norm, a few ops with several tensor arguments), `--layers` layers, `--steps` forward calls
under inference mode. Modes in turn in every repeat, medians of process CPU time (steadier than
wall time on a shared machine):
- untraced; nop (a do-nothing TorchDispatchMode: the floor of any dispatch-mode tracer);
- full: `Tracer(model, path=...)`.

    python benchmarks/bench_tracer_per_op.py --out /tmp/per_op.json

Prints and writes (merged into `--out` under `--name`) the tracer's CPU microseconds per op over
the untraced run and over the do-nothing mode. To compare two versions of the tracer, run the
same command from each checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trace import NopMode  # noqa: E402  (the do-nothing mode bench_trace.py times)

from harness.trace import Tracer  # noqa: E402


class Product(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.gguf_name = name
        self.weight = nn.Parameter(torch.ones(8, 8))

    def forward(self, x):
        return x @ self.weight


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.ones(8))

    def forward(self, x):
        return x * self.weight


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wo = Product("attn_output")
        self.register_buffer("k", torch.ones(8, 8))
        self.register_buffer("v", torch.ones(8, 8))

    def forward(self, x):
        h = torch.addcmul(x, self.k[:1], self.v[:1])
        return self.wo(torch.where(h > 0, h, x))


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = Product("ffn_gate_inp")
        self.experts = Product("ffn_exps")

    def forward(self, x):
        return self.experts(torch.softmax(self.router(x), -1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.moe = Norm(), Attention(), Norm(), MoE()

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.ffn_norm(x))


class Model(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--name", default="fused-like")
    p.add_argument("--out", default="benchmarks/results/tracer_per_op.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = Model(args.layers)
    x = torch.ones(1, 8)
    trace_path = Path(tempfile.mkdtemp(prefix="bench-per-op-")) / "t.jsonl"

    def run():
        with torch.inference_mode():
            for _ in range(args.steps):
                model(x)

    modes = {
        "untraced": contextlib.nullcontext,
        "nop": NopMode,
        "full": lambda: Tracer(model, path=trace_path),
    }
    with Tracer(model, path=trace_path) as tracer:
        run()
    events = tracer.summary.events
    for make in modes.values():  # warm up
        with make():
            run()
    cpu: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(args.repeats):
        for k, make in modes.items():
            start = time.process_time()
            with make():
                run()
            cpu[k].append(time.process_time() - start)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "benchmark": "tracer_per_op",
        "layers": args.layers,
        "steps": args.steps,
        "repeats": args.repeats,
        "events": events,
        "verdict": tracer.summary.verdict,
        "median_cpu_s": {k: round(v, 5) for k, v in med.items()},
        "tracer_cpu_us_per_op_over_untraced": round((med["full"] - med["untraced"]) / events * 1e6, 2),
        "tracer_cpu_us_per_op_over_nop": round((med["full"] - med["nop"]) / events * 1e6, 2),
        "nop_cpu_us_per_op": round((med["nop"] - med["untraced"]) / events * 1e6, 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.name] = result
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"{args.name}: {events} events, tracer {result['tracer_cpu_us_per_op_over_untraced']} us/op over "
        f"untraced, {result['tracer_cpu_us_per_op_over_nop']} over a do-nothing mode "
        f"({result['nop_cpu_us_per_op']} us/op) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
