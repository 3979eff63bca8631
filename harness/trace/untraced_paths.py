"""The path an untraced program takes through composite ops that branch on tensor subclasses.

Some CompositeImplicitAutograd kernels of ATen ask `areAnyTensorSubclassLike(...)` and then take a
"composite compliant" path meant for tensor subclasses instead of the fast path a plain program
takes. That question is true for every tensor while any `TorchDispatchMode` is active
(`isTensorSubclassLike` in aten/src/ATen/TensorSubclassLikeUtils.h), so a tracer's mode, and the
emulation's, would make user code run another program than it runs untraced. Where the two paths
put data on other devices, the traced program fails (or passes) where the untraced one does not.

`torch.ctc_loss` with length tensors (`ctc_loss.Tensor` in aten/src/ATen/native/LossCTC.cpp) is
such an op. Untraced, it copies both lengths to the host as int64 (`.to(kCPU, kLong)`: a
device-to-host copy for lengths on the device) and calls the int-list overload, which computes on
log_probs' device (its mean divides by lengths uploaded from the host list). Under a mode it calls
`_ctc_loss.Tensor` with the length tensors, whose generated CUDA wrapper wants them on log_probs'
device, and divides by the length tensor where it is: host lengths, which CUDA takes untraced, are
refused. While a tracer or the emulation is active (`install`, counted, undone by `uninstall`),
`torch.ctc_loss` (which `F.ctc_loss` and `nn.CTCLoss` call) does what the fast path does, with ops
the dispatch modes see: a device-to-host copy of lengths on a device (a real one, also untraced),
then the int-list overload. Tensors that are subclass-like by themselves (other than the
emulation's, which stand for CUDA tensors), or another dispatch mode than the harness's, keep
PyTorch's own path, as they would untraced. (A direct call of `torch.ops.aten.ctc_loss.Tensor` is
not intercepted.)

Other such branches keep their data where it is: most only avoid in-place ops on subclasses
(gather, masked_select, cummax/cummin backward, reshape). Some backward formulas read device data
on the host untraced and not under a mode (prod's `nonzero`, cumprod's `item`, masked_fill's
`masked_select` for a tensor value): the tracer misses those syncs, which a backward pass makes
outside the model, where a sync is allowed anyway. max/min/median's is a CPU-only branch.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["ctc_loss", "install", "stands_for_plain", "uninstall"]

# Tensor types and dispatch modes of the harness that stand for an untraced program on plain
# (CUDA) tensors: the emulation's tensors and mode, the tracer.
_STAND_INS: set[type] = set()

# What makes a tensor subclass-like by itself (kTensorSubclassLike, as far as this torch names it).
_SUBCLASS_KEYS = tuple(
    getattr(torch._C.DispatchKey, name)
    for name in ("Python", "Batched", "FuncTorchBatched", "FuncTorchGradWrapper", "Functionalize")
    if hasattr(torch._C.DispatchKey, name)
)


def stands_for_plain(cls: type) -> type:
    """Marks a tensor type or a dispatch mode (a class decorator) as standing for an untraced
    program on plain tensors: calls made with or under it take the untraced path."""
    _STAND_INS.add(cls)
    return cls


def _stands_in(obj) -> bool:
    return any(isinstance(obj, cls) for cls in _STAND_INS)


def _plain(t: torch.Tensor) -> bool:
    if _stands_in(t):
        return True
    if t.is_meta or t.layout != torch.strided:
        return False
    keys = torch._C._dispatch_keys(t)
    return not any(keys.has(k) for k in _SUBCLASS_KEYS)


def _untraced_path(tensors) -> bool:
    """Whether these tensors would take the fast path if the harness's modes were not active."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    if not all(_plain(t) for t in tensors if isinstance(t, torch.Tensor)):
        return False
    return all(_stands_in(m) for m in _get_current_dispatch_mode_stack())


def _host_lengths(lengths: torch.Tensor, name: str) -> list[int]:
    """The lengths as the fast path reads them: copied to the host as int64 if they are on a
    device (an op the dispatch modes see), then read there."""
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise RuntimeError(f"{name} must be integral")
    if lengths.device.type != "cpu":
        lengths = lengths.to("cpu", torch.long)
    with torch.utils._mode_utils.no_dispatch():  # host bookkeeping, not an op of the program
        return lengths.to(torch.long).reshape(-1).tolist()


_previous = None  # torch.ctc_loss as it was before `install`
_installed = 0
_lock = threading.Lock()


def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction=1, zero_infinity=False):
    """`torch.ctc_loss` as an untraced program runs it (see the module's docstring)."""
    real = _previous or torch._C._VariableFunctions.ctc_loss
    if (
        isinstance(input_lengths, torch.Tensor)
        and isinstance(target_lengths, torch.Tensor)
        and _untraced_path((log_probs, targets, input_lengths, target_lengths))
    ):
        input_lengths = _host_lengths(input_lengths, "input_lengths")
        target_lengths = _host_lengths(target_lengths, "target_lengths")
    return real(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)


def install() -> None:
    """Puts the untraced paths in place (counted: the last `uninstall` takes them out)."""
    global _installed, _previous
    with _lock:
        if _installed == 0:
            _previous = torch.ctc_loss
            torch.ctc_loss = ctc_loss
        _installed += 1


def uninstall() -> None:
    global _installed, _previous
    with _lock:
        if _installed == 0:
            return
        _installed -= 1
        if _installed == 0:
            torch.ctc_loss = _previous
            _previous = None
