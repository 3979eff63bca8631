"""What a trace is made of: one `Event` per aten op, a `Summary` per run.

An event's tensors are `TensorSpec`s: named tuples (device, dtype, shape, nbytes), interned by
the tracer (one object per distinct spec) and written to JSON as lists.
Classes, worst first:

- `mismatch`: tensor inputs on different devices that the real backend refuses (or an op that
  raised a device error);
- `sync`: a host read of device data (`item`, `bool()`, `tolist`, `nonzero`, a boolean mask on
  the device, a device-to-host copy inside the model);
- `stray`: an op that runs on a device other than its module's placement though nothing raised;
- `transfer`: a cross-device copy inside the model that nothing declared (an upload of a weight
  on every call, a tensor built from Python data, a host round trip);
- `allowed`: a copy that is declared: at a device-map boundary, an upload of the run's inputs, a
  download of its outputs (outside the model), an offloading hook's weight traffic, a copy the
  user allowed (`Tracer(allow_transfers=...)`), or one that moves no bytes;
- `ok`: everything else.

A run's verdict (`Verdict`, a `str`): `clean` when it ran ops inside the model, raised nothing
but device errors, and has no mismatch, sync, stray or transfer; `dirty` when it has one;
`error` when it raised another error (and has no offence: an offence is the finding);
`inconclusive` when no op ran inside the model (nothing was checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

MISMATCH, SYNC, STRAY, TRANSFER, ALLOWED, OK = "mismatch", "sync", "stray", "transfer", "allowed", "ok"
CLASSES = (MISMATCH, SYNC, STRAY, TRANSFER, ALLOWED, OK)
OFFENDING = frozenset((MISMATCH, SYNC, STRAY, TRANSFER))
CLEAN, DIRTY, ERROR, INCONCLUSIVE = "clean", "dirty", "error", "inconclusive"
VERDICTS = (CLEAN, DIRTY, ERROR, INCONCLUSIVE)


class Verdict(str):
    """A run's verdict: equal to "clean", "dirty", "error" or "inconclusive" (a `str`, so
    `summary.verdict == "clean"` reads as before), with `.explanation`: one paragraph that says
    why ("" when clean). pytest's assertion rewriting shows it for a failed
    `assert summary.verdict == "clean"` (through the plugin's `pytest_assertrepr_compare`)."""

    explanation: str

    def __new__(cls, value: str, explanation: str = "") -> Verdict:
        if value not in VERDICTS:
            raise ValueError(f"a verdict is one of {', '.join(VERDICTS)}, not {value!r}")
        verdict = super().__new__(cls, value)
        verdict.explanation = explanation
        return verdict

    def __reduce__(self):
        return (Verdict, (str(self), self.explanation))


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
        "role",
        "hook",
        "op_kind",
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
        # For a copy: "input" when it copies the run's input, "weight" a parameter or buffer of
        # the model (or a view of one), "reused" a copy to the host in the model's own forward
        # that an op of that forward read again (not its result handed over), else None; `hook` "offload" or "boundary" when an
        # offloading hook (accelerate's) made it. Set by the tracer, not written.
        self.role: str | None = None
        self.hook: str | None = None
        self.op_kind: int | None = None

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
        "transfer": event.transfer,
        "stack": event.stack,
    }


DIRECTIONS = ("h2d", "d2h", "d2d")  # host to device, device to host, device to device
_DIRECTION_NAMES = {"h2d": "host->device", "d2h": "device->host", "d2d": "device->device"}


def direction(src: str, dst: str) -> str:
    """ "h2d", "d2h" or "d2d" for a copy from device `src` to device `dst`."""
    if src == "cpu":
        return "h2d"
    return "d2h" if dst == "cpu" else "d2d"


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _per_direction(text: dict[str, float]) -> str:
    return ", ".join(f"{_DIRECTION_NAMES[d]} {format_bytes(text.get(d, 0))}" for d in DIRECTIONS)


def describe_offence(f: dict[str, Any]) -> str:
    """One sentence for a first offence: class, module, tensor, op, devices, source line."""
    module = f.get("module")
    where = (
        "outside the model"
        if module is None
        else ("in the model's own forward" if module == "" else f"in module {module!r}")
    )
    tensor = f" (tensor {f['tensor']})" if f.get("tensor") else ""
    devices = ", ".join(f.get("devices") or []) or "no device"
    expected = f", where the placement expects {f['expected']}" if f.get("expected") else ""
    text = f"{f['class']} {where}{tensor}: {f['op']} on {devices}{expected}"
    transfer = f.get("transfer")
    if transfer:
        text += f", copying {format_bytes(transfer['bytes'])} {transfer['from']} -> {transfer['to']}"
    if f.get("source"):
        text += f", at {f['source']}"
        if f.get("code"):
            text += f" (`{f['code']}`)"
    if f.get("error"):
        text += f"; it raised {f['error'].splitlines()[0]}"
    return text


@dataclass
class Summary:
    """The last record of a trace: the verdict and what led to it.

    `verdict` a `Verdict` (a `str` with `.explanation`); `counts` by class (every class present);
    `first_offence` as `first_offence()` gives it, or None; `events` recorded; `inside` events
    recorded inside the model; `steps` {"traced", "skipped"} forward calls; `unrecorded` ops only
    counted (sampled mode "count"); `transfers` totals per (from, to, class, why, module);
    `traffic` the bytes copied across devices inside the model's forward calls (see
    `bytes_per_call`, `bytes_per_token`); `error` {"error", "module", "source"} for an error the
    run raised that is not a device error, else None; `modules` the number of ops per module and
    device; `routing` tokens per expert per layer ({"layers": [...], "counts": [[...]]}) when the
    tracer collected it, else None."""

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
    inside: int | None = None
    traffic: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.verdict, Verdict):
            self.verdict = Verdict(self.verdict, self._explain(str(self.verdict)))

    @property
    def clean(self) -> bool:
        return self.verdict == CLEAN

    # -- what the verdict says ------------------------------------------------------------

    def _explain(self, verdict: str) -> str:
        offending = {c: self.counts.get(c, 0) for c in CLASSES if c in OFFENDING and self.counts.get(c)}
        total = sum(offending.values())
        if verdict == DIRTY and self.first_offence:
            text = f"dirty: the first offence is a {describe_offence(self.first_offence)}."
            if total > 1:
                text += f" {total} offending events in all ({', '.join(f'{n} {c}' for c, n in offending.items())})."
            if self.error and self.error["error"] != self.first_offence.get("error"):
                text += f" The run also raised {self.error['error'].splitlines()[0]}."
            return text
        if verdict == ERROR:
            e = self.error or {}
            module = e.get("module")
            where = (
                ""
                if module is None
                else (" in the model's own forward" if module == "" else f" in module {module!r}")
            )
            at = f" at {e['source']}" if e.get("source") else ""
            return (
                f"error: the run raised {(e.get('error') or 'an error').splitlines()[0]}{where}{at}; "
                "it is not a device error, and a run that did not finish is never clean (what it "
                f"would have done after the error was not checked; {self.events} events recorded before it)."
            )
        if verdict == INCONCLUSIVE:
            if self.events:
                return (
                    f"inconclusive: no op ran inside the model ({self.events} events outside it), so "
                    "nothing of the model was checked: was the model called inside the `with Tracer(...)` block?"
                )
            return "inconclusive: no op was recorded, so nothing was checked."
        return ""

    def assert_clean(self) -> None:
        """Raises AssertionError with the verdict's explanation unless the run is clean."""
        __tracebackhide__ = True  # pytest shows the caller's line, not this frame
        if self.verdict != CLEAN:
            raise AssertionError(self.verdict.explanation)

    # -- bytes moved ------------------------------------------------------------------------

    @property
    def bytes_per_call(self) -> dict[str, float]:
        """Bytes copied across devices inside the model per traced forward call, by direction
        ("h2d", "d2h", "d2d"), every class counted (allowed boundaries and offload too)."""
        calls = self.traffic.get("calls") or 0
        moved = self.traffic.get("bytes") or {}
        return {d: (moved.get(d, 0) / calls if calls else 0.0) for d in DIRECTIONS}

    @property
    def bytes_per_token(self) -> dict[str, float] | None:
        """Bytes copied inside the model per decoded token, by direction: over the forward calls
        after the first (the decode steps; the first is the prefill) when there are any, else over
        all; a call's tokens are its token ids (`input_ids`, else its first integer tensor
        argument). None when no call had token ids."""
        t = self.traffic
        if t.get("decode_tokens"):
            moved, tokens = t.get("decode_bytes") or {}, t["decode_tokens"]
        elif t.get("tokens"):
            moved, tokens = t.get("bytes") or {}, t["tokens"]
        else:
            return None
        return {d: moved.get(d, 0) / tokens for d in DIRECTIONS}

    def assert_transfers(
        self, max_bytes_per_token: float | None = None, max_bytes_per_call: float | None = None
    ) -> None:
        """Raises AssertionError when the bytes copied across devices inside the model (every
        direction together) exceed a budget per decoded token or per forward call."""
        __tracebackhide__ = True
        if max_bytes_per_token is None and max_bytes_per_call is None:
            raise TypeError("assert_transfers needs max_bytes_per_token or max_bytes_per_call")
        problems = []
        if max_bytes_per_token is not None:
            per_token = self.bytes_per_token
            if per_token is None:
                problems.append(
                    "no forward call had token ids (`input_ids` or an integer tensor), so there is no per-token figure"
                )
            elif sum(per_token.values()) > max_bytes_per_token:
                problems.append(
                    f"{format_bytes(sum(per_token.values()))} per decoded token ({_per_direction(per_token)}) "
                    f"exceed the budget of {format_bytes(max_bytes_per_token)}"
                )
        if max_bytes_per_call is not None:
            per_call = self.bytes_per_call
            if sum(per_call.values()) > max_bytes_per_call:
                problems.append(
                    f"{format_bytes(sum(per_call.values()))} per forward call ({_per_direction(per_call)}) "
                    f"exceed the budget of {format_bytes(max_bytes_per_call)}"
                )
        if problems:
            inside = [t for t in self.transfers if t.get("module") is not None]
            top = sorted(inside, key=lambda t: -t["bytes"])[:3]
            largest = "; ".join(
                f"{t['count']} copies {t['from']} -> {t['to']} in {t['module'] or '<model>'!r} "
                f"({t['class']}{', ' + t['why'] if t.get('why') else ''}): {format_bytes(t['bytes'])}"
                for t in top
            )
            raise AssertionError(f"transfers: {'; '.join(problems)}. Largest: {largest or 'none'}.")

    def __str__(self) -> str:
        lines = [f"verdict: {self.verdict}"]
        if self.verdict.explanation:
            lines.append(f"  {self.verdict.explanation}")
        counts = ", ".join(f"{n} {c}" for c, n in self.counts.items() if n)
        traced = self.steps.get("traced", 0)
        calls = f" in {traced} forward call{'' if traced == 1 else 's'}"
        if self.steps.get("skipped"):
            calls += f" ({self.steps['skipped']} more not traced)"
        lines.append(f"events: {self.events} ({counts or 'none'}){calls}")
        if self.traffic.get("calls"):
            lines.append(f"bytes moved per forward call: {_per_direction(self.bytes_per_call)}")
            per_token = self.bytes_per_token
            if per_token is not None:
                lines.append(f"bytes moved per decoded token: {_per_direction(per_token)}")
            if self.traffic.get("offload"):
                lines.append(f"declared offload traffic: {format_bytes(self.traffic['offload'])} in all")
        if self.error and self.verdict != ERROR:
            lines.append(f"the run raised: {self.error['error'].splitlines()[0]}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "record": "summary",
            "verdict": str(self.verdict),
            "explanation": self.verdict.explanation,
            "counts": dict(self.counts),
            "first_offence": self.first_offence,
            "events": self.events,
            "inside": self.inside,
            "steps": dict(self.steps),
            "unrecorded": self.unrecorded,
            "transfers": list(self.transfers),
            "traffic": self.traffic,
            "error": self.error,
            "modules": self.modules,
            "seconds": self.seconds,
            "routing": self.routing,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        summary = cls(
            verdict=CLEAN,  # replaced below, once the fields that explain it are in
            counts={c: d.get("counts", {}).get(c, 0) for c in CLASSES},
            first_offence=d.get("first_offence"),
            events=d.get("events", 0),
            steps=d.get("steps", {"traced": 0, "skipped": 0}),
            unrecorded=d.get("unrecorded", 0),
            transfers=d.get("transfers", []),
            modules=d.get("modules", {}),
            seconds=d.get("seconds", 0.0),
            routing=d.get("routing"),
            inside=d.get("inside"),
            traffic=d.get("traffic") or {},
            error=d.get("error"),
        )
        summary.verdict = Verdict(d["verdict"], d.get("explanation") or summary._explain(d["verdict"]))
        return summary
