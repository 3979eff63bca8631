"""Instructions per weight byte in the loop of the matrix-vector kernel (decode), per type and
read, from the SASS that Triton's bundled ptxas makes for an H100 (sm_90): a proxy for speed
that needs no GPU. Writes JSON; asserts nothing.

    python benchmarks/sass_matvec.py --out benchmarks/results/sass_matvec.json

`--reads "Q4_K int"` compiles only the reads whose names hold one of those strings.

For each read, `_matvec_kernel` is compiled for sm_90 (pointers and row strides taken as 16-byte
aligned, as the model's weights are) and disassembled with cuobjdump; the loop over super-blocks
is the longest span between a backward branch and its target (not the split sums' loop).
Rows: the loop's instructions, the weight bytes one thread reads per iteration (BN rows of one
super-block over the threads), their ratio, the global loads by width (LDG.E.128 is 16 bytes,
LDG.E.U8 one), integer-to-float conversions (I2F), integer dot products (IDP: the "int"
reads' dp2a), local-memory loads (LDL: register spills; "loop_spills" and "kernel_spills" count
LDL and STL in the loop and in the whole kernel) and barriers (BAR: each a wait for
every warp of the program, mostly around layout changes through shared memory). Fewer instructions per byte and
wider loads are faster while the kernel issues more than memory delivers; only a GPU says by how
much (benchmarks/bench_fused.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.quant import fused  # noqa: E402
from harness.quant.types import GGMLType, type_size  # noqa: E402

T = GGMLType
# (name, type, repacked weight, read: "tile"/"words" (the older reads), "vec" (wide loads, VEC),
# "int" (integer dot products, INT, x quantized in the kernel: INT_X), "int-launch" (x from
# `_int_x`'s launch), gated). Repacked Q4_K: fused.PACK_CONFIG "q4_k_interleave"'s layout; Q6_K's
# repacked weight 2: its packed rows interleaved ("q6_k_interleave", the kernels' PACKED 2).
READS = [
    ("Q4_K words", T.Q4_K, False, "words", False),
    ("Q4_K vec", T.Q4_K, False, "vec", False),
    ("Q4_K vec gated", T.Q4_K, False, "vec", True),
    ("Q4_K int", T.Q4_K, False, "int", False),
    ("Q4_K int gated", T.Q4_K, False, "int", True),
    ("Q4_K int launch", T.Q4_K, False, "int-launch", False),
    ("Q4_K int launch gated", T.Q4_K, False, "int-launch", True),
    ("Q4_K interleaved int", T.Q4_K, True, "int", False),
    ("Q4_K interleaved int gated", T.Q4_K, True, "int", True),
    ("Q4_K interleaved int launch", T.Q4_K, True, "int-launch", False),
    ("Q4_K interleaved int launch gated", T.Q4_K, True, "int-launch", True),
    ("Q5_K tile", T.Q5_K, False, "tile", False),
    ("Q5_K vec", T.Q5_K, False, "vec", False),
    ("Q5_K vec gated", T.Q5_K, False, "vec", True),
    ("Q5_K int", T.Q5_K, False, "int", False),
    ("Q5_K int gated", T.Q5_K, False, "int", True),
    ("Q5_K int launch", T.Q5_K, False, "int-launch", False),
    ("Q5_K int launch gated", T.Q5_K, False, "int-launch", True),
    ("Q6_K tile", T.Q6_K, False, "tile", False),
    ("Q6_K packed vec", T.Q6_K, True, "vec", False),
    ("Q6_K packed vec gated", T.Q6_K, True, "vec", True),
    ("Q6_K packed int", T.Q6_K, True, "int", False),
    ("Q6_K packed int gated", T.Q6_K, True, "int", True),
    ("Q6_K packed int launch", T.Q6_K, True, "int-launch", False),
    ("Q6_K packed int launch gated", T.Q6_K, True, "int-launch", True),
    ("Q6_K interleaved int", T.Q6_K, 2, "int", False),
    ("Q6_K interleaved int launch", T.Q6_K, 2, "int-launch", False),
    ("Q8_0 tile", T.Q8_0, False, "tile", False),
    ("Q8_0 packed vec", T.Q8_0, True, "vec", False),
    ("Q8_0 packed vec gated", T.Q8_0, True, "vec", True),
    ("Q8_0 packed int", T.Q8_0, True, "int", False),
    ("Q8_0 packed int gated", T.Q8_0, True, "int", True),
    ("Q8_0 packed int launch", T.Q8_0, True, "int-launch", False),
    ("Q8_0 packed int launch gated", T.Q8_0, True, "int-launch", True),
]


def compile_matvec(qtype: GGMLType, packed: int, read: str, gated: bool):
    """`_matvec_kernel` compiled for sm_90 as `fused._product` launches it; and its config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    vec, int_read, int_x = read == "vec", read.startswith("int"), read == "int"
    tables = (
        fused.INT_MATVEC_CONFIG if int_read else fused.PACKED_MATVEC_CONFIG if packed else fused.MATVEC_CONFIG
    )
    cfg = tables[qtype]
    weights = "*i32" if qtype == T.Q4_K or vec or int_read else "*u8"
    pointers = {
        **dict.fromkeys(("out_ptr", "scale_ptr", "lut_ptr", "xsum_ptr", "xpow_ptr", "res_ptr"), "*fp32"),
        **dict.fromkeys(("hscale_ptr", "hsum_ptr"), "*fp32"),
        "hq_ptr": "*i16",
        "x_ptr": "*i32" if int_read and not int_x else "*fp32",
        "w_ptr": weights,
        "u_ptr": weights,
        "experts_ptr": "*i64",
        "part_ptr": "*fp32",
        "counter_ptr": "*i32",
    }
    consts = {
        "QT": int(qtype), "NP": fused.PARTS[qtype], "BN": cfg["BN"], "GATED": gated, "SCALED": False,
        "ROUTED": False, "VEC": vec, "PACKED": packed, "STAGES": cfg.get("stages", 1), "UNROLL": cfg.get("unroll", 1),
        "REDUCE": not gated,  # a decode product's splits summed in the kernel (gated ones take one split)
        "INT": int_read, "INT_X": int_x, "PTX": True,
        "RESIDUAL": False, "INT_OUT": False,
        "PREFETCH": cfg.get("prefetch", 0) if int_read and qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 0,
    }  # fmt: skip
    names = fused._matvec_kernel.arg_names
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
    aligned = [
        (i,) for i, n in enumerate(names) if n in pointers or n in ("row_bytes", "expert_bytes", "x_stride")
    ]
    source = ASTSource(
        fn=fused._matvec_kernel,
        signature=signature,
        constexprs=consts,
        attrs={k: [["tt.divisibility", 16]] for k in aligned},
    )
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": cfg["num_warps"]})
    return kernel, cfg


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of a cubin, by the cuobjdump bundled with Triton."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    found = (re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line) for line in text.splitlines())
    return [(int(m.group(1), 16), m.group(2).strip()) for m in found if m]


def longest_loop(code: list[tuple[int, str]]) -> list[str]:
    """The instructions between the backward branch that spans the most and its target, of the
    loops that read no split sums (those loads bypass L1: LDG.E.STRONG.GPU, from `.cg`)."""
    best: list[str] = []
    for addr, ins in code:
        m = re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            body = [i for a, i in code if int(m.group(1), 16) <= a <= addr]
            if not any("LDG.E.STRONG" in i for i in body):
                best = max(best, body, key=len)
    return [re.sub(r"^@!?U?P\w+\s+", "", i) for i in best]  # without predicates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/sass_matvec.json")
    p.add_argument("--reads", help="only the reads whose names hold one of these comma-separated strings")
    args = p.parse_args(argv)
    import triton

    rows = []
    compiled = [
        (name, qtype, packed, read, gated)
        for name, qtype, packed, read, gated in READS
        if not args.reads or any(part in name for part in args.reads.split(","))
    ]
    for name, qtype, packed, read, gated in compiled:
        kernel, cfg = compile_matvec(qtype, packed, read, gated)
        code = sass(kernel.asm["cubin"])
        loop = longest_loop(code)
        ops = collections.Counter(i.split()[0] for i in loop)
        super_block_bytes = type_size(qtype) * (8 if qtype == T.Q8_0 else 1)
        per_thread = cfg["BN"] * super_block_bytes * (2 if gated else 1) / (32 * cfg["num_warps"])
        row = {
            "read": name,
            "loop_instructions": len(loop),
            "weight_bytes_per_thread": per_thread,
            "instructions_per_byte": len(loop) / per_thread,
            "loads": {k: v for k, v in sorted(ops.items()) if k.startswith(("LDG", "LDS", "LDL"))},
            "i2f": sum(v for k, v in ops.items() if k.startswith("I2F")),
            "idp": sum(v for k, v in ops.items() if k.startswith("IDP")),
            "barriers": sum(v for k, v in ops.items() if k.startswith("BAR")),
            "loop_spills": sum(1 for i in loop if re.match(r"(LDL|STL)\b", i)),
            "kernel_spills": sum(1 for _, i in code if re.search(r"\b(LDL|STL)\b", i)),
            "config": cfg,
        }
        rows.append(row)
        print(
            f"{name:24s} {row['instructions_per_byte']:6.2f} instructions/byte  {row['loads']}  I2F {row['i2f']}"
            f"  IDP {row['idp']}  BAR {row['barriers']}  spills {row['loop_spills']} in the loop, {row['kernel_spills']} in all"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
