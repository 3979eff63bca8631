"""How fast an H100 reads the MoE decode products' weight bytes in the order `_matvec_kernel`'s
"int" read takes them, against other orders and layouts of the same bytes: a probe of the access
pattern alone (each word is loaded and summed, no dequantization, no dot products). Writes JSON;
asserts nothing.

    python benchmarks/probe_read_pattern.py --out benchmarks/results/read_pattern.json

Shapes (Mixtral-8x7B Q4_K_M at one token, 2 experts): "gate_up" reads 2 experts x (gate, up) x
14336 rows x 16 Q4_K super-blocks (144 bytes each; 132 MB), a program 128 rows of gate and the
same 128 of up, one super-block a step (`_matvec_kernel`'s grid: 224 programs, unsplit);
"down" 2 experts x 4096 rows x 56 super-blocks (66 MB), a program 128 rows over one of 8 splits
of 7 super-blocks (512 programs), as the Q4_K down's plan runs it.

Each row reads the same bytes; they differ in the order and layout:
- layout "gguf": rows of GGUF blocks one after another (row r, super-block s at r * row_bytes +
  144 s), as the kernels read Q4_K today; "tiled": the 144 bytes of super-block s of a program's
  BN rows side by side (a program's step reads BN * 144 contiguous bytes); "interleaved": within
  that step, 16-byte chunk j of every row side by side (chunk j of row r at (j * BN + r) * 16).
- read "thread_row": a [BN, 4] int32 tile a chunk, nine chunks a super-block (one thread a row,
  16-byte loads: the int read's weight loads); "warp_row": a [BN, 8, 4] tile (eight threads a
  row, 128 contiguous bytes of it a warp's quarter) and the last chunk as [BN, 4].
- stages: Triton's software pipeline of the loop over super-blocks (1: none).

`gbps` is the weight bytes over the median time of a call (CUDA graph of `reps` calls, as
bench_fused.py's `time_ms`); `fraction_of_copy` divides it by a device-to-device copy's rate.
A layout that reads much faster than "gguf" with "thread_row" says the kernels lose bandwidth
to the access pattern itself (DRAM locality, L1 sectors), not to their arithmetic.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SB_WORDS = tl.constexpr(36)  # a Q4_K super-block: 144 bytes
CHUNKS = tl.constexpr(9)  # 16-byte chunks a super-block
LAYOUTS = ("gguf", "tiled", "interleaved")
READS = ("thread_row", "warp_row")
# name: (rows of one matrix, super-blocks a row, matrices a program reads (gate, up), splits)
SHAPES = {
    "gate_up": (2 * 14336, 16, 2, 1),
    "down": (2 * 4096, 56, 1, 8),
}


@triton.jit
def _chunk_at(
    w_ptr, m, tile, rows, sb, j, row_words, n_super, n_rows, BN: tl.constexpr, LAYOUT: tl.constexpr
):
    """Word offsets [BN] of 16-byte chunk j of super-block sb of rows `rows` [BN] (tile `tile`
    of matrix m) in LAYOUT (0 gguf, 1 tiled, 2 interleaved)."""
    r = rows
    if LAYOUT == 0:
        return (m * n_rows + r).to(tl.int64) * row_words + sb * SB_WORDS + 4 * j
    step = ((m * (n_rows // BN) + tile) * n_super + sb).to(tl.int64) * (BN * SB_WORDS)
    local = r - tile * BN
    if LAYOUT == 1:
        return step + local * SB_WORDS + 4 * j
    return step + (j * BN + local) * 4


@triton.jit
def _probe_kernel(
    w_ptr, out_ptr, row_words, n_super, n_rows, chunk,
    BN: tl.constexpr, MATRICES: tl.constexpr, LAYOUT: tl.constexpr, WARP_ROW: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """out[split, row] = the int32 sum (wrapping) of the words of super-blocks [split * chunk,
    + chunk) of row `row` of each of MATRICES matrices, for the BN rows of tile program_id(0)
    (`_chunk_at` says where each chunk lies); each step reads a super-block of every matrix."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tile * BN + tl.arange(0, BN)
    w4 = tl.arange(0, 4)[None, :]
    first = split * chunk
    last = tl.minimum(first + chunk, n_super)
    acc = tl.zeros((BN, 4), dtype=tl.int32)
    acc8 = tl.zeros((BN, 8, 4), dtype=tl.int32)  # (warp_row's tiles: summed after the loop)
    for sb in tl.range(first, last, 1, num_stages=STAGES):
        for m in tl.static_range(MATRICES):  # (gate and up in the same step, as the gated read)
            if WARP_ROW:
                j8 = tl.arange(0, 8)[None, :, None]
                step = (
                    j8 * (BN * 4) if LAYOUT == 2 else 4 * j8
                )  # (interleaved: chunk j of every row side by side)
                at = tl.multiple_of(
                    _chunk_at(w_ptr, m, tile, rows, sb, 0, row_words, n_super, n_rows, BN, LAYOUT), 4
                )
                acc8 += tl.load(w_ptr + at[:, None, None] + step + tl.arange(0, 4)[None, None, :])
                tail = _chunk_at(w_ptr, m, tile, rows, sb, CHUNKS - 1, row_words, n_super, n_rows, BN, LAYOUT)
                acc += tl.load(w_ptr + tl.multiple_of(tail, 4)[:, None] + w4)
            else:
                for j in tl.static_range(CHUNKS):
                    at = _chunk_at(w_ptr, m, tile, rows, sb, j, row_words, n_super, n_rows, BN, LAYOUT)
                    acc += tl.load(w_ptr + tl.multiple_of(at, 4)[:, None] + w4)
    total = tl.sum(acc, axis=1) + tl.sum(tl.sum(acc8, axis=2), axis=1)
    tl.store(out_ptr + split.to(tl.int64) * n_rows + rows, total)


def laid_out(words: torch.Tensor, layout: str, bn: int) -> torch.Tensor:
    """words [matrices, rows, n_super * 36] (GGUF's order) as `layout` lays them out, flat."""
    if layout == "gguf":
        return words.reshape(-1).contiguous()
    m, rows, width = words.shape
    n_super = width // SB_WORDS
    t = words.reshape(m, rows // bn, bn, n_super, SB_WORDS).permute(0, 1, 3, 2, 4)  # (m, tile, sb, r, w)
    if layout == "interleaved":
        t = t.reshape(m, rows // bn, n_super, bn, CHUNKS, 4).permute(0, 1, 2, 4, 3, 5)  # (.., j, r, 4)
    return t.reshape(-1).contiguous()


def expected(words: torch.Tensor, splits: int) -> torch.Tensor:
    """`_probe_kernel`'s out [splits, rows] for GGUF-ordered words, wrapping as int32."""
    m, rows, width = words.shape
    n_super = width // SB_WORDS
    chunk = -(-n_super // splits)
    parts = []
    for s in range(splits):
        block = words[:, :, s * chunk * SB_WORDS : min(n_super, (s + 1) * chunk) * SB_WORDS]
        parts.append(block.to(torch.int64).sum(dim=(0, 2)))
    total = torch.stack(parts)
    return ((total + 2**31) % 2**32 - 2**31).to(torch.int32)


def run_probe(flat: torch.Tensor, shape: tuple, layout: str, read: str, bn: int, warps: int, stages: int):
    """One launch of `_probe_kernel` over `flat` (laid out by `laid_out`): out [splits, rows]."""
    rows, n_super, matrices, splits = shape
    chunk = -(-n_super // splits)
    splits = -(-n_super // chunk)
    out = torch.empty(splits, rows, dtype=torch.int32, device=flat.device)
    _probe_kernel[(rows // bn, splits)](
        flat, out, n_super * SB_WORDS, n_super, rows, chunk,
        BN=bn, MATRICES=matrices, LAYOUT=LAYOUTS.index(layout), WARP_ROW=read == "warp_row", STAGES=stages,
        num_warps=warps,
    )  # fmt: skip
    return out


def check_small() -> list[dict]:
    """Every layout and read at two small shapes (gated, unsplit; one matrix over 3 splits of 7
    super-blocks) on whatever device Triton runs (under TRITON_INTERPRET=1, the CPU): whether
    the kernel's sums equal `expected`'s."""
    results = []
    for shape in [(32, 3, 2, 1), (32, 7, 1, 3)]:
        rows, n_super, matrices, splits = shape
        words = torch.randint(-(2**31), 2**31 - 1, (matrices, rows, n_super * SB_WORDS), dtype=torch.int32)
        want = expected(words, splits)
        for layout, read in itertools.product(LAYOUTS, READS):
            got = run_probe(laid_out(words, layout, 16), shape, layout, read, 16, 1, 1)
            results.append(
                {"shape": list(shape), "layout": layout, "read": read, "match": bool(torch.equal(got, want))}
            )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/read_pattern.json")
    p.add_argument(
        "--check", action="store_true", help="small shapes, sums checked, JSON to stdout (no timing)"
    )
    p.add_argument("--shapes", default="gate_up,down")
    p.add_argument("--grid", default="128x4", help="comma-separated BNxwarps settings")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    if args.check:
        print(json.dumps(check_small()))
        return 0
    from bench_fused import time_ms  # (benchmarks/ is on sys.path as this script's folder)

    from harness.bench import copy_bandwidth

    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    rows_out = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        rows, n_super, matrices, splits = shape
        words = torch.randint(
            -(2**31), 2**31 - 1, (matrices, rows, n_super * SB_WORDS), dtype=torch.int32, device=device
        )
        want = expected(words, splits)
        nbytes = words.numel() * 4
        grid = [tuple(int(v) for v in g.split("x")) for g in args.grid.split(",")]
        stages = [int(s) for s in args.stages.split(",")]
        for layout, (bn, warps) in itertools.product(LAYOUTS, grid):
            flat = laid_out(words, layout, bn)
            for read, st in itertools.product(READS, stages):
                call = functools.partial(run_probe, flat, shape, layout, read, bn, warps, st)
                ok = bool(torch.equal(call(), want))
                ms = time_ms(call, args.reps)
                row = {
                    "shape": name, "layout": layout, "read": read, "BN": bn, "num_warps": warps, "stages": st,
                    "ms": ms, "gbps": nbytes / ms / 1e6, "fraction_of_copy": nbytes / (ms / 1e3) / copy,
                    "sums_match": ok,
                }  # fmt: skip
                rows_out.append(row)
                print(
                    f"{name:8s} {layout:12s} {read:11s} BN={bn:<4d} warps={warps} stages={st}  "
                    f"{ms * 1e3:8.1f} us  {row['gbps']:7.0f} GB/s  {row['fraction_of_copy']:.2f} of copy"
                    + ("" if ok else "  SUMS DIFFER")
                )
        del words
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "device": torch.cuda.get_device_name(device),
        "copy_bytes_per_s": copy,
        "triton": triton.__version__,
    }
    out.write_text(json.dumps({**info, "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
