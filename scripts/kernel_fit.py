"""Do the fused kernels fit GPUs other than the H100? Compiles every Triton kernel launch that the
decode and prefill ops make at Mixtral-8x7B's shapes for several NVIDIA architectures, without a
GPU, and compares each one's shared memory with the architecture's limit for one block.

A kernel that asks for more shared memory than a GPU has compiles fine and fails at its first
launch there ("out of resource: shared memory"): consumer cards (sm_86, sm_89, sm_120) allow
99 KB a block against the H100's 227 KB. The launches are found, not listed by hand:

1. `record`: the ops run on the CPU under Triton's interpreter with every kernel launch replaced
   by a note of its kernel, argument types, alignments, constexprs and launch options (nothing
   is computed, so full-size shapes cost nothing);
2. `compile`: each distinct launch is compiled with Triton's own compiler and ptxas for each
   target, specialized as a launch on a GPU would be (16-byte aligned pointers, integers
   divisible by 16, integers equal to 1), and its shared memory, registers and spill bytes read.

    python scripts/kernel_fit.py --out scripts/results/kernel_fit.json
    python scripts/kernel_fit.py --archs 86 --ops decode       # a part

Writes JSON; prints a row per launch and target; exits 1 where a launch does not fit.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Shared memory one block may use (opt-in maximum), bytes, per compute capability.
SHARED_LIMIT = {70: 98_304, 75: 65_536, 80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 120: 101_376}
ARCH_NAMES = {
    70: "V100",
    75: "T4 / RTX 20xx",
    80: "A100",
    86: "RTX 30xx / A10",
    89: "RTX 40xx / L4 / L40",
    90: "H100 / H200",
    120: "RTX 50xx",
}
OP_GROUPS = ("decode", "prefill")

_TRITON_TYPES = {
    "torch.float32": "fp32",
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.float64": "fp64",
    "torch.int64": "i64",
    "torch.int32": "i32",
    "torch.int16": "i16",
    "torch.int8": "i8",
    "torch.uint8": "u8",
    "torch.bool": "i1",
}


def _argument(value) -> dict:
    """What a launch on a GPU specializes an argument on."""
    import torch

    if isinstance(value, torch.Tensor):
        return {
            "kind": "pointer",
            "type": "*" + _TRITON_TYPES[str(value.dtype)],
            "aligned": value.data_ptr() % 16 == 0,
        }
    if isinstance(value, bool):
        return {"kind": "int", "type": "i1", "value": int(value)}
    if isinstance(value, int):
        return {"kind": "int", "type": "i32" if -(2**31) <= value < 2**31 else "i64", "value": value}
    if isinstance(value, float):
        return {"kind": "float", "type": "fp32"}
    if value is None:
        return {"kind": "none"}
    raise TypeError(f"an argument of type {type(value).__name__}")


def record(groups: list[str]) -> list[dict]:
    """The distinct kernel launches of the ops in `groups`, run under the interpreter with each
    launch noted instead of run (TRITON_INTERPRET must be set before triton is imported)."""
    import torch
    import triton.runtime.interpreter as interpreter

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_host import random_weight

    from harness.quant import fused
    from harness.quant.types import GGMLType

    launches: dict[str, dict] = {}

    def note(self, *args, grid, warmup, **kwargs):
        params = dict(zip(self.arg_names, args, strict=False)) | {
            k: v for k, v in kwargs.items() if k in self.arg_names
        }
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        fn = self.fn
        constexpr = {
            name for name, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)
        }
        launch = {
            "module": fn.__module__,
            "kernel": fn.__name__,
            "constexprs": {n: v for n, v in params.items() if n in constexpr},
            "arguments": {n: _argument(v) for n, v in params.items() if n not in constexpr},
            "options": options,
        }
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)

    interpreter.InterpretedFunction.run = note
    q4, q6 = GGMLType.Q4_K, GGMLType.Q6_K
    d, ffn, n_experts, n_kv, hd, s_max = 4096, 14336, 8, 8, 128, 4096
    cpu = torch.device("cpu")
    typed = {qtype: random_weight(qtype, d, d, cpu) for qtype in fused.FUSED_TYPES}  # d x d, each type
    (weight, code), (weight6, code6) = typed[q4], typed[q6]
    head, code_head = random_weight(q6, 32000, d, cpu)
    gate, code_gu = random_weight(q4, ffn, d, cpu, n_experts)
    up, _ = random_weight(q4, ffn, d, cpu, n_experts)
    down, code_down = random_weight(q6, d, ffn, cpu, n_experts)
    router = torch.randn(n_experts, d)
    cache_k, cache_v = torch.zeros(n_kv, s_max, hd), torch.zeros(n_kv, s_max, hd)
    cos, sin = torch.ones(s_max, hd // 2), torch.zeros(s_max, hd // 2)
    norm = torch.ones(d)
    ops = torch.ops.harness
    with torch.inference_mode():
        for group in groups:
            tokens = [1, 2, 5, 8] if group == "decode" else [9, 512]
            for t in tokens:
                x = torch.randn(t, d)
                experts = torch.stack([torch.arange(t) % n_experts, (torch.arange(t) + 3) % n_experts], 1)
                weights = torch.full((t, 2), 0.5)
                ops.rms_norm(x, norm, 1e-5)
                ops.add_rms_norm(x, x, norm, 1e-5)
                if group == "decode":  # NORM_CONFIG "int_out": the normed rows in `_int_x`'s form too
                    ops.rms_norm_int(x, norm, 1e-5)
                    ops.add_rms_norm_int(x, x, norm, 1e-5)
                    # NORM_CONFIG "router": the norm with the router in one launch (and its int form)
                    ops.add_rms_norm_route(x, x, norm, 1e-5, router, 2, 1e-6)
                    ops.add_rms_norm_int_route(x, x, norm, 1e-5, router, 2, 1e-6)
                ops.router_topk(x, router, 2, 1e-6)
                # every way the products can run: each matrix-vector read (decode) or prefill path
                kind, paths = (
                    ("matvec_path", fused.MATVEC_PATHS)
                    if group == "decode"
                    else ("prefill_path", fused.PREFILL_PATHS)
                )
                for path in paths:
                    setattr(fused, kind, path)
                    for w, c in typed.values():
                        ops.qmatmul(x, w, c, d)
                    ops.qmatmul(x, head, code_head, 32000)
                    ops.qkv(x, weight, weight[:1024], weight6[:1024], code, code, code6)
                    if group == "decode":  # QKV_CONFIG "one_launch": q, and k+v of one buffer, in one launch
                        with _settings(
                            fused.QKV_CONFIG, {"one_launch": True, "one_launch_rows": fused.MATVEC_MAX_ROWS}
                        ):
                            ops.qkv(x, weight, weight6[:1024], weight6[1024:2048], code, code6, code6)
                    ops.moe_ffn(x, gate, up, down, weights, experts, code_gu, code_down)
                    # the decode graph's forms: x quantized apart, and with MOE_FFN_CONFIG's fusions
                    # (h quantized by the gated product, the residual added in the kernel)
                    with fused.graph_step():
                        for fusions in (False, True):
                            with _settings(
                                fused.MOE_FFN_CONFIG, dict.fromkeys(fused.MOE_FFN_CONFIG, fusions)
                            ):
                                ops.moe_ffn(x, gate, up, down, weights, experts, code_gu, code_down, x)
                qkv = torch.randn(t, d + 2 * n_kv * hd)
                for settings in ({}, fused.ATTENTION_TWO_LAUNCHES):
                    with _settings(fused.ATTENTION_CONFIG, settings):
                        for start in (0, 511, 4000 - t):
                            ops.attention(qkv, cache_k, cache_v, cos, sin, None, start)
                            ops.attention(qkv, cache_k, cache_v, cos, sin, torch.arange(start, start + t), 0)
                            if group == "decode":  # ATTENTION_CONFIG "int_out": the output's int form too
                                at = torch.arange(start, start + t)
                                ops.attention_int(qkv, cache_k, cache_v, cos, sin, at, 0)
    return list(launches.values())


@contextlib.contextmanager
def _settings(table: dict, changes: dict):
    """Inside, `table` (a launch-settings dict of harness.quant.fused) updated by `changes`."""
    saved = dict(table)
    table.update(changes)
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def _resources(cubin: bytes) -> dict:
    """Registers and spill (local) bytes per thread of the one kernel in `cubin`, from cuobjdump."""
    from triton.backends.nvidia import compiler as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    found = dict(re.findall(r"(REG|LOCAL|STACK):(\d+)", text))
    return {"registers": int(found.get("REG", 0)), "local_bytes": int(found.get("LOCAL", 0))}


def compile_launch(launch: dict, arch: int, done: dict) -> dict:
    """`launch` compiled for sm_`arch`: its shared memory, registers and spills (`done`: those
    compiled already, by what the compiler sees)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature, constexprs, attrs = {}, dict(launch["constexprs"]), {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in launch["arguments"]:  # a constexpr the launch left at its default (PDL)
            signature[name], constexprs[name] = "constexpr", param.default
            continue
        arg = launch["arguments"][name]
        if arg["kind"] == "none":
            signature[name], constexprs[name] = "constexpr", None
        elif (
            arg["kind"] == "int" and arg["value"] == 1 and arg["type"] != "i1" and not param.do_not_specialize
        ):
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = arg["type"]
            divisible = arg.get("aligned") or (arg["kind"] == "int" and arg["value"] % 16 == 0)
            if (
                divisible
                and arg["type"] != "i1"
                and not param.do_not_specialize_on_alignment
                and not (arg["kind"] == "int" and param.do_not_specialize)
            ):
                attrs[(i,)] = [["tt.divisibility", 16]]
    key = repr((launch["module"], launch["kernel"], signature, constexprs, attrs, launch["options"], arch))
    if key in done:
        return {**done[key], "same_as_above": True}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch["options"])
    done[key] = {"shared_bytes": compiled.metadata.shared, **_resources(compiled.asm["cubin"])}
    return done[key]


def recorded(groups: list[str]) -> list[dict]:
    """`record(groups)`, run in a process of its own under Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    run = subprocess.run(
        [sys.executable, __file__, "--record-only", "--ops", ",".join(groups)],
        capture_output=True,
        text=True,
        env=env,
    )
    if run.returncode:
        raise RuntimeError(f"recording the launches failed:\n{run.stderr}")
    return json.loads(run.stdout)


# Kernels launched through fused._launch_fitted, which steps down fused.fallback_settings where a
# device has too little shared memory.
FALLBACK_KERNELS = {"_matmat_kernel", "_grouped_kernel"}


def _fallback(launch: dict, arch: int, done: dict) -> dict | None:
    """The settings (BM, BN, num_stages) a launch that does not fit sm_`arch` falls back to, or None."""
    from harness.quant import fused

    if launch["kernel"] not in FALLBACK_KERNELS:
        return None
    cfg = {
        "BM": launch["constexprs"]["BM"],
        "BN": launch["constexprs"]["BN"],
        "num_stages": launch["options"].get("num_stages", 1),
    }
    for tried in list(fused.fallback_settings(cfg))[1:]:
        smaller = {
            **launch,
            "constexprs": {**launch["constexprs"], "BM": tried["BM"], "BN": tried["BN"]},
            "options": {**launch["options"], "num_stages": tried["num_stages"]},
        }
        if compile_launch(smaller, arch, done)["shared_bytes"] <= SHARED_LIMIT[arch]:
            return tried
    return None


def check(launches: list[dict], archs: list[int], show: bool = False) -> dict:
    """Each launch compiled for each of `archs` against its shared memory limit."""
    rows, done = [], {}
    for launch in launches:
        for arch in archs:
            row = {
                "kernel": launch["kernel"],
                "constexprs": launch["constexprs"],
                "options": launch["options"],
                "arch": arch,
                **compile_launch(launch, arch, done),
            }
            if row.pop("same_as_above", False):
                continue
            row["fits"] = row["shared_bytes"] <= SHARED_LIMIT[arch]
            if not row["fits"]:
                row["falls_back_to"] = _fallback(launch, arch, done)
            rows.append(row)
            if show:
                verdict = "" if row["fits"] else f"DOES NOT FIT; falls back to {row['falls_back_to']}"
                print(
                    f"sm_{arch:<3} {row['kernel']:24s} shared {row['shared_bytes']:>7} of {SHARED_LIMIT[arch]:>7}"
                    f"  regs {row['registers']:>3}  spill {row['local_bytes']:>4}"
                    f"  {verdict}  {row['constexprs']} {row['options']}",
                    flush=True,
                )
    return {
        "limits": {f"sm_{a}": {"shared_bytes": SHARED_LIMIT[a], "gpus": ARCH_NAMES[a]} for a in archs},
        "launches": len(launches),
        "compiled": len(rows),
        "misfits": sum(not row["fits"] for row in rows),
        # misfits with no smaller setting that fits (or whose kernel has no fallback): a failed launch
        "unfitted": sum(not row["fits"] and row["falls_back_to"] is None for row in rows),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--archs", default=",".join(str(a) for a in SHARED_LIMIT), help="compute capabilities, e.g. 86,90"
    )
    p.add_argument("--ops", default=",".join(OP_GROUPS), help="decode, prefill or both")
    p.add_argument("--out", help="write the table here as JSON")
    p.add_argument("--record-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    groups = args.ops.split(",")
    if args.record_only:  # the interpreter's half, in its own process
        print(json.dumps(record(groups)))
        return 0
    result = check(recorded(groups), [int(a) for a in args.archs.split(",")], show=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{result['launches']} launches, {result['compiled']} compiled, {result['misfits']} do not fit as"
        f" configured, {result['unfitted']} with no fallback that fits"
    )
    return 1 if result["unfitted"] else 0


if __name__ == "__main__":
    sys.exit(main())
