"""The GGML block types this harness reads: block sizes and byte sizes, from gguf's table."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from harness.errors import UnsupportedTypeError

GGMLType = GGMLQuantizationType
T = GGMLQuantizationType

# Every type QTensor.dequantize handles, in GGML's enum order.
SUPPORTED_TYPES: tuple[GGMLType, ...] = (
    T.F32,
    T.F16,
    T.Q4_0,
    T.Q4_1,
    T.Q5_0,
    T.Q5_1,
    T.Q8_0,
    T.Q2_K,
    T.Q3_K,
    T.Q4_K,
    T.Q5_K,
    T.Q6_K,
    T.IQ4_NL,
    T.IQ4_XS,
    T.BF16,
)
FLOAT_TYPES: tuple[GGMLType, ...] = (T.F32, T.F16, T.BF16)

# Byte offsets of the f16 fields (the scale d, and m / dmin where there is one) within each block
# of the block types: where random test blocks must hold finite values.
F16_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
}


def block_size(qtype: GGMLType) -> int:
    """Elements per block (1 for float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: GGMLType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[qtype][1]


def parse_type(name: str | int | GGMLType) -> GGMLType:
    """`"q4_k"`, `"Q4_K"`, `12` or the enum -> the enum; UnsupportedTypeError for anything else."""
    if isinstance(name, GGMLType):
        qtype = name
    elif isinstance(name, int):
        try:
            qtype = GGMLType(name)
        except ValueError:
            raise UnsupportedTypeError(None, None, f"unknown GGML type id {name}") from None
    else:
        try:
            qtype = GGMLType[name.upper()]
        except KeyError:
            raise UnsupportedTypeError(None, None, f"unknown GGML type {name!r}") from None
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedTypeError(None, None, f"type {qtype.name} is not supported (supported: {names})")
    return qtype


def nbytes_for(shape: tuple[int, ...], qtype: GGMLType) -> int:
    """Bytes of a tensor of logical `shape` (numpy order: rows last) in `qtype`."""
    n = 1
    for s in shape:
        n *= s
    return n // block_size(qtype) * type_size(qtype)
