"""Throughput of the torch-op dequantizers of every supported block type, on one device.

    python benchmarks/bench_dequant_types.py [--device cpu|cuda] [--rows 1024] [--cols 4096]
                                             [--iters 10] [--out benchmarks/results/dequant_types.json]

For each block type (`harness.quant.types.SUPPORTED_TYPES`), random blocks of a rows x cols matrix
(f16 scales finite) are dequantized to float32 by `harness.quant.dequant.dequantize_torch` (the
torch ops every device runs, no Triton kernel), `--iters` times after one warm-up, the types taken in turn (a change
in the machine's load hits all alike); the median milliseconds, and (bytes read + bytes written) / median, go to JSON with the device and versions.
On CUDA each call is synchronized before the clock stops. The numbers compare types with each
other on one machine; they are not a kernel benchmark (benchmarks/bench_dequant.py is).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=4096, help="a multiple of 256")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/dequant_types.json")
    args = p.parse_args(argv)

    import torch

    from harness.quant.dequant import dequantize_torch
    from harness.quant.types import (
        F16_FIELDS,
        FLOAT_TYPES,
        IQ1_M_SCALE_BYTES,
        MXFP4_SCALE_BYTE,
        SUPPORTED_TYPES,
        block_size,
        type_size,
    )

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    blocks = {}
    for qtype in SUPPORTED_TYPES:
        if qtype in FLOAT_TYPES:
            continue
        nblocks = args.rows * args.cols // block_size(qtype)
        raw = torch.randint(0, 256, (nblocks, type_size(qtype)), dtype=torch.uint8, generator=gen)
        for off in F16_FIELDS.get(qtype, ()):
            raw[:, off + 1] &= 0xBF  # f16 exponent below 31: finite scales
        if qtype.name == "IQ1_M":
            raw[:, IQ1_M_SCALE_BYTES[2]] &= 0xBF
        if qtype.name == "MXFP4":
            raw[:, MXFP4_SCALE_BYTE] %= 253  # exponents that keep every value finite
        blocks[qtype] = raw.view(-1).to(device)
        dequantize_torch(blocks[qtype], qtype, shape)  # warm-up (and the device's constant tables)
    sync()
    # Round-robin over the types, so that a change in the machine's load hits all of them alike.
    times: dict = {qtype: [] for qtype in blocks}
    for _ in range(args.iters):
        for qtype, raw in blocks.items():
            start = time.perf_counter()
            dequantize_torch(raw, qtype, shape)
            sync()
            times[qtype].append((time.perf_counter() - start) * 1e3)
    rows = []
    for qtype, raw in blocks.items():
        ms = statistics.median(times[qtype])
        moved = raw.numel() + args.rows * args.cols * 4
        rows.append({"type": qtype.name, "median_ms": round(ms, 3), "gb_per_s": round(moved / ms / 1e6, 3)})
        print(f"{qtype.name:8s} {ms:9.2f} ms {moved / ms / 1e6:8.2f} GB/s", flush=True)

    doc = {
        "command": "python benchmarks/bench_dequant_types.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shape": list(shape),
        "iters": args.iters,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
