"""Reading Mixtral (and dense llama) GGUF files.

`open_gguf(path)` returns a `ModelFile`: its `config` (a `MixtralConfig` from the `llama.*`
keys), its `layout` (merged or per-expert experts, or dense), and `tensor(name)` giving a
`QTensor` over the memory-mapped bytes.

The header is parsed here, not by gguf-py's reader, to llama.cpp's standard (`gguf.cpp`,
`llama-model-loader.cpp`): every length, count and size is checked against the bytes left before
it is used, so no claim in a file can make the reader allocate or loop past the file; keys and
tensor names are unique; tensor data lies in the data section in the table's order, aligned,
without gaps or overlap; every tensor's type is one this harness computes. Then the config must
be finite and in range and agree with the tensors present, the tokenizer arrays with the
embedding. Every refusal is a `HarnessError` subclass naming the file and the key or tensor.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType

from harness.errors import GGUFFormatError, GGUFMetadataError, GGUFTensorError, UnsupportedTypeError, shown
from harness.paths import check_input_file
from harness.quant.qtensor import QTensor
from harness.quant.types import (
    F16_FIELDS,
    FLOAT_TYPES,
    IQ1_M_SCALE_BYTES,
    MXFP4_SCALE_BYTE,
    SUPPORTED_TYPES,
    GGMLType,
    type_size,
)


@dataclass(frozen=True)
class MixtralConfig:
    """A Mixtral (or, with expert_count 0, a dense llama) as GGUF's `llama.*` keys describe it."""

    block_count: int  # layers
    embedding_length: int  # D
    feed_forward_length: int  # F, per expert
    head_count: int  # H
    head_count_kv: int  # KV heads (GQA when < H, MQA when 1)
    vocab_size: int  # V
    expert_count: int = 8  # E (0: dense llama)
    expert_used_count: int = 2  # k
    rms_eps: float = 1e-5
    rope_freq_base: float = 1e6
    rope_dimension_count: int | None = None  # None: head_dim
    context_length: int = 32768

    @property
    def head_dim(self) -> int:
        return self.embedding_length // self.head_count

    @property
    def rope_dim(self) -> int:
        return self.rope_dimension_count or self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 0

    def replace(self, **changes) -> MixtralConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, MixtralConfig] = {
    # Small enough for tests; 256-wide rows so every K-quant and IQ4_XS fits its blocks.
    "tiny": MixtralConfig(
        block_count=2,
        embedding_length=256,
        feed_forward_length=512,
        head_count=4,
        head_count_kv=2,
        vocab_size=384,
        expert_count=4,
        expert_used_count=2,
        rms_eps=1e-5,
        rope_freq_base=1e6,
        context_length=512,
    ),
    # The real shapes of Mixtral-8x7B-v0.1.
    "mixtral-8x7b": MixtralConfig(
        block_count=32,
        embedding_length=4096,
        feed_forward_length=14336,
        head_count=32,
        head_count_kv=8,
        vocab_size=32000,
        expert_count=8,
        expert_used_count=2,
        rms_eps=1e-5,
        rope_freq_base=1e6,
        context_length=32768,
    ),
}


# Reading

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 24  # magic, version, tensor count, key count
MIN_KV_BYTES = 8 + 4 + 1  # key length (an empty key), value type, a 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length (an empty name), n_dims, one dim, type, offset
MAX_DIMS = 4
MAX_NAME_BYTES = 63  # llama.cpp's GGML_MAX_NAME (64) less its terminating NUL
MAX_ELEMENTS = 2**63 - 1  # llama.cpp: a tensor's element count must fit an int64
# No tokenizer array comes near this (the largest vocabularies hold about 262k tokens); a length
# field claiming more is broken, and refusing it bounds the time and memory of the parse.
MAX_ARRAY_ITEMS = 2**22
DEFAULT_ALIGNMENT = 32
U32_MAX = 2**32 - 1
ARCHITECTURES = ("llama",)  # the graphs this harness computes

LAYOUTS = ("merged", "per-expert", "dense")
EXPERT_KINDS = ("gate", "up", "down")

V = GGUFValueType
# Metadata value types of a fixed size: struct format and bytes.
_SCALARS: dict[int, tuple[str, int]] = {
    V.UINT8: ("<B", 1),
    V.INT8: ("<b", 1),
    V.UINT16: ("<H", 2),
    V.INT16: ("<h", 2),
    V.UINT32: ("<I", 4),
    V.INT32: ("<i", 4),
    V.FLOAT32: ("<f", 4),
    V.BOOL: ("<B", 1),
    V.UINT64: ("<Q", 8),
    V.INT64: ("<q", 8),
    V.FLOAT64: ("<d", 8),
}
_NUMPY = {
    V.UINT8: "<u1",
    V.INT8: "<i1",
    V.UINT16: "<u2",
    V.INT16: "<i2",
    V.UINT32: "<u4",
    V.INT32: "<i4",
    V.FLOAT32: "<f4",
    V.BOOL: "<u1",
    V.UINT64: "<u8",
    V.INT64: "<i8",
    V.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: where its blocks are and what they hold."""

    name: str
    shape: tuple[int, ...]  # numpy order (GGUF's dims reversed: rows last)
    qtype: GGMLType
    start: int  # absolute file offset of its data
    nbytes: int


class _Cursor:
    """Reads the header of a mapped GGUF file; every length is checked against the bytes left
    before it is used, so no claim in the file can make it allocate or loop past the file."""

    def __init__(self, buf: memoryview, path: str):
        self.buf = buf
        self.path = path
        self.pos = 0
        self.where = "header"  # the field being read, for errors

    def fail(self, problem: str, field: str | None = None) -> GGUFFormatError:
        return GGUFFormatError(self.path, field or self.where, problem)

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left:
            raise self.fail(
                f"{what} needs {n} bytes at offset {self.pos}, but only {self.left} are left (truncated?)"
            )
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, vtype: int, what: str):
        fmt, size = _SCALARS[vtype]
        value = struct.unpack(fmt, self.take(size, what))[0]
        if vtype == V.BOOL:
            return bool(value)
        return float(value) if vtype in (V.FLOAT32, V.FLOAT64) else value

    def u32(self, what: str) -> int:
        return self.scalar(V.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(V.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        # surrogateescape: bytes that are not UTF-8 survive .encode("utf-8", "surrogateescape")
        return bytes(self.take(n, what)).decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int, key: str):
        if vtype == V.STRING:
            return self.string("a string value")
        if vtype in _SCALARS:
            return self.scalar(vtype, "a value")
        if vtype != V.ARRAY:
            raise self.fail(f"unknown value type {vtype}")
        item_type = self.u32("the array's item type")
        n = self.u64("the array's length")
        if n > MAX_ARRAY_ITEMS:
            raise self.fail(f"an array of {n} items, more than the {MAX_ARRAY_ITEMS} allowed")
        if item_type == V.STRING:
            if n * 8 > self.left:  # each string needs at least its 8-byte length
                raise self.fail(
                    f"an array of {n} strings cannot fit in the {self.left} bytes left (truncated?)"
                )
            return [self.string(f"item {i}") for i in range(n)]
        if item_type not in _SCALARS:
            problem = (
                "arrays of arrays are not allowed"
                if item_type == V.ARRAY
                else f"unknown array item type {item_type}"
            )
            raise self.fail(problem)
        size = _SCALARS[item_type][1]
        data = self.take(n * size, f"an array of {n} items")
        values = np.frombuffer(data, dtype=_NUMPY[item_type]).tolist()
        return [bool(v) for v in values] if item_type == V.BOOL else values


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _check_size_and_kind(path: str) -> int:
    """The size of `path`, a regular file; anything else (absent, a folder, a FIFO, a device) is
    refused before it is opened, so nothing blocks or reads without end."""
    return check_input_file(path, error=GGUFFormatError).stat().st_size


class _GGUF:
    """The parsed header of a GGUF file over a copy-on-write memory map of it."""

    def __init__(self, path: str, computable_only: bool = True):
        self.path = path
        size = _check_size_and_kind(path)
        if size < HEADER_BYTES:
            with open(path, "rb") as f:
                head = f.read(4)
            if head != GGUF_MAGIC[: len(head)] or not head:
                _check_magic(path, head)
            raise GGUFFormatError(
                path, "header", f"truncated: {size} bytes, a GGUF header needs {HEADER_BYTES}"
            )
        # copy-on-write: writable views for torch.from_numpy, the file itself is never changed
        self.data = np.memmap(path, dtype=np.uint8, mode="c")
        cur = _Cursor(memoryview(self.data), path)
        _check_magic(path, bytes(cur.take(4, "the magic")))
        self.version = cur.u32("the version")
        if self.version not in SUPPORTED_VERSIONS:
            if self.version & 0xFFFF == 0:
                raise GGUFFormatError(path, "version", "big-endian GGUF files are not supported")
            raise GGUFFormatError(path, "version", f"GGUF version {self.version} is not supported (2 or 3)")
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the key count")
        if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > cur.left:
            raise GGUFFormatError(
                path,
                "header",
                f"claims {n_tensors} tensors and {n_kv} keys, more than its {size} bytes can hold (truncated?)",
            )
        self.metadata: dict[str, Any] = {}
        self.types: dict[str, int] = {}
        key = None
        for i in range(n_kv):
            cur.where = f"key #{i}" if key is None else f"key #{i} (after {shown(key)})"
            key = cur.string("a key")
            cur.where = key or f"key #{i} (an empty name)"
            if key in self.metadata:
                raise cur.fail("appears twice")
            vtype = cur.u32("the value type")
            self.metadata[key] = cur.value(vtype, key)
            self.types[key] = vtype
        self.alignment = self._alignment()
        self.tensors: dict[str, TensorInfo] = {}
        self._read_tensor_table(cur, n_tensors, size, computable_only)

    def _alignment(self) -> int:
        key = "general.alignment"
        if key not in self.metadata:
            return DEFAULT_ALIGNMENT
        value = self.metadata[key]
        if self.types[key] != V.UINT32:
            raise GGUFMetadataError(self.path, key, f"must be a uint32, got {shown(value)}")
        if value <= 0 or value & (value - 1):
            raise GGUFMetadataError(self.path, key, f"must be a power of 2, got {value}")
        return value

    def _read_tensor_table(self, cur: _Cursor, n_tensors: int, size: int, computable_only: bool) -> None:
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            cur.where = f"tensor #{i}"
            name = cur.string("a tensor name")
            if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
                raise cur.fail(f"tensor name {shown(name)} is longer than {MAX_NAME_BYTES} bytes")
            label = name or f"tensor #{i} (an empty name)"  # what errors call it
            if name in names:
                raise GGUFTensorError(self.path, label, "appears twice in the tensor table")
            names.add(name)
            cur.where = label
            n_dims = cur.u32("the dimension count")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFTensorError(self.path, label, f"has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [cur.u64("a dimension") for _ in range(n_dims)]
            if any(d <= 0 for d in dims):
                raise GGUFTensorError(self.path, label, f"has a dimension that is not positive: {dims}")
            n_elements = math.prod(dims)
            if n_elements > MAX_ELEMENTS:
                raise GGUFTensorError(self.path, label, f"has {n_elements} elements, more than 2^63 - 1")
            raw_type = cur.u32("the type")
            offset = cur.u64("the data offset")
            infos.append((name, label, dims, raw_type, offset))
        data_start = _pad(cur.pos, self.alignment)
        expected = 0  # llama.cpp: each tensor starts where the one before ends, padded to the alignment
        for name, label, dims, raw_type, offset in infos:
            qtype = _tensor_type(self.path, label, raw_type, computable_only)
            block, type_bytes = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise GGUFTensorError(
                    self.path,
                    label,
                    f"row length {dims[0]} is not a multiple of the {qtype.name} block size {block}",
                )
            nbytes = math.prod(dims) // block * type_bytes
            if offset != expected:
                raise GGUFTensorError(
                    self.path,
                    label,
                    f"data offset {offset}, expected {expected}: tensor data must follow the table's "
                    f"order, each tensor padded to {self.alignment} bytes, without gaps or overlap",
                )
            end = data_start + offset + nbytes
            if end > size:
                raise GGUFTensorError(
                    self.path, label, f"data ends at byte {end}, past the end of the file ({size} bytes)"
                )
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes)
            expected += _pad(nbytes, self.alignment)


def _check_magic(path: str, head: bytes) -> None:
    if head != GGUF_MAGIC:
        raise GGUFFormatError(
            path, "magic", f"not a GGUF file: starts with {head[:4]!r}, expected {GGUF_MAGIC!r}"
        )


# GGML types llama.cpp writes (ggml.h of llama-cpp-python 0.3.36) that gguf may not name yet.
GGML_TYPES_NEWER_THAN_GGUF = {
    39: "MXFP4",
    40: "NVFP4",
    41: "Q1_0",
    42: "Q2_0",
}


def _tensor_type(path: str, name: str, raw_type: int, computable_only: bool) -> GGMLType:
    """The tensor's GGML type; with `computable_only`, refused unless this harness computes it."""
    try:
        qtype = GGMLType(raw_type)
    except ValueError:
        newer = GGML_TYPES_NEWER_THAN_GGUF.get(raw_type)
        if newer:
            raise UnsupportedTypeError(
                path,
                name,
                f"type {newer} (GGML type id {raw_type}) cannot be computed by this harness: the "
                "installed gguf package does not know it",
            ) from None
        raise GGUFTensorError(path, name, f"unknown GGML type id {raw_type}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise GGUFTensorError(path, name, f"type {qtype.name} has no known block size")
    if computable_only and qtype not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedTypeError(
            path, name, f"type {qtype.name} cannot be computed by this harness (supported: {supported})"
        )
    return qtype


def _check_vocabulary(path: str, metadata: dict[str, Any], n: int) -> None:
    """The tokenizer arrays, where present, have one entry per row of the embedding (`n`)."""
    kinds = {"tokenizer.ggml.tokens": str, "tokenizer.ggml.scores": float, "tokenizer.ggml.token_type": int}
    for key, kind in kinds.items():
        if key not in metadata:
            continue
        values = metadata[key]
        if not isinstance(values, list):
            raise GGUFMetadataError(path, key, f"must be an array, got {shown(values)}")
        if len(values) != n:
            raise GGUFMetadataError(
                path, key, f"has {len(values)} entries, but the vocabulary has {n} tokens (token_embd rows)"
            )
        # GGUF arrays hold one item type: the first item says it
        if values and (not isinstance(values[0], kind) or isinstance(values[0], bool)):
            raise GGUFMetadataError(path, key, f"must hold {kind.__name__} values, got {shown(values[0])}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key of any GGUF file (a vocab-only file too) as Python values.

    In a model file the tokenizer arrays must have one entry per row of `token_embd.weight`
    (a tokenizer built from a shorter list would map ids to the wrong rows)."""
    f = _GGUF(os.fspath(path), computable_only=False)
    embedding = f.tensors.get("token_embd.weight")
    if embedding is not None and len(embedding.shape) == 2:
        _check_vocabulary(f.path, f.metadata, embedding.shape[0])
    return f.metadata


class ModelFile:
    """An open GGUF model: metadata, config, layout and lazily mapped tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = _GGUF(self.path)
        self.metadata: dict[str, Any] = self._file.metadata
        self._tensors: dict[str, TensorInfo] = self._file.tensors
        self._checked: set[str] = set()  # tensors whose float fields were found finite
        self.architecture = self._get("general.architecture", str)
        if self.architecture not in ARCHITECTURES:
            raise GGUFMetadataError(
                self.path,
                "general.architecture",
                f"{shown(self.architecture)} is not an architecture this harness computes ({', '.join(ARCHITECTURES)})",
            )
        self.config = self._read_config()
        self.layout = self._detect_layout()
        self._check_tensors()
        _check_vocabulary(self.path, self.metadata, self.config.vocab_size)

    # -- metadata -------------------------------------------------------------------------

    def _get(self, key: str, kind: type, default: Any = ...) -> Any:
        if key not in self.metadata:
            if default is ...:
                raise GGUFMetadataError(self.path, key, "missing")
            return default
        value = self.metadata[key]
        ok = {
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            str: isinstance(value, str),
        }[kind]
        if not ok:
            raise GGUFMetadataError(
                self.path, key, f"expected {kind.__name__}, got {type(value).__name__} {shown(value)}"
            )
        return kind(value)

    def _read_config(self) -> MixtralConfig:
        a = self.architecture
        g = self._get
        n_embd = g(f"{a}.embedding_length", int)
        n_head = g(f"{a}.attention.head_count", int)
        n_head_kv = g(f"{a}.attention.head_count_kv", int, n_head)
        n_expert = g(f"{a}.expert_count", int, 0)
        n_used = g(f"{a}.expert_used_count", int, 0 if n_expert == 0 else ...)
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        vocab = g(f"{a}.vocab_size", int, len(tokens) if isinstance(tokens, list) and tokens else ...)
        rope_dim = g(f"{a}.rope.dimension_count", int, None)
        config = MixtralConfig(
            block_count=g(f"{a}.block_count", int),
            embedding_length=n_embd,
            feed_forward_length=g(f"{a}.feed_forward_length", int),
            head_count=n_head,
            head_count_kv=n_head_kv,
            vocab_size=vocab,
            expert_count=n_expert,
            expert_used_count=n_used,
            rms_eps=g(f"{a}.attention.layer_norm_rms_epsilon", float),
            rope_freq_base=g(f"{a}.rope.freq_base", float, 10000.0),
            rope_dimension_count=rope_dim,
            context_length=g(f"{a}.context_length", int, 4096),
        )
        self._check_config(config)
        return config

    def _check_config(self, c: MixtralConfig) -> None:
        a = self.architecture

        def bad(key: str, problem: str):
            raise GGUFMetadataError(self.path, f"{a}.{key}", problem)

        for key, value in (
            ("block_count", c.block_count),
            ("expert_count", c.expert_count),
            ("expert_used_count", c.expert_used_count),
            ("rope.dimension_count", c.rope_dimension_count or 1),
            ("embedding_length", c.embedding_length),
            ("feed_forward_length", c.feed_forward_length),
            ("attention.head_count", c.head_count),
            ("attention.head_count_kv", c.head_count_kv),
            ("vocab_size", c.vocab_size),
            ("context_length", c.context_length),
        ):
            if value > U32_MAX:  # llama.cpp reads these keys as uint32
                bad(key, f"{value} does not fit a uint32")
            if value <= 0 and key not in ("expert_count", "expert_used_count"):
                bad(key, f"must be positive, got {value}")
        if c.embedding_length % c.head_count:
            bad(
                "attention.head_count",
                f"{c.head_count} heads do not divide embedding_length {c.embedding_length}",
            )
        if c.head_count % c.head_count_kv:
            bad(
                "attention.head_count_kv",
                f"{c.head_count_kv} KV heads do not divide head_count {c.head_count}",
            )
        if c.rope_dimension_count is None:
            if c.head_dim % 2:
                bad(
                    "attention.head_count",
                    f"head_dim {c.head_dim} (embedding_length / head_count) is odd, and rope covers it "
                    "whole (no rope.dimension_count): rope needs an even dimension",
                )
        elif not (0 < c.rope_dimension_count <= c.head_dim and c.rope_dimension_count % 2 == 0):
            bad(
                "rope.dimension_count",
                f"{c.rope_dimension_count} must be even and in 1..head_dim {c.head_dim}",
            )
        if c.expert_count < 0:
            bad("expert_count", f"must not be negative, got {c.expert_count}")
        if c.expert_count == 0 and c.expert_used_count != 0:
            bad("expert_used_count", f"{c.expert_used_count} used experts in a dense model (expert_count 0)")
        if c.expert_count > 0 and not 1 <= c.expert_used_count <= c.expert_count:
            bad(
                "expert_used_count",
                f"{c.expert_used_count} used experts, but expert_count is {c.expert_count}",
            )
        if not (math.isfinite(c.rms_eps) and c.rms_eps > 0):
            bad("attention.layer_norm_rms_epsilon", f"must be finite and positive, got {c.rms_eps}")
        if not (math.isfinite(c.rope_freq_base) and c.rope_freq_base > 0):
            bad("rope.freq_base", f"must be finite and positive, got {c.rope_freq_base}")
        # Variants of the llama graph this harness does not compute: refused, never ignored.
        scaling = self.metadata.get(f"{a}.rope.scaling.type", "none")
        if scaling != "none":
            bad("rope.scaling.type", f"{shown(scaling)} rope scaling is not supported (only none)")
        for key in ("attention.key_length", "attention.value_length"):
            value = self.metadata.get(f"{a}.{key}", c.head_dim)
            if value != c.head_dim:
                bad(key, f"{shown(value)} differs from head_dim {c.head_dim} (embedding_length / head_count)")
        # Bounded by the tensors present before any list is built from it (a layer has 9 or
        # more); a smaller excess is named by the first missing tensor.
        n = len(self._tensors)
        if c.block_count > n:
            bad("block_count", f"{c.block_count} layers, but the file has only {n} tensors")

    # -- tensors --------------------------------------------------------------------------

    def _detect_layout(self) -> str:
        if not self.config.is_moe:
            return "dense"
        if "blk.0.ffn_gate_exps.weight" in self._tensors:
            return "merged"
        if "blk.0.ffn_gate.0.weight" in self._tensors:
            c, n = self.config, len(self._tensors)
            need = c.block_count * (7 + 3 * c.expert_count) + 2
            if need > n:
                raise GGUFMetadataError(
                    self.path,
                    f"{self.architecture}.expert_count",
                    f"{c.expert_count} experts in {c.block_count} per-expert layers need {need} tensors, "
                    f"the file has {n}",
                )
            return "per-expert"
        raise GGUFTensorError(
            self.path,
            "blk.0.ffn_gate_exps.weight",
            "missing expert tensors: neither blk.0.ffn_gate_exps.weight (merged layout) "
            "nor blk.0.ffn_gate.0.weight (per-expert layout) is in the file",
        )

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the config and layout call for, with its numpy-order shape."""
        c = self.config
        d, f, e, kv = c.embedding_length, c.feed_forward_length, c.expert_count, c.head_count_kv * c.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (c.vocab_size, d),
            "output_norm.weight": (d,),
        }
        if "output.weight" in self._tensors:  # absent: the head is tied to token_embd
            shapes["output.weight"] = (c.vocab_size, d)
        for i in range(c.block_count):
            b = f"blk.{i}"
            shapes |= {
                f"{b}.attn_norm.weight": (d,),
                f"{b}.attn_q.weight": (c.head_count * c.head_dim, d),
                f"{b}.attn_k.weight": (kv, d),
                f"{b}.attn_v.weight": (kv, d),
                f"{b}.attn_output.weight": (d, c.head_count * c.head_dim),
                f"{b}.ffn_norm.weight": (d,),
            }
            if self.layout == "dense":
                shapes |= {
                    f"{b}.ffn_gate.weight": (f, d),
                    f"{b}.ffn_up.weight": (f, d),
                    f"{b}.ffn_down.weight": (d, f),
                }
                continue
            shapes[f"{b}.ffn_gate_inp.weight"] = (e, d)
            if self.layout == "merged":
                shapes |= {
                    f"{b}.ffn_gate_exps.weight": (e, f, d),
                    f"{b}.ffn_up_exps.weight": (e, f, d),
                    f"{b}.ffn_down_exps.weight": (e, d, f),
                }
            else:
                for x in range(e):
                    shapes |= {
                        f"{b}.ffn_gate.{x}.weight": (f, d),
                        f"{b}.ffn_up.{x}.weight": (f, d),
                        f"{b}.ffn_down.{x}.weight": (d, f),
                    }
        return shapes

    def _check_tensors(self) -> None:
        expected = self.expected_tensors()
        # llama.cpp refuses a file with tensors its graph does not use ("wrong number of
        # tensors"): one is a sign that the layer or expert count disagrees with the file, or
        # of a variant (rope_freqs, biases) this graph would silently compute without.
        for name in self._tensors:
            if name not in expected:
                raise GGUFTensorError(
                    self.path,
                    name or "''",
                    f"not used by a {self.layout} llama of {self.config.block_count} layers"
                    + (f" and {self.config.expert_count} experts" if self.config.is_moe else ""),
                )
        for name, shape in expected.items():
            if name not in self._tensors:
                raise GGUFTensorError(self.path, name, f"missing (the {self.layout} layout needs it)")
            got = self.shape(name)
            if got != shape:
                raise GGUFTensorError(
                    self.path, name, f"has shape {list(got)}, expected {list(shape)} from the config"
                )
        if self.layout == "per-expert":  # one type per projection of a layer, as a merged stack has
            for i in range(self.config.block_count):
                for kind in EXPERT_KINDS:
                    names = [f"blk.{i}.ffn_{kind}.{x}.weight" for x in range(self.config.expert_count)]
                    types = {self.qtype(n) for n in names}
                    if len(types) > 1:
                        listed = ", ".join(f"{n}={self.qtype(n).name}" for n in names)
                        raise GGUFTensorError(
                            self.path, names[0], f"experts of one layer have different types ({listed})"
                        )

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise GGUFTensorError(self.path, name, "no such tensor in the file") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape in numpy order (GGUF's dims reversed: rows last)."""
        return self._info(name).shape

    def qtype(self, name: str) -> GGMLType:
        return self._info(name).qtype

    def nbytes(self, name: str) -> int:
        return self._info(name).nbytes

    def tensor(self, name: str) -> QTensor:
        """The tensor's raw blocks as a CPU QTensor over the memory map (nothing is copied).

        The first time a tensor is asked for, its float values (the values of F32/F16/BF16
        tensors, the f16 scales of block types) are checked finite, as llama.cpp's
        `--check-tensors` does: a NaN or inf there would make every logit NaN."""
        info = self._info(name)
        raw = self._file.data[info.start : info.start + info.nbytes]
        if name not in self._checked:
            _check_finite(self.path, info, raw)
            self._checked.add(name)
        return QTensor.from_numpy(raw, info.qtype, info.shape, name=name, path=self.path)

    def experts(self, layer: int, kind: str) -> list[QTensor]:
        """The `kind` ("gate", "up" or "down") weights of each expert of `layer`, in either layout;
        merged stacks are sliced without copying."""
        if kind not in EXPERT_KINDS:
            raise ValueError(f"kind must be one of {EXPERT_KINDS}, got {kind!r}")
        if self.layout == "merged":
            stack = self.tensor(f"blk.{layer}.ffn_{kind}_exps.weight")
            return [stack[e] for e in range(self.config.expert_count)]
        if self.layout == "per-expert":
            return [
                self.tensor(f"blk.{layer}.ffn_{kind}.{e}.weight") for e in range(self.config.expert_count)
            ]
        raise GGUFTensorError(self.path, f"blk.{layer}.ffn_{kind}", "a dense model has no experts")

    @property
    def version(self) -> int:
        return self._file.version

    @property
    def file_bytes(self) -> int:
        return len(self._file.data)

    def close(self) -> None:
        self._tensors = {}
        self._file = None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelFile({self.path!r}, layout={self.layout!r}, tensors={len(self._tensors)})"


CHECK_CHUNK_BYTES = 64 << 20  # tensors are checked a slice at a time: memory stays bounded
# MXFP4 codes whose value, times the half-scale 2^(e - 128) of exponent byte e, stays finite: an
# exponent up to 252 keeps every code finite; past it only the smaller magnitudes do.
_MXFP4_MAGNITUDE = np.array((0, 1, 2, 3, 4, 6, 8, 12) * 2, dtype=np.float64)
_MXFP4_SAFE_EXPONENT = 252


def _check_finite(path: str, info: TensorInfo, raw: np.ndarray) -> None:
    """Refuse a tensor whose float values, or the scales of its blocks, are NaN or inf (or, for
    MXFP4, whose exponent makes a value overflow float32), as llama.cpp's `--check-tensors`
    does. Finite values of any size are accepted, as llama.cpp accepts them: a forward that
    overflows says so in its logits (`harness.run_checks.check_logits`)."""
    q = info.qtype
    unit = 4 if q == GGMLType.F32 else 2 if q in FLOAT_TYPES else type_size(q)  # bytes per value or block
    offsets = F16_FIELDS.get(q, ())
    if q not in FLOAT_TYPES and not offsets and q not in (GGMLType.IQ1_M, _MXFP4):
        return  # scales that are finite whatever their bits (NVFP4's UE4M3)
    step = max(CHECK_CHUNK_BYTES // unit, 1) * unit
    for start in range(0, raw.size, step):
        chunk = raw[start : start + step]
        if q == GGMLType.F32:
            bad = (chunk.view("<u4") & 0x7F800000) == 0x7F800000  # exponent all ones: inf or NaN
        elif q == GGMLType.BF16:
            bad = (chunk.view("<u2") & 0x7F80) == 0x7F80
        elif q == GGMLType.F16:
            bad = (chunk.view("<u2") & 0x7C00) == 0x7C00
        elif q == GGMLType.IQ1_M:  # the f16 scale's exponent: bits 6-7 of byte 53, 4-6 of byte 55
            blocks = chunk.reshape(-1, unit)
            high = (blocks[:, IQ1_M_SCALE_BYTES[2]] >> 4) | (blocks[:, IQ1_M_SCALE_BYTES[3]] & 0xF0)
            bad = (high & 0x7C) == 0x7C
        elif q == _MXFP4:
            bad = _mxfp4_overflows(chunk.reshape(-1, unit))
        else:
            blocks = chunk.reshape(-1, unit)
            scales = np.stack([blocks[:, o : o + 2] for o in offsets], axis=1).reshape(-1).view("<u2")
            bad = (scales & 0x7C00) == 0x7C00
        if not bad.any():
            continue
        first = int(np.flatnonzero(bad)[0])
        if q in FLOAT_TYPES:
            value = _float_at(chunk, first, q)
            raise GGUFTensorError(
                path, info.name, f"value {start // unit + first} is {value:g}: not finite (a corrupt file?)"
            )
        if q == _MXFP4:
            e = int(chunk[first * unit + MXFP4_SCALE_BYTE])
            raise GGUFTensorError(
                path,
                info.name,
                f"block {start // unit + first}: exponent {e} makes its values overflow to inf",
            )
        block = start // unit + first // max(len(offsets), 1)
        raise GGUFTensorError(path, info.name, f"the f16 scale of block {block} is NaN or inf")


_MXFP4 = GGMLType["MXFP4"] if "MXFP4" in GGMLType.__members__ else None


def _float_at(chunk: np.ndarray, i: int, q: GGMLType) -> float:
    """Value `i` of the F32, F16 or BF16 bytes `chunk`."""
    if q == GGMLType.BF16:
        return float((chunk.view("<u2")[i : i + 1].astype("<u4") << 16).view("<f4")[0])
    return float(chunk.view("<f4" if q == GGMLType.F32 else "<f2")[i])


def _mxfp4_overflows(blocks: np.ndarray) -> np.ndarray:
    """[N, 17] MXFP4 blocks -> [N] bool: a value of the block is inf (2^(e - 128) * |code|)."""
    bad = np.zeros(blocks.shape[0], dtype=bool)
    risky = np.flatnonzero(blocks[:, MXFP4_SCALE_BYTE] > _MXFP4_SAFE_EXPONENT)  # rare: look closer
    if risky.size:
        codes = blocks[risky, 1:]
        largest = np.maximum(_MXFP4_MAGNITUDE[codes & 0xF], _MXFP4_MAGNITUDE[codes >> 4]).max(axis=1)
        e = blocks[risky, MXFP4_SCALE_BYTE].astype(np.float64)
        bad[risky] = largest * np.exp2(e - 128) >= 2.0**128
    return bad


def open_gguf(path: str | os.PathLike | Path) -> ModelFile:
    """Open a GGUF model file. Raises a HarnessError subclass naming the file and field on bad input."""
    return ModelFile(path)
