"""Triton GPU dequantization kernels for GGML block types, bit-identical to `gguf.quants.dequantize`.

`harness.quant.dequant.dequantize` dispatches here for CUDA tensors when `supports(qtype)` is true;
everything else takes the torch-op path there.

Layout of a kernel: one program turns `NB` consecutive blocks into `NB * block_size` values,
computed as a 2-D tile whose rows are (block, sub-block) pairs: a sub-block is the span that
shares one scale (and min), so scales are computed once per row and broadcast along it. Rows of
one block are adjacent, so the output tile is one contiguous span (16-byte vector stores) and a
warp's byte loads fall in one or two blocks (they coalesce, and vectorize as far as the block
size's alignment allows). The output is written in the requested dtype straight from the kernel.

Bit-identity with gguf's numpy code: every f16 field is assembled from its two bytes and widened
exactly; products are done in float32 in the same order and grouping as numpy (e.g. Q4_K is
`(d*sc)*q - (dmin*m)`), and launches pass `enable_fp_fusion=False` so mul+add is never contracted
into one FMA rounding. f16/bf16 outputs are the float32 result rounded to nearest even, as
`tensor.to(dtype)` does (bf16 rounding is done in integer ops; see `_store`).

Running on the CPU: Triton's interpreter (`TRITON_INTERPRET=1`) runs these kernels on CPU tensors.
The variable is read when the kernels are decorated, i.e. when this module is first imported, so it
must be set before that (tests/test_quant_kernels.py does it in a subprocess). In interpreter mode
`dequantize` accepts CPU tensors; `supports` answers for the CUDA path and is False without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from harness.errors import UnsupportedTypeError, UsageError
from harness.quant.dequant import constants
from harness.quant.types import GGMLType, block_size, type_size

try:  # triton is an optional dependency (`pip install harness[gpu]`)
    import triton
    import triton.language as tl
except Exception:  # ImportError, or an install that fails to import
    triton = None
    tl = None

T = GGMLType

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Whether the kernels below are built for Triton's interpreter (decided once, at import).
_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0").lower() in (
    "1",
    "true",
    "on",
    "yes",
)


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter (on CPU tensors)."""
    return _INTERPRETED


if triton is not None:

    @triton.jit
    def _program(
        raw_ptr, out_ptr, nblocks, NB: tl.constexpr, NSUB: tl.constexpr, TS: tl.constexpr, SUB: tl.constexpr
    ):
        """This program's tile: rows are (block, sub-block) pairs, NB blocks of NSUB rows of SUB values.

        Returns the program's first input byte and output value, each row's byte offset of its
        block, its sub-block index j, whether it is real, and the row ids.
        """
        pid = tl.program_id(0).to(tl.int64)
        raw = raw_ptr + pid * (NB * TS)
        out = out_ptr + pid * (NB * NSUB * SUB)
        left = tl.minimum(nblocks - pid * NB, NB).to(tl.int32)
        r = tl.arange(0, NB * NSUB)
        blk = r // NSUB
        return raw, out, blk * TS, r % NSUB, blk < left, r

    @triton.jit
    def _byte(ptr, mask):
        """uint8 at `ptr` as int32 (0..255)."""
        return tl.load(ptr, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _f16(ptr, mask):
        """The little-endian f16 at `ptr`, widened exactly to float32."""
        lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _store(out, r, i, SUB: tl.constexpr, y, ok):
        """Write tile `y` [rows, SUB] to the program's contiguous output span, in the output dtype.

        bfloat16 is rounded to nearest even here in integer ops (NaN -> 0x7FC0, as torch does),
        so the interpreter, whose float32 -> bfloat16 cast does not round that way, agrees with
        the GPU; float16 uses the ordinary (round-to-nearest-even) cast.
        """
        if out.dtype.element_ty == tl.bfloat16:
            u = y.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            u = tl.where(y != y, 0x7FC0, u)
            v = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            v = y.to(out.dtype.element_ty)
        tl.store(out + r[:, None] * SUB + i[None, :], v, mask=ok[:, None])

    @triton.jit
    def _legacy_kernel(
        raw_ptr,
        out_ptr,
        lut_ptr,
        nblocks,
        NB: tl.constexpr,
        TS: tl.constexpr,
        HAS_MIN: tl.constexpr,
        HAS_QH: tl.constexpr,
        USE_LUT: tl.constexpr,
        OFFSET: tl.constexpr,
    ):
        """32-value blocks with 4-bit quants: Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL.

        Layout: d f16 | m f16 (HAS_MIN) | qh u32 (HAS_QH) | qs[16]. Rows are block halves h: value
        h*16+i is nibble h of qs[i], plus bit h*16+i of qh as bit 4.
        """
        raw, out, base, h, ok, r = _program(raw_ptr, out_ptr, nblocks, NB, 2, TS, 16)
        QH_AT: tl.constexpr = 4 if HAS_MIN else 2
        QS_AT: tl.constexpr = QH_AT + (4 if HAS_QH else 0)
        i = tl.arange(0, 16)
        d = _f16(raw + base, ok)[:, None]
        q = (_byte(raw + base[:, None] + QS_AT + i[None, :], ok[:, None]) >> (4 * h[:, None])) & 0xF
        if HAS_QH:
            # the two bytes of qh holding bits h*16 .. h*16+15
            qh = _byte(raw + base + QH_AT + 2 * h, ok) | (_byte(raw + base + QH_AT + 2 * h + 1, ok) << 8)
            q = q | (((qh[:, None] >> i[None, :]) & 1) << 4)
        if USE_LUT:
            y = d * tl.load(lut_ptr + q)
        elif HAS_MIN:
            y = d * q.to(tl.float32) + _f16(raw + base + 2, ok)[:, None]
        else:
            y = d * (q - OFFSET).to(tl.float32)
        _store(out, r, i, 16, y, ok)

    @triton.jit
    def _q8_0_kernel(raw_ptr, out_ptr, lut_ptr, nblocks, NB: tl.constexpr):
        """Q8_0: d f16 | qs int8[32]; value i = qs[i] * d."""
        raw, out, base, _, ok, r = _program(raw_ptr, out_ptr, nblocks, NB, 1, 34, 32)
        i = tl.arange(0, 32)
        d = _f16(raw + base, ok)[:, None]
        q = tl.load(raw + base[:, None] + 2 + i[None, :], mask=ok[:, None], other=0).to(tl.int8, bitcast=True)
        _store(out, r, i, 32, q.to(tl.float32) * d, ok)

    @triton.jit
    def _q2_k_kernel(raw_ptr, out_ptr, lut_ptr, nblocks, NB: tl.constexpr):
        """Q2_K: scales[16] (lo nibble scale, hi nibble min) | qs[64] | d f16 | dmin f16.

        Value j*16+i (sub-block j): 2 bits at 2*((j%8)//2) of qs[(j//8)*32 + (j%2)*16 + i];
        y = (d*sc_j)*q - dmin*m_j.
        """
        raw, out, base, j, ok, r = _program(raw_ptr, out_ptr, nblocks, NB, 16, 84, 16)
        i = tl.arange(0, 16)
        sc = _byte(raw + base + j, ok)
        dl = (_f16(raw + base + 80, ok) * (sc & 0xF).to(tl.float32))[:, None]
        ml = (_f16(raw + base + 82, ok) * (sc >> 4).to(tl.float32))[:, None]
        at = base + 16 + (j // 8) * 32 + (j % 2) * 16
        q = (_byte(raw + at[:, None] + i[None, :], ok[:, None]) >> (2 * ((j % 8) // 2))[:, None]) & 3
        _store(out, r, i, 16, dl * q.to(tl.float32) - ml, ok)

    @triton.jit
    def _q3_k_kernel(raw_ptr, out_ptr, lut_ptr, nblocks, NB: tl.constexpr):
        """Q3_K: hmask[32] | qs[64] | scales[12] (16 packed 6-bit, offset 32) | d f16.

        Value j*16+i: low 2 bits as in Q2_K (qs at 32), minus 4 unless bit j//2 of
        hmask[(j%2)*16 + i] is set; y = (d*sc_j)*q.
        """
        raw, out, base, j, ok, r = _program(raw_ptr, out_ptr, nblocks, NB, 16, 110, 16)
        i = tl.arange(0, 16)
        lo = (_byte(raw + base + 96 + j % 8, ok) >> (4 * (j // 8))) & 0xF
        hi = (_byte(raw + base + 104 + j % 4, ok) >> (2 * (j // 4))) & 3
        dl = (_f16(raw + base + 108, ok) * ((lo | (hi << 4)) - 32).to(tl.float32))[:, None]
        ok2 = ok[:, None]
        at = base + 32 + (j // 8) * 32 + (j % 2) * 16
        ql = (_byte(raw + at[:, None] + i[None, :], ok2) >> (2 * ((j % 8) // 2))[:, None]) & 3
        hb = (_byte(raw + (base + (j % 2) * 16)[:, None] + i[None, :], ok2) >> (j // 2)[:, None]) & 1
        _store(out, r, i, 16, dl * (ql - 4 + 4 * hb).to(tl.float32), ok)

    @triton.jit
    def _k_scale_min(raw, base, j, ok):
        """Sub-block j's 6-bit (scale, min) from the 12 bytes at raw+base+4 (Q4_K, Q5_K), as float32."""
        k = base + 4 + j % 4
        a = _byte(raw + k, ok)
        b = _byte(raw + k + 4, ok)
        c = _byte(raw + k + 8, ok)
        first = j < 4
        sc = tl.where(first, a & 63, (c & 0xF) | ((a >> 6) << 4))
        mn = tl.where(first, b & 63, (c >> 4) | ((b >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _q4_k_kernel(raw_ptr, out_ptr, lut_ptr, nblocks, NB: tl.constexpr):
        """Q4_K: d f16 | dmin f16 | scales[12] | qs[128].

        Value j*32+i: nibble j%2 of qs[(j//2)*32 + i]; y = (d*sc_j)*q - dmin*m_j.
        """
        raw, out, base, j, ok, r = _program(raw_ptr, out_ptr, nblocks, NB, 8, 144, 32)
        i = tl.arange(0, 32)
        sc, mn = _k_scale_min(raw, base, j, ok)
        dl = (_f16(raw + base, ok) * sc)[:, None]
        ml = (_f16(raw + base + 2, ok) * mn)[:, None]
        at = base + 16 + (j // 2) * 32
        q = (_byte(raw + at[:, None] + i[None, :], ok[:, None]) >> (4 * (j % 2))[:, None]) & 0xF
        _store(out, r, i, 32, dl * q.to(tl.float32) - ml, ok)

    @triton.jit
    def _q5_k_kernel(raw_ptr, out_ptr, lut_ptr, nblocks, NB: tl.constexpr):
        """Q5_K: d f16 | dmin f16 | scales[12] | qh[32] | qs[128].

        As Q4_K (qs at 48), with bit j of qh[i] as bit 4 of value j*32+i.
        """
        raw, out, base, j, ok, r = _program(raw_ptr, out_ptr, nblocks, NB, 8, 176, 32)
        i = tl.arange(0, 32)
        sc, mn = _k_scale_min(raw, base, j, ok)
        dl = (_f16(raw + base, ok) * sc)[:, None]
        ml = (_f16(raw + base + 2, ok) * mn)[:, None]
        ok2 = ok[:, None]
        at = base + 48 + (j // 2) * 32
        ql = (_byte(raw + at[:, None] + i[None, :], ok2) >> (4 * (j % 2))[:, None]) & 0xF
        qh = (_byte(raw + (base + 16)[:, None] + i[None, :], ok2) >> j[:, None]) & 1
        _store(out, r, i, 32, dl * (ql | (qh << 4)).to(tl.float32) - ml, ok)

    @triton.jit
    def _q6_k_kernel(raw_ptr, out_ptr, lut_ptr, nblocks, NB: tl.constexpr):
        """Q6_K: ql[128] | qh[64] | scales int8[16] | d f16.

        Value j*16+i, c = j//8, s = j%8: nibble s//4 of ql[c*64 + (s%4)*16 + i], with bits
        2*(s//2)..+1 of qh[c*32 + (s%2)*16 + i] as bits 4-5, minus 32; y = (d*sc_j)*q.
        """
        raw, out, base, j, ok, r = _program(raw_ptr, out_ptr, nblocks, NB, 16, 210, 16)
        i = tl.arange(0, 16)
        sc = tl.load(raw + base + 192 + j, mask=ok, other=0).to(tl.int8, bitcast=True)
        dl = (_f16(raw + base + 208, ok) * sc.to(tl.float32))[:, None]
        ok2 = ok[:, None]
        c = j // 8
        s = j % 8
        at_l = base + c * 64 + (s % 4) * 16
        at_h = base + 128 + c * 32 + (s % 2) * 16
        ql = (_byte(raw + at_l[:, None] + i[None, :], ok2) >> (4 * (s // 4))[:, None]) & 0xF
        qh = (_byte(raw + at_h[:, None] + i[None, :], ok2) >> (2 * (s // 2))[:, None]) & 3
        _store(out, r, i, 16, dl * ((ql | (qh << 4)) - 32).to(tl.float32), ok)

    @triton.jit
    def _iq4_xs_kernel(raw_ptr, out_ptr, lut_ptr, nblocks, NB: tl.constexpr):
        """IQ4_XS: d f16 | scales_h u16 | scales_l[4] | qs[128].

        Sub-block j's scale: nibble j%2 of scales_l[j//2] | bits 2j..2j+1 of scales_h << 4, minus
        32. Value j*32 + h*16 + b: grid[nibble h of qs[j*16 + b]]; y = (d*sc_j)*grid.
        """
        raw, out, base, j, ok, r = _program(raw_ptr, out_ptr, nblocks, NB, 8, 136, 32)
        i = tl.arange(0, 32)
        lo = (_byte(raw + base + 4 + j // 2, ok) >> (4 * (j % 2))) & 0xF
        hi = (_byte(raw + base + 2 + j // 4, ok) >> (2 * (j % 4))) & 3
        dl = (_f16(raw + base, ok) * ((lo | (hi << 4)) - 32).to(tl.float32))[:, None]
        at = base + 8 + j * 16
        q = (_byte(raw + at[:, None] + (i % 16)[None, :], ok[:, None]) >> (4 * (i // 16))[None, :]) & 0xF
        _store(out, r, i, 32, dl * tl.load(lut_ptr + q), ok)

    # qtype -> (kernel, extra constexpr arguments, uses the IQ4_NL grid)
    _KERNELS = {
        T.Q4_0: (
            _legacy_kernel,
            {"TS": 18, "HAS_MIN": False, "HAS_QH": False, "USE_LUT": False, "OFFSET": 8},
        ),
        T.Q4_1: (_legacy_kernel, {"TS": 20, "HAS_MIN": True, "HAS_QH": False, "USE_LUT": False, "OFFSET": 0}),
        T.Q5_0: (
            _legacy_kernel,
            {"TS": 22, "HAS_MIN": False, "HAS_QH": True, "USE_LUT": False, "OFFSET": 16},
        ),
        T.Q5_1: (_legacy_kernel, {"TS": 24, "HAS_MIN": True, "HAS_QH": True, "USE_LUT": False, "OFFSET": 0}),
        T.IQ4_NL: (
            _legacy_kernel,
            {"TS": 18, "HAS_MIN": False, "HAS_QH": False, "USE_LUT": True, "OFFSET": 0},
        ),
        T.Q8_0: (_q8_0_kernel, {}),
        T.Q2_K: (_q2_k_kernel, {}),
        T.Q3_K: (_q3_k_kernel, {}),
        T.Q4_K: (_q4_k_kernel, {}),
        T.Q5_K: (_q5_k_kernel, {}),
        T.Q6_K: (_q6_k_kernel, {}),
        T.IQ4_XS: (_iq4_xs_kernel, {}),
    }
else:
    _KERNELS = {}

KERNEL_TYPES: tuple[GGMLType, ...] = tuple(_KERNELS)

# Launch configuration per type: (values per program, warps per program); types not listed use
# DEFAULT_CONFIG. benchmarks/bench_dequant.py --sweep on an H100 (4096x14336, float32 out) put
# every configuration from 1024 to 16384 values per program, 4 or 8 warps, within a few percent
# of the best for every type, so one default serves all.
DEFAULT_CONFIG = (4096, 4)
CONFIGS: dict[GGMLType, tuple[int, int]] = {}


@functools.cache
def _triton_usable() -> bool:
    """triton imports and there is a GPU it can compile for."""
    if triton is None:
        return False
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


def supports(qtype: GGMLType) -> bool:
    """True when `dequantize` has a GPU kernel for `qtype` and Triton can run it here."""
    return qtype in _KERNELS and _triton_usable()


def _lut(device: torch.device) -> torch.Tensor:
    """The IQ4_NL grid as float32 on `device`: the torch path's codebook, one per device."""
    return constants(device).iq4


iq4_table = _lut  # public: the fused kernels (harness.quant.fused) read the same grid


def dequantize(
    raw: torch.Tensor,
    qtype: GGMLType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    blocks_per_program: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Dequantize whole GGML blocks `raw` (uint8, any shape) to a `dtype` tensor of logical `shape`.

    The result is on `raw.device` and bit-identical to `gguf.quants.dequantize` (float32), or to
    that result cast to float16/bfloat16. `blocks_per_program` and `num_warps` override the tuned
    launch configuration (for benchmarks); `blocks_per_program` must be a power of two.
    """
    if qtype not in _KERNELS:
        raise UnsupportedTypeError(None, None, f"no Triton kernel for {GGMLType(qtype).name}")
    if raw.dtype != torch.uint8:
        raise UsageError(None, None, f"raw data must be uint8, got {raw.dtype}")
    if dtype not in OUT_DTYPES:
        raise UsageError(None, None, f"output dtype must be float32, float16 or bfloat16, got {dtype}")
    bs, ts = block_size(qtype), type_size(qtype)
    shape = tuple(int(s) for s in shape)
    nvalues = math.prod(shape)
    if raw.numel() % ts:
        raise UsageError(None, None, f"{raw.numel()} bytes is not a whole number of {qtype.name} blocks")
    nblocks = raw.numel() // ts
    if nblocks * bs != nvalues:
        raise UsageError(
            None,
            None,
            f"{nblocks} {qtype.name} blocks hold {nblocks * bs} values, shape {shape} needs {nvalues}",
        )
    if raw.device.type != "cuda" and not interpreting():
        raise UsageError(None, None, f"Triton kernels need a CUDA tensor, got one on {raw.device}")
    out = raw.new_empty(shape, dtype=dtype)  # from raw: a tracer sees which weight it is for
    if nblocks == 0:
        return out
    raw = raw.contiguous().view(-1)
    values, warps = CONFIGS.get(qtype, DEFAULT_CONFIG)
    nb = blocks_per_program or max(1, values // bs)
    if nb & (nb - 1):
        raise UsageError(None, None, f"blocks_per_program must be a power of two, got {nb}")
    kernel, consts = _KERNELS[qtype]
    grid = (-(-nblocks // nb),)
    # Triton launches on the current CUDA device; switch only when the data lives elsewhere.
    other_gpu = raw.device.type == "cuda" and raw.device.index != torch.cuda.current_device()
    from harness.quant.launch import launch  # (it imports this module)

    with torch.cuda.device(raw.device) if other_gpu else contextlib.nullcontext():
        launch(
            kernel,
            grid,
            raw,
            out,
            _lut(raw.device),
            nblocks,
            NB=nb,
            **consts,
            num_warps=num_warps or warps,
            enable_fp_fusion=False,
        )
    return out
