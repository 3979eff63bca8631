"""The attention kernels of `harness::attention` (decode) compiled for an H100 (sm_90) with
Triton's bundled compiler and ptxas, no GPU needed: shared memory, register spills (local-memory
stores and loads, STL/LDL) and the loop over keys per launch configuration. Writes JSON; asserts
nothing.

    python benchmarks/sass_attention.py --out benchmarks/results/sass_attention.json

Each row compiles `_attention_kernel` as `fused._attention_kernels` launches it for Mixtral's
head dim (128) with the default settings (`fused.ATTENTION_CONFIG`) and with the sweep's
(benchmarks/bench_fused.py ATTENTION_SWEEP: tl.dot's input precision, the merge in the launch
or after it, the query tile's least rows among them), at 4 query rows (one token of a group of
4: the decode graph's), 16 (4 tokens) and ATTENTION_MAX_ROWS (8 tokens), splits as Mixtral's
static 640-key cache takes them on an H100 (132 multiprocessors); pointers and strides 16-byte
aligned, as the model's caches are. Only a GPU says how fast (bench_fused.py --attention-only).
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
H100_PROGRAMS_WANTED = 4 * 132  # fused._programs_wanted on an H100
N_KV, CACHE = 8, 640  # Mixtral's KV heads, bench_model's static cache (512 prompt + 128)


def compile_attention(rows: int, setting: dict, split: bool = True):
    """`_attention_kernel` compiled for sm_90 at head dim 128 (rope on all of it), positions on
    the device, `rows` query rows (group 4: rows / 4 tokens) as `fused._attention_kernels`
    launches it under ATTENTION_CONFIG updated by `setting`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = {**fused.ATTENTION_CONFIG, **setting}
    t = max(1, rows // 4)
    bm = max(int(cfg["min_rows"]), fused._next_pow2(rows))
    per = fused._ceil_div(CACHE, fused._ceil_div(H100_PROGRAMS_WANTED, N_KV))  # as fused.attention_splits
    per = max(cfg["split_min_keys"], fused._ceil_div(per, cfg["BS"]) * cfg["BS"])
    splits = fused._ceil_div(CACHE, per)
    merge = rows <= cfg["fold_merge_rows"] and split and splits > 1
    consts = {
        "BM": bm, "BD": 128, "BS": cfg["BS"], "BT": max(16, fused._next_pow2(t)), "TT": fused._next_pow2(t),
        "FROM_START": False, "SPLIT": split, "ROPE": bool(cfg["fold_rope"]), "PTX": True, "DOT": cfg["dot"],
        "MERGE": merge, "MC": fused.attention_merge_splits(splits, bm, 128, cfg["num_warps"]),
        "PDL": True,
    }  # fmt: skip
    types = {
        **dict.fromkeys(POINTERS, "*fp32"),
        "counter_ptr": "*i32",
        "pos_ptr": "*i64",
        "start": "i64",
        "scale": "fp32",
    }
    names = fused._attention_kernel.arg_names
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    aligned = (*POINTERS, "pos_ptr", "S_MAX", "HD", "W", "HALF")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    source = ASTSource(fn=fused._attention_kernel, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "launch_pdl": True}
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options), splits, merge


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/sass_attention.json")
    args = p.parse_args(argv)
    import triton

    keys = ("BS", "num_warps", "num_stages", "split_min_keys", "dot", "fold_rope", "fold_merge_rows", "min_rows")  # fmt: skip
    default = tuple(fused.ATTENTION_CONFIG[k] for k in keys)
    rows = []
    for values in [default, *(s for s in ATTENTION_SWEEP if s != default)]:
        setting = dict(zip(keys, values, strict=True))
        for n_rows in (4, 16, fused.ATTENTION_MAX_ROWS):
            kernel, splits, merge = compile_attention(n_rows, setting)
            code = sass(kernel.asm["cubin"])
            ops = collections.Counter(i.split()[0].split(".")[0] for _, i in code)
            loop = longest_loop(code)
            row = {
                **setting,
                "query_rows": n_rows,
                "splits_at_640_keys": splits,
                "merged_in_launch": merge,
                "default": values == default,
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
                " ".join(f"{k}={v}" for k, v in setting.items())
                + f" rows={n_rows:3d} splits={splits} merged={merge:d}: shared {row['shared_bytes']:6d} B, STL "
                f"{row['local_stores']:4d} LDL {row['local_loads']:4d}, {row['instructions']} instructions, loop "
                f"{row['loop_instructions']} ({row['loop_ffma']} FFMA, {row['loop_hmma']} HMMA)",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
