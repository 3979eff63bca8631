"""The attention kernels of `harness::attention` (decode) compiled for an H100 (sm_90) with
Triton's bundled compiler and ptxas, no GPU needed: shared memory, register spills (local-memory
stores and loads, STL/LDL) and the loop over keys per launch configuration. Writes JSON; asserts
nothing.

    python benchmarks/sass_attention.py --out benchmarks/results/sass_attention.json

Each row compiles `_attention_kernel` as `fused._attention_kernels` launches it for Mixtral's
head dim (128) with the default settings (`fused.ATTENTION_CONFIG`) and with the sweep's
(benchmarks/bench_fused.py ATTENTION_SWEEP, tl.dot's input precision among them), at 16 query
rows (one token of a group of 4, or up to 4 tokens) and at ATTENTION_MAX_ROWS; pointers and
strides 16-byte aligned, as the model's caches are. Only a GPU says how fast (bench_fused.py --attention-only).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fused import ATTENTION_SWEEP  # noqa: E402
from sass_matvec import longest_loop, sass  # noqa: E402

from harness.quant import fused  # noqa: E402

POINTERS = ("q_ptr", "cache_k", "cache_v", "cos_ptr", "sin_ptr", "out_ptr", "part_acc", "part_m", "part_l")


def compile_attention(
    rows: int, bs: int, warps: int, stages: int, split: bool, dot: str = "ieee", rope: bool = True
):
    """`_attention_kernel` compiled for sm_90 at head dim 128 (rope on all of it), positions on
    the device, its products at tl.dot's input precision `dot`; with `rope`, the rope and the
    cache write folded in (ATTENTION_CONFIG["fold_rope"]), as the launch would run it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {
        "BM": rows, "BD": 128, "BS": bs, "BT": 16, "TT": 1 if rows == 16 else 8, "FROM_START": False, "SPLIT": split, "ROPE": rope,
        "PTX": True, "DOT": dot,
    }  # fmt: skip
    types = {**dict.fromkeys(POINTERS, "*fp32"), "pos_ptr": "*i64", "start": "i64", "scale": "fp32"}
    names = fused._attention_kernel.arg_names
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    aligned = (*POINTERS, "pos_ptr", "S_MAX", "HD", "W", "HALF")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    source = ASTSource(fn=fused._attention_kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 64), options={"num_warps": warps, "num_stages": stages}
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/sass_attention.json")
    args = p.parse_args(argv)
    import triton

    cfg = fused.ATTENTION_CONFIG
    default = (cfg["BS"], cfg["num_warps"], cfg["num_stages"], cfg["dot"], bool(cfg["fold_rope"]))
    settings = {default}
    settings |= {(bs, warps, stages, dot, rope) for bs, warps, stages, _, dot, rope in ATTENTION_SWEEP}
    rows = []
    for bs, warps, stages, dot, rope in sorted(settings):
        for n_rows in (16, fused.ATTENTION_MAX_ROWS):
            kernel = compile_attention(n_rows, bs, warps, stages, split=True, dot=dot, rope=rope)
            code = sass(kernel.asm["cubin"])
            ops = collections.Counter(i.split()[0].split(".")[0] for _, i in code)
            loop = longest_loop(code)
            row = {
                "BS": bs,
                "num_warps": warps,
                "num_stages": stages,
                "dot": dot,
                "fold_rope": rope,
                "query_rows": n_rows,
                "default": (bs, warps, stages, dot, rope) == default,
                "shared_bytes": kernel.metadata.shared,
                "local_stores": ops["STL"],
                "local_loads": ops["LDL"],
                "instructions": len(code),
                "loop_instructions": len(loop),
                "loop_ffma": sum(1 for i in loop if i.startswith("FFMA")),
                "loop_hmma": sum(1 for i in loop if i.startswith("HMMA")),
            }
            rows.append(row)
            print(
                f"BS={bs:3d} warps={warps} stages={stages} dot={dot:6s} rope={rope:d} rows={n_rows:3d}: shared "
                f"{row['shared_bytes']:6d} B, STL {row['local_stores']:4d} LDL {row['local_loads']:4d}, "
                f"{row['instructions']} instructions, loop {row['loop_instructions']} ({row['loop_ffma']} FFMA, "
                f"{row['loop_hmma']} HMMA)",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
