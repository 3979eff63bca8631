"""Q4_K in the interleaved layout (`fused.PACK_CONFIG` "q4_k_interleave"): `pack`/`unpack` bit for
bit, and every reader of such a weight (the prefill's dequantization, the decode "int" read:
gated, routed, split, prefetching; `harness::qkv` in one launch; the whole model) giving the
bits the GGUF layout gives. Kernel cases run on the CPU under Triton's interpreter (a subprocess:
TRITON_INTERPRET is read before the kernels are defined) or on a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.quant.types import GGMLType
from tests.test_quant_fused import (
    INT_X_FORMS,
    _cuobjdump,
    _cuobjdump_tool,
    _extreme_weight,
    _interleaving,
    _matvec_sm_90,
    _pairs_inputs,
    _product_args,
    _random_weight,
    _same_bits,
)

REPO = Path(__file__).resolve().parents[1]
Q4 = GGMLType.Q4_K

# (leading dims, rows, values a row): experts, one and two tiles, one and five super-blocks
LAYOUT_SHAPES = ((), 32, 256), ((3,), 64, 1280), ((2,), 32, 512), ((), 96, 768)


def _q4_k(lead: tuple, rows: int, cols: int, rng, make=_random_weight) -> torch.Tensor:
    n = int(np.prod(lead, dtype=int))
    return make(Q4, n * rows, cols, rng).reshape(*lead, rows, -1)


@pytest.mark.parametrize("lead, rows, cols", LAYOUT_SHAPES)
def test_pack_moves_each_chunk_to_its_tile_slot_and_unpack_restores_the_bytes(lead, rows, cols):
    from harness.quant import fused

    rng = np.random.default_rng(rows + cols)
    raw = _q4_k(lead, rows, cols, rng)
    packed = fused.pack(raw, Q4)
    assert packed.shape == raw.shape and not torch.equal(packed, raw)
    assert torch.equal(fused.unpack(packed, Q4), raw)
    n_super, flat, out = cols // 256, packed.reshape(-1), packed.reshape(-1, rows, raw.shape[-1])
    gguf = raw.reshape(-1, rows, raw.shape[-1])
    for e, r, s, c in zip(*(rng.integers(0, top, 50) for top in (len(out), rows, n_super, 9)), strict=True):
        at = e * rows * raw.shape[-1] + (((r // 32) * n_super + s) * 9 + c) * 512 + (r % 32) * 16
        assert torch.equal(flat[at : at + 16], gguf[e, r, s * 144 + c * 16 : s * 144 + c * 16 + 16])


def test_only_whole_tiles_of_q4_k_are_interleaved_and_only_under_the_switch():
    from harness.quant import fused

    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="tiles of 32 rows"):
        fused.pack(_q4_k((), 48, 256, rng), Q4)
    ok, ragged = _q4_k((2,), 64, 512, rng), _q4_k((), 48, 512, rng)
    wide = _q4_k((), 32, 512, rng, _extreme_weight)
    with _interleaving(False):
        assert fused.kernel_weight(ok, Q4, 512)[1] == int(Q4)
    with _interleaving():
        assert fused.packs(Q4, 512, 64) and not fused.packs(Q4, 512, 48) and not fused.packs(Q4, 300, 64)
        kraw, code = fused.kernel_weight(ok, Q4, 512)
        assert code == int(Q4) | fused.PACKED and torch.equal(fused.gguf_blocks(kraw, code), ok)
        assert fused.matvec_paths(code) == ("int",)
        assert all(fused._reads_int(code, path) for path in fused.MATVEC_PATHS)
        assert fused.kernel_weight(ragged, Q4, 512)[1] == int(Q4)
        assert fused.kernel_weight(wide, Q4, 512)[1] == int(Q4) | fused.PACKED | fused.WIDE


# -- kernel cases (interpreter or GPU) --------------------------------------------------------------


def _dequant_cases(device: str, rng) -> list[dict]:
    """`_dequantize_packed` of interleaved Q4_K against `kernels.dequantize` of the GGUF blocks,
    float16 bit for bit (random and extreme scales: infinities alike)."""
    from harness.quant import fused, kernels

    results = []
    for lead, rows, cols in LAYOUT_SHAPES:
        for make in (_random_weight, _extreme_weight):
            raw = _q4_k(lead, rows, cols, rng, make).to(device)
            shape = (*lead, rows, cols)
            got = fused._dequantize_packed(fused.pack(raw, Q4), Q4, shape)
            want = kernels.dequantize(raw, Q4, shape, torch.float16)
            results.append({
                "case": f"dequant {list(shape)} {make.__name__}",
                "same_bits": torch.equal(got.view(torch.int16).cpu(), want.view(torch.int16).cpu()),
            })  # fmt: skip
    return results


# (rows, values a row, experts): the interpreter's, and Mixtral-8x7B's gate/up and down
READ_SHAPES_SMALL = {"gate_up": (64, 512, 3), "down": (32, 768, 3)}
READ_SHAPES_FULL = {"gate_up": (14336, 4096, 8), "down": (4096, 14336, 8)}
# (INT_MATVEC_CONFIG "prefetch", `int_x_path`) of each comparison, the interpreter's and a GPU's
# (fewer: each is a few sm_90 compiles): all at 4 pairs, the first two at fewer
READ_SETTINGS = tuple((prefetch, int_x) for prefetch in (0, 1, 2) for int_x in ("kernel", "launch"))
READ_SETTINGS_GPU = ((0, "kernel"), (0, "launch"), (2, "launch"))


def _read_cases(device: str, small: bool, rng) -> list[dict]:
    """`fused._product` (decode sizes) of interleaved Q4_K against the GGUF weights' "int" read,
    bit for bit: every form of INT_X_FORMS (gated and not, routed and dense, out_div 1 and 2, one
    split and a split per super-block) at 1 (or 2) and 4 pairs under READ_SETTINGS (on a GPU
    READ_SETTINGS_GPU) (the interleaved weight under `matvec_path` "vec": it reads "int"
    whatever the path)."""
    from harness.quant import fused

    shapes = READ_SHAPES_SMALL if small else READ_SHAPES_FULL
    weights = {}  # per shape: ((GGUF stacks, code), (interleaved stacks, code)), made on the device once
    for kind, (rows, cols, n_exp) in shapes.items():
        stacks = [_q4_k((n_exp,), rows, cols, rng).to(device) for _ in range(2)]
        with _interleaving():
            packed = [fused.kernel_weight(st, Q4, cols) for st in stacks]
        weights[kind] = (stacks, int(Q4)), ([w for w, _ in packed], packed[0][1])
    forms = [(*form, "gate_up" if form[0] else "down") for form in INT_X_FORMS]
    settings = READ_SETTINGS if small else READ_SETTINGS_GPU
    return read_switch_cases(device, Q4, shapes, weights, forms, settings, rng)


def read_switch_cases(
    device: str, qtype, shapes: dict, weights: dict, forms: list, settings, rng
) -> list[dict]:
    """`fused._product` at decode sizes of two layouts of the same weights, bit for bit: for each
    form (gated, routed, out_div, splits "one" or "many", shape kind) at 1 (or 2) and 4 pairs,
    under each of `settings` ((INT_MATVEC_CONFIG[qtype] "prefetch", `int_x_path`): all at 4 pairs,
    the first two at fewer), weights[kind]'s first (stacks, code) read under `matvec_path` "int"
    against its second under "vec" (an interleaved weight reads "int" whatever the path)."""
    from harness.quant import fused

    results = []
    cfg = fused.INT_MATVEC_CONFIG[qtype]
    saved, before = dict(cfg), (fused.matvec_path, fused.int_x_path)
    try:
        for gated, routed, out_div, splits, kind in forms:
            rows, cols, n_exp = shapes[kind]
            (want_w, want_code), (got_w, got_code) = weights[kind]
            for n_pairs in sorted({out_div, 4}):
                x, x_div, experts, scale = _pairs_inputs(n_pairs, routed, cols, n_exp, 1e4, rng)
                want_args, got_args = (
                    _product_args(x, w[0], w[1] if gated else None, code, rows, experts, x_div, scale, device)
                    for w, code in ((want_w, want_code), (got_w, got_code))
                )
                for prefetch, int_x in settings if n_pairs == 4 else settings[:2]:
                    cfg.clear()
                    cfg.update(saved, prefetch=prefetch)
                    cfg[fused.split_setting(gated, routed)] = (
                        (0 if gated else 1) if splits == "one" else 64 * fused.MATVEC_MAX_ROWS
                    )
                    fused.int_x_path = int_x
                    fused.matvec_path = "int"
                    want = fused._product(*want_args, out_div=out_div)
                    fused.matvec_path = "vec"
                    got = fused._product(*got_args, out_div=out_div)
                    results.append({
                        "case": f"read {kind} {'gated' if gated else 'plain'} {'routed' if routed else 'dense'} "
                        f"out_div={out_div} splits={splits} pairs={n_pairs} prefetch={prefetch} x {int_x}",
                        "same_bits": _same_bits(got, want),
                    })  # fmt: skip
    finally:
        cfg.clear()
        cfg.update(saved)
        fused.matvec_path, fused.int_x_path = before
    return results


def _qkv_cases(device: str, small: bool, rng) -> list[dict]:
    """`harness::qkv` (QKV_CONFIG "one_launch" for up to 8 tokens) with q interleaved against q in
    GGUF's layout, bit for bit, at 1 and 4 tokens: q Q4_K with k and v packed Q8_0 (one
    `_matvec_two_runs_kernel` launch), and q, k, v all Q4_K (one run of one buffer, `pack_rows`:
    its tiles stay whole). The launches of each are recorded."""
    shape = (64, 32, 512) if small else (4096, 1024, 4096)
    return qkv_switch_cases(
        device, [(Q4, GGMLType.Q8_0, GGMLType.Q8_0), (Q4, Q4, Q4)], shape, _interleaving, rng
    )


def qkv_switch_cases(device: str, type_sets: list[tuple], shape: tuple, switch, rng) -> list[dict]:
    """`harness::qkv` (QKV_CONFIG "one_launch" for up to 8 tokens) on weights of each of
    `type_sets` (q, k, v) of `shape` (q rows, k and v rows, values a row), prepared with the
    context `switch(on)` off and on, at 1 and 4 tokens: whether the two give the same bits, the
    codes with it on, and the matrix-vector launches of each."""
    from harness.quant import fused
    from harness.quant.launch import unbound

    family = {fused._matvec_kernel, fused._matvec_two_runs_kernel}
    original, launched = fused.launch, []

    def counted(kernel, *a, **kw):
        fn, _ = unbound(kernel, kw)
        if fn in family:
            launched.append(fn.__name__)
        return original(kernel, *a, **kw)

    q_rows, kv_rows, cols = shape
    results, saved = [], dict(fused.QKV_CONFIG)
    try:
        fused.QKV_CONFIG.update(one_launch=True, one_launch_rows=fused.MATVEC_MAX_ROWS)
        fused.launch = counted
        for types in type_sets:
            raws = [
                _random_weight(t, r, cols, rng).to(device)
                for t, r in zip(types, (q_rows, kv_rows, kv_rows), strict=True)
            ]
            xs = [torch.randn(t, cols, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
                  for t in (1, 4)]  # fmt: skip
            outs, launches = [], []
            for on in (False, True):
                with switch(on):
                    prepared = [fused.kernel_weight(raw, t, cols) for raw, t in zip(raws, types, strict=True)]
                codes = [c for _, c in prepared]
                weights = fused.pack_rows([w for w, _ in prepared], codes)
                outs.append([])
                launched.clear()
                for x in xs:
                    outs[-1].append(torch.ops.harness.qkv(x.to(device), *weights, *codes).cpu())
                launches.append(list(launched))
            results.append({
                "case": f"qkv q {types[0].name}, k v {types[1].name}", "codes": codes, "launches": launches,
                "same_bits": all(_same_bits(a, b) for a, b in zip(*outs, strict=True)),
            })  # fmt: skip
    finally:
        fused.QKV_CONFIG.update(saved)
        fused.launch = original
    return results


def _prefill_cases(device: str, small: bool, rng) -> list[dict]:
    """`fused._product` past the decode sizes (prefill) of interleaved Q4_K against GGUF's, bit for
    bit, under each of PREFILL_PATHS: gated routed (moe_ffn's gate/up), routed with scales, dense;
    and a WIDE weight (values beyond float16: "tiled" in float32 whatever the path)."""
    from harness.quant import fused

    rows, cols, n_exp = (64, 512, 3) if small else (1024, 4096, 8)

    def layouts(make):
        stacks = [_q4_k((n_exp,), rows, cols, rng, make).to(device) for _ in range(2)]
        with _interleaving():
            packed = [fused.kernel_weight(st, Q4, cols) for st in stacks]
        code = packed[0][1]
        return (stacks, int(Q4) | (code & fused.WIDE)), ([w for w, _ in packed], code)

    return prefill_switch_cases(device, (rows, cols, n_exp), layouts, rng)


def prefill_switch_cases(device: str, shape: tuple, layouts, rng) -> list[dict]:
    """`fused._product` past the decode sizes (prefill) of two layouts of the same weights of
    `shape` (rows, values a row, experts), bit for bit, under each of PREFILL_PATHS: gated routed
    (moe_ffn's gate/up), routed with scales, dense; of random weights and of extreme ones (WIDE:
    "tiled" in float32 whatever the path). layouts(make): ((W and U stacks, code) the reference,
    (stacks, code) compared) of weights made by `make`."""
    from harness.quant import fused

    rows, cols, n_exp = shape
    n_pairs = fused.MATVEC_MAX_ROWS + 4
    results, before = [], fused.prefill_path
    try:
        for make in (_random_weight, _extreme_weight):
            (want_w, want_code), (got_w, code) = layouts(make)
            for gated, routed in ((True, True), (False, True), (False, False)):
                x, x_div, experts, scale = _pairs_inputs(n_pairs, routed, cols, n_exp, 10.0, rng)
                want_args, got_args = (
                    _product_args(x, w[0], w[1] if gated else None, c, rows, experts, x_div, scale, device)
                    for w, c in ((want_w, want_code), (got_w, code))
                )
                for path in fused.PREFILL_PATHS:
                    fused.prefill_path = path
                    results.append({
                        "case": f"prefill {path} {make.__name__} {'gated' if gated else 'plain'} "
                        f"{'routed' if routed else 'dense'} code={code}",
                        "same_bits": _same_bits(fused._product(*got_args), fused._product(*want_args)),
                        "wide": bool(code & fused.WIDE),
                    })  # fmt: skip
    finally:
        fused.prefill_path = before
    return results


def _check(results: list[dict]) -> None:
    assert results and all(r["same_bits"] for r in results), [
        r["case"] for r in results if not r["same_bits"]
    ]


def _check_qkv(results: list[dict]) -> None:
    from harness.quant import fused

    _check(results)
    mixed, one_type = results
    assert mixed["codes"][0] == int(Q4) | fused.PACKED and one_type["codes"] == [int(Q4) | fused.PACKED] * 3
    # q and k+v in one launch a call either way; q, k, v of one type one run, one launch a call
    assert mixed["launches"] == [["_matvec_two_runs_kernel"] * 2] * 2, mixed["launches"]
    assert one_type["launches"] == [["_matvec_kernel"] * 2] * 2, one_type["launches"]


def _interpreted_cases(mode: str, script: str = __file__, timeout: int = 900) -> list[dict]:
    """The results of this file (or `script`, as `run_cases` runs it) run as a script in `mode`
    on the CPU under the interpreter, with a fresh seed, which a failure names."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    seed = str(int.from_bytes(os.urandom(4), "little"))
    proc = subprocess.run(
        [sys.executable, script, mode, "cpu", seed], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, f"interpreter subprocess failed (seed {seed}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_dequantizes_interleaved_q4_k_bit_for_bit():
    _check(_interpreted_cases("DEQUANT"))


@pytest.mark.slow
def test_interpreter_int_read_of_interleaved_q4_k_matches_gguf_bit_for_bit():
    _check(_interpreted_cases("READ"))


def test_interpreter_prefill_of_interleaved_q4_k_matches_gguf_bit_for_bit():
    results = _interpreted_cases("PREFILL")
    _check(results)
    assert any(r["wide"] for r in results) and not all(r["wide"] for r in results)


def test_interpreter_qkv_with_an_interleaved_q_matches_gguf_bit_for_bit():
    _check_qkv(_interpreted_cases("QKV"))


# -- the model ----------------------------------------------------------------------------------------

_MODEL_SCRIPT = """
import json, sys, torch
from harness.model.mixtral import Mixtral
from harness.quant import fused
from harness.trace.tracer import Tracer
def run(on):
    fused.PACK_CONFIG["q4_k_interleave"] = on
    model = Mixtral.from_gguf(sys.argv[1], max_seq_len=16)
    codes = {f"{name}.{attr}": code for name, m in model.named_modules()
             for attr, code in (getattr(m, "kernel_qtypes", None) or {}).items()}
    codes |= {name: m.kernel_qtype for name, m in model.named_modules() if hasattr(m, "kernel_qtype")}
    with torch.inference_mode(), Tracer(model, keep_events=True) as tracer:
        logits = [model(torch.arange(1, 10), 0), model(torch.tensor([5]), 9), model(torch.tensor([7]), torch.tensor([10]))]
    events = [[e.module, e.op, list(e.tensors or ())] for e in tracer.events if e.module and not e.alias]
    return logits, codes, tracer.summary.verdict, events
off, on = run(False), run(True)
same = [torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(off[0], on[0])]
print(json.dumps({"same": same, "codes": on[1], "verdict": str(on[2]), "events": on[3], "events_off": off[3]}))
"""


@pytest.mark.slow
def test_tiny_model_with_interleaved_q4_k_gives_the_same_logits_and_a_clean_trace(tmp_path):
    """The tiny Q4_K_M model under the interpreter with the switch on against off: a 9-token
    prefill (every product past the decode sizes) and two decode steps give the same logits bit
    for bit; its Q4_K weights (expert stacks, attention's) were interleaved; a Tracer sees the
    same ops naming the GGUF tensors, and its verdict is clean."""
    from harness.quant import fused
    from harness.synth import synthesize

    pytest.importorskip("triton")
    path = synthesize(tmp_path / "tiny.gguf", "tiny", file_type="Q4_K_M", seed=5)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", _MODEL_SCRIPT, str(path)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["same"] == [True, True, True]
    interleaved = int(Q4) | fused.PACKED
    assert got["codes"]["layers.1.moe.experts.w1"] == interleaved, got["codes"]
    assert got["codes"]["layers.0.attn.wq"] == interleaved, got["codes"]
    assert got["verdict"] == "clean" and got["events"] == got["events_off"]
    experts = [e for e in got["events"] if e[0] == "layers.1.moe.experts"]
    assert len(experts) == 3 and all("blk.1.ffn_gate_exps.weight[0]" in e[2] for e in experts)


# -- sm_90 (no GPU) -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_interleaved_q4_k_reads_compile_for_sm_90_with_wide_loads_and_no_spills():
    """The interleaved Q4_K "int" read (moe_ffn's gated gate/up, routed unsplit; its routed,
    split down; a dense product) compiles for an H100 at INT_MATVEC_CONFIG's setting with and
    without "prefetch": no local memory (spills), dp2a, and its weight words as 128-bit loads;
    and the prefill's dequantization of the layout with vector loads and stores."""
    pytest.importorskip("triton.backends.nvidia")
    from harness.quant import fused

    _cuobjdump_tool()
    cfg = fused.INT_MATVEC_CONFIG[Q4]
    for gated, routed, prefetch in ((True, True, 0), (True, True, 2), (False, True, 0), (False, False, 1)):
        consts = {
            "QT": int(Q4), "NP": 2, "BN": cfg["BN"], "GATED": gated, "SCALED": routed, "ROUTED": routed,
            "VEC": False, "PACKED": True, "STAGES": 1, "REDUCE": not gated, "INT": True, "INT_X": False,
            "PTX": True, "PDL": True, "RESIDUAL": False, "INT_OUT": False, "PREFETCH": prefetch,
        }  # fmt: skip
        compiled = _matvec_sm_90(consts, "*i32", cfg["num_warps"])
        code = _cuobjdump(compiled.asm["cubin"])
        where = (gated, routed, prefetch)
        assert not re.search(r"\b(LDL|STL)\b", code), where
        assert "IDP.2A" in code, where
        # per thread and super-block: the head, and each group's two qs chunks, a 16-byte load each
        # (W's and U's when gated)
        assert code.count("LDG.E.128") >= (2 if gated else 1) * 3, (where, code.count("LDG.E.128"))
    # the prefill's dequantization: the quants' 16-byte chunks load, and the values store, as vectors
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"raw_ptr": "*u8", "out_ptr": "*fp16", "nblocks": "i64", "n": "i32", "row_bytes": "i32"}
    source = ASTSource(
        fn=fused._dequant_packed_kernel,
        signature={**signature, "QT": "constexpr", "NB": "constexpr", "IL": "constexpr"},
        constexprs={"QT": int(Q4), "NB": 16, "IL": False},
        attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 4)},
    )
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4}).asm["ptx"]
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx


# -- GPU --------------------------------------------------------------------------------------------------


@pytest.mark.cuda(real=True)
def test_cuda_interleaved_q4_k_matches_gguf_bit_for_bit_at_mixtral_shapes():
    """On the GPU (PTX dp2a, the compiler's layouts) at 8x7B's decode shapes (gate/up 14336 x 4096,
    down 4096 x 14336, 8 experts; 1 and 4 pairs; q 4096 x 4096 with k, v): the interleaved reads
    against the GGUF ones, and the prefill's dequantization, bit for bit."""
    from harness.quant import fused  # noqa: F401  (registers the ops)

    rng = np.random.default_rng()
    _check(_dequant_cases("cuda", rng))
    _check(_read_cases("cuda", False, rng))
    _check(_prefill_cases("cuda", False, rng))
    _check_qkv(_qkv_cases("cuda", False, rng))


def run_cases(cases: dict) -> None:
    """A test file run as a script (`_interpreted_cases`): argv mode, device, seed; prints the
    JSON results of cases[mode] (DEQUANT's take the device and a generator, the others also
    True: the small shapes)."""
    mode, device, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(seed)
    print(json.dumps(cases[mode](device, rng) if mode == "DEQUANT" else cases[mode](device, True, rng)))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from harness.quant import fused  # noqa: F401

    run_cases({"DEQUANT": _dequant_cases, "READ": _read_cases, "QKV": _qkv_cases, "PREFILL": _prefill_cases})
