"""Test helpers that rewrite GGUF files: drop or change keys and tensors, patch header bytes,
convert between the merged and per-expert expert layouts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from harness.fuzzing import rewrite_gguf


def _field_value(field) -> Any:
    """A gguf-py reader field's value as Python: int, float, bool, str, or a list of those."""
    types = field.types

    def scalar(part, vtype):
        if vtype == GGUFValueType.STRING:
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


def _copy_key(writer: GGUFWriter, field) -> None:
    value = _field_value(field)
    vtype = field.types[0]
    sub = field.types[-1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
    writer.add_key_value(field.name, value, vtype, sub_type=sub)


def rewrite(src: str | Path, dst: str | Path, **changes) -> Path:
    """Copy `src` to `dst` with keys set or dropped and tensors dropped, renamed, retyped or
    edited (`harness.fuzzing.rewrite_gguf`)."""
    return rewrite_gguf(src, dst, **changes)


def split_experts(src: str | Path, dst: str | Path) -> Path:
    """Merged expert stacks (`ffn_gate_exps`) -> TheBloke's per-expert tensors (`ffn_gate.E`), same bytes."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch=_field_value(reader.fields["general.architecture"]))
    writer.kv_data[0].clear()
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            _copy_key(writer, field)
    pattern = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
    for t in reader.tensors:
        m = pattern.match(t.name)
        if not m:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        stack = np.asarray(t.data)
        for e in range(stack.shape[0]):
            writer.add_tensor(f"blk.{m[1]}.ffn_{m[2]}.{e}.weight", stack[e], raw_dtype=t.tensor_type)
    _finish(writer)
    return Path(dst)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def byte_offset(reader: GGUFReader, part: np.ndarray) -> int:
    """Where a reader field part (a view of the memory map) starts in the file."""
    return part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]


def patch(path: str | Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def tensor_info_offsets(path: str | Path, name: str) -> dict[str, int]:
    """File offsets of a tensor's info fields: "n_dims", "dims", "type", "offset"."""
    reader = GGUFReader(path)
    field = next(t.field for t in reader.tensors if t.name == name)
    _len, _name, n_dims, dims, raw_type, offset = field.parts
    return {
        "n_dims": byte_offset(reader, n_dims),
        "dims": byte_offset(reader, dims),
        "type": byte_offset(reader, raw_type),
        "offset": byte_offset(reader, offset),
    }
