"""QTensor: raw GGML blocks as a uint8 torch tensor, plus their type and logical shape."""

from __future__ import annotations

import numpy as np
import torch

from harness.device_tables import TABLES
from harness.errors import GGUFTensorError
from harness.quant import dequant  # defines the "dequant" device table that `to` warms
from harness.quant.types import FLOAT_TYPES, GGMLType, block_size, nbytes_for, type_size


class QTensor:
    """A quantized (or plain float) GGUF tensor that can live on any device.

    `raw` holds whole blocks, shaped [*shape[:-1], row_bytes]; `shape` is the logical shape in
    numpy order (rows last), as the gguf package reports it. `name` is the GGUF tensor name.
    """

    __slots__ = ("raw", "qtype", "shape", "name")

    def __init__(self, raw: torch.Tensor, qtype: GGMLType, shape: tuple[int, ...], name: str | None = None):
        shape = tuple(int(s) for s in shape)
        if raw.dtype != torch.uint8:
            raise TypeError(f"QTensor {name}: raw must be uint8 bytes, got {raw.dtype}")
        if not shape or shape[-1] % block_size(qtype):
            raise GGUFTensorError(
                None,
                name,
                f"row length {shape[-1] if shape else None} is not a multiple of the "
                f"{qtype.name} block size {block_size(qtype)}",
            )
        expected = nbytes_for(shape, qtype)
        if raw.numel() != expected:
            raise GGUFTensorError(
                None,
                name,
                f"{raw.numel()} bytes of data, but shape {list(shape)} in {qtype.name} needs {expected}",
            )
        self.raw = raw.reshape(*shape[:-1], shape[-1] // block_size(qtype) * type_size(qtype))
        self.qtype = qtype
        self.shape = shape
        self.name = name

    @classmethod
    def from_numpy(
        cls,
        data: np.ndarray,
        qtype: GGMLType,
        shape: tuple[int, ...],
        name: str | None = None,
        path: str | None = None,
    ) -> QTensor:
        """Wrap bytes (a numpy array of any dtype, e.g. a memory map) without copying."""
        raw = torch.from_numpy(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        try:
            return cls(raw, qtype, shape, name)
        except GGUFTensorError as exc:
            raise GGUFTensorError(path, name, exc.problem) from None

    @classmethod
    def from_float(
        cls, values: torch.Tensor, qtype: GGMLType = GGMLType.F32, name: str | None = None
    ) -> QTensor:
        """A float tensor as an F32, F16 or BF16 QTensor on the same device."""
        dtype = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[
            qtype
        ]
        raw = values.detach().to(dtype).contiguous().view(torch.uint8)
        return cls(raw, qtype, tuple(values.shape), name)

    # -- where it lives -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QTensor:
        """The same blocks on `device` (self when already there). The first blocks to reach a
        device build its constant tables (`harness.device_tables`), outside any forward."""
        raw = self.raw.to(device, non_blocking=non_blocking)
        if raw is self.raw:
            return self
        TABLES.warm(raw.device)
        return QTensor(raw, self.qtype, self.shape, self.name)

    # -- sizes ----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        """F32, F16 or BF16: plain floats, not blocks."""
        return self.qtype in FLOAT_TYPES

    # -- values ---------------------------------------------------------------------------

    def dequantize(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Float values of logical shape, computed on `device` (default: where the blocks are).

        With `device` given, the raw blocks move there first and the work is done there."""
        raw = self.raw if device is None else self.raw.to(device)
        return dequant.dequantize(raw, self.qtype, self.shape, dtype)

    def dequantize_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `index` (of the 2-D tensor) dequantized, and only those: [*index.shape, row_length].

        `index` must be on this tensor's device."""
        if len(self.shape) != 2:
            raise ValueError(
                f"QTensor {self.name}: dequantize_rows needs a 2-D tensor, shape is {list(self.shape)}"
            )
        rows = self.raw.index_select(0, index.reshape(-1))
        out = dequant.dequantize(rows, self.qtype, (rows.shape[0], self.shape[1]), dtype)
        return out.reshape(*index.shape, self.shape[1])

    def __getitem__(self, i: int) -> QTensor:
        """Slice along the first dimension (an expert of a merged expert stack), without copying."""
        if len(self.shape) < 2:
            raise IndexError(f"QTensor {self.name}: cannot index a 1-D tensor by rows of blocks")
        name = None if self.name is None else f"{self.name}[{i}]"
        return QTensor(self.raw[i], self.qtype, self.shape[1:], name)

    def __repr__(self) -> str:
        return f"QTensor({self.name!r}, {self.qtype.name}, shape={list(self.shape)}, device={self.device})"
