"""Reading Mixtral (and dense llama) GGUF files through the `gguf` package.

`open_gguf(path)` returns a `ModelFile`: its `config` (a `MixtralConfig` from the `llama.*`
keys), its `layout` (merged or per-expert experts, or dense), and `tensor(name)` giving a
`QTensor` over the memory-mapped bytes. Everything the header claims is checked against the
file's length before any of it is used.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType

from harness.errors import GGUFFormatError, GGUFMetadataError, GGUFTensorError
from harness.quant.qtensor import QTensor
from harness.quant.types import GGMLType


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
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset
MAX_DIMS = 4

LAYOUTS = ("merged", "per-expert", "dense")
EXPERT_KINDS = ("gate", "up", "down")


class _CheckedReader(GGUFReader):
    """gguf's reader, with every tensor's type, shape and data range checked before its
    data is mapped, so errors name the tensor."""

    path: str
    last_key: str | None = None  # the last key read whole, to say where a broken header broke

    def __init__(self, path: str):
        self.path = path
        super().__init__(path, "c")  # copy-on-write: writable views, the file is never changed

    def _push_field(self, field, skip_sum: bool = False) -> int:
        self.last_key = field.name
        return super()._push_field(field, skip_sum)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_bytes = len(self.data)
        alignment = int(self.alignment)
        start = int(start_offs)
        for field in fields:
            _name_len, name_data, _n_dims, dims, raw_type, offset = field.parts
            name = field.name
            if len(dims) == 0 or len(dims) > MAX_DIMS:
                raise GGUFTensorError(
                    self.path, name, f"has {len(dims)} dimensions (1 to {MAX_DIMS} allowed)"
                )
            dims = [int(d) for d in dims]
            if any(d <= 0 for d in dims):
                raise GGUFTensorError(self.path, name, f"has a dimension that is not positive: {dims}")
            try:
                qtype = GGMLType(int(raw_type[0]))
            except ValueError:
                raise GGUFTensorError(self.path, name, f"unknown GGML type id {int(raw_type[0])}") from None
            if qtype not in GGML_QUANT_SIZES:
                raise GGUFTensorError(self.path, name, f"type {qtype.name} has no known block size")
            block, type_bytes = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise GGUFTensorError(
                    self.path,
                    name,
                    f"row length {dims[0]} is not a multiple of the {qtype.name} block size {block}",
                )
            n_elements = int(np.prod(dims, dtype=object))
            n_bytes = n_elements // block * type_bytes
            rel = int(offset[0])
            if rel % alignment:
                raise GGUFTensorError(self.path, name, f"data offset {rel} is not aligned to {alignment}")
            end = start + rel + n_bytes
            if end > file_bytes:
                raise GGUFTensorError(
                    self.path,
                    name,
                    f"data ends at byte {end}, past the end of the file ({file_bytes} bytes)",
                )
        super()._build_tensors(start_offs, fields)


def _precheck_header(path: str) -> None:
    """Check magic, version and the claimed counts against the file length, before gguf's
    reader walks a header whose sizes are not yet trusted."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise GGUFFormatError(
            path, "magic", f"not a GGUF file: starts with {head[:4]!r}, expected {GGUF_MAGIC!r}"
        )
    if len(head) < HEADER_BYTES:
        raise GGUFFormatError(path, "header", f"truncated: {size} bytes, a GGUF header needs {HEADER_BYTES}")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise GGUFFormatError(path, "version", "big-endian GGUF files are not supported")
        raise GGUFFormatError(path, "version", f"GGUF version {version} is not supported (2 or 3)")
    tensor_count = int.from_bytes(head[8:16], "little")
    kv_count = int.from_bytes(head[16:24], "little")
    need = HEADER_BYTES + kv_count * MIN_KV_BYTES + tensor_count * MIN_TENSOR_INFO_BYTES
    if need > size:
        raise GGUFFormatError(
            path,
            "header",
            f"claims {tensor_count} tensors and {kv_count} keys, more than its {size} bytes can hold (truncated?)",
        )


def _field_value(field) -> Any:
    """A reader field's value as Python: int, float, bool, str, or a list of those."""
    types = field.types
    if not types:
        return None

    def scalar(part, vtype):
        if vtype == GGUFValueType.STRING:
            # surrogateescape: bytes that are not UTF-8 survive .encode("utf-8", "surrogateescape")
            return bytes(part).decode("utf-8", errors="surrogateescape")
        value = part[0]
        if vtype == GGUFValueType.BOOL:
            return bool(value)
        if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            return float(value)
        return int(value)

    if types[0] == GGUFValueType.ARRAY:
        if len(types) < 2:
            return []
        return [scalar(field.parts[i], types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], types[0])


def _open_reader(path: str) -> _CheckedReader:
    """gguf's reader over `path`, after the header's claims are checked; HarnessErrors only."""
    if not os.path.isfile(path):
        raise GGUFFormatError(path, None, "no such file")
    _precheck_header(path)
    reader = _CheckedReader.__new__(_CheckedReader)
    try:
        reader.__init__(path)
        return reader
    except (GGUFTensorError, GGUFFormatError):
        raise
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError, OverflowError) as exc:
        where = "header" if reader.last_key in (None, "GGUF.kv_count") else f"after key {reader.last_key}"
        raise GGUFFormatError(path, where, f"malformed or truncated header ({exc})") from None


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    return {
        name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")
    }


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key of any GGUF file (a vocab-only file too) as Python values."""
    return _metadata(_open_reader(os.fspath(path)))


class ModelFile:
    """An open GGUF model: metadata, config, layout and lazily mapped tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._reader = _open_reader(self.path)
        self.metadata: dict[str, Any] = _metadata(self._reader)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.architecture = self._get("general.architecture", str)
        self.config = self._read_config()
        self.layout = self._detect_layout()
        self._check_tensors()

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
                self.path, key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}"
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
            ("embedding_length", c.embedding_length),
            ("feed_forward_length", c.feed_forward_length),
            ("attention.head_count", c.head_count),
            ("attention.head_count_kv", c.head_count_kv),
            ("vocab_size", c.vocab_size),
            ("context_length", c.context_length),
        ):
            if value <= 0:
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
        if c.rope_dimension_count is not None and not (
            0 < c.rope_dimension_count <= c.head_dim and c.rope_dimension_count % 2 == 0
        ):
            bad(
                "rope.dimension_count",
                f"{c.rope_dimension_count} must be even and in 1..head_dim {c.head_dim}",
            )
        if c.expert_count < 0:
            bad("expert_count", f"must not be negative, got {c.expert_count}")
        if c.expert_count > 0 and not 1 <= c.expert_used_count <= c.expert_count:
            bad(
                "expert_used_count",
                f"{c.expert_used_count} used experts, but expert_count is {c.expert_count}",
            )
        if not c.rms_eps > 0:
            bad("attention.layer_norm_rms_epsilon", f"must be positive, got {c.rms_eps}")

    # -- tensors --------------------------------------------------------------------------

    def _detect_layout(self) -> str:
        if not self.config.is_moe:
            return "dense"
        if "blk.0.ffn_gate_exps.weight" in self._tensors:
            return "merged"
        if "blk.0.ffn_gate.0.weight" in self._tensors:
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
        for name, shape in self.expected_tensors().items():
            if name not in self._tensors:
                raise GGUFTensorError(self.path, name, f"missing (the {self.layout} layout needs it)")
            got = self.shape(name)
            if got != shape:
                raise GGUFTensorError(
                    self.path, name, f"has shape {list(got)}, expected {list(shape)} from the config"
                )

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _info(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise GGUFTensorError(self.path, name, "no such tensor in the file") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape in numpy order (GGUF's dims reversed: rows last)."""
        return tuple(int(d) for d in reversed(self._info(name).shape.tolist()))

    def qtype(self, name: str) -> GGMLType:
        return GGMLType(self._info(name).tensor_type)

    def nbytes(self, name: str) -> int:
        return int(self._info(name).n_bytes)

    def tensor(self, name: str) -> QTensor:
        """The tensor's raw blocks as a CPU QTensor over the memory map (nothing is read yet)."""
        info = self._info(name)
        raw = np.asarray(info.data).reshape(-1).view(np.uint8)
        return QTensor.from_numpy(raw, self.qtype(name), self.shape(name), name=name, path=self.path)

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
        return int(self._reader.fields["GGUF.version"].parts[0][0])

    @property
    def file_bytes(self) -> int:
        return len(self._reader.data)

    def close(self) -> None:
        self._tensors = {}
        self._reader = None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelFile({self.path!r}, layout={self.layout!r}, tensors={len(self._tensors)})"


def open_gguf(path: str | os.PathLike | Path) -> ModelFile:
    """Open a GGUF model file. Raises a HarnessError subclass naming the file and field on bad input."""
    return ModelFile(path)
