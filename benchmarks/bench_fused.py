"""Speed of the fused quantized ops (harness.quant.fused) on Mixtral-8x7B shapes, against a
device-to-device copy measured in the same run. Writes JSON; asserts nothing.

    python benchmarks/bench_fused.py --out benchmarks/results/fused.json

Rows: `harness::qmatmul` at 1 token (matrix-vector) and 512 tokens (tiled, tl.dot) per type, and
`harness::moe_ffn` for one layer (8 experts, 2 used) at 1 and 512 tokens. For a memory-bound row,
`fraction_of_copy` is the weight bytes it reads over the time, divided by the copy rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.bench import copy_bandwidth  # noqa: E402
from harness.quant import fused  # noqa: E402
from harness.quant.types import F16_FIELDS, GGMLType, block_size, type_size  # noqa: E402

T = GGMLType
MATMAT_SWEEP = [
    (32, 64, 4, 2),
    (64, 64, 4, 2),
    (64, 64, 8, 3),
    (64, 128, 8, 2),
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (16, 64, 4, 2),
]


def random_weight(qtype: GGMLType, *shape: int, device) -> torch.Tensor:
    """[*shape[:-1], row_bytes] random blocks with small finite f16 scales."""
    rows = 1
    for s in shape[:-1]:
        rows *= s
    nblocks = rows * shape[-1] // block_size(qtype)
    raw = torch.randint(0, 256, (nblocks, type_size(qtype)), dtype=torch.uint8, device=device)
    for off in F16_FIELDS[qtype]:
        half = (torch.randn(nblocks, device=device) * 0.01).half().view(torch.uint8).view(nblocks, 2)
        raw[:, off : off + 2] = half
    return raw.view(*shape[:-1], -1)


def time_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of one `fn()` on the device: `reps` calls captured in a CUDA graph,
    the graph replayed and timed with CUDA events (host launch costs left out, as in the model's
    decode graph); the median over 5 replays, after warm-up."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    times.sort()
    return times[len(times) // 2]


def try_time_ms(fn, reps: int = 20) -> float:
    """time_ms, or NaN for a configuration the device cannot launch (too much shared memory)."""
    try:
        return time_ms(fn, reps)
    except Exception as exc:  # triton's OutOfResources and the like
        print(f"    skipped: {type(exc).__name__}: {str(exc)[:100]}")
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/fused.json")
    p.add_argument("--sweep", action="store_true", help="also try matrix-vector tile sizes")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    copy = copy_bandwidth(dev)
    rows = []

    def row(name: str, ms: float, nbytes: int, flops: int) -> None:
        r = {
            "name": name,
            "median_ms": ms,
            "weight_bytes": nbytes,
            "fraction_of_copy": nbytes / (ms / 1e3) / copy,
            "tflops": flops / (ms / 1e3) / 1e12,
        }
        rows.append(r)
        print(
            f"{name:48s} {ms:8.3f} ms  {r['fraction_of_copy']:6.1%} of copy  {r['tflops']:7.1f} TFLOP/s",
            flush=True,
        )

    for qtype, n, k in (
        (T.Q4_K, 14336, 4096),
        (T.Q4_K, 4096, 14336),
        (T.Q6_K, 32000, 4096),
        (T.Q8_0, 1024, 4096),
        (T.Q4_K, 4096, 4096),
    ):
        w = random_weight(qtype, n, k, device=dev)
        for t in (1, 512):
            x = torch.randn(t, k, device=dev)
            ms = time_ms(lambda x=x, w=w, qtype=qtype, n=n: torch.ops.harness.qmatmul(x, w, int(qtype), n))
            row(f"qmatmul {qtype.name} {n}x{k} T={t}", ms, w.numel(), 2 * t * n * k)
        if args.sweep:
            saved = dict(fused.MATVEC_CONFIG[qtype]), dict(fused.MATMAT_CONFIG[qtype])
            x = torch.randn(1, k, device=dev)
            for bn in (8, 16, 32, 64):
                for warps in (1, 2, 4, 8):
                    fused.MATVEC_CONFIG[qtype].update(BN=bn, num_warps=warps)
                    ms = try_time_ms(
                        lambda x=x, w=w, qtype=qtype, n=n: torch.ops.harness.qmatmul(x, w, int(qtype), n)
                    )
                    row(f"  sweep BN={bn} warps={warps} {qtype.name} {n}x{k} T=1", ms, w.numel(), 2 * n * k)
            x = torch.randn(512, k, device=dev)
            for bm, bn, warps, stages in MATMAT_SWEEP:
                fused.MATMAT_CONFIG[qtype].update(BM=bm, BN=bn, num_warps=warps, num_stages=stages)
                ms = try_time_ms(
                    lambda x=x, w=w, qtype=qtype, n=n: torch.ops.harness.qmatmul(x, w, int(qtype), n), 3
                )
                row(
                    f"  sweep BM={bm} BN={bn} w={warps} s={stages} {qtype.name} {n}x{k} T=512",
                    ms,
                    w.numel(),
                    2 * 512 * n * k,
                )
            fused.MATVEC_CONFIG[qtype].update(saved[0])
            fused.MATMAT_CONFIG[qtype].update(saved[1])

    e, d, f = 8, 4096, 14336
    gate, up = random_weight(T.Q4_K, e, f, d, device=dev), random_weight(T.Q4_K, e, f, d, device=dev)
    down = random_weight(T.Q4_K, e, d, f, device=dev)
    per_expert = (gate.numel() + up.numel() + down.numel()) // e
    for t in (1, 512):
        x = torch.randn(t, d, device=dev)
        experts = torch.stack([torch.randperm(e, device=dev)[:2] for _ in range(t)])
        weights = torch.rand(t, 2, device=dev).softmax(-1)
        read = per_expert * (2 if t == 1 else e)

        def moe(x=x, experts=experts, weights=weights):
            return torch.ops.harness.moe_ffn(x, gate, up, down, weights, experts, int(T.Q4_K), int(T.Q4_K))

        row(f"moe_ffn Q4_K E=8 k=2 D={d} F={f} T={t}", time_ms(moe), read, 2 * 3 * t * 2 * d * f)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bytes_per_second": copy}
    out.write_text(json.dumps({**info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
