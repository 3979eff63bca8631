"""Classification of one event against the placement: mismatch, sync, stray, transfer, allowed, ok.

The rules follow what the real CUDA backend does:
- an op with tensor inputs on different devices is refused, except where CUDA's kernel takes them
  (`refused`, by CUDA's device rules in `harness.trace.rules`: a 0-dim CPU tensor as a scalar in
  elementwise binary ops, CPU index tensors in advanced indexing (`x[idx]`, `x[idx] = v`), which
  CUDA copies to the device itself, an implicit transfer); an op that raised a device error is a
  mismatch whatever the table says;
- `_to_copy`, `to`, `copy_` across devices are explicit transfers, and so is a tensor made on a
  device from Python data (`torch.tensor(..., device=...)`: its `lift_fresh` on the device);
- a host read of device data (`_local_scalar_dense` behind `item()`, `bool()`, `int()`;
  `nonzero`, `masked_select`, `unique`, ...; a boolean mask on the device used as an index; a
  device-to-host copy inside the model) is a sync;
- an op of a module that computes on a device other than the module's placement is stray; view
  ops compute nothing and are never stray, nor are the ops of the model's own forward (module
  ""), where a run's inputs are checked on the host and moved: the edges of the run.
A transfer is allowed at a declared device-map boundary (in the model's forward, between the
module before the boundary and the module entered, or in the module entered itself) and at the
edges of a run (outside the model; the token upload before `embed` or in it; the download after
`head`). A sync outside the model is the caller reading its output, allowed too.
"""

from __future__ import annotations

import re

import torch

from harness.trace import rules
from harness.trace.events import ALLOWED, MISMATCH, OK, STRAY, SYNC, TRANSFER, Event

# Kinds of ops, by their name without namespace and overload (`aten.mm.default` -> `mm`).
COPY_TO = frozenset({"_to_copy", "to", "_copy_to"})  # input 0 -> output 0
COPY_INTO = frozenset({"copy_", "copy"})  # (dst, src)
COPY_FROM = frozenset({"_copy_from", "_copy_from_and_resize"})  # (src, dst)
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "nonzero",
        "nonzero_numpy",
        "argwhere",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "bincount",
        "_assert_async",
        "tolist",
        # found by `scripts/sweep_device_rules.py --check syncs` (the host waited on an H100):
        # error checks and solvers that read results on the host, a bool result, sizes from data
        "allclose",
        "_linalg_check_errors",
        "linalg_eig",
        "_linalg_eigh",
        "_linalg_svd",
        "linalg_lstsq",
        "linalg_lu",
        "linalg_lu_factor_ex",
        "linalg_ldl_factor_ex",
        "linalg_ldl_solve",
        "linalg_pinv",
        "cholesky",
        "linalg_matrix_exp",
        "to_sparse",
        "_to_sparse",
    }
)


def _output_size_unknown(args, kwargs) -> bool:
    # repeat_interleave(repeats): the output's length is the sum of the repeats, read on the host
    # unless the caller gives it (`output_size=`).
    return (kwargs or {}).get("output_size") is None


def _range_unknown(args, kwargs) -> bool:
    # histc(x, bins, min, max): with min == max (the default 0, 0) CUDA reads x's min and max first.
    kwargs = kwargs or {}
    lo = kwargs.get("min", args[2] if len(args) > 2 else 0)
    hi = kwargs.get("max", args[3] if len(args) > 3 else 0)
    return lo == hi


def _same_shapes(args, kwargs) -> bool:
    # equal(a, b): tensors of different shapes are unequal without reading them.
    return args[0].shape == args[1].shape


def _ends_on_device(args, kwargs) -> bool:
    # linspace/logspace with tensor ends: their values are read on the host.
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args[:2])


def _value_on_device(position: int):
    # masked_fill/index_fill with a tensor value: the value is read on the host (`item()`).
    def reads(args, kwargs) -> bool:
        value = args[position] if len(args) > position else (kwargs or {}).get("value")
        return isinstance(value, torch.Tensor) and value.device.type != "cpu"

    return reads


def _always(args, kwargs) -> bool:
    return True


def _lengths_checked(args, kwargs) -> bool:
    # segment_reduce(data, reduce, lengths=...): the lengths are checked on the host unless unsafe.
    kwargs = kwargs or {}
    return isinstance(kwargs.get("lengths"), torch.Tensor) and not kwargs.get("unsafe", False)


# Ops that read device data on the host only for some arguments (or overloads): op -> (args,
# kwargs) -> whether this call does. The tracer asks before the op runs (`Event.waits`).
SYNC_UNLESS = {
    "aten.repeat_interleave.Tensor": _output_size_unknown,
    "aten.histc.default": _range_unknown,
    "aten.equal.default": _same_shapes,
    **dict.fromkeys(
        [
            f"aten.{op}.{o}"
            for op in ("linspace", "logspace")
            for o in ("Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor")
        ],
        _ends_on_device,
    ),
    "aten.masked_fill.Tensor": _value_on_device(2),
    "aten.masked_fill_.Tensor": _value_on_device(2),
    "aten.index_fill.int_Tensor": _value_on_device(3),
    "aten.index_fill_.int_Tensor": _value_on_device(3),
    # normal with a tensor std checks std >= 0 on the host
    "aten.normal.Tensor_Tensor": _always,
    "aten.normal.float_Tensor": _always,
    "aten.segment_reduce.default": _lengths_checked,
}
INDEX_GET = frozenset({"index", "_unsafe_index"})  # (self, *indices)
# (self, *indices, value)
INDEX_PUT = frozenset({"index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"})
# torch.tensor / as_tensor of Python data: the values are copied to the device in C++, unseen,
# and the fresh tensor is then lifted (`lift_fresh`) on its device: an upload from the host.
UPLOAD = frozenset({"lift_fresh", "lift_fresh_copy"})
(K_OTHER, K_COPY_TO, K_COPY_INTO, K_COPY_FROM, K_SYNC, K_INDEX_GET, K_INDEX_PUT, K_UPLOAD) = range(8)

_DEVICE_ERROR = re.compile(
    r"same device|expected device|at least two devices|different from other tensors|"
    r"on the current device|Expected object of device|to be on (?:the )?(?:same )?device|"
    r"device mismatch|on different devices|indices should be either on|CPU scalars to non-CPU kernel|"
    r"expected self and mask|device type for generator",
    re.IGNORECASE,
)


def is_device_error(message: str | None) -> bool:
    """Whether an exception message is a backend refusing tensors on different devices."""
    return bool(message) and _DEVICE_ERROR.search(message) is not None


def base_name(op: str) -> str:
    """`aten.index_put_.default` -> `index_put_`; `aten::mm` -> `mm`."""
    parts = op.replace("::", ".").split(".")
    return parts[1] if len(parts) >= 2 else parts[0]


_KINDS: dict[str, int] = {}


def op_kind(op: str) -> int:
    kind = _KINDS.get(op)
    if kind is None:
        b = base_name(op)
        if b in COPY_TO:
            kind = K_COPY_TO
        elif b in COPY_INTO:
            kind = K_COPY_INTO
        elif b in COPY_FROM:
            kind = K_COPY_FROM
        elif b in SYNC_OPS or op in SYNC_UNLESS:
            kind = K_SYNC
        elif b in INDEX_GET:
            kind = K_INDEX_GET
        elif b in INDEX_PUT:
            kind = K_INDEX_PUT
        elif b in UPLOAD:
            kind = K_UPLOAD
        else:
            kind = K_OTHER
        _KINDS[op] = kind
    return kind


def _is_cpu_scalar(spec) -> bool:
    return spec.device == "cpu" and not spec.shape


def refused(event: Event) -> bool:
    """Whether real CUDA refuses this op for the devices of its inputs (and out= tensors): CUDA's
    device rules (`harness.trace.rules`, which the emulated accelerator applies too, checked
    against real CUDA by the conformance table) applied to the recorded devices.

    Meta counts as an accelerator here, so a meta run is judged as a CUDA run would be."""
    ins = event.inputs
    if len(ins) < 2:
        return False
    first = ins[0].device
    if all(s.device == first for s in ins):
        return False
    return rules.refusal(event.op, rules.recorded_operands(event.op, ins)) is not None


class Classifier:
    """Classifies events for one placement (a `Placement`, or None for no expectations)."""

    def __init__(self, placement=None):
        self.placement = placement
        self.embed = None
        self.head_modules = frozenset({"head"})
        self._after: set[tuple[str | None, str, str]] = set()  # (module before, from, to)
        self._entered: set[tuple[str, str, str]] = set()  # (module entered, from, to)
        if placement is None:
            return
        self.embed = str(placement.embed)
        n = len(placement.layers)
        for module, src, dst in placement.boundaries():
            src, dst = str(src), str(dst)
            self._entered.add((module, src, dst))
            if module == "norm":
                before = f"layers.{n - 1}" if n else "embed"
            else:
                i = int(module.split(".")[1])
                before = f"layers.{i - 1}" if i else "embed"
            self._after.add((before, src, dst))

    def transfer_allowed(self, event: Event, src: str, dst: str, last_child: str | None) -> bool:
        module = event.module
        if module is None:
            return True  # outside the model: the caller's uploads and downloads
        if module == "":
            if last_child is None:
                return self.embed is None or dst == self.embed  # the token upload
            if last_child in self.head_modules:
                return True  # the download of the logits
            return (last_child, src, dst) in self._after
        if (module, src, dst) in self._entered:
            return True
        if (module == "embed" or module.startswith("embed.")) and dst == self.embed:
            dtype = event.inputs[0][1] if event.inputs else ""
            return "int" in dtype  # token ids
        return False

    def classify(self, event: Event, last_child: str | None = None) -> str:
        """Sets and returns `event.cls` (and `event.transfer` for copies across devices)."""
        kind = op_kind(event.op)
        ins, outs = event.inputs, event.outputs
        if (event.error is not None and is_device_error(event.error)) or refused(event):
            event.cls = MISMATCH
            return MISMATCH
        if kind in (K_COPY_TO, K_COPY_INTO, K_COPY_FROM) and ins:
            if kind == K_COPY_TO:
                src = ins[0][0]
                if outs:
                    dst = outs[0][0]
                elif len(ins) > 1:
                    dst = ins[1][0]  # to(other)
                else:
                    dst = event.target or src
            elif kind == K_COPY_INTO:
                dst, src = ins[0][0], ins[1][0] if len(ins) > 1 else ins[0][0]
            else:
                src, dst = ins[0][0], ins[1][0] if len(ins) > 1 else ins[0][0]
            if src != dst:
                nbytes = ins[1][3] if kind == K_COPY_INTO and len(ins) > 1 else ins[0][3]
                event.transfer = {"from": src, "to": dst, "bytes": nbytes, "explicit": True}
                if self.transfer_allowed(event, src, dst, last_child):
                    cls = ALLOWED
                elif dst == "cpu" and event.waits is not False:
                    cls = SYNC  # a device-to-host copy in the model waits for the device
                else:
                    cls = TRANSFER
                event.cls = cls
                return cls
        elif kind == K_UPLOAD:
            if ins and ins[0][0] != "cpu":
                dst = ins[0][0]
                event.transfer = {"from": "cpu", "to": dst, "bytes": ins[0][3], "explicit": True}
                cls = ALLOWED if self.transfer_allowed(event, "cpu", dst, last_child) else TRANSFER
                event.cls = cls
                return cls
        elif kind == K_SYNC:
            if ins and ins[0][0] != "cpu" and event.waits is not False:
                cls = ALLOWED if event.module is None else SYNC
                event.cls = cls
                return cls
        elif kind in (K_INDEX_GET, K_INDEX_PUT):
            home = ins[0][0] if ins else "cpu"
            indices = ins[1:-1] if kind == K_INDEX_PUT else ins[1:]
            if home != "cpu":
                if any(s[0] != "cpu" and s[1] == "bool" for s in indices):
                    cls = ALLOWED if event.module is None else SYNC  # nonzero of a device mask
                    event.cls = cls
                    return cls
                moved = [s for s in indices if s[0] == "cpu"]
                if moved:
                    event.transfer = {
                        "from": "cpu",
                        "to": home,
                        "bytes": sum(s[3] for s in moved),
                        "explicit": False,
                    }
                    cls = ALLOWED if event.module is None else TRANSFER
                    event.cls = cls
                    return cls
        expected = event.expected
        if expected is not None and not event.alias and event.module:
            if outs:
                device = outs[0][0]
            elif ins:
                device = next((s[0] for s in ins if not _is_cpu_scalar(s)), ins[0][0])
            else:
                device = None
            if device is not None and device != expected:
                event.cls = STRAY
                return STRAY
        event.cls = OK
        return OK
