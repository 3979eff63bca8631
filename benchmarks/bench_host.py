"""Host time of one call of each kind an eager decode step makes, on this machine's host: how an
op is registered (`torch.library.custom_op`, as harness's fused ops are, against a
`torch.library.Library` definition of the same trivial op), a plain torch op, and the fused decode
ops themselves at Mixtral-8x7B's decode shapes and Q4_K_M types (on a CUDA device only). An eager step, and so a
traced one, is bound by these costs (benchmarks/profile_decode.py's `decode_eager_host`). Writes
JSON; asserts nothing.

    python benchmarks/bench_host.py --out benchmarks/results/host.json

Each figure is the median over 7 runs of `--calls` calls, divided by the calls, with the device
synchronized once at the end of a run: host-bound calls measure their host time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.bench import device_name  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--out", default="benchmarks/results/host.json")
    args = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(1, 4096, device=device)
    calls = {
        "torch.empty_like": lambda: torch.empty_like(x),
        "torch.add": lambda: torch.add(x, x),
        "custom_op (trivial)": lambda: torch.ops.harness_bench.trivial_custom_op(x),
        "Library op (trivial)": lambda: torch.ops.harness_bench.trivial_library_op(x),
    }
    if device.type == "cuda":
        calls |= fused_ops(device)
    result = {"device": device_name(device), "torch": torch.__version__, "calls_per_run": args.calls}
    with torch.inference_mode():
        result["us_per_call"] = {name: per_call_us(fn, args.calls, sync) for name, fn in calls.items()}
    for name, us in result["us_per_call"].items():
        print(f"{name:40s} {us:8.2f} us", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
