"""The low-bit file types (IQ2/IQ3/IQ1 grids, ternary, FP4, Q1_0) end to end: the harness's logits
against llama.cpp's on the same file, as tests/test_model_llamacpp.py does for the older types.

Files come from llama.cpp's own quantizer where it needs no importance matrix (IQ3_S, TQ1_0,
TQ2_0, MXFP4_MOE, Q1_0), else from `harness synth` (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ1_S, IQ1_M,
which llama-quantize refuses without an imatrix, and NVFP4, which it does not write). The
comparison is the NMSE over all positions of tokens routed with a margin (llama.cpp rounds
activations to 8 bits before these dot products: ~3e-4 to 2e-3 NMSE here), and the harness
against the float64 reference over gguf's dequantization (an F32 copy of the same values for
Q1_0, which gguf 0.19 cannot dequantize).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from harness.gguf_file import PRESETS
from harness.quant.types import GGMLType
from harness.synth import FILE_TYPES, synthesize
from tests.gguf_edit import rewrite
from tests.test_model_reference import Reference, load_model, nmse, run_model

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
from tests.llamacpp_util import LlamaCpp, quantize  # noqa: E402
from tests.test_model_llamacpp import NMSE_QUANT_MAX, SEED, well_routed_tokens  # noqa: E402

pytestmark = pytest.mark.llamacpp

TINY = PRESETS["tiny"]
# ftype -> the type its expert matrices get
QUANTIZED_BY_LLAMACPP = {
    "IQ3_S": "IQ3_S",
    "TQ1_0": "TQ1_0",
    "TQ2_0": "TQ2_0",
    "MXFP4_MOE": "MXFP4",
    "Q1_0": "Q1_0",
}
WRITTEN_BY_SYNTH = [
    t for t in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ1_S", "IQ1_M", "NVFP4") if t in FILE_TYPES
]
NO_GGUF_DEQUANT = ("Q1_0",)


@pytest.fixture(scope="module")
def f32_source(tmp_path_factory):
    """The tiny Mixtral in F32, in this module's folder (where the other files go too)."""
    return synthesize(
        tmp_path_factory.mktemp("filetypes") / "tiny-f32.gguf", TINY, file_type="F32", seed=SEED
    )


def reference_file(path):
    """`path`, or a copy with each tensor gguf cannot dequantize as F32 holding the harness's
    values (bit-identical to llama.cpp's, tests/test_quant_llamacpp.py)."""
    from harness.gguf_file import open_gguf

    mf = open_gguf(path)
    retype = {
        name: (int(GGMLType.F32), mf.tensor(name).dequantize().numpy())
        for name in mf.tensor_names
        if mf.qtype(name).name in NO_GGUF_DEQUANT
    }
    return rewrite(path, path.parent / f"ref-{path.name}", retype=retype) if retype else path


def compare(path, expert_type: str) -> None:
    types = {GGMLType(t.tensor_type).name for t in GGUFReader(str(path)).tensors if "_exps" in t.name}
    assert types == {expert_type}, types
    reference = Reference(reference_file(path))
    tokens = well_routed_tokens(reference)
    with LlamaCpp(path) as llama:
        expected = llama.logits(tokens)
    assert np.isfinite(expected).all() and expected.std() > 0.1
    got = run_model(load_model(path), tokens)
    err, err_ref = nmse(got, expected), nmse(got, reference.logits(tokens))
    print(f"{path.name}: harness vs llama.cpp NMSE {err:.3e}; vs float64 reference {err_ref:.3e}")
    assert err_ref <= 1e-6
    assert err <= NMSE_QUANT_MAX


@pytest.mark.parametrize(
    "ftype", [f for f in QUANTIZED_BY_LLAMACPP if QUANTIZED_BY_LLAMACPP[f] in FILE_TYPES]
)
def test_llamacpp_quantized_low_bit_file(ftype, f32_source):
    path = quantize(f32_source, f32_source.parent / f"tiny-{ftype}.gguf", ftype)
    compare(path, QUANTIZED_BY_LLAMACPP[ftype])


@pytest.mark.parametrize("file_type", WRITTEN_BY_SYNTH)
def test_synth_low_bit_file_runs_as_in_llamacpp(file_type, f32_source):
    path = synthesize(f32_source.parent / f"synth-{file_type}.gguf", TINY, file_type=file_type, seed=SEED)
    compare(path, file_type)
