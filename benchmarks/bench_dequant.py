"""Throughput of the Triton dequantization kernels, the torch-op path, and a device-to-device copy.

    python benchmarks/bench_dequant.py [--out benchmarks/results/dequant.json] [--types Q4_K,Q6_K,Q8_0]
                                       [--iters 50] [--sweep] [--no-torch]

On a CUDA GPU, for each type and for a 4096x14336 matrix and an 8x14336x4096 expert stack, it
times (CUDA events, median over `--iters` after warmup) `harness.quant.kernels.dequantize` with
float32 output (and float16 output for the matrix), and the torch-op path of
`harness.quant.dequant` with the kernel dispatch bypassed (its per-type function table), when that
module imports. Throughput is (bytes read + bytes written) / time; the copy rate is
`dst.copy_(src)` of a 1 GiB buffer, counting read + write, measured in the same run. `--sweep`
also times the kernels over a grid of launch configurations (values per program x warps) on the
matrix, which is how kernels.CONFIGS is tuned. Results go to JSON (device, versions, medians) and
a table on stdout.

`--smoke` runs tiny shapes with a few iterations; without a GPU it uses Triton's interpreter on the
CPU and wall-clock time (the numbers then mean nothing; it checks that the script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REQUIRED = ("Q4_K", "Q6_K", "Q8_0")
SHAPES = {"mat 4096x14336": (4096, 14336), "experts 8x14336x4096": (8, 14336, 4096)}
SMOKE_SHAPES = {"mat 8x512": (8, 512), "experts 2x4x512": (2, 4, 512)}
SWEEP = [(1024, 4), (2048, 4), (4096, 4), (8192, 4), (8192, 8), (16384, 8)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dequant.json"))
    p.add_argument("--types", default="", help="comma-separated GGML types (default: every kernel type)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--torch-iters", type=int, default=10, help="iterations for the (slow) torch-op path")
    p.add_argument("--sweep", action="store_true", help="also time a grid of launch configurations")
    p.add_argument("--no-torch", action="store_true", help="skip the torch-op path")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes, 2 iterations; CPU interpreter without a GPU"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("bench_dequant: needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before harness.quant.kernels is imported
    import triton

    from harness.quant import kernels
    from harness.quant.types import F16_FIELDS, GGMLType, block_size, type_size

    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.iters, args.warmup, args.torch_iters = 2, 1, 2
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    names = [n.strip().upper() for n in args.types.split(",") if n.strip()]
    qtypes = [GGMLType[n] for n in names] if names else list(kernels.KERNEL_TYPES)

    host_ms: list[float] = []  # host milliseconds per call in the last timed() (GPU runs only)

    def timed(fn, iters: int, warmup: int) -> float:
        """Median milliseconds of `fn()` over `iters` runs after `warmup` runs."""
        for _ in range(warmup):
            fn()
        if not cuda:
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        # Hold the GPU in a spin kernel (~0.1 s) while the host enqueues every iteration, so each
        # event pair brackets GPU time only, not the host's launch overhead between iterations.
        torch.cuda._sleep(200_000_000)
        t0 = time.perf_counter()
        for start, end in events:
            start.record()
            fn()
            end.record()
        host_ms.append((time.perf_counter() - t0) * 1e3 / iters)
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    torch_path, torch_note = None, "skipped (--no-torch)"
    if not args.no_torch:
        try:  # the per-type torch functions, without dequantize's dispatch to the kernels
            from harness.quant import dequant

            torch_path = dequant.dequantize_torch
            torch_note = "harness.quant.dequant.dequantize_torch (kernel dispatch bypassed)"
        except Exception as e:  # another engineer's module may be missing or mid-edit
            torch_note = f"unavailable: {e!r}"

    meta = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter, smoke run)",
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "iters": args.iters,
        "torch_iters": args.torch_iters,
        "statistic": "median",
        "torch_path": torch_note,
        "default_config": list(kernels.DEFAULT_CONFIG),
        "configs": {t.name: list(c) for t, c in kernels.CONFIGS.items()},
    }

    # device-to-device copy: the bandwidth ceiling
    n = (2**30 if not args.smoke else 2**20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_ms = timed(partial(dst.copy_, src), args.iters, args.warmup)
    copy_bytes = 2 * src.numel() * 4
    copy_gbps = copy_bytes / copy_ms / 1e6
    del src, dst
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}")
    print(f"copy: {copy_bytes / 1e9:.2f} GB moved in {copy_ms:.3f} ms = {copy_gbps:.0f} GB/s")
    print(f"torch path: {torch_note}")

    results = []
    gen = torch.Generator(device=device).manual_seed(0)

    def record(qtype, shape_name, shape, path, dtype, config, ms, nbytes):
        gbps = nbytes / ms / 1e6
        row = {
            "type": qtype.name,
            "shape_name": shape_name,
            "shape": list(shape),
            "path": path,
            "dtype": str(dtype).removeprefix("torch."),
            "config": config,
            "median_ms": ms,
            "host_ms_per_call": host_ms[-1] if host_ms else None,
            "bytes": nbytes,
            "gbps": gbps,
            "ratio_to_copy": gbps / copy_gbps,
        }
        results.append(row)
        cfg = "" if config is None else f" {config[0]}v/{config[1]}w"
        print(
            f"{qtype.name:7s} {shape_name:22s} {path + cfg:18s} {row['dtype']:8s} "
            f"{ms:9.3f} ms {gbps:7.0f} GB/s {gbps / copy_gbps:6.1%}"
            + (f"  host {host_ms[-1] * 1e3:5.0f} us/call" if host_ms else "")
        )

    print(f"{'type':7s} {'shape':22s} {'path':18s} {'dtype':8s} {'median':>12s} {'GB/s':>12s} {'copy':>6s}")
    for qtype in qtypes:
        bs, ts = block_size(qtype), type_size(qtype)
        for shape_name, shape in shapes.items():
            nvalues = 1
            for s in shape:
                nvalues *= s
            nblocks = nvalues // bs
            raw = torch.randint(0, 256, (nblocks, ts), dtype=torch.uint8, device=device, generator=gen)
            for off in F16_FIELDS.get(qtype, ()):
                raw[:, off + 1] &= 0xBF  # f16 exponent < 16: finite scales
            raw = raw.view(-1)
            in_bytes = raw.numel()

            for dtype in (torch.float32, torch.float16) if shape_name.startswith("mat") else (torch.float32,):
                out_bytes = nvalues * dtype.itemsize
                ms = timed(partial(kernels.dequantize, raw, qtype, shape, dtype), args.iters, args.warmup)
                record(qtype, shape_name, shape, "triton", dtype, None, ms, in_bytes + out_bytes)
            if args.sweep and shape_name.startswith("mat"):
                for values, warps in SWEEP:
                    bpp = max(1, values // bs)
                    fn = partial(
                        kernels.dequantize, raw, qtype, shape, blocks_per_program=bpp, num_warps=warps
                    )
                    ms = timed(fn, args.iters, args.warmup)
                    record(
                        qtype,
                        shape_name,
                        shape,
                        "triton",
                        torch.float32,
                        [values, warps],
                        ms,
                        in_bytes + nvalues * 4,
                    )
            if torch_path is not None:
                try:
                    ms = timed(partial(torch_path, raw, qtype, shape), args.torch_iters, 1)
                    record(qtype, shape_name, shape, "torch", torch.float32, None, ms, in_bytes + nvalues * 4)
                    # the two paths on the same large tensor, bit for bit
                    same = torch.equal(
                        torch_path(raw, qtype, shape).view(torch.int32),
                        kernels.dequantize(raw, qtype, shape).view(torch.int32),
                    )
                    results[-1]["bitwise_equal_to_triton"] = same
                    if not same:
                        print(f"{qtype.name:7s} {shape_name:22s} MISMATCH between the torch path and triton")
                except Exception as e:
                    print(f"{qtype.name:7s} {shape_name:22s} torch path failed: {e!r}")
                    results.append(
                        {"type": qtype.name, "shape_name": shape_name, "path": "torch", "error": repr(e)}
                    )
            del raw
            if cuda:
                torch.cuda.empty_cache()

    best = {}
    for row in results:
        if (
            row.get("path") == "triton"
            and row.get("dtype") == "float32"
            and row["shape_name"].startswith("mat")
        ):
            key = row["type"]
            if key not in best or row["median_ms"] < best[key]["median_ms"]:
                best[key] = row
    if args.sweep:
        print("best config per type (values per program, warps):")
        for key, row in best.items():
            print(f"  {key:7s} {row['config'] or 'default'}  {row['gbps']:.0f} GB/s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        **meta,
        "copy": {"bytes": copy_bytes, "median_ms": copy_ms, "gbps": copy_gbps},
        "results": results,
        "best_config": {k: v["config"] for k, v in best.items()},
    }
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
