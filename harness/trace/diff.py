"""Compare two traces of the same model (a CPU run and a CUDA run, say).

Devices are compared relative to each trace's own placement: every device is relabelled by its
place in the placement (`d0` for the first device the placement names, `d1` for the next, ...;
`off:cpu` for a device the placement does not name), so "cpu everywhere" against "cuda:0
everywhere" is no difference at all, while a layer placed apart in one run, or an op that runs
off its placement in one run only, is.

Events are aligned per (step, module path) by their op names, difflib-style; for each aligned pair
the relative devices of inputs and outputs and the class are compared. Views (events that
compute nothing), allowed transfers and the caller's ops outside the model are left out: they are
how a placement is carried out (a CPU run has no token upload, a CUDA run has one), and the
placements themselves are compared part by part. Ops are matched by name without overload, with
the few that backends spell differently made one (`contiguous` / `clone`, `item` /
`_local_scalar_dense`, `to` / `_to_copy`). The host is the host in both runs: a CPU tensor matches a CPU tensor whatever the
placements (the caller's token ids, say); an op that runs on the CPU off its placement in one
run shows up as a difference of class.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from harness.trace.classify import base_name
from harness.trace.events import ALLOWED
from harness.trace.store import Trace, load_trace

_MODEL = "<model>"
_SAME_OP = {"contiguous": "clone", "item": "_local_scalar_dense", "to": "_to_copy"}


def _op_key(op: str) -> str:
    base = base_name(op)
    return _SAME_OP.get(base, base)


@dataclass
class Difference:
    """One place where two traces differ.

    `kind`: "placement" (a part of the model placed differently, relatively), "ops" (op
    sequences differ: `a` and `b` are the unmatched op names), "devices" (an aligned op on
    different relative devices: `a`, `b` are "inputs -> outputs" labels) or "class" (an aligned
    op classified differently). `seq_a`/`seq_b` locate the first event involved in each trace."""

    kind: str
    module: str
    step: int | None
    a: Any
    b: Any
    op: str | None = None
    seq_a: int | None = None
    seq_b: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "module": self.module,
            "step": self.step,
            "op": self.op,
            "a": self.a,
            "b": self.b,
            "seq_a": self.seq_a,
            "seq_b": self.seq_b,
        }

    def __str__(self) -> str:
        where = self.module if self.step is None else f"{self.module} (step {self.step})"
        op = f" {self.op}" if self.op else ""
        return f"{self.kind:9} {where}{op}: a {self.a} | b {self.b}"


@dataclass
class TraceDiff:
    a: str
    b: str
    differences: list[Difference] = field(default_factory=list)
    truncated: int = 0  # differences found beyond `max_differences`
    steps_only_in_a: list[int] = field(default_factory=list)
    steps_only_in_b: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.differences) + self.truncated

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self):
        return iter(self.differences)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "count": len(self),
            "differences": [d.to_dict() for d in self.differences],
            "truncated": self.truncated,
            "steps_only_in_a": self.steps_only_in_a,
            "steps_only_in_b": self.steps_only_in_b,
        }

    def __str__(self) -> str:
        if not self:
            return f"no differences between {self.a} and {self.b}"
        lines = [f"{len(self)} differences between {self.a} (a) and {self.b} (b):"]
        lines += [f"  {d}" for d in self.differences]
        if self.truncated:
            lines.append(f"  ... and {self.truncated} more")
        return "\n".join(lines)


def _labels(trace: Trace) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """device -> relative label, and the placement's parts as (part, label)."""
    placement = trace.placement
    if not placement:
        return {}, []
    parts = [("embed", placement["embed"])]
    parts += [(f"layers.{i}", d) for i, d in enumerate(placement["layers"])]
    parts.append(("head", placement["head"]))
    labels: dict[str, str] = {}
    for _, device in parts:
        if device not in labels:
            labels[device] = f"d{len(labels)}"
    return labels, [(part, labels[d]) for part, d in parts]


class _Side:
    """One trace reduced to what the comparison needs, grouped by (step, module)."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.labels, self.parts = _labels(trace)
        self.groups: dict[tuple[int, str], list[tuple]] = {}
        label = self._label
        for ev in trace.events():
            if ev.alias or ev.cls == ALLOWED or ev.module is None:
                continue
            module = ev.module or _MODEL
            ins = tuple((label(s[0]), s[0] == "cpu") for s in ev.inputs)
            outs = None if ev.outputs is None else tuple((label(s[0]), s[0] == "cpu") for s in ev.outputs)
            self.groups.setdefault((ev.step, module), []).append((ev.op, (ins, outs), ev.cls, ev.seq))

    def _label(self, device: str) -> str:
        label = self.labels.get(device)
        if label is None:
            label = self.labels[device] = f"off:{device}"
        return label


def _same_devices(x, y) -> bool:
    """Relative devices of two aligned events: equal labels, or the host on both sides."""
    (ins_x, outs_x), (ins_y, outs_y) = x, y
    if len(ins_x) != len(ins_y) or (outs_x is None) != (outs_y is None):
        return False
    pairs = zip(ins_x + (outs_x or ()), ins_y + (outs_y or ()), strict=True)
    return all(a[0] == b[0] or (a[1] and b[1]) for a, b in pairs)


def _show(devices) -> str:
    ins, outs = devices
    text = ",".join(label for label, _ in ins) + " -> "
    return text + ("(raised)" if outs is None else ",".join(label for label, _ in outs))


def _name(trace: Trace) -> str:
    return os.fspath(trace.path)


def diff(
    a: str | os.PathLike | Trace, b: str | os.PathLike | Trace, max_differences: int = 1000
) -> TraceDiff:
    """Where traces `a` and `b` (paths or loaded traces) of the same model differ."""
    ta, tb = load_trace(a), load_trace(b)
    sa, sb = _Side(ta), _Side(tb)
    out = TraceDiff(_name(ta), _name(tb))
    found: list[Difference] = []

    def add(d: Difference) -> None:
        if len(found) < max_differences:
            found.append(d)
        else:
            out.truncated += 1

    # The placements, relatively.
    pa, pb = dict(sa.parts), dict(sb.parts)
    for part in dict.fromkeys([*pa, *pb]):
        la, lb = pa.get(part), pb.get(part)
        if la != lb:
            add(Difference("placement", part, None, la, lb))

    steps_a = {step for step, _ in sa.groups}
    steps_b = {step for step, _ in sb.groups}
    out.steps_only_in_a = sorted(steps_a - steps_b)
    out.steps_only_in_b = sorted(steps_b - steps_a)
    common = steps_a & steps_b
    keys = [k for k in dict.fromkeys([*sa.groups, *sb.groups]) if k[0] in common]
    for key in keys:
        step, module = key
        ea, eb = sa.groups.get(key, []), sb.groups.get(key, [])
        ops_a, ops_b = [_op_key(e[0]) for e in ea], [_op_key(e[0]) for e in eb]
        matcher = difflib.SequenceMatcher(None, ops_a, ops_b, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                for x, y in zip(ea[i1:i2], eb[j1:j2], strict=True):
                    if not _same_devices(x[1], y[1]):
                        add(Difference("devices", module, step, _show(x[1]), _show(y[1]), x[0], x[3], y[3]))
                    elif x[2] != y[2]:
                        add(Difference("class", module, step, x[2], y[2], x[0], x[3], y[3]))
            else:
                add(
                    Difference(
                        "ops",
                        module,
                        step,
                        ops_a[i1:i2],
                        ops_b[j1:j2],
                        None,
                        ea[i1][3] if i2 > i1 else None,
                        eb[j1][3] if j2 > j1 else None,
                    )
                )
    out.differences = found
    return out
