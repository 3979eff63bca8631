"""The GGML block types this harness reads: block sizes and byte sizes, from gguf's table."""

from __future__ import annotations

import gguf.quants
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from harness.errors import UnsupportedTypeError

GGMLType = GGMLQuantizationType
T = GGMLQuantizationType


def _with_tables(*names: str) -> tuple[GGMLType, ...]:
    """The types among `names` that this gguf names and whose grid tables it has (the IQ grids
    are read from gguf-py, `harness.quant.dequant.iq_grids`)."""
    grid_of = {"IQ1_M": "IQ1_S"}
    out = []
    for name in names:
        source = getattr(gguf.quants, grid_of.get(name, name), None)
        if name in T.__members__ and getattr(source, "grid_hex", None):
            out.append(T[name])
    return tuple(out)


# Every type QTensor.dequantize handles, in GGML's enum order.
SUPPORTED_TYPES: tuple[GGMLType, ...] = tuple(
    sorted(
        (
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
            T.TQ1_0,
            T.TQ2_0,
            *_with_tables("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"),
            *(T[name] for name in ("MXFP4", "NVFP4", "Q1_0") if name in T.__members__),
        ),
        key=int,
    )
)
FLOAT_TYPES: tuple[GGMLType, ...] = (T.F32, T.F16, T.BF16)

# Byte offsets of the f16 fields (the scale d, and m / dmin where there is one) within each block
# of the block types: where random test blocks must hold finite values. IQ1_M spreads its f16
# scale over the top nibbles of its four sub-scale words (`IQ1_M_SCALE_BYTES`); MXFP4's scale is
# an E8M0 exponent byte (`MXFP4_SCALE_BYTE`; finite, but past 252 it overflows the larger
# values), NVFP4's are UE4M3 bytes (always finite).
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
    T.IQ2_XXS: (0,),
    T.IQ2_XS: (0,),
    T.IQ2_S: (0,),
    T.IQ3_XXS: (0,),
    T.IQ3_S: (0,),
    T.IQ1_S: (0,),
    T.TQ1_0: (52,),
    T.TQ2_0: (64,),
    **({T.Q1_0: (0,)} if "Q1_0" in T.__members__ else {}),
}
# IQ1_M: the f16 scale's low byte is (byte 49 >> 4) | (byte 51 & 0xF0), its high byte
# (byte 53 >> 4) | (byte 55 & 0xF0): its exponent bits are bits 6-7 of byte 53 and 4-6 of 55.
IQ1_M_SCALE_BYTES = (49, 51, 53, 55)
MXFP4_SCALE_BYTE = 0


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
