"""Device-consistency harness for quantized Mixtral (MoE) inference over GGUF files."""

from harness.errors import (
    DeviceError,
    GGUFFormatError,
    GGUFMetadataError,
    GGUFTensorError,
    HarnessError,
    UnsupportedTypeError,
    UsageError,
)
from harness.gguf_file import PRESETS, MixtralConfig, ModelFile, open_gguf
from harness.model.generate import generate
from harness.model.mixtral import Mixtral
from harness.model.placement import Placement
from harness.model.tokenizer import Tokenizer
from harness.quant.qmatmul import QMatMul
from harness.quant.qtensor import QTensor
from harness.quant.types import GGMLType
from harness.trace import Tracer, diff, load_trace

__all__ = [
    "PRESETS",
    "DeviceError",
    "GGMLType",
    "GGUFFormatError",
    "GGUFMetadataError",
    "GGUFTensorError",
    "HarnessError",
    "Mixtral",
    "MixtralConfig",
    "ModelFile",
    "Placement",
    "QMatMul",
    "QTensor",
    "Tokenizer",
    "Tracer",
    "UnsupportedTypeError",
    "UsageError",
    "diff",
    "generate",
    "load_trace",
    "open_gguf",
]
