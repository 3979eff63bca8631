"""Launch settings of the matrix-vector kernel (decode) per read, at Mixtral-8x7B's decode shapes,
on a CUDA device: (BN, warps, programs per multiprocessor) of one type and layout at a time, in
- harness::moe_ffn at one token, two of eight experts: Q4_K gate and up stacks with a packed Q6_K
  down stack (swept for Q4_K, then for packed Q6_K) and with a Q4_K one (a Q4_K_M file has both);
- harness::qkv: attention's Q4_K q (4096 x 4096) and packed Q8_0 k and v (1024 x 4096 each, one
  launch), as Q4_K_M's 8-expert files have them (swept for Q4_K, then for packed Q8_0);
- harness::qmatmul: Q4_K 4096 x 4096, Q5_K 4096 x 4096 (attention's output projection), the
  32000-row packed Q6_K head, a 1024-row packed Q6_K.

Each call reads weights other than the previous call's (experts or copies in turn, more than the
H100's 50 MB L2 in all), as the model reads each weight once a token: timing one weight over and
over measures L2, not memory. Times are medians of a CUDA graph of 20 calls (`bench_fused.time_ms`);
every setting's result is checked against the default setting's (NMSE; a wrong build shows
here, as BN=8 with 2 warps once did). Writes JSON; asserts nothing.

    python benchmarks/sweep_matvec.py --out benchmarks/results/matvec_sweep.json

`--grid 64x4,128x8` sweeps those (BN, warps) instead of GRID, `--per-sm 2,4,8` those programs a
multiprocessor instead of PROGRAMS_PER_SM (the setting's "dense_programs_per_sm" in the cases of
one weight a product, its "programs_per_sm" in moe_ffn's), `--stages 1,2,3` the software pipelining of the loop
over super-blocks too, `--cases Q4_K,head` only the cases whose names hold one of those strings:

    python benchmarks/sweep_matvec.py --paths int --grid 64x4,128x4,128x8 --stages 1,2,3 --cases moe_ffn

`--gated-per-sm 0,2,4,8` also sweeps the setting's "gated_programs_per_sm" (the gated gate/up
product's splits; 0 never splits it) in the cases whose swept type is moe_ffn's gate/up type,
apart from "programs_per_sm" (its down product's, when that is of the same type). At 8x7B's
gate/up on an H100 (132 multiprocessors, Q4_K's int read at BN=128) 0 and 1 give 1 split, 2 and
3 give 2, 4 gives 3, 6 and 8 give 4, 12 and 16 give 8, 32 gives 16:

    python benchmarks/sweep_matvec.py --paths int --int-x launch --grid 128x4 --per-sm 4 \
        --gated-per-sm 0,2,4,6,12,32 --cases "moe_ffn Q4_K gate/up/down" --out /tmp/gated.json

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

(Session 15 removed `--reads`/`--span`, the Q4_K/Q5_K "rows" read's: slower on an H100,
benchmarks/results/matvec_rows_sweep.json.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

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


class Case(NamedTuple):
    call: Callable  # call(choice=None): the op on the next weights in turn, or on `choice`
    first: object  # the first choice
    nbytes: int  # weight bytes a call reads
    code: int  # the type and layout whose launch setting the case sweeps
    reference: Callable  # the first choice's result by dequantize-then-matmul in float32
    gated: bool = False  # whether that setting also launches a gated product (moe_ffn's gate/up)
    routed: bool = False  # whether its products are routed (moe_ffn's), else of one weight each


def in_turn(items: list):
    """A function giving items[1], items[2], ... items[0], items[1], ... call after call."""
    turn = itertools.cycle(items[1:] + items[:1])
    return lambda: next(turn)


def dense(raw: torch.Tensor, code: int, rows: int, cols: int) -> torch.Tensor:
    """A weight prepared by `fused.kernel_weight` (`code`) as float32 [rows, cols]."""
    qtype = T(code & 0xFF)
    return dequant.dequantize(fused.gguf_blocks(raw, code), qtype, (rows, cols), torch.float32)


def cases(dev: torch.device, d: int = 4096, f: int = 14336, vocab: int = 32000, kv: int = 1024) -> dict:
    """name -> Case."""
    x = torch.randn(1, d, device=dev)
    ops = torch.ops.harness
    pairs = [torch.tensor([[a, (a + 3) % 8]], device=dev) for a in range(8)]
    weights = torch.tensor([[0.6, 0.4]], device=dev)
    gate, up = random_weight(T.Q4_K, 8, f, d, device=dev), random_weight(T.Q4_K, 8, f, d, device=dev)
    down4 = random_weight(T.Q4_K, 8, d, f, device=dev)
    down6, code6 = fused.kernel_weight(random_weight(T.Q6_K, 8, d, f, device=dev), T.Q6_K, f)
    square = [random_weight(T.Q4_K, d, d, device=dev) for _ in range(8)]
    square5 = [random_weight(T.Q5_K, d, d, device=dev) for _ in range(8)]
    code8 = fused.kernel_weight(random_weight(T.Q8_0, kv, d, device=dev), T.Q8_0, d)[1]
    attention = []  # (q, k, v): k and v of one buffer (`fused.pack_rows`), as the model's are
    for _ in range(4):
        k, v = (fused.kernel_weight(random_weight(T.Q8_0, kv, d, device=dev), T.Q8_0, d)[0] for _ in range(2))
        attention.append((random_weight(T.Q4_K, d, d, device=dev), *fused.pack_rows([k, v], [code8, code8])))
    head, _ = fused.kernel_weight(random_weight(T.Q6_K, vocab, d, device=dev), T.Q6_K, d)
    narrow = [
        fused.kernel_weight(random_weight(T.Q6_K, d // 4, d, device=dev), T.Q6_K, d)[0] for _ in range(16)
    ]
    q4, q5, q6 = type_size(T.Q4_K), type_size(T.Q5_K), type_size(T.Q6_K)  # bytes of 256 values
    q8 = 8 * type_size(T.Q8_0)
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

    def qkv():
        turn = in_turn(attention)
        return lambda w=None: ops.qkv(x, *(turn() if w is None else w), int(T.Q4_K), code8, code8)

    def qkv_reference():
        q, k, v = attention[0]
        return torch.cat(
            [x @ dense(q, int(T.Q4_K), d, d).T, x @ dense(k, code8, kv, d).T, x @ dense(v, code8, kv, d).T], 1
        )

    moe6, moe6_ref = experts(down6, code6), moe_reference(down6, code6)
    qkv_bytes = d * d * q4 // 256 + 2 * kv * d * q8 // 256
    return {
        "moe_ffn Q4_K gate/up, packed Q6_K down; Q4_K settings": Case(
            moe6, pairs[0], gated_bytes + 2 * d * f * q6 // 256, int(T.Q4_K), moe6_ref, gated=True, routed=True,
        ),
        "moe_ffn Q4_K gate/up, packed Q6_K down; packed Q6_K settings": Case(
            moe6, pairs[0], gated_bytes + 2 * d * f * q6 // 256, code6, moe6_ref, routed=True,
        ),
        "moe_ffn Q4_K gate/up/down; Q4_K settings": Case(
            experts(down4, int(T.Q4_K)), pairs[0], gated_bytes + 2 * d * f * q4 // 256, int(T.Q4_K),
            moe_reference(down4, int(T.Q4_K)), gated=True, routed=True,
        ),
        "qkv Q4_K q, packed Q8_0 k/v; Q4_K settings": Case(
            qkv(), attention[0], qkv_bytes, int(T.Q4_K), qkv_reference,
        ),
        "qkv Q4_K q, packed Q8_0 k/v; packed Q8_0 settings": Case(
            qkv(), attention[0], qkv_bytes, code8, qkv_reference,
        ),
        "qmatmul Q4_K 4096 x 4096": Case(
            product(square, int(T.Q4_K), d), square[0], d * d * q4 // 256, int(T.Q4_K),
            product_reference(square[0], int(T.Q4_K), d),
        ),
        "qmatmul Q5_K 4096 x 4096 (attention's output)": Case(
            product(square5, int(T.Q5_K), d), square5[0], d * d * q5 // 256, int(T.Q5_K),
            product_reference(square5[0], int(T.Q5_K), d),
        ),
        "qmatmul packed Q6_K head 32000 x 4096": Case(
            product([head], code6, vocab), head, vocab * d * q6 // 256, code6, product_reference(head, code6, vocab),
        ),
        "qmatmul packed Q6_K 1024 x 4096": Case(
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
    p.add_argument(
        "--per-sm",
        default=",".join(map(str, PROGRAMS_PER_SM)),
        help="comma-separated values of a setting's programs_per_sm to sweep",
    )
    p.add_argument(
        "--gated-per-sm",
        help="comma-separated values of a setting's gated_programs_per_sm to sweep where it launches "
        "a gated product (0: never split it); default: the setting's own",
    )
    p.add_argument("--cases", help="only the cases whose name holds one of these comma-separated strings")
    args = p.parse_args(argv)
    try:
        grid = GRID if not args.grid else [tuple(int(v) for v in g.split("x")) for g in args.grid.split(",")]
        stages = [int(v) for v in args.stages.split(",")]
        per_sm = [int(v) for v in args.per_sm.split(",")]
        gated_per_sm = [int(v) for v in args.gated_per_sm.split(",")] if args.gated_per_sm else [None]
        if any(len(g) != 2 or min(g) < 1 for g in grid) or min(stages + per_sm) < 1:
            raise ValueError
        if gated_per_sm != [None] and min(gated_per_sm) < 0:
            raise ValueError
    except ValueError:
        print(
            "sweep_matvec: --grid takes BNxWARPS,..., --stages and --per-sm N,... (positive integers), "
            "--gated-per-sm N,... (0 or more)",
            file=sys.stderr,
        )
        return 2
    paths, int_x = args.paths.split(","), args.int_x.split(",")
    checked = [("--paths", paths, fused.MATVEC_PATHS), ("--int-x", int_x, fused.INT_X_PATHS)]
    for flag, given, known in checked:
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
                else swept(name, case, reads, copy_tbps, grid, stages, per_sm, gated_per_sm)
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
    name: str,
    case: Case,
    reads: list[tuple[str, str | None]],
    copy_tbps: float,
    grid: list,
    stages: list,
    per_sm: list,
    gated_per_sm: list,
) -> list[dict]:
    """Rows of one case: each read's (path, int_x) launch settings (`grid` x `per_sm` x
    `gated_per_sm` where the case launches a gated product with them x `stages`), each checked
    against that read's default setting."""
    rows = []
    for path, int_x in reads:
        which = read(path, int_x)
        config = fused.matvec_config(case.code)
        default = dict(config)
        reference = case.call(case.first)
        gated_values = gated_per_sm if case.gated else [None]
        settings = itertools.product(grid, per_sm, gated_values, stages)
        for (bn, warps), n_per_sm, gated, n_stages in settings:
            per_sm_key = fused.split_setting(False, case.routed)  # (the case's non-gated products)
            config.update(BN=bn, num_warps=warps, stages=n_stages, **{per_sm_key: n_per_sm})
            if gated is not None:
                config["gated_programs_per_sm"] = gated
            try:
                off = nmse(case.call(case.first), reference)
                ms = time_ms(case.call)
            except Exception as exc:  # triton's OutOfResources and the like
                print(f"    skipped: {type(exc).__name__}: {str(exc)[:100]}")
                off, ms = None, float("nan")
            finally:
                config.clear()
                config.update(default)
            setting = (bn, warps, n_per_sm, n_stages)
            row = {
                "case": name, **which, "BN": bn, "warps": warps, "programs_per_sm": n_per_sm, "stages": n_stages,
                "us": round(ms * 1000, 2), "fraction_of_copy": round(case.nbytes / ms / 1e9 / copy_tbps, 3),
                "nmse_vs_default": off,
                "default": setting
                == (default["BN"], default["num_warps"], default.get(per_sm_key, default.get("programs_per_sm", 4)), default.get("stages", 1)),
            }  # fmt: skip
            if case.gated:
                gated_default = default.get("gated_programs_per_sm", default.get("programs_per_sm", 4))
                row["gated_programs_per_sm"] = (
                    default.get("gated_programs_per_sm", n_per_sm) if gated is None else gated
                )
                row["default"] = row["default"] and row["gated_programs_per_sm"] == gated_default
            rows.append(row)
    return rows


def compared(name: str, case: Case, reads: list[tuple[str, str | None]], copy_tbps: float) -> list[dict]:
    """Rows of one case: each read (path, int_x) at its default setting, its result against
    dequantize-then-matmul in float32 and against the first read's (bit for bit), and its time
    over the first read's (medians of one run)."""
    call, first, nbytes, code, reference, _ = case
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
