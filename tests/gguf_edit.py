"""Test helpers that rewrite GGUF files: drop or change keys and tensors, patch header bytes,
convert between the merged and per-expert expert layouts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from harness.gguf_file import _field_value


def _copy_key(writer: GGUFWriter, field) -> None:
    value = _field_value(field)
    vtype = field.types[0]
    sub = field.types[-1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
    writer.add_key_value(field.name, value, vtype, sub_type=sub)


def rewrite(
    src: str | Path,
    dst: str | Path,
    *,
    drop_keys: tuple[str, ...] = (),
    set_keys: dict[str, tuple[Any, GGUFValueType]] | None = None,
    drop_tensors: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
) -> Path:
    """Copy `src` to `dst` with keys dropped or set and tensors dropped or renamed."""
    reader = GGUFReader(src)
    set_keys = set_keys or {}
    rename = rename or {}
    arch = _field_value(reader.fields["general.architecture"])
    writer = GGUFWriter(dst, arch=arch)
    writer.kv_data[0].clear()  # the writer pre-adds general.architecture; copy keys in file order
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in drop_keys:
            continue
        if name in set_keys:
            value, vtype = set_keys[name]
            writer.add_key_value(name, value, vtype)
        else:
            _copy_key(writer, field)
    for name, (value, vtype) in set_keys.items():
        if name not in reader.fields:
            writer.add_key_value(name, value, vtype)
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        writer.add_tensor(rename.get(t.name, t.name), np.asarray(t.data), raw_dtype=t.tensor_type)
    _finish(writer)
    return Path(dst)


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
