"""What a trace is made of: one `Event` per aten op, a `Summary` per run.

An event's tensors are `TensorSpec`s: named tuples (device, dtype, shape, nbytes), interned by
the tracer (one object per distinct spec) and written to JSON as lists.
Classes, worst first:

- `mismatch`: tensor inputs on different devices that the real backend refuses (or an op that
  raised a device error);
- `sync`: a host read of device data (`item`, `bool()`, `tolist`, `nonzero`, a boolean mask on
  the device, a device-to-host copy inside the model);
- `stray`: an op that runs on a device other than its module's placement though nothing raised;
- `transfer`: a cross-device copy that no declared boundary explains;
- `allowed`: a transfer at a declared device-map boundary, or at the edges of a run;
- `ok`: everything else.

A run is `clean` when it has no mismatch, stray or sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

MISMATCH, SYNC, STRAY, TRANSFER, ALLOWED, OK = "mismatch", "sync", "stray", "transfer", "allowed", "ok"
CLASSES = (MISMATCH, SYNC, STRAY, TRANSFER, ALLOWED, OK)
OFFENDING = frozenset((MISMATCH, SYNC, STRAY))
CLEAN, DIRTY = "clean", "dirty"


class TensorSpec(NamedTuple):
    """One tensor of an event, e.g. ("cuda:0", "float32", (3, 256), 3072). The tracer interns one
    per distinct spec; JSON writes it as a list."""

    device: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def spec_dict(spec: TensorSpec) -> dict:
    device, dtype, shape, nbytes = spec
    return {"device": device, "dtype": dtype, "shape": list(shape), "bytes": nbytes}


# The op of an event for a device error raised before any aten op ran (a check in a composite
# op's C++ code or in Python: meshgrid, multi_dot, scaled_dot_product_attention, ...).
RAISED = "<raised before any aten op>"


class Event:
    """One aten op as the tracer saw it, made before the op ran.

    `module` is the module path (`layers.0.moe.router`), "" for the model's own forward and None
    outside the model; `expected` the device its placement gives that module (None where there
    is no single one); `tensors` the GGUF names of the weights among the inputs; `source`
    "file:line in function" of the innermost model frame; `alias` True when the op only made a
    view (it computed nothing); `transfer` {"from", "to", "bytes", "explicit"} for a copy
    across devices; `stack` the Python stack, kept for offending events only.
    """

    __slots__ = (
        "seq",
        "step",
        "op",
        "module",
        "expected",
        "tensors",
        "source",
        "inputs",
        "outputs",
        "alias",
        "error",
        "cls",
        "transfer",
        "stack",
        "target",
        "waits",
        "named_devices",
    )

    def __init__(
        self,
        seq: int,
        step: int,
        op: str,
        module: str | None,
        expected: str | None,
        tensors: tuple[str, ...] | None,
        source: str | None,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec] | None = None,
        alias: bool = False,
        error: str | None = None,
        cls: str | None = None,
        transfer: dict | None = None,
        stack: list[str] | None = None,
        target: str | None = None,
    ):
        self.seq = seq
        self.step = step
        self.op = op
        self.module = module
        self.expected = expected
        self.tensors = tensors
        self.source = source
        self.inputs = inputs
        self.outputs = outputs
        self.alias = alias
        self.error = error
        self.cls = cls
        self.transfer = transfer
        self.stack = stack
        self.target = target  # the device a copy goes to, known before it runs (not written)
        # Whether the op makes the host wait for the device, where its arguments tell (an op of
        # `classify.SYNC_UNLESS`, a non-blocking copy to the host); None: by its kind (not written).
        self.waits: bool | None = None
        # The devices a device error names, for an error raised before any aten op (RAISED).
        self.named_devices: list[str] | None = None

    @property
    def devices(self) -> list[str]:
        """Every device among inputs and outputs, in order of appearance (for a RAISED event,
        the devices its error names)."""
        if self.named_devices is not None:
            return list(self.named_devices)
        return list(dict.fromkeys(s.device for s in (*self.inputs, *(self.outputs or ()))))

    @property
    def offending(self) -> bool:
        return self.cls in OFFENDING

    def to_dict(self) -> dict[str, Any]:
        d = {
            "seq": self.seq,
            "step": self.step,
            "op": self.op,
            "module": self.module,
            "expected": self.expected,
            "class": self.cls,
            "source": self.source,
            "in": [[s.device, s.dtype, list(s.shape), s.nbytes] for s in self.inputs],
            "out": None
            if self.outputs is None
            else [[s.device, s.dtype, list(s.shape), s.nbytes] for s in self.outputs],
        }
        if self.tensors:
            d["tensors"] = list(self.tensors)
        if self.alias:
            d["alias"] = True
        if self.error is not None:
            d["error"] = self.error
        if self.transfer is not None:
            d["transfer"] = self.transfer
        if self.stack is not None:
            d["stack"] = self.stack
        if self.named_devices is not None:
            d["devices"] = list(self.named_devices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        def specs(xs):
            return None if xs is None else [TensorSpec(d, t, tuple(shape), n) for d, t, shape, n in xs]

        ev = cls(
            seq=d["seq"],
            step=d.get("step", 0),
            op=d["op"],
            module=d.get("module"),
            expected=d.get("expected"),
            tensors=tuple(d["tensors"]) if d.get("tensors") else None,
            source=d.get("source"),
            inputs=specs(d.get("in")) or [],
            outputs=specs(d.get("out")),
            alias=bool(d.get("alias", False)),
            error=d.get("error"),
            cls=d.get("class"),
            transfer=d.get("transfer"),
            stack=d.get("stack"),
        )
        if d.get("devices") is not None:
            ev.named_devices = list(d["devices"])
        return ev

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        where = self.module if self.module is not None else "<outside>"
        return f"Event(#{self.seq} {self.op} in {where!r} {self.cls} {self.devices})"


def first_offence(event: Event) -> dict[str, Any]:
    """The summary's description of an offending event."""
    return {
        "class": event.cls,
        "module": event.module,
        "tensor": ", ".join(event.tensors) if event.tensors else None,
        "op": event.op,
        "devices": event.devices,
        "expected": event.expected,
        "source": event.source,
        "seq": event.seq,
        "step": event.step,
        "error": event.error,
        "stack": event.stack,
    }


@dataclass
class Summary:
    """The last record of a trace: the verdict and what led to it.

    `counts` by class (every class present); `first_offence` as `first_offence()` gives it, or
    None; `events` recorded; `steps` {"traced", "skipped"} forward calls; `unrecorded` ops only
    counted (sampled mode "count"); `transfers` totals per (from, to, class); `modules` the
    number of ops per module and device; `routing` tokens per expert per layer
    ({"layers": [...], "counts": [[...]]}) when the tracer collected it, else None."""

    verdict: str
    counts: dict[str, int]
    first_offence: dict[str, Any] | None = None
    events: int = 0
    steps: dict[str, int] = field(default_factory=lambda: {"traced": 0, "skipped": 0})
    unrecorded: int = 0
    transfers: list[dict[str, Any]] = field(default_factory=list)
    modules: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    routing: dict[str, Any] | None = None

    @property
    def clean(self) -> bool:
        return self.verdict == CLEAN

    def to_dict(self) -> dict[str, Any]:
        return {
            "record": "summary",
            "verdict": self.verdict,
            "counts": dict(self.counts),
            "first_offence": self.first_offence,
            "events": self.events,
            "steps": dict(self.steps),
            "unrecorded": self.unrecorded,
            "transfers": list(self.transfers),
            "modules": self.modules,
            "seconds": self.seconds,
            "routing": self.routing,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        return cls(
            verdict=d["verdict"],
            counts={c: d.get("counts", {}).get(c, 0) for c in CLASSES},
            first_offence=d.get("first_offence"),
            events=d.get("events", 0),
            steps=d.get("steps", {"traced": 0, "skipped": 0}),
            unrecorded=d.get("unrecorded", 0),
            transfers=d.get("transfers", []),
            modules=d.get("modules", {}),
            seconds=d.get("seconds", 0.0),
            routing=d.get("routing"),
        )
