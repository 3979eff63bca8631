"""Torch dequantizers for GGML block types, bit-identical to `gguf.quants.dequantize` in float32.

`dequantize(raw, qtype, shape, dtype)` turns whole GGML blocks (uint8, on any device) into a
tensor of logical `shape` on the same device. Every step is a torch op on `raw.device`: no host
reads, no per-call host tensors. The few constants (shift vectors, IQ4 codebook) are the
"dequant" table of the per-device registry `harness.device_tables`.

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


def _build_constants(device: torch.device) -> SimpleNamespace:
    return SimpleNamespace(
        nib=constant_table([0, 4], torch.uint8, device),  # low nibble, high nibble
        crumb=constant_table([0, 2, 4, 6], torch.uint8, device),  # four 2-bit fields of a byte
        bit=constant_table(list(range(8)), torch.uint8, device),  # eight bits of a byte
        iq4=constant_table(IQ4_KVALUES, torch.float32, device),
    )


DEQUANT_TABLE = "dequant"
TABLES.define(DEQUANT_TABLE, _build_constants)


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
}

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
