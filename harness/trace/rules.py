"""CUDA's device rules: which tensor arguments of an op may be on which devices.

One table and one check, used by both sides of the harness:
- the emulated accelerator (`harness.trace.emulated`) checks the live tensors of each op before it
  runs it, and raises CUDA's error message;
- the classifier (`harness.trace.classify.refused`) checks the devices a trace recorded.

Both describe an op's tensor arguments as `Operand`s (argument name, device, dtype, shape, written)
and ask `refusal(op, operands)`: CUDA's error message, or None where CUDA accepts the call.
`live_operands` builds them from a call's arguments, `recorded_operands` from a trace's specs.

The facts are from aten (PyTorch 2.x): the generated CUDA wrappers check every positional and out
tensor argument against the first (`check_and_update_common_device`, no exception for 0-dim CPU
tensors); ops marked `device_check: NoCheck` in native_functions.yaml do their own checks, listed
below. An op runs CUDA's kernel when any operand is on a device other than the CPU (the
dispatcher picks the highest backend); all-CPU calls are plain CPU ops and are not checked.
Meta counts as a device here, so a meta run is judged as a CUDA run would be.
`harness.trace.conformance` checks the rules row by row against real CUDA (`pytest -m cuda`),
and `scripts/sweep_device_rules.py` over PyTorch's whole op database.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import torch

__all__ = [
    "RULES",
    "RULE_DOCS",
    "Layout",
    "Operand",
    "index_put_is_masked_fill",
    "layout",
    "live_operands",
    "recorded_operands",
    "refusal",
    "rule_of",
]

# ---- the rules -----------------------------------------------------------------------------------

SAME = "same"  # default: all operands on one device (generated `check_and_update_common_device`)
CPU_SCALAR = "cpu-scalar"  # TensorIterator binary/comparison ops: one 0-dim CPU input is a scalar
WHERE = "where"  # where: 0-dim operands on another device are moved to the op's device
MASKED_FILL = "masked-fill"  # masked_fill: mask on self's device (even 0-dim); value 0-dim, any device
SCALAR_VALUE = "scalar-value"  # fill_/index_fill_: the 0-dim `value` tensor is read with item()
INDEX = "index"  # x[idx]: indices on the CPU or on x's device (CPU ones are moved)
INDEX_PUT = "index-put"  # x[idx] = v: indices anywhere (moved); v on x's device unless 0-dim
TRANSFER = "transfer"  # copies: any devices
CPU_SCALAR_OTHER = "cpu-scalar-other"  # logical_and/or/xor: as CPU_SCALAR, but self is no CPU scalar
SCATTER = "scatter"  # slice_scatter & co: src copied into a clone of self; any devices, out on self's
ANY = "any"  # resize_as_: the other tensor gives a shape only
MASKED_INDEX = "masked-index"  # _unsafe_masked_index(_put_accumulate): indices on the CPU or self's device
HOST_LENGTHS = "host-lengths"  # _pack_padded_sequence / _pad_packed_sequence: lengths on the CPU
RNG_STATE = "rng-state"  # fused attention backward: its dropout RNG state may be host tensors
CUDNN_CTC = "cudnn-ctc"  # _cudnn_ctc_loss: log_probs on CUDA, targets on the host (int-list lengths)

RULE_DOCS = {
    SAME: "all tensor arguments on one device; a 0-dim CPU tensor is no exception "
    "(generated CUDA wrappers: check_and_update_common_device)",
    CPU_SCALAR: "TensorIterator with allow_cpu_scalars: at most one 0-dim CPU input, never an output; "
    "everything else on the device",
    WHERE: "where_self_out: 0-dim condition/self/other on another device are moved to the first "
    "non-CPU one's device; then TensorIterator without CPU scalars",
    MASKED_FILL: "masked_fill__cuda: mask on self's device, even 0-dim; a value tensor must be 0-dim "
    "and may be anywhere (item()), but a CPU self with a CUDA value is refused",
    SCALAR_VALUE: "fill_/index_fill_ with a 0-dim value tensor read by item(): value anywhere, "
    "the other tensors on one device",
    INDEX: "index (x[idx]): every index on the CPU or on x's device (check_indices_on_cpu_or_selfdevice); "
    "CPU indices are copied to the device",
    INDEX_PUT: "_index_put_impl_ (x[idx] = v): indices moved to x's device whatever theirs; v on x's "
    "device unless 0-dim (moved), or a one-element CPU v with a single boolean mask on x's device "
    "(masked_fill path); with accumulate=True v must end up on x's device",
    TRANSFER: "copies across devices are the point: no check",
    CPU_SCALAR_OTHER: "logical_and/or/xor, soft_margin_loss (CompositeExplicitAutograd): the result is made "
    "on self's device before TensorIterator runs, so only `other` may be a 0-dim CPU input",
    SCATTER: "slice/select/diagonal/as_strided_scatter (CompositeExplicitAutograd): self is cloned and src "
    "copied into it: any devices; the result is on self's device",
    ANY: "resize_as_ reads the template's sizes only, linspace/logspace their tensor ends' values, "
    "_use_cudnn_ctc_loss & co. only inspect their arguments: no check",
    HOST_LENGTHS: "_pack_padded_sequence/_pad_packed_sequence read their lengths / batch_sizes on the "
    "host (checkLongTensor): those must be CPU tensors; the data may be anywhere",
    MASKED_INDEX: "_unsafe_masked_index(_put_accumulate) (CompositeExplicitAutograd, over index): index "
    "tensors on the CPU or on self's device; mask and values on self's device",
    CUDNN_CTC: "_cudnn_ctc_loss (device_check: NoCheck; cudnn/LossCTC.cpp checkBackend): log_probs on "
    "CUDA; with int-list lengths the targets on the CPU, with length tensors anywhere (moved to CUDA)",
    RNG_STATE: "flash/efficient/cuDNN attention backward: the forward's dropout RNG state "
    "(philox_seed, philox_offset; rng_state, unused) comes back as host tensors outside graph "
    "capture (0-dim CPU ones when there is no dropout) and is taken so; the rest on one device",
}
# Their names in the fused attention backward ops' schemas.
_RNG_STATE_ARGS = frozenset({"philox_seed", "philox_offset", "rng_state", "unused"})

# Binary and comparison ops built with TensorIterator's BINARY_OP_CONFIG / comparison config
# (allow_cpu_scalars(true)); their functional, in-place and out variants are all `NoCheck`.
# fmt: off
_CPU_SCALAR_OPS = [
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod",
    "pow", "maximum", "minimum", "fmax", "fmin", "atan2", "hypot", "copysign", "heaviside",
    "xlogy", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_left_shift",
    "bitwise_right_shift", "__and__", "__or__", "__xor__", "__lshift__", "__rshift__",
    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "eq", "ne", "lt", "le",
    "gt", "ge", "special_xlog1py", "special_zeta", "special_chebyshev_polynomial_t",
    "special_chebyshev_polynomial_u", "special_chebyshev_polynomial_v",
    "special_chebyshev_polynomial_w", "special_shifted_chebyshev_polynomial_t",
    "special_shifted_chebyshev_polynomial_u", "special_shifted_chebyshev_polynomial_v",
    "special_shifted_chebyshev_polynomial_w", "special_hermite_polynomial_h",
    "special_hermite_polynomial_he", "special_laguerre_polynomial_l",
    "special_legendre_polynomial_p",
]
# CompositeExplicitAutograd ops made of such elementwise ops: the same rule holds for them.
_CPU_SCALAR_COMPOSITES = ["ldexp", "allclose"]
# fmt: on


def _with_inplace(names: list[str]) -> list[str]:
    """Each op and its in-place variant (`add`, `add_`); dunder ops are named as they are."""
    return [n for name in names for n in ((name,) if name.startswith("__") else (name, name + "_"))]


RULES: dict[str, str] = {
    **dict.fromkeys(_with_inplace(_CPU_SCALAR_OPS), CPU_SCALAR),
    **dict.fromkeys(_CPU_SCALAR_COMPOSITES, CPU_SCALAR),
    **dict.fromkeys(_with_inplace(["logical_and", "logical_or", "logical_xor"]), CPU_SCALAR_OTHER),
    "soft_margin_loss": CPU_SCALAR_OTHER,  # CompositeExplicitAutograd; only the target may be a CPU scalar
    **dict.fromkeys(["slice_scatter", "select_scatter", "diagonal_scatter", "as_strided_scatter"], SCATTER),
    "resize_as_": ANY,
    "linspace": ANY,  # tensor start/end are read as scalars; the result goes to `device`
    "logspace": ANY,
    # CompositeExplicitAutograd: lengths / batch_sizes must be CPU tensors, read on the host
    "_pack_padded_sequence": HOST_LENGTHS,
    "_pad_packed_sequence": HOST_LENGTHS,
    # questions about the arguments (may cuDNN / MIOpen run this?), asked by CTC loss and RNNs
    # (`_ctc_loss(_backward)`, both overloads, keep the default: CUDA's generated wrapper wants
    # every tensor on log_probs' device, the length tensors of `.Tensor` too (torch 2.11 on an
    # H100 refuses host lengths there); `torch.ctc_loss` itself moves length tensors to the host
    # and calls the int-list overload, as `harness.trace.untraced_paths` keeps it under a tracer)
    "_use_cudnn_ctc_loss": ANY,
    "_cudnn_ctc_loss": CUDNN_CTC,
    "_use_miopen_ctc_loss": ANY,
    "_use_cudnn_rnn_flatten_weight": ANY,
    "_unsafe_masked_index": MASKED_INDEX,
    **dict.fromkeys(
        [
            "_scaled_dot_product_flash_attention_backward",
            "_flash_attention_backward",
            "_scaled_dot_product_efficient_attention_backward",
            "_efficient_attention_backward",
            "_scaled_dot_product_cudnn_attention_backward",
            "_cudnn_attention_backward",
            "_scaled_dot_product_fused_attention_overrideable_backward",
        ],
        RNG_STATE,
    ),
    "_unsafe_masked_index_put_accumulate": MASKED_INDEX,
    "where": WHERE,
    "masked_fill": MASKED_FILL,
    "masked_fill_": MASKED_FILL,
    "fill": SCALAR_VALUE,
    "fill_": SCALAR_VALUE,
    "index_fill": SCALAR_VALUE,
    "index_fill_": SCALAR_VALUE,
    "index": INDEX,
    "_unsafe_index": INDEX,
    "index_put": INDEX_PUT,
    "index_put_": INDEX_PUT,
    "_index_put_impl_": INDEX_PUT,
    "_unsafe_index_put": INDEX_PUT,
    "copy_": TRANSFER,
    "copy": TRANSFER,
    "_to_copy": TRANSFER,
    "_copy_from": TRANSFER,
    "_copy_from_and_resize": TRANSFER,
}


def _split(op: str) -> tuple[str, str]:
    """`aten.add_.Tensor` / `aten::add_.Tensor` / `add_` -> ("add_", "Tensor"); overload "" if none."""
    parts = op.replace("::", ".").split(".")
    if len(parts) >= 2 and parts[0] in ("aten", "prims"):
        parts = parts[1:]
    elif len(parts) >= 3:
        parts = parts[1:]  # another namespace
    name = parts[0]
    overload = parts[1] if len(parts) > 1 and parts[1] != "default" else ""
    return name, overload


@lru_cache(maxsize=4096)
def rule_of(op: str) -> str:
    """The rule for an op, by its name with or without namespace and overload (`aten.add_.Tensor`)."""
    return RULES.get(_split(op)[0], SAME)


def one_device_suffices(op: str) -> bool:
    """Whether every call of `op` with all its tensors on one device is accepted (all but the ops
    that want some argument on the host whatever the others' device)."""
    return rule_of(op) not in (HOST_LENGTHS, CUDNN_CTC)


# ---- operands ------------------------------------------------------------------------------------


class Operand(NamedTuple):
    """One tensor argument of a call: its name in the op's schema, where it is, and whether the
    op writes it (an out= tensor, or self of an in-place op; such a self appears twice: written,
    then read)."""

    name: str
    device: str  # "cuda:0", "cpu", "meta"
    dtype: str  # "float32", "bool"
    shape: tuple[int, ...]
    out: bool = False

    @property
    def dim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_cpu_scalar(self) -> bool:
        return self.device == "cpu" and not self.shape and not self.out


class Layout(NamedTuple):
    """What an op's schema says about its tensor arguments."""

    positional: tuple[str, ...]  # names of the arguments that may be passed by position
    tensor_args: tuple[tuple[str, bool, bool], ...]  # (name, is a list, kwarg-only and written)
    outs: tuple[str, ...]  # names of the written kwarg-only arguments (out=)
    inplace: bool  # the first argument is written
    device_arg: bool  # factories, *_like, new_*: made on their `device` from one input at most


def _is_tensor_type(t, *, in_list: bool = False) -> tuple[bool, bool]:
    """(is a tensor argument, is a list of them) for a schema argument's type."""
    kind = t.kind()
    if kind == "OptionalType":
        return _is_tensor_type(t.getElementType(), in_list=in_list)
    if kind == "ListType" and not in_list:
        return _is_tensor_type(t.getElementType(), in_list=True)[0], True
    return kind == "TensorType", in_list


def _layout_of_schema(schema) -> Layout:
    positional, tensor_args, inplace = [], [], False
    for i, a in enumerate(schema.arguments):
        written = a.alias_info is not None and a.alias_info.is_write
        if not a.kwarg_only:
            positional.append(a.name)
            if i == 0 and written:
                inplace = True
        is_tensor, is_list = _is_tensor_type(a.type)
        if is_tensor:
            tensor_args.append((a.name, is_list, a.kwarg_only and written))
    return Layout(
        positional=tuple(positional),
        tensor_args=tuple(tensor_args),
        outs=tuple(name for name, _, is_out in tensor_args if is_out),
        inplace=inplace,
        device_arg=any(a.name == "device" for a in schema.arguments),
    )


_LAYOUTS: dict = {}


def layout(func) -> Layout:
    """The layout of an `OpOverload`'s schema (cached per op)."""
    lay = _LAYOUTS.get(func)
    if lay is None:
        lay = _LAYOUTS[func] = _layout_of_schema(func._schema)
    return lay


@lru_cache(maxsize=4096)
def _layout_by_name(op: str) -> Layout | None:
    """The layout of an op named as a trace names it (`aten.add.Tensor`), or None if unknown."""
    parts = op.replace("::", ".").split(".")
    if len(parts) < 2:
        return None
    try:
        packet = getattr(getattr(torch.ops, parts[0]), parts[1])
        return layout(getattr(packet, parts[2] if len(parts) > 2 else "default"))
    except Exception:  # not an op of this torch (a trace from another version, a custom op)
        return None


def _operand(name: str, t: torch.Tensor, out: bool) -> Operand:
    return Operand(name, str(t.device), str(t.dtype).removeprefix("torch."), tuple(t.shape), out)


def live_operands(lay: Layout, args, kwargs) -> list[Operand]:
    """The operands of a call about to run: written ones (out=) first, then the positional ones
    (an in-place op's self as written, then as read), then kwarg-only tensor inputs."""
    ops = []
    written = lay.outs
    for name in written:
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor):
            ops.append(_operand(name, t, True))
        elif isinstance(t, (list, tuple)):
            ops.extend(_operand(name, x, True) for x in t if isinstance(x, torch.Tensor))
    names = lay.positional
    for i, a in enumerate(args):
        name = names[i] if i < len(names) else f"arg{i}"
        if isinstance(a, torch.Tensor):
            if i == 0 and lay.inplace:
                ops.append(_operand(name, a, True))  # written, and read
            ops.append(_operand(name, a, False))
        elif isinstance(a, (list, tuple)):
            ops.extend(_operand(name, x, False) for x in a if isinstance(x, torch.Tensor))
    for name, v in kwargs.items():  # kwarg-only tensor inputs (rare)
        if name not in written and isinstance(v, torch.Tensor):
            ops.append(_operand(name, v, False))
    return ops


def recorded_operands(op: str, specs: Sequence) -> list[Operand]:
    """The operands of a recorded op from its tensor specs (`TensorSpec`s, in the order the tracer
    records them: positional arguments, lists flattened and None left out, then keyword ones).
    Names come from the op's schema; where it is unknown, or the specs do not fit it, they are
    `arg0`, `arg1`, ... in order."""
    lay = _layout_by_name(op)
    n = len(specs)
    if lay is None:
        return [Operand(f"arg{i}", s.device, s.dtype, tuple(s.shape)) for i, s in enumerate(specs)]
    outs = lay.outs
    ins = [(name, is_list) for name, is_list, is_out in lay.tensor_args if not is_out]
    n_outs = len(outs) if n >= len(outs) and outs else 0
    n_ins = n - n_outs
    fixed = sum(1 for _, is_list in ins if not is_list)
    names: list[str] = []
    for name, is_list in ins:
        if is_list:
            names += [name] * max(n_ins - fixed, 0)
        else:
            names.append(name)
    names = names[:n_ins] + [f"arg{i}" for i in range(len(names), n_ins)]
    operands = []
    for i, (name, s) in enumerate(zip(names, specs[:n_ins], strict=True)):
        if i == 0 and lay.inplace:
            operands.append(Operand(name, s.device, s.dtype, tuple(s.shape), True))
        operands.append(Operand(name, s.device, s.dtype, tuple(s.shape)))
    for name, s in zip(outs, specs[n_ins:], strict=False):
        operands.append(Operand(name, s.device, s.dtype, tuple(s.shape), True))
    return operands


# ---- the checks ----------------------------------------------------------------------------------


def _same_device(ops: list[Operand], wrapper: str) -> str | None:
    common = None
    for o in ops:
        if common is None:
            common = o.device
        elif o.device != common:
            return (
                f"Expected all tensors to be on the same device, but got {o.name} is on {o.device}, different "
                f"from other tensors on {common} (when checking argument in method {wrapper})"
            )
    return None


def _two_devices(a: str, b: str) -> str:
    return f"Expected all tensors to be on the same device, but found at least two devices, {a} and {b}!"


def _tensor_iterator(ops: list[Operand], allow_cpu_scalars: bool) -> str | None:
    """TensorIterator's compute_types device check (outputs first, as it orders them)."""
    ordered = [o for o in ops if o.out] + [o for o in ops if not o.out]
    common = next((o.device for o in ordered if o.device != "cpu"), "cpu")
    if common == "cpu":
        return None
    scalars = 0
    for o in ordered:
        if allow_cpu_scalars and o.is_cpu_scalar:
            if scalars >= 1:
                return "Trying to pass too many CPU scalars to non-CPU kernel!"
            scalars += 1
        elif o.device != common:
            return _two_devices(common, o.device)
    return None


def _first(ops: list[Operand], name: str) -> Operand | None:
    return next((o for o in ops if o.name == name and not o.out), None)


def _check_where(ops, wrapper, accumulate) -> str | None:
    trio = [o for o in ops if not o.out and o.name in ("condition", "self", "other")]
    device = next((o.device for o in trio if o.device != "cpu"), "cpu")
    moved = [o for o in trio if not (o.device != device and o.dim == 0 and device != "cpu")]
    return _tensor_iterator([o for o in ops if o.out] + moved, allow_cpu_scalars=False)


def _check_masked_fill(ops, wrapper, accumulate) -> str | None:
    self, mask, value = _first(ops, "self"), _first(ops, "mask"), _first(ops, "value")
    if self is None or mask is None:
        return _same_device(ops, wrapper)
    if value is not None:
        if value.dim != 0:
            return None  # the CPU kernel raises the same "only supports a 0-dimensional value tensor"
        if self.device == "cpu" and value.device != "cpu":
            return "masked_fill_: Expected inputs to be on same device"
    if self.device != mask.device:
        return (
            f"expected self and mask to be on the same device, but got mask on {mask.device} "
            f"and self on {self.device}"
        )
    return None


def _check_scalar_value(ops, wrapper, accumulate) -> str | None:
    rest = [o for o in ops if not (o.name == "value" and o.dim == 0)]
    return _tensor_iterator(rest, allow_cpu_scalars=False)


def _check_index(ops, wrapper, accumulate) -> str | None:
    self = _first(ops, "self")
    if self is None:
        return _same_device(ops, wrapper)
    for o in ops:
        if o.name == "indices" and o.device != "cpu" and o.device != self.device:
            return (
                f"indices should be either on cpu or on the same device as the indexed tensor ({self.device})"
            )
    out = next((o for o in ops if o.out), None)
    if out is not None and out.device != self.device:
        return _tensor_iterator([out, self], allow_cpu_scalars=False)
    return None


def index_put_is_masked_fill(ops: Sequence[Operand], accumulate: bool = False) -> bool:
    """Whether CUDA runs this `index_put_` (x[mask] = v) as `self.masked_fill_(mask, v.item())`
    (canDispatchToMaskedFill): not accumulating, a one-element CPU value, and one index, a bool or
    uint8 mask on self's device. The mask is then never counted on the host (no nonzero)."""
    self, value = _first(ops, "self"), _first(ops, "values")
    if accumulate or self is None or value is None or value.numel != 1 or value.device != "cpu":
        return False
    indices = [o for o in ops if o.name == "indices"]
    return len(indices) == 1 and indices[0].dtype in ("bool", "uint8") and indices[0].device == self.device


def _check_index_put(ops, wrapper, accumulate) -> str | None:
    self, value = _first(ops, "self"), _first(ops, "values")
    if self is None or value is None:
        return _same_device(ops, wrapper)
    dev = self.device
    if index_put_is_masked_fill(ops, accumulate):
        return None
    vdev = value.device
    if vdev != dev and value.dim == 0:
        vdev = dev  # moved
    if vdev == dev:
        return None
    if dev.startswith("cuda") and accumulate:
        return f"expected device {dev} but got device {vdev} for value tensor"
    common = dev if dev != "cpu" else vdev
    return _two_devices(common, vdev if common == dev else dev)


def _check_cpu_scalar_other(ops, wrapper, accumulate) -> str | None:
    self = _first(ops, "self")
    if self is not None and self.device == "cpu":
        other = next((o.device for o in ops if o.device != "cpu"), None)
        if other is not None:
            return _two_devices(other, "cpu")
    return _tensor_iterator(ops, allow_cpu_scalars=True)


def _check_masked_index(ops, wrapper, accumulate) -> str | None:
    self = _first(ops, "self")
    if self is None:
        return _same_device(ops, wrapper)
    for o in ops:
        if o.device != self.device and not (o.name == "indices" and o.device == "cpu"):
            return (
                f"Expected all tensors to be on the same device, but got {o.name} is on {o.device}, different "
                f"from other tensors on {self.device} (when checking argument in method {wrapper})"
            )
    return None


def _check_host_lengths(ops, wrapper, accumulate) -> str | None:
    for o in ops:
        if o.name in ("lengths", "batch_sizes") and o.device != "cpu":
            return (
                f"'lengths' argument should be a 1D CPU int64 tensor, but got {o.dim}D {o.device} "
                f"{_TYPE_NAMES.get(o.dtype, o.dtype)} tensor"
            )
    return None


# c10's names of scalar types, as its messages write them
_TYPE_NAMES = {
    "int64": "Long",
    "int32": "Int",
    "int16": "Short",
    "int8": "Char",
    "uint8": "Byte",
    "bool": "Bool",
}


def _check_rng_state(ops, wrapper, accumulate) -> str | None:
    # By name, or as what they are (0-dim int64): a trace leaves out the undefined tensors before
    # them (flash's cum_seq_q/k), so recorded operands can carry the wrong names.
    def rng(o: Operand) -> bool:
        return o.device == "cpu" and (o.name in _RNG_STATE_ARGS or (o.dim == 0 and o.dtype == "int64"))

    return _same_device([o for o in ops if not rng(o)], wrapper)


def _no_check(ops, wrapper, accumulate) -> None:
    return None


def _check_cudnn_ctc(ops, wrapper, accumulate) -> str | None:
    log_probs, targets = _first(ops, "log_probs"), _first(ops, "targets")
    if log_probs is None or targets is None:
        return _same_device(ops, wrapper)
    lengths_given = any(o.name in ("input_lengths", "target_lengths") for o in ops)  # the .Tensor overload
    want_targets = "cpu" if not lengths_given else targets.device
    for o, want in ((log_probs, "cuda"), (targets, want_targets)):
        if o.device.split(":")[0] != want.split(":")[0]:
            return (
                f"Expected tensor to have {want.split(':')[0].upper()} Backend, but got tensor with "
                f"{o.device.split(':')[0].upper()} Backend (while checking arguments for cudnn_ctc_loss)"
            )
    return None


_CHECKS = {
    SAME: lambda ops, wrapper, accumulate: _same_device(ops, wrapper),
    CPU_SCALAR: lambda ops, wrapper, accumulate: _tensor_iterator(ops, allow_cpu_scalars=True),
    CPU_SCALAR_OTHER: _check_cpu_scalar_other,
    SCATTER: _no_check,
    ANY: _no_check,
    TRANSFER: _no_check,
    MASKED_INDEX: _check_masked_index,
    HOST_LENGTHS: _check_host_lengths,
    RNG_STATE: _check_rng_state,
    CUDNN_CTC: _check_cudnn_ctc,
    WHERE: _check_where,
    MASKED_FILL: _check_masked_fill,
    SCALAR_VALUE: _check_scalar_value,
    INDEX: _check_index,
    INDEX_PUT: _check_index_put,
}


def refusal(
    op: str, operands: Sequence[Operand], *, accumulate: bool = False, device_arg: bool = False
) -> str | None:
    """CUDA's error message if real CUDA refuses a call of `op` (`aten.add.Tensor`, `add`) with
    these operands for their devices, else None. `accumulate`: index_put's flag; `device_arg`: the
    op has a `device` argument (factories, `*_like`, `new_*`), which CUDA does not check."""
    if device_arg or len(operands) < 2:
        return None
    first = operands[0].device
    if all(o.device == "cpu" for o in operands):
        return None  # a CPU op
    if all(o.device == first for o in operands) and one_device_suffices(op):
        return None
    name, overload = _split(op)
    wrapper = f"wrapper_CUDA_{name}{'_' + overload if overload else ''}"  # as structured kernels' are named
    return _CHECKS[RULES.get(name, SAME)](list(operands), wrapper, accumulate)
