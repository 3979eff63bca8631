"""QTensor: raw blocks that move between devices and dequantize where they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from harness.errors import GGUFTensorError
from harness.quant.qmatmul import QMatMul
from harness.quant.qtensor import QTensor
from harness.quant.types import SUPPORTED_TYPES, GGMLType
from harness.synth import random_blocks

T = GGMLType
SOME_TYPES = [T.Q8_0, T.Q4_K, T.Q6_K, T.IQ4_XS, T.F16]


def make(qtype: GGMLType, shape: tuple[int, ...], seed: int = 0, name: str = "w") -> QTensor:
    blocks = random_blocks(qtype, shape, np.random.default_rng(seed), 0.05)
    return QTensor.from_numpy(blocks, qtype, shape, name=name)


# gguf 0.19 names Q1_0 but cannot dequantize it (tests/test_quant_dequant.py checks it)
@pytest.mark.parametrize("qtype", [t for t in SUPPORTED_TYPES if t.name != "Q1_0"], ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype):
    qt = make(qtype, (3, 512))
    expected = gguf_dequantize(qt.raw.numpy(), qtype)
    out = qt.dequantize()
    assert out.shape == (3, 512) and out.dtype == torch.float32
    assert np.array_equal(out.numpy().view(np.int32), expected.astype(np.float32).view(np.int32))


@pytest.mark.parametrize("qtype", SOME_TYPES, ids=lambda t: t.name)
def test_dequantize_runs_on_the_tensors_device(qtype):
    # The meta device stands in for an accelerator: any op that touched host data would fail.
    qt = make(qtype, (2, 256)).to("meta")
    assert qt.device.type == "meta"
    assert qt.dequantize().device.type == "meta"
    assert qt.dequantize(dtype=torch.float16).dtype == torch.float16


def test_dequantize_with_device_moves_the_blocks_first():
    qt = make(T.Q4_K, (2, 256))
    out = qt.dequantize(device="meta")
    assert out.device.type == "meta"
    assert qt.device.type == "cpu"  # the QTensor itself stays


def test_to_same_device_is_identity_and_keeps_metadata():
    qt = make(T.Q5_K, (4, 256), name="blk.0.attn_q.weight")
    assert qt.to("cpu") is qt
    moved = qt.to("meta")
    assert (moved.qtype, moved.shape, moved.name) == (qt.qtype, qt.shape, qt.name)


@pytest.mark.parametrize("qtype", SOME_TYPES, ids=lambda t: t.name)
def test_expert_slice_is_a_view(qtype):
    stack = make(qtype, (4, 8, 256), name="blk.0.ffn_gate_exps.weight")
    e2 = stack[2]
    assert e2.shape == (8, 256)
    assert e2.name == "blk.0.ffn_gate_exps.weight[2]"
    assert e2.raw.untyped_storage().data_ptr() == stack.raw.untyped_storage().data_ptr()
    assert torch.equal(e2.dequantize(), stack.dequantize()[2])


@pytest.mark.parametrize("qtype", SOME_TYPES, ids=lambda t: t.name)
def test_dequantize_rows_only_the_rows_asked_for(qtype):
    qt = make(qtype, (16, 256))
    index = torch.tensor([[3, 3], [15, 0]])
    rows = qt.dequantize_rows(index)
    assert rows.shape == (2, 2, 256)
    assert torch.equal(rows, qt.dequantize()[index])


def test_from_float_round_trips():
    values = torch.randn(3, 64)
    assert torch.equal(QTensor.from_float(values).dequantize(), values)
    half = QTensor.from_float(values, T.F16)
    assert half.nbytes == 3 * 64 * 2
    assert torch.equal(half.dequantize(), values.half().float())
    assert torch.equal(QTensor.from_float(values, T.BF16).dequantize(), values.bfloat16().float())


def test_wrong_byte_count_is_refused():
    with pytest.raises(
        GGUFTensorError, match=r"w: 100 bytes of data, but shape \[1, 256\] in Q4_K needs 144"
    ):
        QTensor(torch.zeros(100, dtype=torch.uint8), T.Q4_K, (1, 256), name="w")


def test_row_not_a_multiple_of_the_block_is_refused():
    with pytest.raises(GGUFTensorError, match="row length 100 is not a multiple of the Q8_0 block size 32"):
        QTensor(torch.zeros(136, dtype=torch.uint8), T.Q8_0, (1, 100), name="w")


def test_raw_must_be_bytes():
    with pytest.raises(TypeError, match="uint8"):
        QTensor(torch.zeros(64, dtype=torch.float32), T.F32, (64,))


# -- QMatMul -----------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", SOME_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("strategy", ["quantized", "f32", "f16"])
def test_qmatmul_strategies_agree_with_the_dequantized_product(qtype, strategy):
    qt = make(qtype, (32, 256))
    x = torch.randn(5, 256)
    reference = x.double() @ qt.dequantize().double().T
    out = QMatMul(qt, strategy)(x)
    assert out.shape == (5, 32) and out.dtype == torch.float32
    tol = 2e-2 if strategy == "f16" else 1e-4
    assert torch.allclose(out.double(), reference, rtol=tol, atol=tol)


def test_qmatmul_quantized_keeps_blocks_not_floats():
    qt = make(T.Q4_K, (32, 256))
    mm = QMatMul(qt, "quantized")
    assert mm.weight is None and mm.qweight.dtype == torch.uint8
    assert mm.qtensor.nbytes == qt.nbytes
    assert sum(b.numel() * b.element_size() for b in mm.buffers()) == qt.nbytes


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_weights_are_dequantized_once_on_their_own_device(qtype):
    """candle#1815: F16/F32 weights were dequantized onto the CPU. Here they stay where they are."""
    router = QTensor.from_float(torch.randn(8, 64), qtype, name="blk.0.ffn_gate_inp.weight").to("meta")
    mm = QMatMul(router)
    assert mm.strategy == "f32"
    assert mm.weight.device.type == "meta"
    assert mm.qweight is None
    assert mm(torch.empty(3, 64, device="meta")).device.type == "meta"


def test_qmatmul_module_to_moves_its_weight():
    mm = QMatMul(make(T.Q8_0, (32, 256)))
    mm.to("meta")
    assert mm.qweight.device.type == "meta"
    assert mm.qtensor.device.type == "meta"


def test_qmatmul_rejects_unknown_strategy_and_bad_shape():
    with pytest.raises(ValueError, match="strategy"):
        QMatMul(make(T.Q8_0, (32, 256)), "int4")
    with pytest.raises(ValueError, match="2-D"):
        QMatMul(make(T.Q8_0, (2, 32, 256)))


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", [T.F16, T.F32, T.Q4_K, T.Q8_0], ids=lambda t: t.name)
def test_qmatmul_on_cuda_stays_on_cuda(qtype):
    qt = make(qtype, (32, 256)).to("cuda")
    mm = QMatMul(qt)
    buffer = mm.weight if mm.weight is not None else mm.qweight
    assert buffer.device == qt.device
    x = torch.randn(4, 256, device="cuda")
    out = mm(x)
    assert out.device == qt.device
    reference = x.double().cpu() @ make(qtype, (32, 256)).dequantize().double().T
    assert torch.allclose(out.double().cpu(), reference, rtol=1e-4, atol=1e-4)
