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
from harness.quant.qmatmul import QMatMul
from harness.quant.qtensor import QTensor
from harness.quant.types import GGMLType

__all__ = [
    "PRESETS",
    "DeviceError",
    "GGMLType",
    "GGUFFormatError",
    "GGUFMetadataError",
    "GGUFTensorError",
    "HarnessError",
    "MixtralConfig",
    "ModelFile",
    "QMatMul",
    "QTensor",
    "UnsupportedTypeError",
    "UsageError",
    "open_gguf",
]
