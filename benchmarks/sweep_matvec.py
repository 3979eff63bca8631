"""Launch settings of the matrix-vector kernel (decode) per read, at Mixtral-8x7B's decode shapes,
on a CUDA device: (BN, warps, programs per multiprocessor) of one type and layout at a time, in
- harness::moe_ffn at one token, two of eight experts: Q4_K gate and up stacks with a packed Q6_K
  down stack (swept for Q4_K, then for packed Q6_K) and with a Q4_K one (a Q4_K_M file has both);
- harness::qmatmul: Q4_K 4096 x 4096, the 32000-row packed Q6_K head, a 1024-row packed Q6_K.

Each call reads weights other than the previous call's (experts or copies in turn, more than the
H100's 50 MB L2 in all), as the model reads each weight once a token: timing one weight over and
over measures L2, not memory. Times are medians of a CUDA graph of 20 calls (`bench_fused.time_ms`);
every setting's result is checked against the default setting's (NMSE; a wrong build shows
here, as BN=8 with 2 warps once did). Writes JSON; asserts nothing.

    python benchmarks/sweep_matvec.py --out benchmarks/results/matvec_sweep.json

`--grid 64x4,128x8` sweeps those (BN, warps) instead of GRID, `--stages 1,2,3` the software
pipelining of the loop over super-blocks too, `--cases Q4_K,head` only the cases whose names
hold one of those strings:

    python benchmarks/sweep_matvec.py --paths int --grid 64x4,128x4,128x8 --stages 1,2,3 --cases moe_ffn

`--paths vec,int` sweeps the settings of each `matvec_path` in turn (the table that path reads:
`fused.matvec_config`). `--compare` times each of `--paths` at its default setting instead, in
one run, with each case's result against dequantize-then-matmul in float32 (NMSE) and each
path's time over the first path's:

    python benchmarks/sweep_matvec.py --compare --paths vec,int --out benchmarks/results/matvec_int.json

`--int-x kernel,launch` takes the "int" path once for each of those values of `fused.int_x_path`
(x quantized in the matrix-vector kernel, or by `_int_x`'s launch before it), in that order; rows
say which ("int_x"), and `--compare` also says whether a result is the first read's bit for bit:

    python benchmarks/sweep_matvec.py --compare --paths int --int-x kernel,launch \
        --out benchmarks/results/matvec_int_x.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fused import nmse, random_weight, time_ms  # noqa: E402

from harness.bench import copy_bandwidth, device_name  # noqa: E402
from harness.quant import dequant, fused  # noqa: E402
from harness.quant.types import GGMLType as T  # noqa: E402
from harness.quant.types import type_size  # noqa: E402

GRID = [(16, 4), (16, 2), (16, 1), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)]
PROGRAMS_PER_SM = (4, 8)


def in_turn(items: list):
    """A function giving items[1], items[2], ... items[0], items[1], ... call after call."""
    turn = itertools.cycle(items[1:] + items[:1])
    return lambda: next(turn)


def dense(raw: torch.Tensor, code: int, rows: int, cols: int) -> torch.Tensor:
    """A weight prepared by `fused.kernel_weight` (`code`) as float32 [rows, cols]."""
    qtype = T(code & 0xFF)
    return dequant.dequantize(fused.gguf_blocks(raw, code), qtype, (rows, cols), torch.float32)


def cases(dev: torch.device, d: int = 4096, f: int = 14336, vocab: int = 32000) -> dict:
    """name -> (call(choice=None): the op on the next weights in turn or on `choice`; the first
    choice; weight bytes a call reads; the type and layout whose launch setting the case sweeps;
    reference(): the first choice's result by dequantize-then-matmul in float32)."""
    x = torch.randn(1, d, device=dev)
    ops = torch.ops.harness
    pairs = [torch.tensor([[a, (a + 3) % 8]], device=dev) for a in range(8)]
    weights = torch.tensor([[0.6, 0.4]], device=dev)
    gate, up = random_weight(T.Q4_K, 8, f, d, device=dev), random_weight(T.Q4_K, 8, f, d, device=dev)
    down4 = random_weight(T.Q4_K, 8, d, f, device=dev)
    down6, code6 = fused.kernel_weight(random_weight(T.Q6_K, 8, d, f, device=dev), T.Q6_K, f)
    square = [random_weight(T.Q4_K, d, d, device=dev) for _ in range(8)]
    head, _ = fused.kernel_weight(random_weight(T.Q6_K, vocab, d, device=dev), T.Q6_K, d)
    narrow = [
        fused.kernel_weight(random_weight(T.Q6_K, d // 4, d, device=dev), T.Q6_K, d)[0] for _ in range(16)
    ]
    q4, q6 = type_size(T.Q4_K), type_size(T.Q6_K)  # bytes of 256 values
    gated_bytes = 2 * 2 * f * d * q4 // 256  # two experts' gate and up rows

    def experts(down, down_code):
        turn = in_turn(pairs)
        return lambda e=None: ops.moe_ffn(
            x, gate, up, down, weights, turn() if e is None else e, int(T.Q4_K), down_code
        )

    def product(weights_in_turn, code, n):
        turn = in_turn(weights_in_turn)
        return lambda w=None: ops.qmatmul(x, turn() if w is None else w, code, n)

    def moe_reference(down, down_code):
        def reference():
            out = torch.zeros(1, d, device=dev)
            for e, share in zip(pairs[0][0].tolist(), weights[0].tolist(), strict=True):
                g, u = dense(gate[e], int(T.Q4_K), f, d), dense(up[e], int(T.Q4_K), f, d)
                h = torch.nn.functional.silu(x @ g.T) * (x @ u.T)
                out += share * (h @ dense(down[e], down_code, d, f).T)
            return out

        return reference

    def product_reference(w, code, n):
        return lambda: x @ dense(w, code, n, d).T

    moe6, moe6_ref = experts(down6, code6), moe_reference(down6, code6)
    return {
        "moe_ffn Q4_K gate/up, packed Q6_K down; Q4_K settings": (
            moe6, pairs[0], gated_bytes + 2 * d * f * q6 // 256, int(T.Q4_K), moe6_ref,
        ),
        "moe_ffn Q4_K gate/up, packed Q6_K down; packed Q6_K settings": (
            moe6, pairs[0], gated_bytes + 2 * d * f * q6 // 256, code6, moe6_ref,
        ),
        "moe_ffn Q4_K gate/up/down; Q4_K settings": (
            experts(down4, int(T.Q4_K)), pairs[0], gated_bytes + 2 * d * f * q4 // 256, int(T.Q4_K),
            moe_reference(down4, int(T.Q4_K)),
        ),
        "qmatmul Q4_K 4096 x 4096": (
            product(square, int(T.Q4_K), d), square[0], d * d * q4 // 256, int(T.Q4_K),
            product_reference(square[0], int(T.Q4_K), d),
        ),
        "qmatmul packed Q6_K head 32000 x 4096": (
            product([head], code6, vocab), head, vocab * d * q6 // 256, code6, product_reference(head, code6, vocab),
        ),
        "qmatmul packed Q6_K 1024 x 4096": (
            product(narrow, code6, d // 4), narrow[0], d // 4 * d * q6 // 256, code6,
            product_reference(narrow[0], code6, d // 4),
        ),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/matvec_sweep.json")
    p.add_argument(
        "--paths", default=fused.MATVEC_PATHS[0], help="comma-separated values of fused.matvec_path"
    )
    p.add_argument(
        "--int-x",
        default=fused.int_x_path,
        help='comma-separated values of fused.int_x_path for the "int" path',
    )
    p.add_argument("--compare", action="store_true", help="each path at its default setting, no sweep")
    p.add_argument(
        "--grid", help="BNxWARPS settings to sweep, comma-separated (e.g. 64x4,128x8); default GRID"
    )
    p.add_argument(
        "--stages",
        default="1",
        help="comma-separated values of a setting's software pipelining stages to sweep",
    )
    p.add_argument("--cases", help="only the cases whose name holds one of these comma-separated strings")
    args = p.parse_args(argv)
    try:
        grid = GRID if not args.grid else [tuple(int(v) for v in g.split("x")) for g in args.grid.split(",")]
        stages = [int(v) for v in args.stages.split(",")]
        if any(len(g) != 2 or min(g) < 1 for g in grid) or min(stages) < 1:
            raise ValueError
    except ValueError:
        print(
            "sweep_matvec: --grid takes BNxWARPS,... and --stages N,... (positive integers)", file=sys.stderr
        )
        return 2
    paths, int_x = args.paths.split(","), args.int_x.split(",")
    for flag, given, known in (("--paths", paths, fused.MATVEC_PATHS), ("--int-x", int_x, fused.INT_X_PATHS)):
        unknown = [x for x in given if x not in known]
        if unknown:
            print(f"sweep_matvec: {flag}: unknown {unknown}, known {list(known)}", file=sys.stderr)
            return 2
    reads = [(path, x) for path in paths for x in (int_x if path == "int" else [None])]
    if not torch.cuda.is_available():
        print("sweep_matvec: needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    copy_tbps = copy_bandwidth(dev) / 1e12
    result = {
        "device": device_name(dev), "torch": torch.__version__, "copy_TBps": copy_tbps, "paths": paths,
        "int_x": int_x, "compare": args.compare, "rows": [],
    }  # fmt: skip
    before = fused.matvec_path, fused.int_x_path
    try:
        for name, case in cases(dev).items():
            if args.cases and not any(part in name for part in args.cases.split(",")):
                continue
            rows = (
                compared(name, case, reads, copy_tbps)
                if args.compare
                else swept(name, case, reads, copy_tbps, grid, stages)
            )
            for row in rows:
                result["rows"].append(row)
                print(row, flush=True)
    finally:
        fused.matvec_path, fused.int_x_path = before
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def read(path: str, int_x: str | None) -> dict:
    """`path` taken (and `int_x` where given) for the calls that follow; the row's fields that say so."""
    fused.matvec_path = path
    if int_x is not None:
        fused.int_x_path = int_x
    return {"path": path, "int_x": int_x}


def swept(
    name: str, case: tuple, reads: list[tuple[str, str | None]], copy_tbps: float, grid: list, stages: list
) -> list[dict]:
    """Rows of one case: each read's (path, int_x) launch settings (`grid` x PROGRAMS_PER_SM x
    `stages`), each checked against that read's default setting."""
    call, first, nbytes, code, _ = case
    rows = []
    for path, int_x in reads:
        which = read(path, int_x)
        config = fused.matvec_config(code)
        default = dict(config)
        reference = call(first)
        for (bn, warps), per_sm, n_stages in itertools.product(grid, PROGRAMS_PER_SM, stages):
            config.update(BN=bn, num_warps=warps, programs_per_sm=per_sm, stages=n_stages)
            try:
                off = nmse(call(first), reference)
                ms = time_ms(call)
            except Exception as exc:  # triton's OutOfResources and the like
                print(f"    skipped: {type(exc).__name__}: {str(exc)[:100]}")
                off, ms = None, float("nan")
            finally:
                config.clear()
                config.update(default)
            rows.append({
                "case": name, **which, "BN": bn, "warps": warps, "programs_per_sm": per_sm, "stages": n_stages,
                "us": round(ms * 1000, 2), "fraction_of_copy": round(nbytes / ms / 1e9 / copy_tbps, 3),
                "nmse_vs_default": off,
                "default": (bn, warps, per_sm, n_stages)
                == (default["BN"], default["num_warps"], default.get("programs_per_sm", 4), default.get("stages", 1)),
            })  # fmt: skip
    return rows


def compared(name: str, case: tuple, reads: list[tuple[str, str | None]], copy_tbps: float) -> list[dict]:
    """Rows of one case: each read (path, int_x) at its default setting, its result against
    dequantize-then-matmul in float32 and against the first read's (bit for bit), and its time
    over the first read's (medians of one run)."""
    call, first, nbytes, code, reference = case
    ref = reference()
    rows, first_out = [], None
    for path, int_x in reads:
        which = read(path, int_x)
        out = call(first)
        first_out = out.clone() if first_out is None else first_out
        ms = time_ms(call)
        rows.append({
            "case": name, **which, "setting": dict(fused.matvec_config(code)), "us": round(ms * 1000, 2),
            "fraction_of_copy": round(nbytes / ms / 1e9 / copy_tbps, 3),
            "nmse_vs_dequantize_then_matmul": nmse(out, ref), "same_bits_as_first_path": torch.equal(out, first_out),
            "time_over_first_path": round(ms * 1000 / rows[0]["us"], 3) if rows else 1.0,
        })  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.exit(main())
