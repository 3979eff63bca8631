"""Torch dequantizers for GGML block types, bit-identical in float32 to `gguf.quants.dequantize`
and to llama.cpp's `dequantize_row_*` (tests/test_quant_llamacpp.py).

`dequantize(raw, qtype, shape, dtype)` turns whole GGML blocks (uint8, on any device) into a
tensor of logical `shape` on the same device. Every step is a torch op on `raw.device`: no host
reads, no per-call host tensors. The constants (shift vectors, the IQ4/MXFP4 codebooks, the
NVFP4 scale table, the IQ sign patterns and grids) are the "dequant" table of the per-device
registry `harness.device_tables`.

Bit-identity with gguf's numpy code comes from doing the same float32 ops in the same order:
f16 fields widen to float32 exactly, integer codes become float32 exactly, and every product or
difference is its own rounded op (no fused multiply-add), e.g. `(d * sc) * q - (dmin * m)`.

Shape legend: N blocks; S sub-blocks per block; L values per sub-block; B bytes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import _disable_current_modes

from harness.device_tables import TABLES
from harness.errors import GGUFTensorError, UsageError
from harness.quant.types import GGMLType, block_size, parse_type, type_size

T = GGMLType

# IQ4_NL / IQ4_XS codebook (kvalues_iq4nl in ggml-common.h).
IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def constant_table(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant table on `device`: made on the CPU and copied over, once per device (when
    blocks first move there, or at load). A model whose weight sits on an unplanned device makes
    one in its forward: a tracer then sees that copy as a transfer, not as ops of its own on the
    wrong device."""
    return torch.tensor(values, dtype=dtype).to(device)


# MXFP4 codebook: the E2M1 values, doubled (kvalues_mxfp4 in ggml-common.h; the block scale is
# E8M0 halved to match).
MXFP4_KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
IQ1_DELTA = 0.125  # IQ1S_DELTA in ggml-common.h


def _ue4m3_table() -> list[float]:
    """NVFP4's sub-block scales: an unsigned E4M3 byte (bit 7 unused; 0 and 0x7F read as 0),
    halved like MXFP4's (ggml_ue4m3_to_fp32 in ggml-impl.h). Exact in float32."""
    table = []
    for x in range(256):
        exp, man = (x >> 3) & 0xF, x & 7
        raw = man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        table.append(0.0 if x in (0, 0x7F) else raw * 0.5)
    return table


# The IQ grids (iq2xxs_grid ... iq1s_grid in ggml-common.h) are data, read from gguf-py's own
# copies: `gguf.quants.<TYPE>.grid_hex` packs each grid value's code in 2 or 3 bits, as hex text,
# and `grid_map` gives the value of each code. Decoded once on the host (`iq_grids`).
GRID_SOURCES = {
    "iq2xxs": "IQ2_XXS",
    "iq2xs": "IQ2_XS",
    "iq2s": "IQ2_S",
    "iq3xxs": "IQ3_XXS",
    "iq3s": "IQ3_S",
    "iq1s": "IQ1_S",
}


def _decode_grid(hex_text: bytes, values: tuple, shape: tuple[int, int]) -> torch.Tensor:
    bits = max(1, math.ceil(math.log2(len(values))))
    per_byte = 8 // bits
    packed = torch.frombuffer(bytearray(bytes.fromhex(hex_text.decode("ascii"))), dtype=torch.uint8)
    shifts = torch.arange(0, 8, 8 // per_byte, dtype=torch.uint8)
    codes = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(-1).long()
    return torch.tensor(values, dtype=torch.float32)[codes].view(shape)


@functools.cache
def iq_grids() -> dict[str, torch.Tensor]:
    """Each IQ grid gguf-py has, as float32 [rows, 8 or 4] on the CPU: name -> grid."""
    import gguf.quants

    grids = {}
    with _disable_current_modes():  # host data, made once: no tracer or emulation need see it
        for name, source in GRID_SOURCES.items():
            q = getattr(gguf.quants, source, None)
            if q is not None and getattr(q, "grid_hex", None):
                grids[name] = _decode_grid(q.grid_hex, q.grid_map, q.grid_shape)
    return grids


def _ksign_table() -> list[list[float]]:
    """IQ2/IQ3 sign patterns: 7 stored sign bits select 8 signs; the 8th makes the count of minus
    signs even (ksigns_iq2xs in ggml-common.h). [128, 8] of +-1.0."""
    rows = []
    for i in range(128):
        bits = i | ((bin(i).count("1") & 1) << 7)
        rows.append([-1.0 if bits >> j & 1 else 1.0 for j in range(8)])
    return rows


def build_constants(device: torch.device) -> SimpleNamespace:
    """Every dequantizer's constants, made now on `device` (the registry keeps one set per device)."""
    return SimpleNamespace(
        nib=constant_table([0, 4], torch.uint8, device),  # low nibble, high nibble
        crumb=constant_table([0, 2, 4, 6], torch.uint8, device),  # four 2-bit fields of a byte
        bit=constant_table(list(range(8)), torch.uint8, device),  # eight bits of a byte
        iq4=constant_table(IQ4_KVALUES, torch.float32, device),
        mxfp4=constant_table(MXFP4_KVALUES, torch.float32, device),
        ue4m3=constant_table(_ue4m3_table(), torch.float32, device),
        pow3=constant_table([1, 3, 9, 27, 81], torch.int32, device),  # TQ1_0's base-3 digits
        shift3=constant_table([0, 3, 6, 9], torch.int32, device),  # four 3-bit fields of a u16
        shift7=constant_table([0, 7, 14, 21], torch.int32, device),  # four 7-bit fields of a u32
        shift8=constant_table([0, 8], torch.int32, device),  # bytes of a little-endian u16
        shift8x4=constant_table([0, 8, 16, 24], torch.int32, device),  # bytes of a u32
        low28=constant_table([0xFF, 0xFF, 0xFF, 0x0F], torch.int32, device),  # a u32's bits 0-27
        ksign=constant_table(_ksign_table(), torch.float32, device),
        **{name: grid.to(device) for name, grid in iq_grids().items()},
    )


DEQUANT_TABLE = "dequant"
TABLES.define(DEQUANT_TABLE, build_constants)


def constants(device: torch.device) -> SimpleNamespace:
    """Shift vectors and the IQ4 codebook on `device`: the registry's "dequant" table
    (`harness.device_tables`), built once per device."""
    return TABLES.get(DEQUANT_TABLE, device)


# ---- byte-level helpers ------------------------------------------------------------------------


def _view(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the bytes along the last dim of `b` as `dtype` (copying only when needed)."""
    if dtype.itemsize == 1:
        return b.view(dtype)
    b = b.contiguous()
    if b.storage_offset() % dtype.itemsize:
        b = b.clone()  # a misaligned start (e.g. an odd offset into a memory map)
    return b.view(dtype)


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian f16 field at byte `offset` of each block, as float32: [N, 1]."""
    return _view(blocks[:, offset : offset + 2], torch.float16).float()


def _split(b: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """[N, ..., G, B] bytes -> [N, ..., G, len(shifts), B] fields `(b >> shift) & mask`."""
    return (b.unsqueeze(-2) >> shifts.view(-1, 1)).bitwise_and_(mask)


def _iq4(q: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    """4-bit codebook indices -> float32 codebook values, same shape (index_select: the fast gather)."""
    return c.iq4.index_select(0, q.reshape(-1).int()).view(q.shape)


def _nibbles(b: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    """[N, G, B] -> [N, G, 2, B]: low nibbles, then high nibbles (GGML's order within a group)."""
    return _split(b, c.nib, 0x0F)


# ---- float types -------------------------------------------------------------------------------


def _f32(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    return _view(blocks, torch.float32)  # [N, 1]


def _f16_all(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    return _view(blocks, torch.float16).float()  # [N, 1]


def _bf16(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    return _view(blocks, torch.bfloat16).float()  # [N, 1]; exact: bf16 is the top half of f32


# ---- 32-value blocks ---------------------------------------------------------------------------
# Elements 0..15 are the low nibbles of qs[0..15], elements 16..31 the high nibbles.


def _q4_0(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qs[16]
    d = _f16(blocks, 0)  # [N, 1]
    q = _nibbles(blocks[:, 2:18], c).view(blocks.shape[0], 32)  # [N, 32]
    return q.float().sub_(8).mul_(d)  # d * (q - 8)


def _q4_1(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | m f16 | qs[16]
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # [N, 1]
    q = _nibbles(blocks[:, 4:20], c).view(blocks.shape[0], 32)  # [N, 32]
    return q.float().mul_(d).add_(m)  # (d * q) + m


def _q5(blocks: torch.Tensor, c: SimpleNamespace, off: int) -> torch.Tensor:
    """5-bit codes of Q5_0 / Q5_1: qh[4] at `off` (bit i = high bit of element i), then qs[16]."""
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, off + 4 : off + 20], c).view(n, 32)  # [N, 32]
    qh = _split(blocks[:, off : off + 4].view(n, 4, 1), c.bit, 1).view(n, 32)  # bit 8 * byte + k
    return ql.bitwise_or_(qh << 4)


def _q5_0(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qh[4] | qs[16]
    d = _f16(blocks, 0)  # [N, 1]
    return _q5(blocks, c, 2).float().sub_(16).mul_(d)  # d * (q - 16)


def _q5_1(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | m f16 | qh[4] | qs[16]
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # [N, 1]
    return _q5(blocks, c, 4).float().mul_(d).add_(m)  # (d * q) + m


def _q8_0(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qs[32] int8
    d = _f16(blocks, 0)  # [N, 1]
    return _view(blocks[:, 2:34], torch.int8).float().mul_(d)  # [N, 32]


def _iq4_nl(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qs[16] (4-bit indices into the codebook)
    d = _f16(blocks, 0)  # [N, 1]
    q = _nibbles(blocks[:, 2:18], c).view(blocks.shape[0], 32)  # [N, 32]
    return _iq4(q, c).mul_(d)


# ---- 256-value super-blocks (K-quants, IQ4_XS) -------------------------------------------------


def _q2_k(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # scales[16] (low nibble: scale, high: min) | qs[64] | d f16 | dmin f16
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)  # [N, 1]
    sc = blocks[:, :16]
    dl = (d * (sc & 0x0F).float()).view(n, 16, 1)  # [N, S=16, 1]
    ml = (dmin * (sc >> 4).float()).view(n, 16, 1)
    q = _split(blocks[:, 16:80].view(n, 2, 32), c.crumb, 3).view(n, 16, 16)  # [N, S, L=16]
    return (dl * q.float()).sub_(ml).view(n, 256)  # (dl * q) - ml


def _q3_k(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # hmask[32] | qs[64] | scales[12] (16 x 6-bit, signed by -32) | d f16
    n = blocks.shape[0]
    d = _f16(blocks, 108)  # [N, 1]
    lo = _nibbles(blocks[:, 96:104].view(n, 1, 8), c).view(n, 16)  # low 4 bits of each scale
    hi = _split(blocks[:, 104:108].view(n, 1, 4), c.crumb, 3).view(n, 16)  # high 2 bits
    sc = lo.bitwise_or_(hi << 4).to(torch.int8).sub_(32)  # [N, 16]
    dl = (d * sc.float()).view(n, 16, 1)  # [N, S=16, 1]
    ql = _split(blocks[:, 32:96].view(n, 2, 32), c.crumb, 3).view(n, 16, 16)  # [N, S, L=16]
    qh = _split(blocks[:, :32].view(n, 1, 32), c.bit, 1).view(n, 16, 16)
    # A clear hmask bit subtracts 4: q = ql - 4 * (1 - qh).
    q = ql.to(torch.int8).sub_(((qh ^ 1) << 2).to(torch.int8))
    return (dl * q.float()).view(n, 256)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes [N, 12] -> 8 six-bit scales and 8 six-bit mins ([N, 8] each; Q4_K, Q5_K)."""
    n = s.shape[0]
    s = s.view(n, 3, 4)
    a, b, hl = s[:, 0], s[:, 1], s[:, 2]  # [N, 4]: scales 0-3 | mins 0-3 | low/high nibbles of 4-7
    sc = torch.cat((a & 0x3F, (hl & 0x0F) | ((a >> 2) & 0x30)), dim=-1)
    mn = torch.cat((b & 0x3F, (hl >> 4) | ((b >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_sub_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: d*scale and dmin*min of the 8 sub-blocks, each [N, 8, 1] float32."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [N, 1]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return (d * sc.float()).view(n, 8, 1), (dmin * mn.float()).view(n, 8, 1)


def _q4_k(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | dmin f16 | scales[12] | qs[128]
    n = blocks.shape[0]
    dl, ml = _k_sub_scales(blocks)  # [N, S=8, 1]
    q = _nibbles(blocks[:, 16:144].view(n, 4, 32), c).view(n, 8, 32)  # [N, S, L=32]
    return (dl * q.float()).sub_(ml).view(n, 256)  # (dl * q) - ml


def _q5_k(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
    n = blocks.shape[0]
    dl, ml = _k_sub_scales(blocks)  # [N, S=8, 1]
    ql = _nibbles(blocks[:, 48:176].view(n, 4, 32), c).view(n, 8, 32)  # [N, S, L=32]
    qh = _split(blocks[:, 16:48].view(n, 1, 32), c.bit, 1).view(n, 8, 32)
    q = ql.bitwise_or_(qh << 4)
    return (dl * q.float()).sub_(ml).view(n, 256)  # (dl * q) - ml


def _q6_k(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # ql[128] | qh[64] | scales[16] int8 | d f16
    n = blocks.shape[0]
    d = _f16(blocks, 208)  # [N, 1]
    dl = (d * _view(blocks[:, 192:208], torch.int8).float()).view(n, 16, 1)  # [N, S=16, 1]
    ql = _nibbles(blocks[:, :128].view(n, 2, 64), c).view(n, 8, 32)  # [N, 8, 32]
    qh = _split(blocks[:, 128:192].view(n, 2, 32), c.crumb, 3).view(n, 8, 32)
    q = ql.bitwise_or_(qh << 4).to(torch.int8).sub_(32).view(n, 16, 16)  # [N, S, L=16]
    return (dl * q.float()).view(n, 256)


def _iq4_xs(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | scales_h u16 (8 x 2 bits) | scales_l[4] (8 x 4 bits) | qs[128]
    n = blocks.shape[0]
    d = _f16(blocks, 0)  # [N, 1]
    lo = _nibbles(blocks[:, 4:8].view(n, 4, 1), c).view(n, 8)  # scale i: nibble i % 2 of byte i // 2
    hi = _split(blocks[:, 2:4].view(n, 2, 1), c.crumb, 3).view(n, 8)  # bits 2i..2i+1 of the u16
    sc = lo.bitwise_or_(hi << 4).to(torch.int8).sub_(32)  # [N, 8]
    dl = (d * sc.float()).view(n, 8, 1)  # [N, S=8, 1]
    q = _nibbles(blocks[:, 8:136].view(n, 8, 16), c).view(n, 8, 32)  # [N, S, L=32]
    return (dl * _iq4(q, c)).view(n, 256)


# ---- IQ grid types (i-quants below 4 bits) ------------------------------------------------------
# Groups of 8 (IQ2, IQ1) or 4 (IQ3) values are one row of a grid of magnitudes (see `iq_grids`),
# signs apply per value, one scale per 16 or 32 values. llama.cpp's order of rounding is kept:
# the sub-block scale `db` first, then `(db * grid) * sign` (a sign is exact) or
# `dl * (grid + delta)` (IQ1).


# The op that first meets a constant reads the block bytes themselves (a view or copy of the
# weight), so that under a fault that misplaces the constants a tracer names the weight.


def _u16(b: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    """[..., 2k] little-endian bytes -> [..., k] uint16 values (as int64)."""
    return (b.unflatten(-1, (-1, 2)).int() << c.shift8).sum(-1)


def _scale_and_signs(b: torch.Tensor, c: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ2_XXS/IQ3_XXS: [N, G, 4] bytes of a little-endian u32 -> its top 4 bits (the 4-bit
    scale, [N, G]) and its four 7-bit sign indices (bits 0-27, [N, G, 4]). Built from the low 28
    bits only, so no shift reaches an int32's sign bit."""
    b = b.int()
    low28 = ((b & c.low28) << c.shift8x4).sum(-1)  # [N, G]
    return b[..., 3] >> 4, (low28.unsqueeze(-1) >> c.shift7).bitwise_and_(0x7F)


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a [K, W] table: [*index.shape, W]."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])


def _bits(b: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    """[N, B] bytes -> [N, B, 8] of their bits, least significant first, as uint8."""
    return (b.unsqueeze(-1) >> c.bit).bitwise_and_(1)


def _signed(x: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    """x with its sign flipped where `minus` (0/1, same shape) is 1."""
    return torch.where(minus.bool(), -x, x)


def _iq2_xxs(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | 8 x (4 grid indices u8, u32: 4 x 7-bit sign index, 4-bit scale on top)
    n = blocks.shape[0]
    d = _f16(blocks, 0).view(n, 1, 1, 1)
    q = blocks[:, 2:66].view(n, 8, 8)
    scale, sign_index = _scale_and_signs(q[:, :, 4:8], c)  # [N, 8], [N, 8, 4]
    db = (d * scale.view(n, 8, 1, 1).float().add_(0.5)).mul_(0.25)  # [N, S=8, 1, 1]
    grid = _rows(c.iq2xxs, q[:, :, :4].int())  # [N, 8, 4, 8]
    return ((db * grid) * _rows(c.ksign, sign_index)).view(n, 256)


def _iq2_xs(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qs u16[32] (9-bit grid index, 7-bit sign index) | scales[8] (two 4-bit each)
    n = blocks.shape[0]
    d = _f16(blocks, 0).view(n, 1, 1, 1)
    qs = _u16(blocks[:, 2:66], c).view(n, 16, 2)  # [N, S=16, 2 groups of 8]
    sc = _nibbles(blocks[:, 66:74].view(n, 8, 1), c).view(n, 16, 1, 1)
    db = (d * sc.float().add_(0.5)).mul_(0.25)
    grid = _rows(c.iq2xs, qs & 511)  # [N, 16, 2, 8]
    return ((db * grid) * _rows(c.ksign, qs >> 9)).view(n, 256)


def _iq2_s(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qs[32] (grid index, low 8 bits) | signs[32] | qh[8] (4 x 2 high index bits) | scales[8]
    n = blocks.shape[0]
    d = _f16(blocks, 0).view(n, 1, 1, 1)
    hi = _split(blocks[:, 66:74].view(n, 8, 1), c.crumb, 3).view(n, 32)
    index = blocks[:, 2:34].int() | (hi.int() << 8)  # [N, 32]
    sc = _nibbles(blocks[:, 74:82].view(n, 8, 1), c).view(n, 16, 1, 1)
    db = (d * sc.float().add_(0.5)).mul_(0.25)
    grid = _rows(c.iq2s, index).view(n, 16, 2, 8)
    minus = _bits(blocks[:, 34:66], c).view(n, 16, 2, 8)
    return _signed(db * grid, minus).view(n, 256)


def _iq3_xxs(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qs[64] (grid indices, 4 values each) | 8 x u32 (4 x 7-bit sign index, 4-bit scale)
    n = blocks.shape[0]
    d = _f16(blocks, 0).view(n, 1, 1, 1)
    scale, sign_index = _scale_and_signs(blocks[:, 66:98].view(n, 8, 4), c)  # [N, 8], [N, 8, 4]
    db = (d * scale.view(n, 8, 1, 1).float().add_(0.5)).mul_(0.5)  # [N, S=8, 1, 1]
    grid = _rows(c.iq3xxs, blocks[:, 2:66].int()).view(n, 8, 4, 8)
    return ((db * grid) * _rows(c.ksign, sign_index)).view(n, 256)


def _iq3_s(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qs[64] (grid index, low 8 bits) | qh[8] (high index bits) | signs[32] | scales[4]
    n = blocks.shape[0]
    d = _f16(blocks, 0).view(n, 1, 1, 1)
    index = blocks[:, 2:66].int() | (_bits(blocks[:, 66:74], c).view(n, 64).int() << 8)
    sc = _nibbles(blocks[:, 106:110].view(n, 4, 1), c).view(n, 8, 1, 1)
    db = d * (sc.int() * 2 + 1).float()  # [N, S=8, 1, 1]
    grid = _rows(c.iq3s, index).view(n, 8, 4, 8)
    minus = _bits(blocks[:, 74:106], c).view(n, 8, 4, 8)
    return _signed(db * grid, minus).view(n, 256)


def _iq1_values(
    dl: torch.Tensor, index: torch.Tensor, minus: torch.Tensor, c: SimpleNamespace
) -> torch.Tensor:
    """IQ1_S/IQ1_M: dl * (grid + delta), delta = -+IQ1_DELTA by `minus`; dl broadcasts over the
    [N, G, 8] grid rows that `index` [N, G] picks, `minus` is [N, G]."""
    delta = torch.where(minus.bool(), -IQ1_DELTA, IQ1_DELTA).unsqueeze(-1).float()
    return dl * (_rows(c.iq1s, index) + delta)


def _iq1_s(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qs[32] (grid index, low 8 bits) | qh u16[8] (4 x 3 high index bits, 3-bit scale, delta sign)
    n = blocks.shape[0]
    d = _f16(blocks, 0).view(n, 1, 1)
    qh = _u16(blocks[:, 34:50], c)  # [N, 8]
    dl = d * (((qh >> 12) & 7) * 2 + 1).float().view(n, 8, 1)  # [N, S=8, 1]
    hi = (qh.unsqueeze(-1) >> c.shift3) & 7  # [N, 8, 4]
    index = blocks[:, 2:34].int().view(n, 8, 4) | (hi << 8)
    minus = (qh >> 15).view(n, 8, 1).expand(n, 8, 4)
    return _iq1_values(dl.unsqueeze(-1), index, minus, c).view(n, 256)


def _iq1_m(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # qs[32] (grid index, low 8 bits) | qh[16] (2 x: 3 high index bits, delta sign) |
    # scales u16[4]: 4 x 3-bit sub-scales each, and the f16 d spread over their top nibbles
    n = blocks.shape[0]
    sc = blocks[:, 48:56]
    d_bytes = torch.stack(
        ((sc[:, 1] >> 4) | (sc[:, 3] & 0xF0), (sc[:, 5] >> 4) | (sc[:, 7] & 0xF0)), dim=-1
    )  # [N, 2]
    d = _view(d_bytes, torch.float16).float().view(n, 1, 1, 1)
    s = (_u16(sc, c).unsqueeze(-1) >> c.shift3) & 7  # [N, 4, 4]
    dl = d * (s * 2 + 1).float().view(n, 16, 1, 1)  # [N, S=16 (of 16 values), 1, 1]
    qh = _nibbles(blocks[:, 32:48].view(n, 16, 1), c).view(n, 16, 2)  # [N, S, 2 groups of 8]
    index = blocks[:, :32].int().view(n, 16, 2) | ((qh & 7).int() << 8)
    return _iq1_values(dl, index, qh >> 3, c).view(n, 256)


# ---- ternary and microscaled FP4 ----------------------------------------------------------------


def _tq1_0(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # qs[48] | qh[4] | d f16: five (qs) or four (qh) base-3 digits per byte, read as
    # ((byte * 3^k mod 256) * 3) >> 8; value d * (digit - 1)
    n = blocks.shape[0]
    d = _f16(blocks, 52)  # [N, 1]
    b = blocks[:, :52].int()

    def digits(part: torch.Tensor, powers: torch.Tensor) -> torch.Tensor:  # [N, B] -> [N, k * B]
        q = (part.unsqueeze(1) * powers.view(-1, 1)) & 0xFF
        return ((q * 3) >> 8).reshape(n, powers.numel() * part.shape[1])

    t = torch.cat(
        (digits(b[:, :32], c.pow3), digits(b[:, 32:48], c.pow3), digits(b[:, 48:52], c.pow3[:4])), 1
    )
    return (t - 1).float().mul_(d)  # [N, 256]


def _tq2_0(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # qs[64] (four 2-bit values per byte) | d f16; value d * (q - 1)
    n = blocks.shape[0]
    d = _f16(blocks, 64)  # [N, 1]
    q = _split(blocks[:, :64].view(n, 2, 32), c.crumb, 3).view(n, 256)
    return q.float().sub_(1).mul_(d)


def _mxfp4(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # e u8 (E8M0 scale) | qs[16] (4-bit codes: low nibbles, then high nibbles)
    n = blocks.shape[0]
    e = blocks[:, :1].int()  # [N, 1]
    # ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 bits (a subnormal for e < 2)
    bits = torch.where(e < 2, (e + 1) * 0x00200000, (e - 1) << 23)
    d = bits.view(torch.float32)
    q = _nibbles(blocks[:, 1:17].view(n, 1, 16), c).view(n, 32)
    return c.mxfp4.index_select(0, q.reshape(-1).int()).view(n, 32).mul_(d)


def _nvfp4(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d[4] (UE4M3 scale of each 16 values) | qs[32] (4-bit codes; per 16 values: 8 low nibbles,
    # then the same 8 bytes' high nibbles)
    n = blocks.shape[0]
    d = c.ue4m3.index_select(0, blocks[:, :4].reshape(-1).int()).view(n, 4, 1)  # [N, S=4, 1]
    q = _nibbles(blocks[:, 4:36].view(n, 4, 8), c).view(n, 4, 16)
    return (c.mxfp4.index_select(0, q.reshape(-1).int()).view(n, 4, 16) * d).view(n, 64)


def _q1_0(blocks: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    # d f16 | qs[16] (one bit per value, least significant first): +d where set, -d where clear
    n = blocks.shape[0]
    d = _f16(blocks, 0)  # [N, 1]
    plus = _bits(blocks[:, 2:18], c).view(n, 128)
    return torch.where(plus.bool(), d, -d)


_DEQUANT: dict[GGMLType, Callable[[torch.Tensor, SimpleNamespace], torch.Tensor]] = {
    T.F32: _f32,
    T.F16: _f16_all,
    T.BF16: _bf16,
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
    T.IQ4_NL: _iq4_nl,
    T.IQ4_XS: _iq4_xs,
    T.IQ2_XXS: _iq2_xxs,
    T.IQ2_XS: _iq2_xs,
    T.IQ2_S: _iq2_s,
    T.IQ3_XXS: _iq3_xxs,
    T.IQ3_S: _iq3_s,
    T.IQ1_S: _iq1_s,
    T.IQ1_M: _iq1_m,
    T.TQ1_0: _tq1_0,
    T.TQ2_0: _tq2_0,
}
# Types a gguf older than 0.19 may not name.
for _name, _fn in (("MXFP4", _mxfp4), ("NVFP4", _nvfp4), ("Q1_0", _q1_0)):
    if _name in T.__members__:
        _DEQUANT[T[_name]] = _fn

# Float types whose own torch dtype needs no float32 detour.
_NATIVE = {(T.F32, torch.float32), (T.F16, torch.float16), (T.BF16, torch.bfloat16)}


def _check(raw: torch.Tensor, qtype: GGMLType, shape: tuple[int, ...]) -> None:
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        got = raw.dtype if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise UsageError(None, None, f"dequantize: raw must be a uint8 tensor of GGML blocks, got {got}")
    if any(s < 0 for s in shape):
        raise GGUFTensorError(None, None, f"{qtype.name}: negative dimension in shape {shape}")
    bs, ts = block_size(qtype), type_size(qtype)
    last = shape[-1] if shape else 1
    if last % bs:
        raise GGUFTensorError(
            None,
            None,
            f"{qtype.name}: last dim of shape {shape} is {last}, not a multiple of block size {bs}",
        )
    numel = math.prod(shape)
    expected = numel // bs * ts
    if raw.numel() != expected:
        raise GGUFTensorError(
            None,
            None,
            f"{qtype.name}: shape {shape} needs {expected} bytes ({numel // bs} blocks of {ts}), "
            f"got {raw.numel()} bytes",
        )


def dequantize(
    raw: torch.Tensor, qtype: GGMLType, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Whole GGML blocks `raw` (uint8, any shape, any device) -> a `dtype` tensor of `shape` there.

    `shape` is in numpy order (rows last), as the gguf package reports it. Values are computed in
    float32, bit-identical to `gguf.quants.dequantize`, then cast to `dtype`; F32/F16/BF16 read
    as their own dtype go direct and may share memory with `raw`. On CUDA the Triton kernels
    (`harness.quant.kernels`) do the types they support; `dequantize_torch` never takes them.
    Raises UnsupportedTypeError for a type not in SUPPORTED_TYPES, GGUFTensorError when the bytes
    do not fit `shape`, UsageError when `raw` is not a uint8 tensor.
    """
    return _dequantize(raw, qtype, shape, dtype, kernels_ok=True)


def dequantize_torch(
    raw: torch.Tensor, qtype: GGMLType, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`dequantize` by the torch ops alone, on any device (for comparisons with the kernels)."""
    return _dequantize(raw, qtype, shape, dtype, kernels_ok=False)


def _dequantize(raw, qtype, shape, dtype, kernels_ok: bool) -> torch.Tensor:
    qtype = parse_type(qtype)
    shape = tuple(int(s) for s in shape)
    _check(raw, qtype, shape)

    if kernels_ok and raw.device.type == "cuda":
        try:
            from harness.quant import kernels
        except ImportError:  # the GPU kernels are optional; the torch path below covers every type
            kernels = None
        if kernels is not None and kernels.supports(qtype):
            return kernels.dequantize(raw, qtype, shape, dtype)

    blocks = raw.contiguous().view(-1, type_size(qtype))  # [N, B]
    if (qtype, dtype) in _NATIVE:
        return _view(blocks, dtype).view(shape)
    out = _DEQUANT[qtype](blocks, constants(raw.device))  # [N, block_size] float32
    return out.view(shape).to(dtype)


@functools.cache
def uses_constants(qtype: GGMLType | str | int) -> bool:
    """Whether dequantizing `qtype` with the torch ops reads the per-device constants (shift
    vectors, codebook): every block type but Q8_0; no float type."""
    qtype = parse_type(qtype)
    fn = _DEQUANT.get(qtype)
    if fn is None:
        return False

    class _Read(Exception):
        pass

    class _Probe:
        def __getattr__(self, name):
            raise _Read

    with _disable_current_modes():  # a tracer or an emulation active now need not see the probe
        try:
            fn(torch.zeros((1, type_size(qtype)), dtype=torch.uint8), _Probe())
        except _Read:
            return True
    return False
