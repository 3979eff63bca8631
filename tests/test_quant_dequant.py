"""harness.quant.dequant against gguf.quants.dequantize, bit for bit, for every supported type.

(llama.cpp's own dequantize_row_* are the reference in tests/test_quant_llamacpp.py.)"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quant_shape_to_byte_shape
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.device_tables import TABLES
from harness.errors import GGUFTensorError, UnsupportedTypeError, UsageError
from harness.quant import dequant
from harness.quant.dequant import dequantize
from harness.quant.qtensor import QTensor
from harness.quant.types import (
    F16_FIELDS,
    FLOAT_TYPES,
    IQ1_M_SCALE_BYTES,
    MXFP4_SCALE_BYTE,
    SUPPORTED_TYPES,
    GGMLType,
    block_size,
    type_size,
)

T = GGMLType
QUANT_TYPES = tuple(t for t in SUPPORTED_TYPES if t not in FLOAT_TYPES)
# Types gguf can quantize from float32 itself; the rest are written as random valid blocks.
GGUF_QUANTIZES = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
# Types whose scale is an f16 (in fields, or spread over IQ1_M's sub-scale words): the edge cases.
F16_SCALED = tuple(t for t in QUANT_TYPES if t in F16_FIELDS or t == T.IQ1_M)
# The types added for low-bit files (IQ2/IQ3/IQ1 grids, ternary, FP4): checked on the emulation.
LOW_BIT_TYPES = tuple(
    t for t in QUANT_TYPES if t.name.startswith(("IQ1", "IQ2", "IQ3", "TQ", "MXFP", "NVFP", "Q1_"))
)

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
    elif qtype == T.IQ1_M:  # clear f16 exponent bit 10 (bit 6 of byte 53): never all ones
        raw.reshape(-1, type_size(qtype))[:, IQ1_M_SCALE_BYTES[2]] &= 0xBF
    elif qtype.name == "MXFP4":  # exponents past 252 overflow the larger codes
        raw.reshape(-1, type_size(qtype))[:, MXFP4_SCALE_BYTE] %= 253
    else:  # NVFP4's UE4M3 scales are finite whatever their bits
        blocks = raw.reshape(-1, type_size(qtype))
        for off in F16_FIELDS.get(qtype, ()):
            field = np.ascontiguousarray(blocks[:, off : off + 2]).view(np.uint16)
            _make_finite(field, F16_EXP)
            blocks[:, off : off + 2] = field.view(np.uint8)
    return raw


def set_scales(raw: np.ndarray, qtype: GGMLType, value: float) -> None:
    """Write `value` (as f16) into every f16 scale of every block, in place."""
    blocks = raw.reshape(-1, type_size(qtype))
    bits = np.array([value], dtype=np.float16).view(np.uint16)[0]
    if qtype == T.IQ1_M:  # the scale's four nibbles are the top nibbles of bytes 49, 51, 53, 55
        for k, at in enumerate(IQ1_M_SCALE_BYTES):
            blocks[:, at] = (blocks[:, at] & 0x0F) | (((int(bits) >> (4 * k)) & 0xF) << 4)
        return
    for off in F16_FIELDS[qtype]:
        blocks[:, off : off + 2] = np.array([bits], dtype=np.uint16).view(np.uint8)


def reference(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    if qtype.name == "Q1_0":  # gguf 0.19 names Q1_0 but cannot dequantize it: +-d by each bit
        blocks = np.ascontiguousarray(raw).reshape(-1, type_size(qtype))
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        plus = np.unpackbits(blocks[:, 2:], axis=-1, bitorder="little").astype(bool)
        return np.where(plus, d, -d).reshape(*raw.shape[:-1], -1)
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
@pytest.mark.parametrize("qtype", F16_SCALED, ids=ids)
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


@pytest.mark.skipif("MXFP4" not in T.__members__, reason="this gguf does not name MXFP4")
def test_mxfp4_every_exponent_and_code_matches_gguf() -> None:
    """All 256 E8M0 exponents (a subnormal half-scale below 2, infinities past 252 for the
    larger codes) with all 16 codes in both nibbles."""
    qtype = T.MXFP4
    raw = np.zeros((256, type_size(qtype)), dtype=np.uint8)
    raw[:, MXFP4_SCALE_BYTE] = np.arange(256)
    codes = np.arange(16, dtype=np.uint8)
    raw[:, 1:17] = codes | (codes[::-1] << 4)
    out = dequantize(as_raw(raw), qtype, (256 * 32,))
    with np.errstate(over="ignore"):
        want = reference(raw, qtype)
    assert_bit_identical(out, want.reshape(-1))
    assert torch.isinf(out).any() and torch.isfinite(out[: 253 * 32]).all()


@pytest.mark.skipif("NVFP4" not in T.__members__, reason="this gguf does not name NVFP4")
def test_nvfp4_every_scale_byte_matches_gguf() -> None:
    qtype = T.NVFP4
    raw = np.random.default_rng(6).integers(0, 256, size=(64, type_size(qtype)), dtype=np.uint8)
    raw[:, :4] = np.arange(256, dtype=np.uint8).reshape(64, 4)
    assert_bit_identical(dequantize(as_raw(raw), qtype, (64 * 64,)), reference(raw, qtype).reshape(-1))


def test_sign_table_is_ggml_ksigns() -> None:
    """The computed IQ2/IQ3 sign patterns are ggml's ksigns_iq2xs (gguf-py's copy)."""
    table = dequant.constants(torch.device("cpu")).ksign  # [128, 8] of +-1
    bits = (table < 0).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)
    assert bits.sum(-1).to(torch.uint8).numpy().tobytes() == gguf.quants.IQ2_XXS.ksigns


@pytest.mark.parametrize("qtype", LOW_BIT_TYPES, ids=ids)
def test_emulated_accelerator_dequantizes_bit_identically(qtype: GGMLType) -> None:
    """On the emulated CUDA device the blocks move, the tables are built at the move (not in the
    dequantization), and the values are the CPU's bit for bit."""
    from harness.trace.emulated import EmulatedCuda

    shape = (3, 2 * block_size(qtype))
    raw = random_blocks(qtype, shape, np.random.default_rng(7))
    want = dequantize(as_raw(raw), qtype, shape)
    with EmulatedCuda(device_count=2):
        moved = QTensor(as_raw(raw), qtype, shape).to("cuda:1")
        assert TABLES.has(dequant.DEQUANT_TABLE, torch.device("cuda", 1))
        got = moved.dequantize()
        assert got.device == torch.device("cuda", 1)
        got = got.cpu()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("qtype", [T.Q8_1, T.Q8_K, T.I8, T.F64], ids=ids)
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


class _Rows(torch.nn.Module):
    """The embedding's use of a QTensor: a GGUF-named buffer of blocks, rows dequantized."""

    def __init__(self, qt: QTensor):
        super().__init__()
        self.gguf_name, self.qtype, self.shape = qt.name, qt.qtype, qt.shape
        self.register_buffer("qweight", qt.raw, persistent=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return QTensor(self.qweight, self.qtype, self.shape, self.gguf_name).dequantize_rows(rows)


@pytest.mark.parametrize("qtype", LOW_BIT_TYPES, ids=ids)
def test_misplaced_constants_are_found_at_an_op_that_names_the_weight(qtype: GGMLType) -> None:
    """With the constants on the host (the dequant-host-constants fault), the first op that meets
    them reads the blocks themselves, so the tracer's first offence names the GGUF tensor."""
    from harness.trace import Tracer
    from harness.trace.emulated import EmulatedCuda

    shape = (4, 256)
    raw = as_raw(random_blocks(qtype, shape, np.random.default_rng(8)))
    with EmulatedCuda():
        module = _Rows(QTensor(raw, qtype, shape, "token_embd.weight").to("cuda:0"))
        previous = TABLES.override(
            dequant.DEQUANT_TABLE, lambda device: dequant.build_constants(torch.device("cpu"))
        )
        try:
            with Tracer(module) as tracer:
                module(torch.tensor([1, 3], device="cuda:0"))
        except RuntimeError:  # CUDA refuses the mixed op; the tracer has recorded it
            pass
        finally:
            TABLES.override(dequant.DEQUANT_TABLE, previous)
    first = tracer.summary.first_offence
    assert (first["class"], first["tensor"]) == ("mismatch", "token_embd.weight"), first
