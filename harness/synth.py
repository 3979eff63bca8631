"""Writing synthetic Mixtral (or dense llama) GGUF files with random weights.

`synthesize(path, config, file_type, layout, router, seed)` writes a file llama.cpp loads: the
tensors and `llama.*` keys of its llama architecture, a small SentencePiece-style vocabulary, and
random weights of a sane scale in any of the GGML types this harness reads. `plan()` says which
tensors a file will hold (names, GGML types, numpy shapes) without writing anything.

File types (`FILE_TYPES`):
  - plain GGML type names (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K,
    IQ4_NL, IQ4_XS, Q2_K_PURE, and the low-bit IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S,
    IQ1_M, TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0): every weight matrix in that type (a row too short
    for its blocks falls back as llama.cpp's quantizer does);
  - llama.cpp's mixes (Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M): the type of
    each tensor chosen as `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp chooses it.
    `Q2_K` names llama.cpp's Q2_K mix, as `llama-quantize` does; Q2_K everywhere is `Q2_K_PURE`.
    For the per-expert layout of a MoE the mix is llama.cpp's of December 2023, which made
    TheBloke's files (expert ffn_down at the base type): mixtral-8x7b Q4_K_M comes to 26.44 GB
    per-expert, as TheBloke's file does, and 28.45 GB merged, as llama.cpp quantizes it today.
  Norms are F32 and the router (`ffn_gate_inp`) F32 or F16 per `router`, never quantized.

Layouts: "merged" experts are one 3-D tensor per projection (`blk.N.ffn_gate_exps.weight`,
[E, F, D]); "per-expert" (TheBloke's files from before April 2024) one 2-D tensor per expert
(`blk.N.ffn_gate.E.weight`, [F, D]). A config with `expert_count == 0` gives a dense llama.

Weights are generated tensor by tensor, in chunks of rows, straight into the file after a header
written first, so memory stays bounded by a chunk (a few MB) whatever the model's size. Each tensor
has its own random stream, seeded by (`seed`, tensor name). Float weights are drawn from a normal
distribution and quantized with `gguf.quants.quantize` where gguf can quantize the type (and
NVFP4 by a small quantizer here); for the K-quants, IQ and ternary types valid blocks are
generated directly (random quant bits or grid indices, scales chosen so the dequantized values
have the requested standard deviation). llama.cpp's quantizer needs an importance matrix for the
IQ2/IQ1/IQ3_XXS types, which these files need not. Shapes here are numpy order (rows
last): GGUF's dims are the reverse.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pathlib
import shutil
import string
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import gguf
import numpy as np

from harness.errors import UsageError
from harness.gguf_file import PRESETS, MixtralConfig
from harness.quant.types import (
    F16_FIELDS,
    IQ1_M_SCALE_BYTES,
    SUPPORTED_TYPES,
    GGMLType,
    block_size,
    type_size,
)

T = GGMLType
LFT = gguf.LlamaFileType

__all__ = [
    "FILE_TYPES",
    "LAYOUTS",
    "ROUTER_TYPES",
    "FileType",
    "PlannedTensor",
    "build_vocab",
    "plan",
    "random_blocks",
    "resolve_config",
    "synthesize",
    "tensor_bytes",
]


# --------------------------------------------------------------------------------------------
# File types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileType:
    """A `--type`: the default GGML type of weight matrices, and whether llama.cpp's mix applies."""

    name: str
    ftype: int  # llama.cpp's LLAMA_FTYPE, written as general.file_type
    base: GGMLType  # the type of weight matrices the mix does not single out
    mix: bool  # True: llama_tensor_get_type picks each tensor's type; False: every matrix is `base`


def _file_types() -> dict[str, FileType]:
    plain = [
        ("F32", LFT.ALL_F32, T.F32),
        ("F16", LFT.MOSTLY_F16, T.F16),
        ("BF16", LFT.MOSTLY_BF16, T.BF16),
        ("Q8_0", LFT.MOSTLY_Q8_0, T.Q8_0),
        ("Q4_0", LFT.MOSTLY_Q4_0, T.Q4_0),
        ("Q4_1", LFT.MOSTLY_Q4_1, T.Q4_1),
        ("Q5_0", LFT.MOSTLY_Q5_0, T.Q5_0),
        ("Q5_1", LFT.MOSTLY_Q5_1, T.Q5_1),
        ("Q2_K_PURE", LFT.MOSTLY_Q2_K, T.Q2_K),
        ("Q3_K", LFT.MOSTLY_Q3_K_S, T.Q3_K),
        ("Q4_K", LFT.MOSTLY_Q4_K_S, T.Q4_K),
        ("Q5_K", LFT.MOSTLY_Q5_K_S, T.Q5_K),
        ("Q6_K", LFT.MOSTLY_Q6_K, T.Q6_K),
        ("IQ4_NL", LFT.MOSTLY_IQ4_NL, T.IQ4_NL),
        ("IQ4_XS", LFT.MOSTLY_IQ4_XS, T.IQ4_XS),
    ]
    # The low-bit types, where this gguf names them and the harness computes them: every matrix
    # in the type (llama.cpp's own mixes for these ftypes vary the type per tensor; these do not).
    # MXFP4 is llama.cpp's MXFP4_MOE ftype, which quantizes only the experts: here all matrices.
    low_bit = [
        ("IQ2_XXS", "MOSTLY_IQ2_XXS"),
        ("IQ2_XS", "MOSTLY_IQ2_XS"),
        ("IQ2_S", "MOSTLY_IQ2_S"),
        ("IQ3_XXS", "MOSTLY_IQ3_XXS"),
        ("IQ3_S", "MOSTLY_IQ3_S"),
        ("IQ1_S", "MOSTLY_IQ1_S"),
        ("IQ1_M", "MOSTLY_IQ1_M"),
        ("TQ1_0", "MOSTLY_TQ1_0"),
        ("TQ2_0", "MOSTLY_TQ2_0"),
        ("MXFP4", "MOSTLY_MXFP4_MOE"),
        ("NVFP4", "MOSTLY_NVFP4"),
        ("Q1_0", "MOSTLY_Q1_0"),
    ]
    for name, ftype in low_bit:
        if name in T.__members__ and T[name] in SUPPORTED_TYPES and ftype in LFT.__members__:
            plain.append((name, LFT[ftype], T[name]))
    mixes = [
        ("Q2_K", LFT.MOSTLY_Q2_K, T.Q2_K),
        ("Q3_K_S", LFT.MOSTLY_Q3_K_S, T.Q3_K),
        ("Q3_K_M", LFT.MOSTLY_Q3_K_M, T.Q3_K),
        ("Q3_K_L", LFT.MOSTLY_Q3_K_L, T.Q3_K),
        ("Q4_K_S", LFT.MOSTLY_Q4_K_S, T.Q4_K),
        ("Q4_K_M", LFT.MOSTLY_Q4_K_M, T.Q4_K),
        ("Q5_K_S", LFT.MOSTLY_Q5_K_S, T.Q5_K),
        ("Q5_K_M", LFT.MOSTLY_Q5_K_M, T.Q5_K),
    ]
    types = {name: FileType(name, int(ft), base, False) for name, ft, base in plain}
    types.update({name: FileType(name, int(ft), base, True) for name, ft, base in mixes})
    return types


FILE_TYPES: dict[str, FileType] = _file_types()
LAYOUTS: tuple[str, ...] = ("merged", "per-expert")
ROUTER_TYPES: dict[str, GGMLType] = {"f32": T.F32, "f16": T.F16}
MIN_VOCAB = 3 + 256  # <unk> <s> </s> and the byte tokens
MAX_VOCAB = 1 << 22  # harness.gguf_file.MAX_ARRAY_ITEMS: the longest array the loader reads


def resolve_config(config: MixtralConfig | str) -> MixtralConfig:
    """A preset name or a config -> a checked config; UsageError for anything unusable."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise UsageError(None, "preset", f"unknown preset {config!r} (presets: {', '.join(PRESETS)})")
        config = PRESETS[config]
    if not isinstance(config, MixtralConfig):
        raise UsageError(
            None, "config", f"expected a MixtralConfig or a preset name, got {type(config).__name__}"
        )
    _check_config(config)
    return config


# Bounds of what can be written (and what `open_gguf` reads back): GGUF stores these keys as
# uint32 and the loader reads no tokenizer array longer than its MAX_ARRAY_ITEMS.
U32_FIELDS = (
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "head_count",
    "head_count_kv",
    "vocab_size",
    "expert_count",
    "expert_used_count",
    "context_length",
    "rope_dimension_count",
)
MAX_TENSORS = 1 << 17  # a per-expert DeepSeek-V3 (61 layers x 256 experts) has about 47,000
MAX_PARAMETERS = 1 << 44  # 17.6 T: far past any disk here; a config past it is a typo


def _tensor_count(c: MixtralConfig, layout: str) -> int:
    per_layer = 9 if c.expert_count == 0 else 10 if layout == "merged" else 7 + 3 * c.expert_count
    return 3 + c.block_count * per_layer


def _parameter_count(c: MixtralConfig) -> int:
    d, f, kv = c.embedding_length, c.feed_forward_length, c.head_count_kv * c.head_dim
    ffn = 3 * d * f * max(c.expert_count, 1) + c.expert_count * d
    return 2 * c.vocab_size * d + d + c.block_count * (2 * d * d + 2 * kv * d + 2 * d + ffn)


def _check_config(c: MixtralConfig) -> None:
    def bad(field: str, problem: str) -> UsageError:
        return UsageError(None, f"config.{field}", problem)

    for field in U32_FIELDS:
        value = getattr(c, field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise bad(field, f"must be an integer, got {value!r}")
        if value is not None and value > 0xFFFFFFFF:
            raise bad(field, f"{value} does not fit the uint32 GGUF stores it in")
    for field in ("rms_eps", "rope_freq_base"):
        value = getattr(c, field)
        stored = float(np.float32(value)) if isinstance(value, (int, float)) else math.nan
        if not (math.isfinite(stored) and stored > 0):
            raise bad(field, f"must be positive and finite as a float32, got {value!r}")
    for field in ("block_count", "embedding_length", "feed_forward_length", "head_count", "head_count_kv"):
        if getattr(c, field) < 1:
            raise bad(field, f"must be at least 1, got {getattr(c, field)}")
    if c.context_length < 1:
        raise bad("context_length", f"must be at least 1, got {c.context_length}")
    if c.embedding_length % c.head_count:
        raise bad("head_count", f"{c.head_count} heads do not divide embedding_length {c.embedding_length}")
    if c.head_count % c.head_count_kv:
        raise bad("head_count_kv", f"{c.head_count_kv} KV heads do not divide head_count {c.head_count}")
    if c.head_dim % 2:
        raise bad("head_count", f"head_dim {c.head_dim} must be even for RoPE")
    if c.rope_dim < 2 or c.rope_dim % 2 or c.rope_dim > c.head_dim:
        raise bad("rope_dimension_count", f"{c.rope_dim} must be even and in [2, head_dim={c.head_dim}]")
    if c.vocab_size > MAX_VOCAB:
        raise bad(
            "vocab_size", f"{c.vocab_size} tokens, more than the {MAX_VOCAB} a GGUF vocabulary may hold here"
        )
    if c.vocab_size < MIN_VOCAB:
        raise bad(
            "vocab_size", f"must be at least {MIN_VOCAB} (3 special and 256 byte tokens), got {c.vocab_size}"
        )
    if c.expert_count < 0:
        raise bad("expert_count", f"must be 0 (dense) or more, got {c.expert_count}")
    if c.expert_count > 0 and not 1 <= c.expert_used_count <= c.expert_count:
        raise bad(
            "expert_used_count",
            f"{c.expert_used_count} used experts must be in [1, expert_count={c.expert_count}]",
        )
    params = _parameter_count(c)
    if params > MAX_PARAMETERS:
        raise bad(
            "block_count", f"the config has {params} parameters, more than the {MAX_PARAMETERS} allowed"
        )


def _resolve_file_type(file_type: str | FileType) -> FileType:
    if isinstance(file_type, FileType):
        return file_type
    key = str(file_type).upper()
    if key not in FILE_TYPES:
        raise UsageError(
            None, "file type", f"unknown file type {file_type!r} (types: {', '.join(FILE_TYPES)})"
        )
    return FILE_TYPES[key]


def _resolve_layout(layout: str) -> str:
    key = str(layout).lower().replace("_", "-")
    if key not in LAYOUTS:
        raise UsageError(None, "layout", f"unknown layout {layout!r} (layouts: {', '.join(LAYOUTS)})")
    return key


def _resolve_router(router: str | GGMLType) -> GGMLType:
    key = router.name if isinstance(router, GGMLType) else str(router)
    if key.lower() not in ROUTER_TYPES:
        raise UsageError(None, "router", f"unknown router type {router!r} (router types: f32, f16)")
    return ROUTER_TYPES[key.lower()]


# --------------------------------------------------------------------------------------------
# Plan: which tensors, of which type and shape
# --------------------------------------------------------------------------------------------


class PlannedTensor(NamedTuple):
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]  # numpy order: rows last

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape[:-1]) * self.shape[-1]
        return n // block_size(self.qtype) * type_size(self.qtype)

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)


def _tensor_shapes(c: MixtralConfig, layout: str) -> list[tuple[str, tuple[int, ...]]]:
    D, F, V, E = c.embedding_length, c.feed_forward_length, c.vocab_size, c.expert_count
    kv_dim = c.head_count_kv * c.head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (V, D))]
    for i in range(c.block_count):
        b = f"blk.{i}."
        shapes += [
            (b + "attn_norm.weight", (D,)),
            (b + "attn_q.weight", (D, D)),
            (b + "attn_k.weight", (kv_dim, D)),
            (b + "attn_v.weight", (kv_dim, D)),
            (b + "attn_output.weight", (D, D)),
            (b + "ffn_norm.weight", (D,)),
        ]
        if E == 0:
            shapes += [
                (b + "ffn_gate.weight", (F, D)),
                (b + "ffn_up.weight", (F, D)),
                (b + "ffn_down.weight", (D, F)),
            ]
        elif layout == "merged":
            shapes += [
                (b + "ffn_gate_inp.weight", (E, D)),
                (b + "ffn_gate_exps.weight", (E, F, D)),
                (b + "ffn_down_exps.weight", (E, D, F)),
                (b + "ffn_up_exps.weight", (E, F, D)),
            ]
        else:
            shapes.append((b + "ffn_gate_inp.weight", (E, D)))
            for e in range(E):
                shapes += [
                    (b + f"ffn_gate.{e}.weight", (F, D)),
                    (b + f"ffn_down.{e}.weight", (D, F)),
                    (b + f"ffn_up.{e}.weight", (F, D)),
                ]
    shapes += [("output_norm.weight", (D,)), ("output.weight", (V, D))]
    return shapes


def plan(
    config: MixtralConfig | str = "tiny",
    file_type: str | FileType = "Q4_K_M",
    layout: str = "merged",
    router: str = "f32",
) -> list[PlannedTensor]:
    """The tensors `synthesize` writes, in file order: name, GGML type, numpy shape."""
    c = resolve_config(config)
    ft = _resolve_file_type(file_type)
    layout = _resolve_layout(layout)
    router_type = _resolve_router(router)
    count = _tensor_count(c, layout)
    if count > MAX_TENSORS:
        raise UsageError(
            None,
            "config.block_count",
            f"{c.block_count} layers make {count} tensors in the {layout} layout, more than the "
            f"{MAX_TENSORS} allowed",
        )
    # TheBloke's per-expert files were quantized before llama.cpp's mix applied to MoE experts.
    state = _MixState(legacy_moe=layout == "per-expert" and c.is_moe)
    out = []
    for name, shape in _tensor_shapes(c, layout):
        if len(shape) == 1:
            qtype = T.F32  # norms
        elif "ffn_gate_inp" in name:
            qtype = router_type
        else:
            qtype = _matrix_type(c, ft, name, shape, state)
        out.append(PlannedTensor(name, qtype, shape))
    return out


def tensor_bytes(tensors: list[PlannedTensor], alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> int:
    """Bytes of the tensor-data section (each tensor padded to `alignment`)."""
    return sum(-(-t.nbytes // alignment) * alignment for t in tensors)


@dataclass
class _MixState:
    legacy_moe: bool = False  # the December 2023 mix (see _mix_type)
    i_attention_wv: int = 0


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _matrix_type(
    c: MixtralConfig, ft: FileType, name: str, shape: tuple[int, ...], st: _MixState
) -> GGMLType:
    """llama.cpp's llama_tensor_get_type for a weight matrix, for the K-quant mixes it names."""
    new = ft.base
    if new in (T.F32, T.F16, T.BF16):
        return new  # not quantized: no mix, no fallback
    if ft.mix:
        new = _mix_type(c, ft, name, shape, st)
    return _fallback(new, shape[-1])


def _mix_type(c: MixtralConfig, ft: FileType, name: str, shape: tuple[int, ...], st: _MixState) -> GGMLType:
    # Follows llama_tensor_get_type_impl (llama.cpp src/llama-quant.cpp), for the llama arch
    # (not Falcon), without an imatrix, for the ftypes of FILE_TYPES' mixes. With
    # `st.legacy_moe` it follows llama.cpp as of December 2023, which made TheBloke's per-expert
    # Mixtral files: its "ffn_down.weight" test missed "blk.N.ffn_down.E.weight", so expert
    # ffn_down kept the base type (fixed by llama.cpp PRs #4872/#4927, January 2024), and
    # attn_output was not yet raised to Q5_K for 8 experts (PR #4906).
    f = ft.ftype
    new = ft.base
    n_expert = c.expert_count
    n_gqa = c.head_count // c.head_count_kv
    n_layer = c.block_count
    is_70b = n_expert == 0 and n_layer == 80 and c.head_count != c.head_count_kv
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1

    if name == "output.weight":
        # output has its own tensor here, so token_embd is not tied to it
        if shape[-1] % block_size(new):
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if name == "token_embd.weight":
        return new
    if "attn_v.weight" in name:
        i, n = st.i_attention_wv, n_layer  # one attn_v per layer, in layer order
        if f == LFT.MOSTLY_Q2_K:
            new = T.Q4_K if n_gqa >= 4 else T.Q3_K
        elif f == LFT.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < 2 else T.Q4_K
        elif f == LFT.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif f in (LFT.MOSTLY_Q4_K_M, LFT.MOSTLY_Q5_K_M) and _use_more_bits(i, n):
            new = T.Q6_K
        elif f == LFT.MOSTLY_Q4_K_S and i < 4:
            new = T.Q5_K
        if is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if n_expert == 8:
            new = T.Q8_0
        st.i_attention_wv += 1
        return new
    if "attn_k.weight" in name:
        return T.Q8_0 if n_expert == 8 else new
    if "attn_q.weight" in name:
        return new
    if "ffn_down" in name:
        if st.legacy_moe:
            return new
        if f == LFT.MOSTLY_Q2_K:
            new = T.Q3_K
        elif f == LFT.MOSTLY_Q3_K_M:
            new = T.Q5_K if layer < n_layer // 16 else T.Q4_K
        elif f == LFT.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif f in (LFT.MOSTLY_Q4_K_M, LFT.MOSTLY_Q5_K_M):
            if _use_more_bits(layer, n_layer):
                new = T.Q6_K
        elif f == LFT.MOSTLY_Q4_K_S and layer < n_layer // 8:
            new = T.Q5_K
        return new
    if "attn_output.weight" in name:
        if n_expert == 8 and not st.legacy_moe:
            if f in (
                LFT.MOSTLY_Q2_K,
                LFT.MOSTLY_Q3_K_S,
                LFT.MOSTLY_Q3_K_M,
                LFT.MOSTLY_Q4_K_S,
                LFT.MOSTLY_Q4_K_M,
            ):
                new = T.Q5_K
        elif f == LFT.MOSTLY_Q2_K:
            new = T.Q3_K
        elif f == LFT.MOSTLY_Q3_K_M:
            new = T.Q4_K
        elif f == LFT.MOSTLY_Q3_K_L:
            new = T.Q5_K
        return new
    return new  # ffn_gate, ffn_up: the base type for these mixes


_FALLBACK = {
    T.IQ1_S: T.IQ4_NL,
    T.IQ1_M: T.IQ4_NL,
    T.IQ2_XXS: T.IQ4_NL,
    T.IQ2_XS: T.IQ4_NL,
    T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL,
    T.IQ3_S: T.IQ4_NL,
    T.TQ1_0: T.Q4_0,
    T.TQ2_0: T.Q4_0,
    T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


def _fallback(qtype: GGMLType, ncols: int) -> GGMLType:
    """llama.cpp's tensor_type_fallback: a type whose blocks fit a row of `ncols`."""
    if ncols % block_size(qtype) == 0:
        return qtype
    # (llama.cpp has no fallback for NVFP4 and Q1_0 and refuses such a row: F16 here)
    new = _FALLBACK.get(qtype, qtype)
    return new if ncols % block_size(new) == 0 else T.F16


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

SPACE = "\u2581"  # SentencePiece's "▁"
SINGLE_CHARS = SPACE + string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation

# A few paragraphs of plain English for the merges (written for this file).
_TEXT = """
The harness loads a model from a file and runs it on the devices it was given. Every tensor of
every layer should stay where the placement put it, and the router of each layer should sit on the
same device as the experts it chooses between. When a tensor moves to the wrong device, the forward
pass fails or it quietly copies data back and forth, and both are bugs that users find long before
the tests do. This is why the tests record the device of every value that an operation reads or
writes, and why they compare that record with the plan that the user asked for.
A small model is enough to find most of these problems. It has two layers, four experts and a short
vocabulary, and it runs in less than a second on a laptop. The large model has the same shapes as
the real one, so its file is about as big, but its weights are random numbers with a sensible
scale. The words in this text are here only to give the tokenizer some pieces that look like the
ones in a real vocabulary: the, and, that, with, from, this, for, have, will, there, their, which,
when, where, what, would, could, should, about, after, before, other, these, those, into, over,
under, between, through, during, without, within, again, against, because, while, each, every.
Numbers such as 1, 2, 10, 42, 100 and 2024 appear as well, with commas, periods, colons; quotes,
"brackets" (round ones) and dashes - so that the pieces cover the common characters of English.
Once upon a time there was a quick brown fox that jumped over the lazy dog, and the dog did not
mind at all, because it was asleep in the warm sun by the river near the old stone house.
"""


def build_vocab(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style tokens, scores and token types, exactly `vocab_size` of them.

    `<unk>`, `<s>`, `</s>`, the 256 byte tokens, the single characters, then pieces made by
    BPE-like merges over a built-in English text and, when those run out, systematically (a piece
    followed by a letter). Every multi-character piece is the concatenation of two pieces before
    it, which is how llama.cpp's SPM tokenizer reaches it; later merges score lower.
    """
    if vocab_size < MIN_VOCAB:
        raise UsageError(None, "vocab_size", f"must be at least {MIN_VOCAB}, got {vocab_size}")
    TT = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL] + [TT.BYTE] * 256
    n_pieces = vocab_size - len(tokens)
    chars = list(SINGLE_CHARS[:n_pieces])
    merged = _merged_pieces(n_pieces - len(chars), set(chars))
    pieces = chars + merged
    tokens += pieces
    types += [TT.NORMAL] * len(pieces)
    # merges: 0, -1, -2, ... in order; single characters below every merge; specials and bytes 0
    scores = [0.0] * MIN_VOCAB + [-float(len(merged) + i) for i in range(len(chars))]
    scores += [-float(i) for i in range(len(merged))]
    assert len(tokens) == len(scores) == len(types) == vocab_size
    return tokens, scores, [int(t) for t in types]


def _merged_pieces(n: int, chars: set[str]) -> list[str]:
    if n <= 0:
        return []
    known = set(chars)
    out: list[str] = []
    # BPE over the words of the text (each word with the space marker in front).
    words = Counter(SPACE + w for w in _TEXT.split())
    syms = [list(w) for w in words]  # symbols of each distinct word
    freq = list(words.values())
    while len(out) < n:
        pairs: Counter[tuple[str, str]] = Counter()
        for s, f in zip(syms, freq, strict=True):
            for a, b in zip(s, s[1:], strict=False):
                pairs[a, b] += f
        pairs = Counter({p: k for p, k in pairs.items() if p[0] in known and p[1] in known})
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        piece = a + b
        if piece not in known:
            known.add(piece)
            out.append(piece)
        for s in syms:
            j = 0
            while j < len(s) - 1:
                if s[j] == a and s[j + 1] == b:
                    s[j : j + 2] = [piece]
                j += 1
    # Then systematically: each piece of letters (in order) followed by each lowercase letter.
    letters = string.ascii_lowercase
    bases = [p for p in [SPACE, *letters, *out] if p in known]
    k = 0
    while len(out) < n:
        base = bases[k]
        k += 1
        for ch in letters:
            piece = base + ch
            if piece not in known:
                known.add(piece)
                out.append(piece)
                bases.append(piece)
                if len(out) == n:
                    break
    return out


# --------------------------------------------------------------------------------------------
# Random blocks
# --------------------------------------------------------------------------------------------

_D_TARGET = 2.0**-13  # aim the f16 super-block scale d at about this (a normal f16)
_IQ4_VALUES = np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.float64)
# gguf.quants can quantize floats to these; the rest get directly generated blocks.
_FLOAT_QUANTIZED = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0) + tuple(
    T[name] for name in ("MXFP4",) if name in T.__members__ and T[name] in SUPPORTED_TYPES
)
# Types whose random bytes are valid blocks once their scale is set (grid indices, signs, bits,
# base-3 digits and sub-scales cover their whole range; TQ2_0's unused code 3 is redrawn): the
# scale is chosen from the values' RMS at scale 1.
_SCALE_ONLY = tuple(
    T[name]
    for name in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ3_S", "IQ2_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q1_0")
    if name in T.__members__ and T[name] in SUPPORTED_TYPES
)
# NVFP4's smallest scale is too coarse for random codes at small std: its values are quantized
# here, as llama.cpp's reference quantizer does (`_quantize_nvfp4`).
_NVFP4 = tuple(T[name] for name in ("NVFP4",) if name in T.__members__ and T[name] in SUPPORTED_TYPES)


@dataclass(frozen=True)
class _Layout:
    """A directly generated type: statistics of its quant values, range of its integer scales."""

    q_mean: float  # mean of the quant value (before the sub-block scale)
    q_var: float  # variance of the quant value
    scale_max: int  # largest integer sub-block scale magnitude
    signed: bool  # True: signed scales (mean 0 by symmetry); False: scale and min (Q2_K/Q4_K/Q5_K)
    min_max: int = 0  # largest integer min (unsigned layouts)


_LAYOUTS = {
    T.Q2_K: _Layout(1.5, 1.25, 15, False, 15),
    T.Q3_K: _Layout(-0.5, 5.25, 31, True),
    T.Q4_K: _Layout(7.5, 21.25, 63, False, 63),
    T.Q5_K: _Layout(15.5, 85.25, 63, False, 63),
    T.Q6_K: _Layout(-0.5, 341.25, 127, True),
    T.IQ4_NL: _Layout(float(_IQ4_VALUES.mean()), float(_IQ4_VALUES.var()), 1, True),
    T.IQ4_XS: _Layout(float(_IQ4_VALUES.mean()), float(_IQ4_VALUES.var()), 31, True),
}
RANDOM_BLOCK_TYPES: tuple[GGMLType, ...] = _FLOAT_QUANTIZED + tuple(_LAYOUTS) + _SCALE_ONLY + _NVFP4


def random_blocks(
    qtype: GGMLType, shape: tuple[int, ...], rng: np.random.Generator, std: float
) -> np.ndarray:
    """Random values of standard deviation about `std` (mean about 0) in `qtype`'s block layout.

    Returns uint8 of gguf's byte shape (`shape` with its last dim counted in bytes). For the
    K-quants and IQ4 types, every block is valid: random quant bits, f16 scales finite and positive.
    """
    qtype = GGMLType(qtype)
    shape = tuple(int(s) for s in shape)
    if qtype not in RANDOM_BLOCK_TYPES:
        raise UsageError(None, "qtype", f"random_blocks cannot make {qtype.name} blocks")
    if not shape or shape[-1] % block_size(qtype):
        raise UsageError(
            None, "shape", f"row length of {shape} is not a multiple of {qtype.name}'s block size"
        )
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    if qtype in _FLOAT_QUANTIZED or qtype in _NVFP4:
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        if qtype in _NVFP4:
            return _quantize_nvfp4(values.reshape(-1, 64)).reshape(byte_shape)
        return gguf.quants.quantize(values, qtype).view(np.uint8).reshape(byte_shape)
    n_blocks = math.prod(shape) // block_size(qtype)
    blocks = _random_block_bytes(qtype, rng, n_blocks)
    if qtype in _SCALE_ONLY:
        jitter = rng.uniform(0.75, 1.25, size=n_blocks)  # per-block scales vary, as in real files
        _set_scale(qtype, blocks, std / (_unit_rms(qtype) * math.sqrt(_JITTER_MS)) * jitter)
    else:
        _fill_scales(qtype, blocks, rng, std)
    return blocks.reshape(byte_shape)


def _random_block_bytes(qtype: GGMLType, rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """[n_blocks, type_size] random bytes (scales still to be set)."""
    blocks = _random_bytes(rng, n_blocks * type_size(qtype)).reshape(n_blocks, type_size(qtype))
    if qtype == T.TQ2_0:  # 2-bit codes 0..2 (-1, 0, 1): a code 3 (+2) becomes a random one of those
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
        crumbs = (blocks[:, :64, None] >> shifts) & 3
        redraw = rng.integers(0, 3, size=crumbs.shape, dtype=np.uint8)
        crumbs = np.where(crumbs == 3, redraw, crumbs)
        blocks[:, :64] = np.bitwise_or.reduce(crumbs << shifts, axis=-1)
    return blocks


def _set_scale(qtype: GGMLType, blocks: np.ndarray, d: np.ndarray) -> None:
    """Write the block scale `d` (one per block, made finite and positive) into `blocks`."""
    bits = _f16(d).view(np.uint16)
    if qtype == T.IQ1_M:  # the f16's four nibbles are the top nibbles of four sub-scale bytes
        for k, at in enumerate(IQ1_M_SCALE_BYTES):
            blocks[:, at] = (blocks[:, at] & 0x0F) | (((bits >> (4 * k)) & 0xF) << 4).astype(np.uint8)
        return
    (off,) = F16_FIELDS[qtype]
    blocks[:, off : off + 2] = bits.view(np.uint8).reshape(-1, 2)


_MXFP4_VALUES = np.array((0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12), dtype=np.float64)


def _quantize_nvfp4(values: np.ndarray) -> np.ndarray:
    """[N, 64] float32 -> [N, 36] NVFP4 blocks: per 16 values the UE4M3 scale nearest amax / 6
    (the largest E2M1 value), each value the nearest code at that scale."""
    n = values.shape[0]
    sub = values.reshape(n, 4, 16).astype(np.float64)
    codes = np.arange(1, 0x7F)
    scales = np.array([_ue4m3(c) for c in codes])  # increasing
    want = np.abs(sub).max(axis=-1) / 12  # per sub-block: value = code value * scale, max 12
    pick = np.clip(np.searchsorted(scales, want), 0, len(codes) - 1)
    d = scales[pick][..., None]  # [N, 4, 1]
    q = np.abs(sub[..., None] - _MXFP4_VALUES * d[..., None]).argmin(axis=-1).astype(np.uint8)  # [N, 4, 16]
    out = np.empty((n, 36), dtype=np.uint8)
    out[:, :4] = codes[pick]
    out[:, 4:] = (q[..., :8] | (q[..., 8:] << 4)).reshape(n, 32)
    return out


def _ue4m3(code: int) -> float:
    """NVFP4's scale code -> its value, halved as ggml_ue4m3_to_fp32 does (codes 1..0x7E)."""
    exp, man = (code >> 3) & 0xF, code & 7
    return (man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)) * 0.5


@functools.cache
def _unit_rms(qtype: GGMLType) -> float:
    """The RMS of the values of random blocks of `qtype` whose scale is 1."""
    import torch

    from harness.quant.dequant import dequantize_torch

    n = 4096
    blocks = _random_block_bytes(qtype, np.random.default_rng(0), n)
    _set_scale(qtype, blocks, np.ones(n))
    values = dequantize_torch(torch.from_numpy(blocks), qtype, (n * block_size(qtype),), torch.float64)
    return float(values.square().mean().sqrt())


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    # random_raw is the fastest way to get bytes (several times faster than integers()).
    return rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n]


def _fill_scales(qtype: GGMLType, blocks: np.ndarray, rng: np.random.Generator, std: float) -> None:
    lay = _LAYOUTS[qtype]
    nb = blocks.shape[0]
    jitter = rng.uniform(0.75, 1.25, size=nb)  # per-block d varies, as in real files
    q_rms = math.sqrt(lay.q_var + lay.q_mean**2)
    if qtype == T.IQ4_NL:  # d qs[16]: no sub-block scales, and d stays positive
        d = _f16(std / (q_rms * math.sqrt(_JITTER_MS)) * jitter)
        blocks[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
        return
    n_sub = {T.Q2_K: 16, T.Q3_K: 16, T.Q4_K: 8, T.Q5_K: 8, T.Q6_K: 16, T.IQ4_XS: 8}[qtype]
    # Integer sub-block scales in [hi/2, hi], hi as large as lets d stay near _D_TARGET.
    hi = int(min(lay.scale_max, max(1, std / (q_rms * _D_TARGET))))
    lo = max(1, (hi + 1) // 2)
    sc = rng.integers(lo, hi + 1, size=(nb, n_sub), dtype=np.int16)
    cand = np.arange(lo, hi + 1, dtype=np.float64)
    if lay.signed:
        sign = np.where(rng.integers(0, 2, size=(nb, n_sub), dtype=np.int8) == 1, 1, -1).astype(np.int16)
        sc = sc * sign
        unit_var = float((cand**2).mean()) * (lay.q_var + lay.q_mean**2)
        d = _f16(std / math.sqrt(unit_var * _JITTER_MS) * jitter)
    else:
        # value = d*sc*q - dmin*m with m = round(sc*q_mean*d/dmin): mean ~0 in every sub-block
        ratio = hi * lay.q_mean / lay.min_max  # dmin/d so that the largest m fits
        ms_c = np.clip(np.rint(cand * lay.q_mean / ratio), 0, lay.min_max)
        unit_var = float(((cand**2) * lay.q_var + (cand * lay.q_mean - ratio * ms_c) ** 2).mean())
        d = _f16(std / math.sqrt(unit_var * _JITTER_MS) * jitter)
        dmin = _f16(d.astype(np.float64) * ratio)
        m = np.rint(sc * lay.q_mean * (d.astype(np.float64) / dmin.astype(np.float64))[:, None])
        m = np.clip(m, 0, lay.min_max).astype(np.int16)
    if qtype == T.Q2_K:  # scales[16] qs[64] d dmin
        blocks[:, 0:16] = (sc | (m << 4)).astype(np.uint8)
        blocks[:, 80:82] = d.view(np.uint8).reshape(nb, 2)
        blocks[:, 82:84] = dmin.view(np.uint8).reshape(nb, 2)
    elif qtype == T.Q3_K:  # hmask[32] qs[64] scales[12] d
        blocks[:, 96:108] = _pack_q3k_scales(sc + 32)
        blocks[:, 108:110] = d.view(np.uint8).reshape(nb, 2)
    elif qtype in (T.Q4_K, T.Q5_K):  # d dmin scales[12] (qh[32]) qs[128]
        blocks[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
        blocks[:, 2:4] = dmin.view(np.uint8).reshape(nb, 2)
        blocks[:, 4:16] = _pack_k4_scales(sc, m)
    elif qtype == T.Q6_K:  # ql[128] qh[64] scales[16] (int8) d
        blocks[:, 192:208] = sc.astype(np.int8).view(np.uint8)
        blocks[:, 208:210] = d.view(np.uint8).reshape(nb, 2)
    elif qtype == T.IQ4_XS:  # d scales_h(u16) scales_l[4] qs[128]
        u = (sc + 32).astype(np.uint16)  # 6 bits each
        blocks[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
        high = ((u >> 4) & 3) << (2 * np.arange(8, dtype=np.uint16))
        blocks[:, 2:4] = np.bitwise_or.reduce(high, axis=1).astype("<u2").view(np.uint8).reshape(nb, 2)
        low = (u & 0xF).astype(np.uint8)
        blocks[:, 4:8] = low[:, 0::2] | (low[:, 1::2] << 4)


_JITTER_MS = (1.25**3 - 0.75**3) / (3 * 0.5)  # E[j^2] for j ~ U(0.75, 1.25)


def _f16(x: np.ndarray) -> np.ndarray:
    """float -> float16, kept finite and positive (the smallest subnormal at least)."""
    return np.clip(np.asarray(x, dtype=np.float64), 2.0**-24, 65504.0).astype("<f2")


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins into 12 bytes (get_scale_min_k4)."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def _pack_q3k_scales(u: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit scales (biased by 32) into 12 bytes."""
    u = u.astype(np.uint8)
    low = u & 0xF
    high = u >> 4
    out = np.empty((u.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = low[:, 0:8] | (low[:, 8:16] << 4)
    out[:, 8:12] = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 20  # values generated at a time: bounds memory whatever the model's size


def _std_for(t: PlannedTensor) -> float:
    if t.name == "token_embd.weight":
        return 0.02
    return 1.0 / math.sqrt(t.shape[-1])  # 1/sqrt(fan_in): activations keep their scale


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, zlib.crc32(name.encode())])


def _tensor_chunks(t: PlannedTensor, seed: int) -> Iterator[np.ndarray]:
    """The bytes of tensor `t`, a chunk of rows at a time."""
    rng = _tensor_rng(seed, t.name)
    ncols = t.shape[-1]
    rows = math.prod(t.shape[:-1])
    if len(t.shape) == 1:  # norm weights: near 1
        yield (1.0 + 0.02 * rng.standard_normal(ncols, dtype=np.float32)).astype("<f4").view(np.uint8)
        return
    std = _std_for(t)
    step = max(1, CHUNK_ELEMENTS // ncols)
    for r in range(0, rows, step):
        yield random_blocks(t.qtype, (min(step, rows - r), ncols), rng, std)


def synthesize(
    path: str | os.PathLike,
    config: MixtralConfig | str = "tiny",
    file_type: str = "Q4_K_M",
    layout: str = "merged",
    router: str = "f32",
    seed: int = 0,
    progress: bool = False,
) -> pathlib.Path:
    """Write a synthetic GGUF to `path` and return its path; UsageError for bad arguments.

    Header and tensor infos first, then each tensor's data generated a chunk at a time, so memory
    stays bounded by a chunk whatever the model's size. Deterministic for a given `seed`.
    """
    c = resolve_config(config)
    ft = _resolve_file_type(file_type)
    tensors = plan(c, ft, layout, router)
    if not isinstance(seed, int) or seed < 0:
        raise UsageError(None, "seed", f"must be a non-negative integer, got {seed!r}")
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise UsageError(path, None, f"cannot write here: {path.parent} is not a directory")
    need, free = tensor_bytes(tensors), shutil.disk_usage(path.parent).free
    if need > free:
        raise UsageError(path, None, f"needs {need} bytes of tensor data, the disk has {free} free")

    writer = gguf.GGUFWriter(path, "llama")
    _add_metadata(writer, c, ft)
    for t in tensors:
        writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
    bar = None
    try:
        try:
            writer.write_header_to_file()
        except OSError as e:
            raise UsageError(path, None, f"cannot write: {e.strerror or e}") from e
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None and len(writer.fout) == 1
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=tensor_bytes(tensors), unit="B", unit_scale=True, desc=f"synth {path.name}")
        for t in tensors:
            for chunk in _tensor_chunks(t, seed):
                chunk.tofile(fout)
                if bar is not None:
                    bar.update(chunk.nbytes)
            writer.write_padding(fout, t.nbytes)
        writer.close()
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    finally:
        if bar is not None:
            bar.close()
    return path


def _add_metadata(w: gguf.GGUFWriter, c: MixtralConfig, ft: FileType) -> None:
    kind = f"{c.expert_count}x MoE" if c.is_moe else "dense"
    w.add_name(f"synthetic {kind} llama {ft.name}")
    w.add_file_type(ft.ftype)
    w.add_custom_alignment(gguf.GGUF_DEFAULT_ALIGNMENT)
    if ft.base not in (T.F32, T.F16, T.BF16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.context_length)
    w.add_embedding_length(c.embedding_length)
    w.add_block_count(c.block_count)
    w.add_feed_forward_length(c.feed_forward_length)
    w.add_rope_dimension_count(c.rope_dim)
    w.add_head_count(c.head_count)
    w.add_head_count_kv(c.head_count_kv)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_rope_freq_base(c.rope_freq_base)
    if c.is_moe:
        w.add_expert_count(c.expert_count)
        w.add_expert_used_count(c.expert_used_count)
    w.add_vocab_size(c.vocab_size)
    tokens, scores, types = build_vocab(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
