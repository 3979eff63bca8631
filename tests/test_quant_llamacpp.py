"""harness.quant.dequant against llama.cpp's own dequantize_row_* (libggml-base, as
llama-cpp-python ships it), bit for bit, for every supported block type: on random blocks (every
bit pattern a file can hold, scales finite) and on blocks llama.cpp's quantizer made."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.quant.dequant import dequantize
from harness.quant.types import FLOAT_TYPES, SUPPORTED_TYPES, GGMLType, block_size, type_size
from tests.test_quant_dequant import assert_bit_identical, random_blocks

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
from tests.llamacpp_util import ggml_dequantize, ggml_quantize  # noqa: E402

pytestmark = pytest.mark.llamacpp

BLOCK_TYPES = tuple(t for t in SUPPORTED_TYPES if t not in FLOAT_TYPES)


def ids(qtype: GGMLType) -> str:
    return qtype.name


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=ids)
def test_random_blocks_match_llamacpp(qtype: GGMLType) -> None:
    n = 4 * 256 // block_size(qtype) * 16  # 16 rows of 1024 values
    raw = random_blocks(qtype, (n * block_size(qtype),), np.random.default_rng(int(qtype)))
    want = ggml_dequantize(raw, qtype.name, n * block_size(qtype))
    got = dequantize(torch.from_numpy(raw.copy()), qtype, (n * block_size(qtype),))
    assert_bit_identical(got, want)


# IQ1_S/IQ1_M are left out here: ggml's setup of their quantizer alone takes ~17 s (random blocks,
# above, cover every bit pattern of theirs).
@pytest.mark.parametrize("qtype", [t for t in BLOCK_TYPES if t.name not in ("IQ1_S", "IQ1_M")], ids=ids)
def test_llamacpp_quantized_blocks_match_llamacpp(qtype: GGMLType) -> None:
    """Blocks as llama.cpp's quantizer writes them (the grids' real neighbourhoods, real scales)
    from normal values, dequantized by the harness and by llama.cpp."""
    values = np.random.default_rng(3).standard_normal((8, 512), dtype=np.float32) * np.float32(0.05)
    raw = ggml_quantize(values, int(qtype), type_size(qtype), block_size(qtype))
    want = ggml_dequantize(raw, qtype.name, values.size).reshape(values.shape)
    got = dequantize(torch.from_numpy(raw), qtype, values.shape)
    assert_bit_identical(got, want)
    # and the quantizer did quantize: the values are near the inputs (relative error 1 for zeros, 2 for noise; ternary ~0.66)
    rel = float(np.sum((want - values) ** 2) / np.sum(values**2))
    assert rel < 0.9, f"{qtype.name}: relative error {rel:.3f}"
