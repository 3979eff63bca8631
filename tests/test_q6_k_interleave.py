"""Packed Q6_K in the interleaved layout (`fused.PACK_CONFIG` "q6_k_interleave"): `pack`/`unpack`
bit for bit, and every reader of such a weight (the prefill's dequantization and tiles, the decode
"int" read: gated, routed, split, prefetching; `harness::qkv` in one launch) giving the bits the
row-major packed layout gives. Kernel cases run on the CPU under Triton's interpreter (a
subprocess: TRITON_INTERPRET is read before the kernels are defined) or on a GPU."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.quant.types import GGMLType
from tests.test_model_decode import _interpreted
from tests.test_q4_k_interleave import (
    _check,
    prefill_switch_cases,
    qkv_switch_cases,
    read_switch_cases,
    run_cases,
)
from tests.test_q4_k_interleave import _interpreted_cases as _interpreted_in
from tests.test_quant_fused import (
    INT_X_FORMS,
    _cuobjdump,
    _cuobjdump_tool,
    _extreme_weight,
    _matvec_sm_90,
    _random_weight,
)
from tests.test_quant_fused import _interleaving as _switch

REPO = Path(__file__).resolve().parents[1]
Q6 = GGMLType.Q6_K

# (leading dims, rows, values a row): one group, experts, groups past one 32-row tile, and rows
# of 8 and 16 super-blocks (one and two chunks of the d plane)
LAYOUT_SHAPES = ((), 8, 2048), ((3,), 16, 4096), ((2,), 40, 2048), ((), 32, 4096)


def _interleaving(on: bool = True):
    """`kernel_weight` interleaving packed Q6_K (PACK_CONFIG "q6_k_interleave") or not, inside."""
    return _switch(on, "q6_k_interleave")


def _q6_k(lead: tuple, rows: int, cols: int, rng, make=_random_weight) -> torch.Tensor:
    n = int(np.prod(lead, dtype=int))
    return make(Q6, n * rows, cols, rng).reshape(*lead, rows, -1)


@pytest.mark.parametrize("lead, rows, cols", LAYOUT_SHAPES)
def test_pack_moves_each_chunk_to_its_group_lane_and_unpack_restores_the_bytes(lead, rows, cols):
    from harness.quant import fused

    rng = np.random.default_rng(rows + cols)
    raw = _q6_k(lead, rows, cols, rng)
    planes, packed = fused.pack(raw, Q6), fused.pack(raw, Q6, interleave=True)
    assert packed.shape == raw.shape and not torch.equal(packed, planes)
    assert torch.equal(fused.unpack(packed, Q6, interleaved=True), raw)
    n, row_bytes = cols // 256, raw.shape[-1]
    flat, rows_of = packed.reshape(-1), planes.reshape(-1, rows, row_bytes)

    def chunk(e: int, r: int, at: int, plane_at: int, size: int = 16) -> bool:
        lane = e * rows * row_bytes + (r - r % 8) * row_bytes + (r % 8) * 16
        return torch.equal(flat[lane + at : lane + at + size], rows_of[e, r, plane_at : plane_at + size])

    for e, r, s, c, u, h in zip(
        *(rng.integers(0, top, 40) for top in (len(rows_of), rows, n, 2, 2, 2)), strict=True
    ):
        s128, w_ql, w_qh = 1664 * s, 16 * c + 8 * u + 4 * h, 8 * c + 4 * h
        assert chunk(e, r, s128 + 512 * u + 256 * c + 128 * h, 128 * s + 4 * w_ql)  # ql
        assert chunk(e, r, s128 + 1024 + 256 * c + 128 * h, 128 * n + 64 * s + 4 * w_qh)  # qh
        assert chunk(e, r, s128 + 1536, 192 * n + 16 * s)  # the scales
        assert chunk(e, r, 1664 * n + (s // 8) * 128 + 2 * (s % 8), 208 * n + 2 * s, 2)  # d


def test_only_whole_groups_of_packed_q6_k_are_interleaved_and_only_under_the_switch():
    from harness.quant import fused

    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="groups of 8 rows"):
        fused.pack(_q6_k((), 20, 2048, rng), Q6, interleave=True)
    with pytest.raises(ValueError, match="only Q6_K"):
        fused.pack(_random_weight(GGMLType.Q8_0, 8, 512, rng), GGMLType.Q8_0, interleave=True)
    ok, ragged, short = _q6_k((2,), 24, 2048, rng), _q6_k((), 20, 2048, rng), _q6_k((), 32, 1024, rng)
    wide = _q6_k((), 8, 2048, rng, _extreme_weight)
    packed = int(Q6) | fused.PACKED
    with _interleaving(False):
        assert fused.kernel_weight(ok, Q6, 2048)[1] == packed
    with _interleaving():
        assert fused.interleaves(Q6, 2048, 24) and not fused.interleaves(Q6, 2048, 20)
        assert not fused.interleaves(Q6, 1024, 32) and not fused.interleaves(GGMLType.Q8_0, 2048, 32)
        kraw, code = fused.kernel_weight(ok, Q6, 2048)
        assert code == packed | fused.INTERLEAVED and torch.equal(fused.gguf_blocks(kraw, code), ok)
        assert fused.matvec_paths(code) == ("int",) and fused.matvec_paths(packed) == ("int", "vec")
        assert all(fused._reads_int(code, path) for path in fused.MATVEC_PATHS)
        assert fused._packed_form(code) == 2 and fused._packed_form(packed) == 1
        assert fused.matvec_config(code) is fused.INT_MATVEC_CONFIG[Q6]
        assert fused.kernel_weight(ragged, Q6, 2048)[1] == packed  # rows not whole groups: row-major
        assert fused.kernel_weight(short, Q6, 1024)[1] == int(Q6)  # rows not 16-byte multiples: GGUF's
        assert fused.kernel_weight(wide, Q6, 2048)[1] == packed | fused.INTERLEAVED | fused.WIDE
        # an expert of a stack, as the module dequantizes one (`Experts.weight`)
        kraw, code = fused.kernel_weight(ok, Q6, 2048)
        assert torch.equal(fused.gguf_blocks(kraw[1], code), ok[1])


# -- kernel cases (interpreter or GPU) --------------------------------------------------------------


def _dequant_cases(device: str, rng) -> list[dict]:
    """`_dequantize_packed` of interleaved Q6_K against `kernels.dequantize` of the GGUF blocks,
    float16 bit for bit (random and extreme scales: infinities alike)."""
    from harness.quant import fused, kernels

    results = []
    for lead, rows, cols in LAYOUT_SHAPES:
        for make in (_random_weight, _extreme_weight):
            raw = _q6_k(lead, rows, cols, rng, make).to(device)
            shape = (*lead, rows, cols)
            got = fused._dequantize_packed(fused.pack(raw, Q6, interleave=True), Q6, shape, interleaved=True)
            want = kernels.dequantize(raw, Q6, shape, torch.float16)
            results.append({
                "case": f"dequant {list(shape)} {make.__name__}",
                "same_bits": torch.equal(got.view(torch.int16).cpu(), want.view(torch.int16).cpu()),
            })  # fmt: skip
    return results


# (rows, values a row, experts): the interpreter's (24 rows: a tile of BN 16 past the last row),
# and Mixtral-8x7B's expert shapes and output head
READ_SHAPES_SMALL = {"gate_up": (24, 2048, 3), "down": (32, 4096, 3)}
READ_SHAPES_FULL = {"gate_up": (14336, 4096, 8), "down": (4096, 14336, 8), "head": (32000, 4096, 1)}
# (INT_MATVEC_CONFIG "prefetch", `int_x_path`) of each comparison, the interpreter's and a GPU's:
# all at 4 pairs, the first two at fewer
READ_SETTINGS = tuple((prefetch, int_x) for prefetch in (1, 0, 2) for int_x in ("kernel", "launch"))
READ_SETTINGS_GPU = ((1, "launch"), (0, "kernel"), (0, "launch"))


def _prepared_pair(stacks: list[torch.Tensor], cols: int):
    """The stacks as `kernel_weight` prepares them with the switch off and on: ((row-major
    packed stacks, code), (interleaved stacks, code))."""
    from harness.quant import fused

    made = []
    for on in (False, True):
        with _interleaving(on):
            prepared = [fused.kernel_weight(st, Q6, cols) for st in stacks]
        made.append(([w for w, _ in prepared], prepared[0][1]))
    return made


def _read_cases(device: str, small: bool, rng) -> list[dict]:
    """`fused._product` (decode sizes) of interleaved Q6_K against the row-major packed weights'
    "int" read, bit for bit (`read_switch_cases`): every form of INT_X_FORMS (gated and not,
    routed and dense, out_div 1 and 2, one split and a split per super-block) at 1 (or 2) and 4
    pairs under READ_SETTINGS (on a GPU READ_SETTINGS_GPU, and the output head, dense)."""
    from harness.quant import fused

    shapes = READ_SHAPES_SMALL if small else READ_SHAPES_FULL
    weights = {}  # per shape: (row-major (stacks, code), interleaved (stacks, code)), made once
    for kind, (rows, cols, n_exp) in shapes.items():
        stacks = [_q6_k((n_exp,), rows, cols, rng).to(device) for _ in range(1 if kind == "head" else 2)]
        weights[kind] = _prepared_pair(stacks, cols)
        assert weights[kind][1][1] & fused.INTERLEAVED and not weights[kind][0][1] & fused.INTERLEAVED
    forms = [(*form, "gate_up" if form[0] else "down") for form in INT_X_FORMS]
    if "head" in shapes:
        forms += [(False, False, 1, "one", "head")]
    settings = READ_SETTINGS if small else READ_SETTINGS_GPU
    return read_switch_cases(device, Q6, shapes, weights, forms, settings, rng)


def _qkv_cases(device: str, small: bool, rng) -> list[dict]:
    """`harness::qkv` (QKV_CONFIG "one_launch") with k and v interleaved Q6_K against them packed
    row-major, bit for bit, at 1 and 4 tokens: q Q4_K with k and v Q6_K (one
    `_matvec_two_runs_kernel` launch), and q, k, v all Q6_K (one run of one buffer, `pack_rows`:
    its groups stay whole). The launches of each are recorded."""
    shape = (64, 32, 2048) if small else (4096, 1024, 4096)
    return qkv_switch_cases(device, [(GGMLType.Q4_K, Q6, Q6), (Q6, Q6, Q6)], shape, _interleaving, rng)


def _prefill_cases(device: str, small: bool, rng) -> list[dict]:
    """`fused._product` past the decode sizes (prefill) of interleaved Q6_K against the row-major
    packed layout's, bit for bit, under each of PREFILL_PATHS (`prefill_switch_cases`): gated
    routed, routed with scales, dense; and a WIDE weight ("tiled" in float32 whatever the path)."""
    rows, cols, n_exp = (24, 2048, 3) if small else (1024, 4096, 8)

    def layouts(make):
        return _prepared_pair([_q6_k((n_exp,), rows, cols, rng, make).to(device) for _ in range(2)], cols)

    return prefill_switch_cases(device, (rows, cols, n_exp), layouts, rng)


def _check_qkv(results: list[dict]) -> None:
    from harness.quant import fused

    _check(results)
    mixed, one_type = results
    interleaved = int(Q6) | fused.PACKED | fused.INTERLEAVED
    assert mixed["codes"][1:] == [interleaved] * 2 and one_type["codes"] == [interleaved] * 3
    # q and k+v in one launch a call either way; q, k, v of one type one run, one launch a call
    assert mixed["launches"] == [["_matvec_two_runs_kernel"] * 2] * 2, mixed["launches"]
    assert one_type["launches"] == [["_matvec_kernel"] * 2] * 2, one_type["launches"]


def _interpreted_cases(mode: str) -> list[dict]:
    """The results of this file run as a script in `mode` under the interpreter (`run_cases`)."""
    return _interpreted_in(mode, __file__, timeout=1800)


def test_interpreter_dequantizes_interleaved_q6_k_bit_for_bit():
    _check(_interpreted_cases("DEQUANT"))


@pytest.mark.slow
def test_interpreter_int_read_of_interleaved_q6_k_matches_row_major_bit_for_bit():
    _check(_interpreted_cases("READ"))


def test_interpreter_prefill_of_interleaved_q6_k_matches_row_major_bit_for_bit():
    results = _interpreted_cases("PREFILL")
    _check(results)
    assert any(r["wide"] for r in results) and not all(r["wide"] for r in results)


def test_interpreter_qkv_with_interleaved_q6_k_matches_row_major_bit_for_bit():
    _check_qkv(_interpreted_cases("QKV"))


# -- the modules ----------------------------------------------------------------------------------------

_MODULES_SCRIPT = """
import json, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from test_quant_fused import _random_weight
from harness.model.mixtral import Experts
from harness.quant import fused
from harness.quant.qmatmul import QMatMul
from harness.quant.qtensor import QTensor
from harness.quant.types import GGMLType
from harness.trace.tracer import Tracer

rng = np.random.default_rng(7)
q6, q4 = GGMLType.Q6_K, GGMLType.Q4_K
head_raw = _random_weight(q6, 16, 2048, rng)
gate = [QTensor(_random_weight(q4, 2048, 256, rng), q4, (2048, 256), f"g{e}") for e in range(3)]
up = [QTensor(_random_weight(q4, 2048, 256, rng), q4, (2048, 256), f"u{e}") for e in range(3)]
down_raw = [_random_weight(q6, 256, 2048, rng) for e in range(3)]
x, xe = torch.randn(9, 2048), torch.randn(1, 256)
chosen, weights = torch.tensor([[2, 0]]), torch.tensor([[0.75, 0.25]])

def run(on):
    fused.PACK_CONFIG["q6_k_interleave"] = on
    head = QMatMul(QTensor(head_raw, q6, (16, 2048), "output.weight"))
    down = [QTensor(r, q6, (256, 2048), f"d{e}") for e, r in enumerate(down_raw)]
    experts = Experts(gate, up, down, torch.device("cpu"))
    with Tracer(head, keep_events=True) as tracer:
        y = [head(x[:1]), head(x)]
    ops = [[e.op, list(e.tensors or ())] for e in tracer.events if not e.alias]
    with Tracer(experts, keep_events=True) as tracer:
        ye = experts(xe, weights, chosen)
    moe_ops = [[e.op, sorted(e.tensors or ())] for e in tracer.events if not e.alias]
    with fused.disabled():
        y_torch = head(x[:1])
    return {
        "bits": [t.view(torch.int32).flatten().tolist() for t in (*y, ye)],
        "torch_bits": y_torch.view(torch.int32).flatten().tolist(),
        "head_code": head.kernel_qtype, "down_code": experts.kernel_qtypes["w2"],
        "ops": ops, "moe_ops": moe_ops,
        "gguf_bytes": torch.equal(fused.gguf_blocks(head.qweight, head.kernel_qtype), head_raw),
        "expert_weight": torch.equal(experts.weight("w2", 1, torch.float32),
                                     QTensor(down_raw[1], q6, (256, 2048)).dequantize(dtype=torch.float32)),
    }

print(json.dumps({"off": run(False), "on": run(True)}))
"""


def test_modules_with_interleaved_q6_k_give_the_same_bits_name_the_gguf_tensors_and_unpack():
    """Under the interpreter, QMatMul (the head: 1 and 9 rows) and Experts (Q6_K downs) with the
    switch on: their Q6_K weights are interleaved, the ops give the bits of the row-major packed
    layout, a tracer sees the same ops naming the same GGUF tensors, and the torch path and
    `Experts.weight` get the GGUF blocks back."""
    from harness.quant import fused

    stdout = _interpreted(_MODULES_SCRIPT, REPO / "tests")
    off, on = (json.loads(stdout.strip().splitlines()[-1])[k] for k in ("off", "on"))
    packed = int(Q6) | fused.PACKED
    assert (off["head_code"], off["down_code"]) == (packed, packed)
    assert (on["head_code"], on["down_code"]) == (packed | fused.INTERLEAVED,) * 2
    assert on["bits"] == off["bits"] and on["torch_bits"] == off["torch_bits"]
    assert on["ops"] == off["ops"] and all(op[1] == ["output.weight"] for op in on["ops"])
    assert on["moe_ops"] == off["moe_ops"] and any("d2" in op[1] for op in on["moe_ops"])
    assert on["gguf_bytes"] and on["expert_weight"]


# -- sm_90 (no GPU) -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_interleaved_q6_k_reads_compile_for_sm_90_with_wide_loads_and_no_spills():
    """The interleaved Q6_K "int" read (moe_ffn's routed, split down; a dense product: the head;
    a gated one; and as k+v's run of `harness::qkv`'s one launch beside a Q4_K q) compiles for an
    H100 at INT_MATVEC_CONFIG's setting with and without "prefetch": no local memory (spills),
    dp2a, and its ql and qh words as 128-bit loads; and the prefill's dequantization of the
    layout with vector loads and stores."""
    pytest.importorskip("triton.backends.nvidia")
    from harness.quant import fused

    _cuobjdump_tool()
    cfg = fused.INT_MATVEC_CONFIG[Q6]
    for gated, routed, prefetch in ((False, True, 1), (False, True, 0), (False, False, 1), (True, False, 0)):
        consts = {
            "QT": int(Q6), "NP": fused.PARTS[Q6], "BN": cfg["BN"], "GATED": gated, "SCALED": routed,
            "ROUTED": routed, "VEC": False, "PACKED": 2, "STAGES": 1, "REDUCE": not gated, "INT": True,
            "INT_X": False, "PTX": True, "PDL": True, "RESIDUAL": False, "INT_OUT": False, "PREFETCH": prefetch,
        }  # fmt: skip
        compiled = _matvec_sm_90(consts, "*i32", cfg["num_warps"])
        code = _cuobjdump(compiled.asm["cubin"])
        where = (gated, routed, prefetch)
        assert not re.search(r"\b(LDL|STL)\b", code), where
        assert "IDP.2A" in code, where
        # per thread and super-block: ql even, ql odd and qh, a 16-byte load each (W's and U's)
        assert code.count("LDG.E.128") >= (2 if gated else 1) * 3, (where, code.count("LDG.E.128"))
    # `harness::qkv`'s one launch: a Q4_K q run and an interleaved Q6_K k+v run, both split
    consts, warps = {"PTX": True, "PDL": True}, 0
    for qtype, end, packed in ((GGMLType.Q4_K, "", True), (Q6, "2", 2)):
        run_cfg = fused.INT_MATVEC_CONFIG[qtype]
        run = {"QT": int(qtype), "NP": fused.PARTS[qtype], "BN": run_cfg["BN"], "PACKED": packed, "STAGES": 1,
               "UNROLL": 1, "REDUCE": True, "INT_X": False}  # fmt: skip
        consts |= {key + end: value for key, value in run.items()}
        warps = max(warps, run_cfg["num_warps"])
    pointers = {
        f"{name}{end}_ptr": kind
        for end in ("", "2")
        for name, kind in (("x", "*i32"), ("w", "*i32"), ("out", "*fp32"), ("xsum", "*fp32"), ("xpow", "*fp32"),
                           ("part", "*fp32"), ("counter", "*i32"))
    }  # fmt: skip
    code = _cuobjdump(
        _matvec_sm_90(consts, "*i32", warps, fused._matvec_two_runs_kernel, pointers).asm["cubin"]
    )
    assert not re.search(r"\b(LDL|STL)\b", code) and "IDP.2A" in code
    assert code.count("LDG.E.128") >= 3 + 3, code.count("LDG.E.128")  # q's head and qs; k+v's ql, ql, qh
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"raw_ptr": "*u8", "out_ptr": "*fp16", "nblocks": "i64", "n": "i32", "row_bytes": "i32"}
    source = ASTSource(
        fn=fused._dequant_packed_kernel,
        signature={**signature, "QT": "constexpr", "NB": "constexpr", "IL": "constexpr"},
        constexprs={"QT": int(Q6), "NB": 16, "IL": True},
        attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 4)},
    )
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4}).asm["ptx"]
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx


# -- GPU --------------------------------------------------------------------------------------------------


@pytest.mark.cuda(real=True)
def test_cuda_interleaved_q6_k_matches_row_major_bit_for_bit_at_mixtral_shapes():
    """On the GPU (PTX dp2a, the compiler's layouts) at 8x7B's shapes (the expert downs 4096 x
    14336 and a gated 14336 x 4096, 8 experts; the 32000-row head; 1 and 4 pairs; q 4096 x 4096
    with k, v 1024 x 4096): the interleaved reads against the row-major packed ones, the
    prefill's, and the dequantization against GGUF's, bit for bit."""
    from harness.quant import fused  # noqa: F401  (registers the ops)

    rng = np.random.default_rng()
    _check(_dequant_cases("cuda", rng))
    _check(_read_cases("cuda", False, rng))
    _check(_prefill_cases("cuda", False, rng))
    _check_qkv(_qkv_cases("cuda", False, rng))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from harness.quant import fused  # noqa: F401

    run_cases({"DEQUANT": _dequant_cases, "READ": _read_cases, "QKV": _qkv_cases, "PREFILL": _prefill_cases})
