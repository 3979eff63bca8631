"""QMatMul: `x @ W.T` for a GGUF weight, with candle's three strategies chosen in one place.

- "quantized": keep the blocks; on a GPU, types with a fused kernel (`harness.quant.fused.supports`)
  multiply straight from the blocks (`harness::qmatmul`), others dequantize on every call.
- "f32": dequantize once to float32 at construction.
- "f16": dequantize once to float16; the product runs in float16.

F32, F16 and BF16 weights are plain floats: they are always converted once, on the weight's
own device (candle#1823's fix; candle#1815 dequantized them on the CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from harness.quant import fused
from harness.quant.qtensor import QTensor

STRATEGIES = ("quantized", "f32", "f16")


class QMatMul(nn.Module):
    """A linear layer without bias over a QTensor of shape [out_features, in_features]."""

    def __init__(self, weight: QTensor, strategy: str = "quantized"):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"QMatMul strategy must be one of {STRATEGIES}, got {strategy!r}")
        if len(weight.shape) != 2:
            raise ValueError(f"QMatMul {weight.name}: weight must be 2-D, shape is {list(weight.shape)}")
        self.gguf_name = weight.name
        self.qtype = weight.qtype
        self.out_features, self.in_features = weight.shape
        if weight.is_float and strategy == "quantized":
            strategy = "f32"
        self.strategy = strategy
        # Exactly one of the two buffers is set; both move with the module. On a device where the
        # fused kernels run, the blocks are kept as they read them (`fused.placed_weight`, here
        # and after every move).
        self.kernel_qtype, self.kernel_ready = int(self.qtype), False
        self.register_buffer("qweight", weight.raw if strategy == "quantized" else None, persistent=False)
        self._place_weight()
        dense = None
        if strategy != "quantized":
            dense = weight.dequantize(dtype=torch.float16 if strategy == "f16" else torch.float32)
        self.register_buffer("weight", dense, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._place_weight()
        return self

    def _place_weight(self) -> None:
        if self.qweight is not None:
            self.qweight, self.kernel_qtype, self.kernel_ready = fused.placed_weight(
                self.qweight, self.kernel_qtype, self.in_features, self.kernel_ready
            )

    @property
    def qtensor(self) -> QTensor | None:
        """The raw blocks when kept quantized, else None."""
        if self.strategy != "quantized":
            return None
        raw = fused.gguf_blocks(self.qweight, self.kernel_qtype)
        return QTensor(raw, self.qtype, (self.out_features, self.in_features), self.gguf_name)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] float weight on the module's device."""
        if self.strategy == "quantized":
            return self.qtensor.dequantize(dtype=dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor, x_int: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        # x: [..., in] -> [..., out]. `x_int`: x [T, in] float32's `_int_x` form from the op that
        # made x (`harness::attention_int`), handed to the fused op; where it does not run, unused.
        strategy = self.strategy
        if strategy == "f16":
            return (x.to(torch.float16) @ self.weight.T).to(x.dtype)
        # (the buffer read once, from nn.Module.__getattr__'s table directly: a tenth of the time)
        qweight = self._buffers["qweight"]
        if strategy == "quantized" and fused.supports(self.qtype, qweight.device, self.in_features):
            if x.dim() == 2 and x.dtype == torch.float32:  # (no reshapes: each is an op to a tracer)
                return torch.ops.harness.qmatmul(
                    x, qweight, self.kernel_qtype, self.out_features, *(x_int or ())
                )
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.harness.qmatmul(flat, qweight, self.kernel_qtype, self.out_features)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        w = self.weight if self.strategy == "f32" else self.qtensor.dequantize(dtype=x.dtype)
        return x @ w.to(x.dtype).T

    def extra_repr(self) -> str:
        return (
            f"{self.gguf_name}, {self.qtype.name}, in={self.in_features}, out={self.out_features}, "
            f"strategy={self.strategy}"
        )
