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

`--q6k` probes packed Q6_K instead (PACK_CONFIG "q6_k_interleave"): the packed Q6_K "int" read's
own loads (`fused._q6_k_int_words`, `_q6_k_scale_words`: ql, qh, scale and d words of each
super-block) summed, at its BN and warps, over the row-major packed layout ("packed") and the
interleaved one ("interleaved"), at Mixtral-8x7B's Q6_K down (2 experts x 4096 rows x 56
super-blocks, 96 MB, 2 splits as its plan on an H100) and output head (32000 x 16, 108 MB):

    python benchmarks/probe_read_pattern.py --q6k --grid 16x2 --stages 1 --out benchmarks/results/read_pattern_q6_k.json

`sums_match`: the interleaved read's per-row sums equal the packed one's (and, with `--check`,
torch's).
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

from harness.quant import fused  # noqa: E402
from harness.quant.fused import _interleaved_rows, _q6_k_int_words, _q6_k_scale_words  # noqa: E402
from harness.quant.types import GGMLType  # noqa: E402

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


Q6_LAYOUTS = ("packed", "interleaved")
# name: (rows of one matrix, super-blocks a row, splits)
Q6_SHAPES = {"q6_down": (2 * 4096, 56, 2), "q6_head": (32000, 16, 1)}


@triton.jit
def _q6_k_probe_kernel(
    w_ptr,
    out_ptr,
    n_rows,
    n_super,
    chunk,
    row_bytes,
    BN: tl.constexpr,
    IL: tl.constexpr,
    STAGES: tl.constexpr,
):
    """out[split, row] = the int32 sum (wrapping) of every word the packed Q6_K int read loads for
    super-blocks [split * chunk, + chunk) of row `row` (its d word once per super-block), for the
    BN rows of tile program_id(0), in the packed (IL False) or interleaved layout."""
    split = tl.program_id(1)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    if IL:
        roww = _interleaved_rows(0, 0, n, n_rows, row_bytes, 8) // 4
    else:
        roww = tl.where(n < n_rows, n, 0).to(tl.int64) * row_bytes // 4
    first = split * chunk
    last = tl.minimum(first + chunk, n_super)
    acc = tl.zeros((BN, 2, 2, 4), dtype=tl.int32)
    acc_row = tl.zeros((BN,), dtype=tl.int32)
    for sb in tl.range(first, last, 1, num_stages=STAGES):
        ql_even, ql_odd, qh, d_word = _q6_k_int_words(w_ptr, roww, sb, n_super, None, IL)
        s0, s1, s2, s3 = _q6_k_scale_words(w_ptr, roww, sb, n_super, None, IL)
        acc += ql_even + ql_odd + qh
        acc_row += d_word + s0 + s1 + s2 + s3
    total = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1) + acc_row
    tl.store(out_ptr + split.to(tl.int64) * n_rows + n, total, mask=n < n_rows)


def q6_k_laid_out(raw: torch.Tensor, layout: str) -> torch.Tensor:
    """Q6_K GGUF blocks [rows, row_bytes] as the kernels keep them in `layout`, as int32 words."""
    return fused.pack(raw, GGMLType.Q6_K, interleave=layout == "interleaved").view(torch.int32)


def q6_k_expected(raw: torch.Tensor, splits: int) -> torch.Tensor:
    """`_q6_k_probe_kernel`'s out [splits, rows] from GGUF blocks, in torch (wrapping as int32)."""
    words = fused.pack(raw, GGMLType.Q6_K).view(torch.int32).to(torch.int64)
    n_super = raw.shape[1] // 210
    chunk = -(-n_super // splits)
    sb = torch.arange(n_super)
    ql = words[:, : 32 * n_super].reshape(-1, n_super, 32).sum(-1)
    qh = words[:, 32 * n_super : 48 * n_super].reshape(-1, n_super, 16).sum(-1)
    sc = words[:, 48 * n_super : 52 * n_super].reshape(-1, n_super, 4).sum(-1)
    d = words[:, 52 * n_super + sb // 2]  # each d word once a super-block it serves
    per_sb = ql + qh + sc + d
    total = torch.stack([per_sb[:, s * chunk : (s + 1) * chunk].sum(-1) for s in range(-(-n_super // chunk))])
    return ((total + 2**31) % 2**32 - 2**31).to(torch.int32)


def run_q6_k_probe(flat: torch.Tensor, shape: tuple, layout: str, bn: int, warps: int, stages: int):
    """One launch of `_q6_k_probe_kernel` over `flat` (`q6_k_laid_out`): out [splits, rows]."""
    rows, n_super, splits = shape
    chunk = -(-n_super // splits)
    splits = -(-n_super // chunk)
    out = torch.empty(splits, rows, dtype=torch.int32, device=flat.device)
    _q6_k_probe_kernel[(-(-rows // bn), splits)](
        flat, out, rows, n_super, chunk, flat.shape[1] * 4,
        BN=bn, IL=layout == "interleaved", STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return out


def check_q6_k_small() -> list[dict]:
    """Both Q6_K layouts at two small shapes (one split, 24 rows of 8 super-blocks: a tile past the
    last row; 16 super-blocks over 3 splits) under whatever Triton runs: whether the sums equal
    `q6_k_expected`'s."""
    results = []
    for shape in [(24, 8, 1), (16, 16, 3)]:
        rows, n_super, splits = shape
        raw = torch.randint(0, 256, (rows, n_super * 210), dtype=torch.uint8)
        want = q6_k_expected(raw, splits)
        for layout in Q6_LAYOUTS:
            got = run_q6_k_probe(q6_k_laid_out(raw, layout), shape, layout, 16, 2, 1)
            results.append({"shape": list(shape), "layout": layout, "match": bool(torch.equal(got, want))})
    return results


def probe_q6_k(args, copy: float, time_ms) -> list[dict]:
    """The Q6_K probe's timed rows (`--q6k`)."""
    rows_out = []
    for name in args.shapes.split(","):
        shape = Q6_SHAPES[name]
        rows, n_super, _ = shape
        raw = torch.randint(0, 256, (rows, n_super * 210), dtype=torch.uint8, device="cuda")
        nbytes = raw.numel()
        grid = [tuple(int(v) for v in g.split("x")) for g in args.grid.split(",")]
        stages = [int(s) for s in args.stages.split(",")]
        reference = None
        for layout, (bn, warps), st in itertools.product(Q6_LAYOUTS, grid, stages):
            flat = q6_k_laid_out(raw, layout)
            call = functools.partial(run_q6_k_probe, flat, shape, layout, bn, warps, st)
            got = call()
            reference = got if reference is None else reference
            ok = bool(torch.equal(got, reference))
            ms = time_ms(call, args.reps)
            row = {
                "shape": name, "type": GGMLType.Q6_K.name, "layout": layout, "read": "q6_k_int", "BN": bn,
                "num_warps": warps, "stages": st, "ms": ms, "gbps": nbytes / ms / 1e6,
                "fraction_of_copy": nbytes / (ms / 1e3) / copy, "sums_match": ok,
            }  # fmt: skip
            rows_out.append(row)
            print(
                f"{name:8s} {layout:12s} BN={bn:<4d} warps={warps} stages={st}  {ms * 1e3:8.1f} us  "
                f"{row['gbps']:7.0f} GB/s  {row['fraction_of_copy']:.2f} of copy"
                + ("" if ok else "  SUMS DIFFER")
            )
            del flat
        del raw
    return rows_out


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
    p.add_argument("--q6k", action="store_true", help="probe packed Q6_K's layouts (shapes q6_down,q6_head)")
    args = p.parse_args(argv)
    if args.check:
        print(json.dumps(check_q6_k_small() if args.q6k else check_small()))
        return 0
    if args.q6k and args.shapes == "gate_up,down":
        args.shapes = ",".join(Q6_SHAPES)
    from bench_fused import time_ms  # (benchmarks/ is on sys.path as this script's folder)

    from harness.bench import copy_bandwidth

    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    rows_out = probe_q6_k(args, copy, time_ms) if args.q6k else []
    for name in [] if args.q6k else args.shapes.split(","):
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
