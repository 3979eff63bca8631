"""harness.quant.dequant against gguf.quants.dequantize, bit for bit, for every supported type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quant_shape_to_byte_shape
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.errors import GGUFTensorError, UnsupportedTypeError, UsageError
from harness.quant.dequant import dequantize
from harness.quant.types import F16_FIELDS, FLOAT_TYPES, SUPPORTED_TYPES, GGMLType, block_size, type_size

T = GGMLType
QUANT_TYPES = tuple(t for t in SUPPORTED_TYPES if t not in FLOAT_TYPES)
# Types gguf can quantize from float32 itself; the rest are written as random valid blocks.
GGUF_QUANTIZES = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
# Byte offsets of the f16 scale fields (d, and m / dmin where there is one) within each block.

# (exponent mask, a bit of it to clear) per float layout: all-ones exponent -> finite.
F16_EXP = (0x7C00, 0x4000)
BF16_EXP = (0x7F80, 0x4000)
F32_EXP = (0x7F800000, 0x40000000)
LAYOUTS = ("byte_shape", "flat", "misaligned", "strided")


def ids(qtype: GGMLType) -> str:
    return qtype.name


def _make_finite(bits: np.ndarray, exp: tuple[int, int]) -> None:
    """Turn every inf/NaN bit pattern in `bits` (uint16/uint32, in place) into a finite number."""
    mask, clear = (bits.dtype.type(v) for v in exp)
    bits[(bits & mask) == mask] &= ~clear


def random_blocks(qtype: GGMLType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random bytes of `shape` in `qtype` (gguf's byte shape), with every float field finite."""
    raw = rng.integers(0, 256, size=quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    if qtype == T.F32:
        _make_finite(raw.view(np.uint32), F32_EXP)
    elif qtype in (T.F16, T.BF16):
        _make_finite(raw.view(np.uint16), F16_EXP if qtype == T.F16 else BF16_EXP)
    else:
        blocks = raw.reshape(-1, type_size(qtype))
        for off in F16_FIELDS[qtype]:
            field = np.ascontiguousarray(blocks[:, off : off + 2]).view(np.uint16)
            _make_finite(field, F16_EXP)
            blocks[:, off : off + 2] = field.view(np.uint8)
    return raw


def set_scales(raw: np.ndarray, qtype: GGMLType, value: float) -> None:
    """Write `value` (as f16) into every scale field of every block, in place."""
    blocks = raw.reshape(-1, type_size(qtype))
    for off in F16_FIELDS[qtype]:
        blocks[:, off : off + 2] = np.array([value], dtype=np.float16).view(np.uint8)


def reference(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype)


def as_raw(raw: np.ndarray, layout: str = "byte_shape") -> torch.Tensor:
    """The bytes as a uint8 torch tensor laid out as `layout` (same logical byte order)."""
    t = torch.from_numpy(raw.copy())
    if layout == "flat":
        return t.reshape(-1)
    if layout == "misaligned":  # an odd storage offset, as in a memory map
        buf = torch.empty(t.numel() + 1, dtype=torch.uint8)
        buf[1:] = t.reshape(-1)
        return buf[1:]
    if layout == "strided":  # a non-contiguous view
        t2 = t.reshape(-1, t.shape[-1])
        return t2.t().contiguous().t()
    return t


def assert_bit_identical(got: torch.Tensor, want: np.ndarray) -> None:
    assert got.dtype == torch.float32
    assert tuple(got.shape) == want.shape
    g = got.detach().cpu().contiguous().view(torch.int32).reshape(-1)
    w = torch.from_numpy(np.array(want, dtype=np.float32)).view(torch.int32).reshape(-1)
    bad = (g != w).nonzero()
    if bad.numel():
        i = int(bad[0])
        gv, wv = got.reshape(-1)[i].item(), float(want.reshape(-1)[i])
        raise AssertionError(
            f"{bad.numel()} of {g.numel()} values differ; first at flat index {i}: "
            f"got {gv!r} ({int(g[i]) & 0xFFFFFFFF:#010x}), want {wv!r} ({int(w[i]) & 0xFFFFFFFF:#010x})"
        )


@st.composite
def cases(draw: st.DrawFn, qtype: GGMLType) -> tuple[tuple[int, ...], int, str]:
    """(logical shape, rng seed, raw layout): up to 3-D, several blocks per row."""
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    per_row = draw(st.integers(1, 3)) if qtype in QUANT_TYPES else draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    layout = draw(st.sampled_from(LAYOUTS))
    return (*lead, per_row * block_size(qtype)), seed, layout


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=ids)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_random_blocks_match_gguf(qtype: GGMLType, data: st.DataObject) -> None:
    shape, seed, layout = data.draw(cases(qtype))
    raw = random_blocks(qtype, shape, np.random.default_rng(seed))
    out = dequantize(as_raw(raw, layout), qtype, shape)
    assert_bit_identical(out, reference(raw, qtype))


@pytest.mark.parametrize("scale", [0.0, -0.0, 2.0**-24, -(2.0**-14), 1.0, -65504.0, 65504.0])
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=ids)
def test_edge_scales_match_gguf(qtype: GGMLType, scale: float) -> None:
    """Zero, signed zero, the smallest f16 subnormal and the largest f16 as every scale."""
    shape = (2, 2 * block_size(qtype))
    raw = random_blocks(qtype, shape, np.random.default_rng(1))
    set_scales(raw, qtype, scale)
    assert_bit_identical(dequantize(as_raw(raw), qtype, shape), reference(raw, qtype))


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=ids)
def test_expert_tensor_shape(qtype: GGMLType) -> None:
    """A 3-D [experts, rows, cols] tensor from flat bytes comes back in that shape."""
    shape = (4, 3, 256)
    raw = random_blocks(qtype, shape, np.random.default_rng(2))
    out = dequantize(as_raw(raw, "flat"), qtype, shape)
    assert out.shape == shape
    assert_bit_identical(out, reference(raw, qtype))


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=ids)
def test_empty_tensor(qtype: GGMLType) -> None:
    shape = (0, block_size(qtype))
    out = dequantize(torch.empty(0, dtype=torch.uint8), qtype, shape)
    assert out.shape == shape
    assert out.dtype == torch.float32


def _write_gguf(path, rng: np.random.Generator) -> None:
    w = gguf.GGUFWriter(path, "llama")
    for qtype in SUPPORTED_TYPES:
        for shape in [(3, 2 * 256), (4, 2, 256)]:  # a matrix and a small expert tensor
            name = f"{qtype.name.lower()}.{len(shape)}d"
            if qtype in GGUF_QUANTIZES:
                data = gguf.quants.quantize(rng.standard_normal(shape, dtype=np.float32), qtype)
                if qtype in (T.F32, T.F16):
                    w.add_tensor(name, data)  # the writer takes the type from the numpy dtype
                else:
                    w.add_tensor(name, data, raw_dtype=qtype)
            else:
                w.add_tensor(name, random_blocks(qtype, shape, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_round_trip(tmp_path) -> None:
    """Tensors written by gguf.GGUFWriter and read by gguf.GGUFReader dequantize like gguf does."""
    path = tmp_path / "all_types.gguf"
    _write_gguf(path, np.random.default_rng(3))
    reader = gguf.GGUFReader(path)
    seen = set()
    for info in reader.tensors:
        qtype = GGMLType(info.tensor_type)
        shape = tuple(reversed([int(n) for n in info.shape]))  # ggml order -> numpy order
        raw = torch.from_numpy(np.array(info.data).reshape(-1).view(np.uint8))
        out = dequantize(raw, qtype, shape)
        assert out.shape == shape, info.name
        assert_bit_identical(out, reference(info.data, qtype).reshape(shape))
        seen.add(qtype)
    assert seen == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=ids)
def test_other_dtypes_are_the_float32_result_cast(qtype: GGMLType, dtype: torch.dtype) -> None:
    shape = (3, 2 * block_size(qtype) if qtype in QUANT_TYPES else 64)
    raw = as_raw(random_blocks(qtype, shape, np.random.default_rng(4)))
    out = dequantize(raw, qtype, shape, dtype)
    want = dequantize(raw, qtype, shape).to(dtype)
    assert out.dtype == dtype
    assert out.shape == shape
    bits = torch.int64 if dtype == torch.float64 else torch.int16
    assert torch.equal(out.view(bits), want.view(bits))


@pytest.mark.parametrize("qtype", [T.Q8_1, T.Q8_K, T.IQ2_XXS, T.TQ1_0, T.MXFP4], ids=ids)
def test_unsupported_type_raises(qtype: GGMLType) -> None:
    shape = (1, block_size(qtype))
    raw = torch.zeros(type_size(qtype), dtype=torch.uint8)
    with pytest.raises(UnsupportedTypeError, match=qtype.name):
        dequantize(raw, qtype, shape)


def test_byte_count_mismatch_raises() -> None:
    with pytest.raises(GGUFTensorError, match=r"needs 36 bytes.*got 35 bytes"):
        dequantize(torch.zeros(35, dtype=torch.uint8), T.Q4_0, (2, 32))


def test_row_not_whole_blocks_raises() -> None:
    with pytest.raises(GGUFTensorError, match=r"last dim .* is 128, not a multiple of block size 256"):
        dequantize(torch.zeros(144, dtype=torch.uint8), T.Q4_K, (2, 128))


def test_raw_not_uint8_raises() -> None:
    with pytest.raises(UsageError, match="uint8"):
        dequantize(torch.zeros(8, dtype=torch.float32), T.F32, (8,))


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=ids)
def test_meta_device_needs_no_host_reads(qtype: GGMLType) -> None:
    """On the meta device (shapes, no data) any host read would raise: the path is torch ops only."""
    shape = (2, 3, 2 * block_size(qtype))
    n = 2 * 3 * 2 * type_size(qtype)
    out = dequantize(torch.empty(n, dtype=torch.uint8, device="meta"), qtype, shape, torch.bfloat16)
    assert out.device.type == "meta"
    assert out.shape == shape
    assert out.dtype == torch.bfloat16


@pytest.mark.cuda(real=True)
@pytest.mark.parametrize("layout", ["byte_shape", "misaligned"])
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=ids)
def test_cuda_output_on_raw_device_and_bit_identical(qtype: GGMLType, layout: str) -> None:
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # not the default one, where there are two
    shape = (4, 3, 2 * block_size(qtype) if qtype in QUANT_TYPES else 96)
    raw = random_blocks(qtype, shape, np.random.default_rng(5))
    out = dequantize(as_raw(raw, layout).to(device), qtype, shape)
    assert out.device == device
    assert_bit_identical(out, reference(raw, qtype))
    half = dequantize(as_raw(raw, layout).to(device), qtype, shape, torch.float16)
    assert half.device == device
    assert torch.equal(half.view(torch.int16), out.to(torch.float16).view(torch.int16))
