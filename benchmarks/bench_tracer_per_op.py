"""The tracer's own cost per op on a workload shaped like the fused decode path, without a model
file, `--layers` layers, `--steps` forward calls under inference mode:
- `--workload aten` (the default): per layer 8 module calls and 13 aten ops on small static
  tensors (a product of a named weight, a norm, a few ops with several tensor arguments);
- `--workload custom-ops`: per layer the 8 module calls and 8 ops of the fused decode step, each
  a custom op with the argument list of its `harness::` op (37 tensors a layer: qkv's three
  weights, attention's caches and tables, moe_ffn's stacked experts named per expert) doing
  next to nothing, and the `.to()` the experts end with.
Modes in turn in every repeat, medians of process CPU time (steadier than wall time on a shared
machine):
- untraced; nop (a do-nothing TorchDispatchMode: the floor of any dispatch-mode tracer);
- facts: a do-nothing mode that also reads the device, dtype and shape of every tensor an op
  takes and gives (the least a tracer of devices reads; `full - facts` is the tracer's own
  bookkeeping: module, source line, weight names, matching a repeat, writing, setup);
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
from typing import Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trace import NopMode  # noqa: E402  (the do-nothing mode bench_trace.py times)

from harness.trace import Tracer  # noqa: E402


class FactsMode(NopMode):
    """A do-nothing mode that reads each tensor's device, dtype and shape, as a tracer must
    (arguments, inside lists too, and outputs), as cheaply as Python can."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        facts = []
        for a in (*args, *kwargs.values()) if kwargs else args:
            if a.__class__ is Tensor or (a.__class__ not in _PLAIN and isinstance(a, Tensor)):
                facts += (a.device, a.dtype, a.shape)
            elif a.__class__ is list or a.__class__ is tuple:
                facts += [(b.device, b.dtype, b.shape) for b in a if isinstance(b, Tensor)]
        out = func._op(*args, **kwargs) if kwargs else func._op(*args)
        if out.__class__ is Tensor:
            facts += (out.device, out.dtype, out.shape)
        elif isinstance(out, (list, tuple)):
            facts += [(o.device, o.dtype, o.shape) for o in out if isinstance(o, Tensor)]
        return out


_PLAIN = frozenset((int, float, bool, str, type(None)))  # (isinstance(x, Tensor) is slow for them)


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


def custom_ops_model(layers: int) -> nn.Module:
    """A model whose layers make the fused decode step's calls with trivial custom ops."""
    lib = "bench_tracer_per_op"

    def op(name, mutates=()):
        return lambda fn: torch.library.custom_op(f"{lib}::{name}", mutates_args=mutates)(fn)

    @op("rms_norm")
    def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
        return x.clone()

    @op("add_rms_norm")
    def add_rms_norm(x: Tensor, r: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return x.clone(), x.clone()

    @op("qkv")
    def qkv(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, a: int, b: int, c: int) -> Tensor:
        return x.new_zeros(x.shape[0], 3 * x.shape[1])  # q, k and v side by side

    @op("attention", ("ck", "cv"))
    def attention(
        qkv: Tensor,
        ck: Tensor,
        cv: Tensor,
        cos: Tensor,
        sin: Tensor,
        at: Optional[Tensor],  # noqa: UP045 (the form torch.library reads on every version)
        p: int,
    ) -> Tensor:
        return qkv[:, : qkv.shape[1] // 3].clone()

    @op("qmatmul")
    def qmatmul(x: Tensor, w: Tensor, qtype: int, n: int) -> Tensor:
        return x.clone()

    @op("router_topk")
    def router_topk(x: Tensor, w: Tensor, k: int, floor: float) -> tuple[Tensor, Tensor]:
        return x.new_ones(1, k), x.new_zeros(1, k, dtype=torch.int64)

    @op("moe_ffn")
    def moe_ffn(
        x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, weights: Tensor, experts: Tensor, a: int, b: int
    ) -> Tensor:
        return x.clone()

    ops = getattr(torch.ops, lib)

    def named(module: nn.Module, name: str, t: torch.Tensor, gguf: str) -> nn.Module:
        module.register_buffer(name, t)
        module.gguf_name = gguf
        return module

    class Norm(nn.Module):
        def forward(self, x, residual=None):
            if residual is None:
                return ops.rms_norm(x, self.weight, 1e-5)
            return ops.add_rms_norm(x, residual, self.weight, 1e-5)

    class QMatMul(nn.Module):
        def forward(self, x):
            return ops.qmatmul(x, self.qweight, 12, 8)

    class Attention(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            blocks = torch.ones(8, 8, dtype=torch.uint8)
            for w in ("q", "k", "v", "output"):
                setattr(
                    self, f"w{w[0]}", named(QMatMul(), "qweight", blocks.clone(), f"blk.{i}.attn_{w}.weight")
                )
            for name in ("cache_k", "cache_v"):
                self.register_buffer(name, torch.zeros(2, 16, 4))
            for name in ("cos", "sin"):
                self.register_buffer(name, torch.ones(16, 2))

        def forward(self, x, position):
            qkv = ops.qkv(x, self.wq.qweight, self.wk.qweight, self.wv.qweight, 12, 12, 14)
            out = ops.attention(qkv, self.cache_k, self.cache_v, self.cos, self.sin, position, 0)
            return self.wo(out)

    class Router(nn.Module):
        def forward(self, x, k):
            return ops.router_topk(x, self.weight, k, 1e-6)

    class Experts(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            self.gguf_names = {}
            for attr, kind in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                self.register_buffer(attr, torch.ones(8, 8, 8, dtype=torch.uint8))
                self.gguf_names[attr] = [f"blk.{i}.ffn_{kind}.{e}.weight" for e in range(8)]

        def forward(self, x, weights, experts):
            return ops.moe_ffn(x, self.w1, self.w3, self.w2, weights, experts, 12, 14).to(x.dtype)

    class MoE(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            self.router = named(Router(), "weight", torch.ones(8, 8), f"blk.{i}.ffn_gate_inp.weight")
            self.experts = Experts(i)

        def forward(self, x):
            return self.experts(x, *self.router(x, 2))

    class Layer(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            self.attn_norm = named(Norm(), "weight", torch.ones(8), f"blk.{i}.attn_norm.weight")
            self.attn = Attention(i)
            self.ffn_norm = named(Norm(), "weight", torch.ones(8), f"blk.{i}.ffn_norm.weight")
            self.moe = MoE(i)

        def forward(self, x, position):
            x, normed = self.ffn_norm(x, self.attn(self.attn_norm(x), position))
            return x + self.moe(normed)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer(i) for i in range(layers))

        def forward(self, x, position):
            for layer in self.layers:
                x = layer(x, position)
            return x

    return Decoder()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--workload", choices=("aten", "custom-ops"), default="aten")
    p.add_argument("--name", default=None, help="default: fused-like (aten), custom-ops")
    p.add_argument("--out", default="benchmarks/results/tracer_per_op.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.name = args.name or {"aten": "fused-like", "custom-ops": "custom-ops"}[args.workload]
    x = torch.ones(1, 8)
    if args.workload == "aten":
        model = Model(args.layers)
        inputs = (x,)
    else:
        model = custom_ops_model(args.layers)
        inputs = (x, torch.zeros(1, dtype=torch.int64))
    trace_path = Path(tempfile.mkdtemp(prefix="bench-per-op-")) / "t.jsonl"

    def run():
        with torch.inference_mode():
            for _ in range(args.steps):
                model(*inputs)

    modes = {
        "untraced": contextlib.nullcontext,
        "nop": NopMode,
        "facts": FactsMode,
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
        "workload": args.workload,
        "layers": args.layers,
        "steps": args.steps,
        "repeats": args.repeats,
        "events": events,
        "verdict": tracer.summary.verdict,
        "median_cpu_s": {k: round(v, 5) for k, v in med.items()},
        "tracer_cpu_us_per_op_over_untraced": round((med["full"] - med["untraced"]) / events * 1e6, 2),
        "tracer_cpu_us_per_op_over_nop": round((med["full"] - med["nop"]) / events * 1e6, 2),
        "nop_cpu_us_per_op": round((med["nop"] - med["untraced"]) / events * 1e6, 2),
        "facts_cpu_us_per_op": round((med["facts"] - med["untraced"]) / events * 1e6, 2),
        "tracer_cpu_us_per_op_over_facts": round((med["full"] - med["facts"]) / events * 1e6, 2),
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
        f"({result['nop_cpu_us_per_op']} us/op; reading every tensor's facts too: "
        f"{result['facts_cpu_us_per_op']}) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
