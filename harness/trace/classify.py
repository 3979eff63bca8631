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
  ops compute nothing and are never stray, nor is host bookkeeping (every tensor a 0-dim CPU
  tensor, which CUDA takes as a number, or empty), nor are the ops of the model's own forward
  (module ""), where a run's inputs are checked on the host and moved: the edges of the run.
A copy across devices is allowed when something declares it (`Classifier.why_allowed`): outside
the model (the caller's uploads and downloads), the run's inputs uploaded, an activation moved at
a device-map boundary (between devices of a module that the placement spreads over several),
an offloading hook's traffic (accelerate's), the user's `allow_transfers`, no bytes at all, or
the model's own forward handing its result to the host (the tracer holds such a download until
the call returns, and asks `not_returned` for one the call does not return).
Any other copy inside the model is an offending `transfer` (a device-to-host one a `sync`). A
sync outside the model is the caller reading its output, allowed too.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from harness.errors import UsageError
from harness.trace import rules
from harness.trace.events import ALLOWED, MISMATCH, OK, STRAY, SYNC, TRANSFER, Event

# Kinds of ops, by their name without namespace and overload (`aten.mm.default` -> `mm`).
COPY_TO = frozenset({"_to_copy", "to", "_copy_to"})  # input 0 -> output 0
COPY_INTO = frozenset({"copy_", "copy"})  # (dst, src)
COPY_FROM = frozenset({"_copy_from", "_copy_from_and_resize"})  # (src, dst)
# The host waiting for the device without a tensor op (`torch.cuda.synchronize()`, a stream's or
# an event's `synchronize()`): the tracer records it as an event of this op, without tensors.
HOST_WAIT = "cuda::synchronize"

SYNC_OPS = frozenset(
    {
        "synchronize",  # HOST_WAIT
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
        # a nested tensor's sizes, or whether a mask is left-aligned, come from the mask's values
        # (nn.TransformerEncoder's fast path with a padding mask)
        "_nested_tensor_from_mask",
        "_nested_tensor_from_mask_left_aligned",
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


def _ctc_lengths_on_device(first: int):
    # _ctc_loss(_backward).Tensor, called directly, copies its lengths (arguments `first`,
    # `first` + 1) to the host (ctc_loss_tensor); CUDA wants them on log_probs' device.
    def reads(args, kwargs) -> bool:
        return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args[first : first + 2])

    return reads


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
    "aten._ctc_loss.Tensor": _ctc_lengths_on_device(2),
    "aten._ctc_loss_backward.Tensor": _ctc_lengths_on_device(3),
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
    r"expected self and mask|device type for generator|should be a 1D CPU int64 tensor, but got \d+D (?!cpu)|"
    # Legacy checks (convolutions) name tensor types: one CUDA type against one CPU type.
    r"\(torch\.cuda\.\w+\) and \w+ type \(torch\.(?!cuda\.)\w+\)|"
    r"\(torch\.(?!cuda\.)\w+\) and \w+ type \(torch\.cuda\.\w+\)|"
    # Autograd's check of a tensor hook's result (check_variable_result): a gradient moved across.
    r"\(was torch\.cuda\.\w+ got torch\.(?!cuda\.)\w+\)|\(was torch\.(?!cuda\.)\w+ got torch\.cuda\.\w+\)|"
    r"was (?:CUDA|CPU) tensor got (?:CPU|CUDA) tensor|"
    # A kernel's own device assertion, and a CUDA tensor reaching an op with no CUDA kernel.
    r"is_cuda\(\) INTERNAL ASSERT|with arguments from the 'CUDA' backend",
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


def _computes_nothing(specs) -> bool:
    """Whether an op's tensors are all host scalars (0-dim CPU tensors, which CUDA itself takes
    as numbers) or empty: host bookkeeping such as `int(batch_sizes[0])` or `torch.tensor(2.0).sqrt()`,
    no computation that belongs on a device."""
    return all(s.nbytes == 0 or (s.device == "cpu" and not s.shape) for s in specs)


def refused(event: Event) -> bool:
    """Whether real CUDA refuses this op for the devices of its inputs (and out= tensors): CUDA's
    device rules (`harness.trace.rules`, which the emulated accelerator applies too, checked
    against real CUDA by the conformance table) applied to the recorded devices.

    Meta counts as an accelerator here, so a meta run is judged as a CUDA run would be."""
    ins = event.inputs
    if len(ins) < 2:
        return False
    first = ins[0].device
    if all(s.device == first for s in ins) and (first == "cpu" or rules.one_device_suffices(event.op)):
        return False
    return rules.refusal(event.op, rules.recorded_operands(event.op, ins)) is not None


def allowance(allow_transfers) -> Callable[[Event], bool] | None:
    """A user's declared transfers as a predicate on events: module-path prefixes (a str or a
    list of them: a copy inside one of those modules is allowed; "" allows every copy), or a
    predicate `(event) -> bool` (it sees `event.module`, `event.op`, `event.tensors`,
    `event.transfer` {"from", "to", "bytes"}, `event.source`), or None."""
    if allow_transfers is None:
        return None
    if callable(allow_transfers):
        return allow_transfers
    prefixes = (allow_transfers,) if isinstance(allow_transfers, str) else tuple(allow_transfers)
    for p in prefixes:
        if not isinstance(p, str):
            raise UsageError(None, "allow_transfers", f"module-path prefixes (str) or a predicate; got {p!r}")

    def allowed(event: Event) -> bool:
        module = event.module
        return module is not None and any(
            not p or module == p or module.startswith(p + ".") for p in prefixes
        )

    allowed.prefixes = prefixes
    return allowed


class Classifier:
    """Classifies events for one placement (a `ModulePlacement`, or None for no expectations)
    and the user's declared transfers (`allowance(allow_transfers)`)."""

    def __init__(self, placement=None, allow_transfers=None):
        self.placement = placement
        self.allow = allowance(allow_transfers)
        self._left: set[str] = set()  # devices activations left at boundaries, this forward call

    def begin_call(self) -> None:
        """A new forward call of the model begins (boundaries are judged per call)."""
        self._left = set()

    def why_allowed(self, event: Event, src: str, dst: str) -> str | None:
        """Why a copy across devices is declared (the transfer's "why"), or None when nothing
        declares it: "outside" (the caller's uploads and downloads, outside the model), "output" (an activation
        downloaded in the model's own forward: its result handed to the host), "empty"
        (no bytes move), "offload" or "boundary" (an offloading hook moving weights, or a module's
        inputs, as accelerate's does: `event.hook`), "input" (the run's inputs uploaded),
        "declared" (`allow_transfers`), "boundary" (an activation moved between the devices of
        a module that the placement spreads over several: a declared device-map boundary)."""
        if event.module is None:
            return "outside"
        if event.hook is not None:
            return event.hook
        if not event.transfer["bytes"]:
            return "empty"
        if event.role == "input" and (dst != "cpu" or self._places_on(event.module, dst)):
            return "input"  # the run's inputs uploaded (read back to the host, they are a sync)
        if self.allow is not None and self.allow(event):
            return "declared"
        if event.role != "weight" and event.op_kind != K_UPLOAD and self._at_boundary(event.module, src, dst):
            return "boundary"
        if event.module == "" and dst == "cpu" and event.role is None:
            # the model's own forward hands its result to the host: the run's edge (the tracer
            # checks that the call returns it, else `not_returned`)
            return "output"
        return None

    def not_returned(self, event: Event) -> str:
        """The class of a download that `why_allowed` took for the model's result ("output") once
        the forward call has returned without it: a copy to the host in the middle of the
        forward (logging, numpy), which the host waits for (`sync`; `transfer` if non-blocking)."""
        event.transfer.pop("why", None)
        event.cls = TRANSFER if event.waits is False else SYNC
        return event.cls

    def _places_on(self, module: str, device: str) -> bool:
        return self.placement is None or device in self.placement.devices_under(module)

    def _at_boundary(self, module: str, src: str, dst: str) -> bool:
        """Whether the placement declares a boundary here: the module spreads over both devices,
        or one of its ancestors does and the copy brings data to the module's own device."""
        placement = self.placement
        if placement is None:
            return True  # no expectations: an activation may go anywhere
        if not placement.declared and dst in self._left:
            # Where weights happen to be declares a split only one way: activations that come
            # back to a device they left in this call go back and forth (a router left on the
            # CPU between layers on the GPU, say). Give `placement=` to declare such a map.
            return False
        own = placement.device_of(module)
        path = module
        while True:
            devices = placement.devices_under(path)
            if len(devices) > 1 and src in devices and dst in devices and (path == module or dst == own):
                self._left.add(src)
                return True
            if not path:
                return False
            path = path.rsplit(".", 1)[0] if "." in path else ""

    def _transfer(self, event: Event, src: str, dst: str, nbytes: int, explicit: bool) -> str:
        if dst == "meta":
            nbytes = 0  # meta holds no data: nothing moves (an offloaded weight released)
        event.transfer = {"from": src, "to": dst, "bytes": nbytes, "explicit": explicit}
        why = self.why_allowed(event, src, dst)
        if why is not None:
            event.transfer["why"] = why
            return ALLOWED
        return TRANSFER

    def classify(self, event: Event, last_child: str | None = None) -> str:
        """Sets and returns `event.cls` (and `event.transfer` for copies across devices)."""
        kind = event.op_kind = op_kind(event.op)
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
                cls = self._transfer(event, src, dst, nbytes, explicit=True)
                if cls == TRANSFER and dst == "cpu" and event.waits is not False:
                    cls = SYNC  # a device-to-host copy in the model waits for the device
                event.cls = cls
                return cls
        elif kind == K_UPLOAD:
            if ins and ins[0][0] != "cpu":
                dst = ins[0][0]
                event.cls = self._transfer(event, "cpu", dst, ins[0][3], explicit=True)
                return event.cls
        elif kind == K_SYNC:
            # (an op that raised another error than a device error read nothing)
            reads = (ins and ins[0][0] != "cpu") or (not ins and event.op == HOST_WAIT)
            if reads and event.waits is not False and event.error is None:
                cls = ALLOWED if event.module is None else SYNC
                event.cls = cls
                return cls
        elif kind in (K_INDEX_GET, K_INDEX_PUT):
            home = ins[0][0] if ins else "cpu"
            indices = ins[1:-1] if kind == K_INDEX_PUT else ins[1:]
            if home != "cpu":
                # (x[mask] = scalar is masked_fill_ on CUDA: no count of the mask; `accumulate`
                # is not recorded, and is taken as False, as `x[...] = v` passes it)
                fills = kind == K_INDEX_PUT and rules.index_put_is_masked_fill(
                    rules.recorded_operands(event.op, ins)
                )
                if not fills and any(s[0] != "cpu" and s[1] == "bool" for s in indices):
                    cls = ALLOWED if event.module is None else SYNC  # nonzero of a device mask
                    event.cls = cls
                    return cls
                moved = [s for s in indices if s[0] == "cpu"]
                if moved:
                    # CUDA copies CPU indices to the device itself: an implicit upload
                    event.cls = self._transfer(event, "cpu", home, sum(s[3] for s in moved), explicit=False)
                    return event.cls
        expected = event.expected
        if expected is not None and not event.alias and event.module:
            if outs:
                device = outs[0][0]
            elif ins:
                device = next((s[0] for s in ins if not _is_cpu_scalar(s)), ins[0][0])
            else:
                device = None
            # (a module whose submodules the placement spreads over several devices may compute
            # on any of them: it hands its submodules their inputs and combines their results)
            if (
                device is not None
                and device != expected
                and not (self.placement is not None and self._places_on(event.module, device))
                and not _computes_nothing((*ins, *(outs or ())))
            ):
                event.cls = STRAY
                return STRAY
        event.cls = OK
        return OK
