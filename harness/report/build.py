"""The HTML mismatch report: one self-contained file built from one or more traces.

    build_report(["cpu.jsonl", "cuda.jsonl"], "reports/run.html", title="router on CUDA")

The file has no network assets (inline CSS and JS, a Content-Security-Policy that forbids
fetching anything) and shows, per trace: the verdict and counts, the first offence with its
Python stack and source line, the module tree coloured by device, transfers by module and
direction, host syncs, the expert-routing heatmap when routing counts are given, and the model's
config and placement; across traces, an op timeline (a canvas overview and a virtualized event
table, filtered by class and module, with a jump to the first offence) and, for two traces (or
the `diff_pairs` given), their `harness.trace.diff`.

Traces are read as a stream, one line at a time. Events repeat endlessly (the same op of the same
module on the same shapes, step after step), so each distinct event body becomes a "kind" and the
timeline embeds one kind index per event; above `max_events` events, every event that is not
`ok` is kept and the `ok` ones are sampled evenly, which the report says. Aggregates (counts,
transfers, syncs, modules) are exact: they are taken over every event of the file.

Every string from a trace (GGUF tensor names, module paths, case and test names, sources) reaches
the page through jinja2's autoescape or through the embedded JSON block, where `<`, `>` and `&`
are written as `\\u003c`, `\\u003e`, `\\u0026`; the page's script puts strings into the DOM as
text only.

Routing: a trace made with `Tracer(..., routing=True)` (as `harness trace` and the cases make
them) carries tokens per expert per layer in its summary, and the heatmap shows it; otherwise
`build_report(routing=...)` takes counts gathered by `collect_routing(model)`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import linecache
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from harness.errors import UsageError
from harness.trace.events import CLASSES, OFFENDING, OK
from harness.trace.routing import RoutingCounts, collect_routing
from harness.trace.store import Trace, load_trace

__all__ = ["MAX_EVENTS", "RoutingCounts", "build_report", "check_report_path", "collect_routing"]

MAX_EVENTS = 200_000  # events embedded in the timeline, over all traces of a report
MIN_EVENTS_PER_TRACE = 20_000
MAX_TABLE_ROWS = 300  # rows of the sync, transfer and diff tables
MAX_DIFFERENCES = 500

_TEMPLATE = "template.html.j2"
_PREFIX = re.compile(r'\{"seq":(\d+),"step":(\d+),')
_CLASS_COLORS = {
    "mismatch": "#d32f2f",
    "sync": "#ef6c00",
    "stray": "#ad1457",
    "transfer": "#1565c0",
    "allowed": "#64b5f6",
    "ok": "#b0bec5",
}
_DEVICE_PALETTE = ("#2e7d32", "#6a1b9a", "#00838f", "#9e6a03", "#3949ab", "#827717", "#4e342e")
_DIRECTION_PALETTE = ("#1565c0", "#ef6c00", "#2e7d32", "#ad1457", "#6a1b9a", "#00838f", "#9e6a03", "#546e7a")
_CPU_COLOR = "#546e7a"
_OTHER_COLOR = "#9e9e9e"

# A kind's fields, in the order the page's script reads them.
K_OP, K_MOD, K_EXP, K_CLS, K_DEVS, K_SIG, K_SRC, K_TEN, K_FLAGS, K_ERR, K_TR, K_STACK = range(12)
F_ALIAS, F_TRANSFER = 1, 2


# ---- routing -------------------------------------------------------------------------------------


def _routing_matrix(value) -> dict[str, Any] | None:
    """RoutingCounts, a summary's routing record, a tensor or nested lists -> {"rows": [...],
    "labels": [...], "max": n}."""
    if value is None:
        return None
    labels = None
    if isinstance(value, RoutingCounts):
        labels = [_layer_label(p) for p in value.layers]
        value = value.tolist()
    elif isinstance(value, dict) and "counts" in value:  # a trace summary's `routing`
        labels = [_layer_label(str(p)) for p in value.get("layers") or []] or None
        value = value["counts"]
    elif hasattr(value, "tolist"):
        value = value.tolist()
    try:
        rows = [[int(x) for x in row] for row in value]
    except (TypeError, ValueError):
        raise UsageError(None, "routing", "expected a [layers, experts] matrix of counts") from None
    if not rows:
        return None
    labels = labels or [f"layer {i}" for i in range(len(rows))]
    width = max(len(r) for r in rows)
    peak = max((x for r in rows for x in r), default=0)
    return {
        "labels": labels,
        "experts": list(range(width)),
        "rows": [
            {
                "label": label,
                "total": sum(r),
                "cells": [{"n": x, "alpha": round(x / peak, 3) if peak else 0.0} for x in r]
                + [{"n": None, "alpha": 0.0}] * (width - len(r)),
            }
            for label, r in zip(labels, rows, strict=False)
        ],
        "max": peak,
    }


def _layer_label(path: str) -> str:
    m = re.match(r"^layers\.(\d+)\b", path)
    return f"layer {m[1]}" if m else path


# ---- reading a trace -----------------------------------------------------------------------------


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def _spec_text(spec) -> str:
    device, dtype, shape, _ = spec
    return f"{device} {dtype}[{','.join(str(n) for n in shape)}]"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class _Strings:
    """Interned strings of one trace: the page's script looks them up by index."""

    def __init__(self):
        self.index: dict[str, int] = {}
        self.values: list[str] = []

    def __call__(self, s: str | None) -> int:
        if s is None:
            return -1
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.values)
            self.values.append(s)
        return i


class _Kind:
    """An event without its seq and step: what the events of one op at one place share."""

    __slots__ = (
        "op",
        "module",
        "expected",
        "cls",
        "devices",
        "run_on",
        "sig",
        "source",
        "tensors",
        "alias",
        "error",
        "transfer",
        "stack",
        "count",
        "first_seq",
        "first_step",
        "row",
        "nbytes",
    )

    def __init__(self, d: dict[str, Any]):
        module = d.get("module")
        self.op = str(d.get("op"))
        self.module = "<outside>" if module is None else (str(module) or "<model>")
        self.expected = d.get("expected")
        self.cls = str(d.get("class") or OK)
        ins = d.get("in") or []
        outs = d.get("out")
        self.devices = list(dict.fromkeys(str(s[0]) for s in (*ins, *(outs or ()))))
        first = outs[0] if outs else (ins[0] if ins else None)
        self.run_on = str(first[0]) if first else None
        ins_text = ", ".join(_spec_text(s) for s in ins)
        outs_text = "(raised)" if outs is None else ", ".join(_spec_text(s) for s in outs)
        self.sig = f"{ins_text} \u2192 {outs_text}"
        self.source = d.get("source")
        tensors = d.get("tensors")
        self.tensors = ", ".join(str(t) for t in tensors) if tensors else None
        self.alias = bool(d.get("alias"))
        self.error = d.get("error")
        self.transfer = d.get("transfer") if isinstance(d.get("transfer"), dict) else None
        self.nbytes = 0
        if self.transfer is not None:
            with contextlib.suppress(TypeError, ValueError):
                self.nbytes = int(self.transfer.get("bytes") or 0)
        stack = d.get("stack")
        self.stack = [str(s) for s in stack] if isinstance(stack, list) else None
        self.count = 0
        self.first_seq = None
        self.first_step = None
        self.row = None

    def key(self) -> tuple:
        tr = self.transfer
        return (
            self.op,
            self.module,
            self.expected,
            self.cls,
            self.sig,
            self.source,
            self.tensors,
            self.alias,
            self.error,
            None if tr is None else tuple(sorted((k, str(v)) for k, v in tr.items())),
            None if self.stack is None else tuple(self.stack),
        )


class _Scan:
    """One pass over a trace's events: kinds, exact aggregates, and the embedded sample."""

    def __init__(self, trace: Trace, cap: int):
        self.trace = trace
        self.kinds: list[_Kind] = []
        self.ev_kind: list[int] = []
        self.ev_seq: list[int] = []
        self.steps: list[list[int]] = []  # [first embedded index, step]
        self.step_bytes: dict[int, dict[tuple[str, str], int]] = {}  # step -> (from, to) -> bytes
        self.total = 0
        self.shown = 0
        self.note = None
        self._read(cap)

    def _plan(self, cap: int) -> tuple[int, int]:
        """(stride for ok events, stride for the others) so that about `cap` are embedded."""
        summary = self.trace.summary
        if summary is not None and summary.events:
            n_ok = summary.counts.get(OK, 0)
            n_other = max(summary.events - n_ok, 0)
        else:
            n_ok, n_other = max(_count_lines(self.trace.path) - 1, 0), 0
        if n_ok + n_other <= cap:
            return 1, 1
        other_budget = max(cap - min(n_ok, cap // 4), cap // 2)
        other_stride = 1 if n_other <= other_budget else math.ceil(n_other / other_budget)
        ok_budget = max(cap - min(n_other, other_budget), cap // 4)
        ok_stride = 1 if n_ok <= ok_budget else math.ceil(n_ok / ok_budget)
        return ok_stride, other_stride

    def _read(self, cap: int) -> None:
        path = self.trace.path
        ok_stride, other_stride = self._plan(cap)
        by_body: dict[str, _Kind] = {}
        by_key: dict[tuple, _Kind] = {}
        kinds, ev_kind, ev_seq, steps = self.kinds, self.ev_kind, self.ev_seq, self.steps
        last_step = None
        n_ok = n_other = 0
        total = 0
        match = _PREFIX.match
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                f.readline()
                lineno = 1
                for line in f:
                    lineno += 1
                    m = match(line)
                    kind = by_body.get(line[m.end() :]) if m is not None else None
                    if kind is not None:
                        seq, step = int(m[1]), int(m[2])
                    else:
                        if not line.strip():
                            continue
                        d = self._parse(line, lineno)
                        if d is None:
                            break  # the run died while writing this line
                        if "record" in d:
                            continue
                        try:
                            seq, step = int(d["seq"]), int(d.get("step", 0))
                            d["op"]  # noqa: B018 - an event names its op
                        except (KeyError, TypeError, ValueError):
                            raise UsageError(
                                path, f"line {lineno}", "an event without 'seq' or 'op'"
                            ) from None
                        try:
                            kind = _Kind(d)
                        except (TypeError, IndexError, ValueError) as exc:
                            raise UsageError(path, f"line {lineno}", f"a malformed event ({exc})") from None
                        key = kind.key()
                        known = by_key.get(key)
                        if known is None:
                            kind.row = len(kinds)
                            kinds.append(kind)
                            by_key[key] = kind
                        else:
                            kind = known
                        if m is not None and line.endswith("\n"):
                            by_body[line[m.end() :]] = kind
                    total += 1
                    if kind.transfer is not None:
                        moved = self.step_bytes.setdefault(step, {})
                        direction = (str(kind.transfer.get("from")), str(kind.transfer.get("to")))
                        moved[direction] = moved.get(direction, 0) + kind.nbytes
                    if kind.count == 0:
                        kind.first_seq, kind.first_step = seq, step
                    kind.count += 1
                    if kind.cls == OK and kind.transfer is None:
                        keep = n_ok % ok_stride == 0
                        n_ok += 1
                    else:
                        keep = n_other % other_stride == 0 or kind.count == 1
                        n_other += 1
                    if keep:
                        if step != last_step:
                            steps.append([len(ev_kind), step])
                            last_step = step
                        ev_kind.append(kind.row)
                        ev_seq.append(seq)
            except UnicodeDecodeError as exc:
                raise UsageError(path, None, f"not UTF-8 text ({exc.reason})") from None
        self.total = total
        self.shown = len(ev_kind)
        if self.shown < total:
            parts = []
            if ok_stride > 1:
                parts.append(f"one ok event in {ok_stride}")
            if other_stride > 1:
                parts.append(f"one other event in {other_stride}, and the first of each kind")
            else:
                parts.append("every event that is not ok")
            self.note = (
                f"The timeline shows {self.shown:,} of {total:,} events: "
                + " and ".join(parts)
                + ". Counts, transfers, syncs and the module tree cover every event."
            )

    def _parse(self, line: str, lineno: int) -> dict[str, Any] | None:
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            if not line.endswith("\n"):
                return None
            raise UsageError(self.trace.path, f"line {lineno}", f"not JSON ({exc.msg})") from None
        if not isinstance(d, dict):
            raise UsageError(self.trace.path, f"line {lineno}", "not a JSON object")
        return d


# ---- what the page shows -------------------------------------------------------------------------


def _device_of(placement: dict[str, Any] | None, module: str) -> str | None:
    """The device a placement gives a module path (as `Placement.device_of`, on strings)."""
    if not placement:
        return None
    if module == "layers":
        return None  # the list of layers: its own placement is its layers'
    if module in ("<model>", "embed") or module.startswith("embed."):
        return placement.get("embed")
    m = re.match(r"^layers\.(\d+)(\.|$)", module)
    if m:
        layers = placement.get("layers") or []
        i = int(m[1])
        return layers[i] if i < len(layers) else None
    if module == "<outside>":
        return None
    return placement.get("head")


def _tree(kinds: list[_Kind], placement: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The module tree: nodes in forward order, with the devices each module's ops ran on."""
    nodes: dict[str, dict[str, Any]] = {}
    roots: list[dict[str, Any]] = []

    def node(path: str) -> dict[str, Any]:
        n = nodes.get(path)
        if n is not None:
            return n
        n = nodes[path] = {
            "path": path,
            "name": path.rsplit(".", 1)[-1],
            "placed": _device_of(placement, path),
            "devices": {},
            "ops": 0,
            "offending": 0,
            "children": [],
            "tensors": set(),
        }
        if "." in path:
            node(path.rsplit(".", 1)[0])["children"].append(n)
        else:
            roots.append(n)
        return n

    if placement and placement.get("layers"):  # a Mixtral's skeleton, in forward order
        node("embed")
        for i in range(len(placement.get("layers") or [])):
            node(f"layers.{i}")
    for k in kinds:
        if k.module in ("<outside>", "<model>"):
            continue
        n = node(k.module)
        n["ops"] += k.count
        if k.run_on is not None:
            n["devices"][k.run_on] = n["devices"].get(k.run_on, 0) + k.count
        if k.cls in OFFENDING:
            n["offending"] += k.count
        if k.tensors:
            n["tensors"].update(t for t in k.tensors.split(", ") if len(n["tensors"]) < 64)

    def finish(n: dict[str, Any]) -> None:
        for c in n["children"]:
            finish(c)
        n["total_ops"] = n["ops"] + sum(c["total_ops"] for c in n["children"])
        n["total_offending"] = n["offending"] + sum(c["total_offending"] for c in n["children"])
        n["devices"] = sorted(n["devices"].items(), key=lambda kv: -kv[1])
        n["tensors"] = sorted(n["tensors"])
        if n["placed"] is None and "." not in n["path"] and n["children"]:
            placed = {c["placed"] for c in n["children"]}
            n["placed"] = placed.pop() if len(placed) == 1 else None
        n["open"] = n["total_offending"] > 0

    for r in roots:
        finish(r)
    return roots


def _transfers(kinds: list[_Kind]) -> list[dict[str, Any]]:
    agg: dict[tuple, list[int]] = {}
    for k in kinds:
        tr = k.transfer
        if tr is None:
            continue
        key = (k.module, str(tr.get("from")), str(tr.get("to")), k.cls)
        a = agg.setdefault(key, [0, 0, k.first_seq])
        a[0] += k.count
        with contextlib.suppress(TypeError, ValueError):
            a[1] += int(tr.get("bytes") or 0) * k.count
        a[2] = min(a[2], k.first_seq)
    rows = [
        {
            "module": module,
            "src": src,
            "dst": dst,
            "cls": cls,
            "count": n,
            "bytes": nbytes,
            "bytes_text": _fmt_bytes(nbytes),
            "first_seq": first,
        }
        for (module, src, dst, cls), (n, nbytes, first) in agg.items()
    ]
    rows.sort(key=lambda r: r["first_seq"])
    return rows


def _syncs(kinds: list[_Kind]) -> list[dict[str, Any]]:
    agg: dict[tuple, dict[str, Any]] = {}
    for k in kinds:
        if k.cls != "sync":
            continue
        key = (k.module, k.op, k.source)
        a = agg.get(key)
        if a is None:
            a = agg[key] = {
                "module": k.module,
                "op": k.op,
                "source": k.source,
                "devices": ", ".join(k.devices),
                "tensors": k.tensors,
                "count": 0,
                "first_seq": k.first_seq,
            }
        a["count"] += k.count
        a["first_seq"] = min(a["first_seq"], k.first_seq)
    return sorted(agg.values(), key=lambda r: r["first_seq"])


def _first_offence(trace: Trace, kinds: list[_Kind]) -> dict[str, Any] | None:
    first = trace.summary.first_offence if trace.summary is not None else None
    if first is None:
        offending = [k for k in kinds if k.cls in OFFENDING]
        if not offending:
            return None
        k = min(offending, key=lambda k: k.first_seq)
        first = {
            "class": k.cls,
            "module": None if k.module == "<outside>" else ("" if k.module == "<model>" else k.module),
            "tensor": k.tensors,
            "op": k.op,
            "devices": k.devices,
            "expected": k.expected,
            "source": k.source,
            "seq": k.first_seq,
            "step": k.first_step,
            "error": k.error,
            "stack": k.stack,
        }
    keys = (
        "class",
        "module",
        "tensor",
        "op",
        "devices",
        "expected",
        "source",
        "seq",
        "step",
        "error",
        "code",
    )
    first = {**dict.fromkeys(keys), **first}
    first["class"] = first["class"] or "mismatch"
    first["module_text"] = (
        "<outside the model>" if first.get("module") is None else (first["module"] or "<model>")
    )
    first["context"] = _source_context(first.get("source"))
    if not first.get("code") and first["context"]:
        first["code"] = next((t for n, t, here in first["context"] if here), None)
    stack = first.get("stack") or []
    first["stack"] = [_split_frame(s) for s in stack]
    first["stack_groups"] = _fold_stack(first["stack"])
    first["user_frames"] = sum(len(g["frames"]) for g in first["stack_groups"] if not g["folded"])
    return first


# Frames of the machinery that ran the test, not of the user's code: folded in the stacks shown.
_FOLDED = re.compile(
    r"(?:^|[/\\])(?P<what>_pytest|pluggy|xdist|execnet|pytest_harness)[/\\]"
    r"|(?:^|[/\\])(?P<main>pytest)[/\\]__main__\.py|(?P<runpy><frozen runpy>|runpy\.py)"
)


def _fold_stack(frames: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The frames in groups: the user's frames one by one, runs of pytest, pluggy, xdist,
    execnet (and runpy) frames folded into one group that names what they belong to. Frames
    outside the innermost of those (the `pytest` script, execnet's `<string>` bootstrap) only
    launched the test runner: they are folded with it."""
    matches = [_FOLDED.search(frame["where"].split(" in ", 1)[0]) for frame in frames]
    innermost = max((i for i, m in enumerate(matches) if m is not None), default=-1)
    groups: list[dict[str, Any]] = []
    for i, (frame, m) in enumerate(zip(frames, matches, strict=True)):
        if m is None and i > innermost:
            groups.append({"folded": False, "frames": [frame]})
            continue
        what = "launcher" if m is None else (m["what"] or m["main"] or "runpy").lstrip("_")
        if groups and groups[-1]["folded"]:
            groups[-1]["frames"].append(frame)
            if what not in groups[-1]["what"]:
                groups[-1]["what"].append(what)
        else:
            groups.append({"folded": True, "frames": [frame], "what": [what]})
    return groups


def _stack_lines(stack: list[str]) -> list[str]:
    """A stack as lines for the timeline's detail: each run of folded frames one line."""
    lines = []
    for g in _fold_stack([_split_frame(f) for f in stack]):
        if g["folded"]:
            n = len(g["frames"])
            lines.append(f"\u22ef {n} frame{'s' if n != 1 else ''} of {', '.join(g['what'])} (folded)")
        else:
            lines += [f"{f['where']}: {f['code']}" if f["code"] else f["where"] for f in g["frames"]]
    return lines


def _split_frame(frame: str) -> dict[str, str]:
    """ "file:line in func: code" -> {"where", "code"}."""
    where, sep, code = str(frame).partition(": ")
    if not sep or " in " not in where:
        return {"where": str(frame), "code": ""}
    return {"where": where, "code": code}


def _source_context(source: str | None, around: int = 3) -> list[tuple[int, str, bool]]:
    """Lines around "file:line in func", where the file can be found here."""
    if not source:
        return []
    try:
        where = source.split(" in ", 1)[0]
        filename, lineno_text = where.rsplit(":", 1)
        lineno = int(lineno_text)
    except ValueError:
        return []
    repo = Path(__file__).resolve().parents[2]
    for candidate in (Path(filename), repo / filename, Path.cwd() / filename):
        try:
            if candidate.suffix == ".py" and candidate.is_file():  # model code, nothing else
                lines = linecache.getlines(str(candidate))
                break
        except OSError:
            continue
    else:
        return []
    lo, hi = max(lineno - around, 1), min(lineno + around, len(lines))
    return [(n, lines[n - 1].rstrip("\n"), n == lineno) for n in range(lo, hi + 1)]


MAX_CHART_BARS = 160


def _bytes_per_step(step_bytes: dict[int, dict[tuple[str, str], int]]) -> dict[str, Any] | None:
    """Bars of bytes moved across devices per forward step, stacked by direction (from, to);
    steps beyond MAX_CHART_BARS are summed in equal runs of steps. None when nothing moved."""
    if not step_bytes or not any(sum(v.values()) for v in step_bytes.values()):
        return None
    steps = sorted(step_bytes)
    per_bar = math.ceil(len(steps) / MAX_CHART_BARS)
    directions = sorted({d for v in step_bytes.values() for d in v}, key=lambda d: (d[0], d[1]))
    bars = []
    for i in range(0, len(steps), per_bar):
        chunk = steps[i : i + per_bar]
        moved = dict.fromkeys(directions, 0)
        for step in chunk:
            for d, n in step_bytes[step].items():
                moved[d] += n
        label = _step_label(chunk[0]) if len(chunk) == 1 else f"steps {chunk[0]}-{chunk[-1]}"
        bars.append({"label": label, "total": sum(moved.values()), "moved": moved})
    top = max(b["total"] for b in bars) or 1
    for b in bars:
        y = 0.0
        b["segments"] = []
        for k, d in enumerate(directions):
            n = b["moved"][d]
            if n:
                h = max(100.0 * n / top, 1.5)  # a few bytes still show
                b["segments"].append({"direction": k, "bytes": n, "y": max(100.0 - y - h, 0.0), "h": h})
                y += h
        b["total_text"] = _fmt_bytes(b["total"])
        del b["moved"]
    return {
        "bars": bars,
        "directions": [{"src": a, "dst": b, "color": None} for a, b in directions],  # colored per report
        "max_text": _fmt_bytes(top),
        "total_text": _fmt_bytes(sum(b["total"] for b in bars)),
        "per_bar": per_bar,
    }


def _step_label(step: int) -> str:
    return "prefill" if step == 0 else f"decode {step}"


def _part_of(module: str) -> str | None:
    """The strip's column of a module path: `layers.N` for what is inside a layer, else the
    top-level module (`embed`, `norm`, `output`, or a user model's own children)."""
    if module in ("<outside>", "<model>", "layers"):
        return None
    head, _, rest = module.partition(".")
    if head == "layers" and rest:
        return f"layers.{rest.partition('.')[0]}"
    return head


def _layer_strip(kinds: list[_Kind], placement: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One column per layer (and per other top-level module), in forward order: the device its
    placement gives it and the devices its ops ran on, with how many ops and offences."""
    columns: dict[str, dict[str, Any]] = {}
    for k in sorted(kinds, key=lambda k: k.first_seq if k.first_seq is not None else 0):
        part = _part_of(k.module)
        if part is None:
            continue
        col = columns.get(part)
        if col is None:
            col = columns[part] = {
                "part": part,
                "placed": _device_of(placement, part),
                "ran": {},
                "ops": 0,
                "offending": 0,
            }
        col["ops"] += k.count
        if k.run_on is not None and not k.alias:
            col["ran"][k.run_on] = col["ran"].get(k.run_on, 0) + k.count
        if k.cls in OFFENDING:
            col["offending"] += k.count
    out = []
    for col in columns.values():
        total = sum(col["ran"].values()) or 1
        ran = sorted(col["ran"].items(), key=lambda kv: -kv[1])
        # Widths in the strip: a device off the placement gets at least a tenth, so a few
        # stray ops still show (the tooltip has the numbers).
        widths = [100.0 * n / total if d == col["placed"] else max(100.0 * n / total, 10.0) for d, n in ran]
        scale = 100.0 / (sum(widths) or 1.0)
        col["ran"] = [
            {"device": d, "ops": n, "share": w * scale} for (d, n), w in zip(ran, widths, strict=True)
        ]
        col["label"] = col["part"].removeprefix("layers.")
        off = [r["device"] for r in col["ran"] if col["placed"] and r["device"] != col["placed"]]
        col["off_placement"] = off
        out.append(col)
    return out


def _device_order(device: str) -> tuple:
    """cpu first, then by name with numbers compared as numbers (cuda:2 before cuda:10)."""
    parts = re.split(r"(\d+)", device)
    return (device != "cpu", [int(p) if p.isdigit() else p for p in parts])


def _colors(devices: list[str]) -> dict[str, str]:
    colors: dict[str, str] = {}
    accel = 0
    for d in devices:
        if d in colors:
            continue
        if d == "cpu":
            colors[d] = _CPU_COLOR
        elif d.startswith("cuda") or d.startswith("mps") or d.startswith("xpu") or d.startswith("meta"):
            colors[d] = _DEVICE_PALETTE[accel % len(_DEVICE_PALETTE)] if d != "meta" else _OTHER_COLOR
            accel += d != "meta"
        else:
            colors[d] = _OTHER_COLOR
    return colors


def _trace_name(trace: Trace, given: str | None) -> str:
    if given is not None:
        return str(given)
    h = trace.header
    for key in ("test", "nodeid", "case", "name"):
        v = h.get(key)
        if isinstance(v, str) and v:
            return v
    return trace.path.name


def _scalar_items(d: Any) -> list[tuple[str, str]]:
    if not isinstance(d, dict):
        return []
    return [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in d.items()]


_HEADER_SHOWN = ("command", "case", "test", "nodeid", "fault", "prompt_tokens", "decode", "sample_every")


def _run(
    i: int, trace: Trace, name: str | None, scan: _Scan, routing, test: dict[str, Any] | None = None
) -> dict[str, Any]:
    h = trace.header
    s = trace.summary
    kinds = scan.kinds
    counts = dict.fromkeys(CLASSES, 0)
    for k in kinds:
        counts[k.cls] = counts.get(k.cls, 0) + k.count
    if s is not None:
        verdict = s.verdict
        # The summary counts what the tracer saw (also ops not written in "count" mode).
        counts = {c: max(int(_number(s.counts.get(c)) or 0), counts.get(c, 0)) for c in counts}
    else:
        verdict = "unfinished"
    placement_full = _placement(trace.placement)
    first = _first_offence(trace, kinds)
    transfers = _transfers(kinds)
    syncs = _syncs(kinds)
    config = h.get("config") if isinstance(h.get("config"), dict) else {}
    shown = {k: h[k] for k in _HEADER_SHOWN if k in h}
    if "prompt_tokens" in shown and isinstance(shown["prompt_tokens"], list):
        toks = shown["prompt_tokens"]
        shown["prompt_tokens"] = (
            f"{len(toks)} tokens: " + json.dumps(toks[:32]) + (" ..." if len(toks) > 32 else "")
        )
    placement = h.get("placement") if isinstance(h.get("placement"), dict) else {}
    # Any model's placement is by module-path prefix; "" is the whole model.
    placement = {("every module" if k == "" else k): v for k, v in placement.items()}
    if placement_full is not None and not placement_full["layers"] and h.get("model_class") != "Mixtral":
        # Any module traced against one device (`Tracer(model, placement="cuda:0")`): it has no
        # embedding or head, whatever the placement object calls its parts.
        placement = {"every module": placement_full["embed"]}
        placement_full = None
    expected = h.get("expected_verdict") if h.get("expected_verdict") in ("clean", "dirty") else None
    model = h.get("model")
    return {
        "index": i,
        "anchor": f"run-{i}",
        "name": _trace_name(trace, name),
        "path": os.fspath(trace.path),
        "verdict": verdict,
        "dirty": verdict != "clean",
        # A run meant to be dirty (a demo, a fault case) that came out dirty is no surprise.
        "expected": expected,
        "as_expected": expected is not None and expected == verdict,
        "test": _test_outcome(test),
        "counts": counts,
        "events": scan.total,
        "steps": _steps(s.steps) if s is not None else None,
        "seconds": _number(s.seconds) if s is not None else None,
        "unrecorded": (s.unrecorded if s is not None else 0),
        "model": model,
        "model_name": Path(str(model)).name if model else None,
        "model_exists": bool(model) and Path(str(model)).is_file(),
        "model_class": h.get("model_class"),
        "config": _scalar_items(config),
        "config_short": _config_short(config),
        "placement": placement,
        "placement_full": placement_full,
        "strip": _layer_strip(kinds, _placement(trace.placement)),
        "bytes_chart": _bytes_per_step(scan.step_bytes),
        "device_names": h.get("devices") if isinstance(h.get("devices"), dict) else {},
        "torch": h.get("torch"),
        "python": h.get("python"),
        "header": [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in shown.items()],
        "first": first,
        "tree": _tree(kinds, _placement(trace.placement)),
        "transfers": transfers[:MAX_TABLE_ROWS],
        "transfers_more": max(len(transfers) - MAX_TABLE_ROWS, 0),
        "transfer_bytes": _fmt_bytes(sum(r["bytes"] for r in transfers)),
        "syncs": syncs[:MAX_TABLE_ROWS],
        "syncs_more": max(len(syncs) - MAX_TABLE_ROWS, 0),
        "sync_count": sum(r["count"] for r in syncs),
        "routing": _routing_matrix(routing),
        "note": scan.note,
    }


def _test_outcome(test: dict[str, Any] | None) -> dict[str, Any] | None:
    """A pytest test's outcome and duration, as the plugin hands them over, ready to show."""
    if not isinstance(test, dict) or not test.get("outcome"):
        return None
    seconds = _number(test.get("duration"))
    return {"outcome": str(test["outcome"]), "duration": None if seconds is None else f"{seconds:.2f} s"}


def _placement(p: Any) -> dict[str, Any] | None:
    """The header's full placement, if it has the expected shape."""
    if not isinstance(p, dict) or not isinstance(p.get("layers"), list):
        return None
    return {"embed": str(p.get("embed")), "layers": [str(d) for d in p["layers"]], "head": str(p.get("head"))}


def _steps(steps: Any) -> dict[str, int] | None:
    if not isinstance(steps, dict):
        return None
    return {k: int(_number(steps.get(k)) or 0) for k in ("traced", "skipped")}


def _number(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _load(t: str | os.PathLike | Trace) -> Trace:
    """`load_trace`, with a malformed summary record reported as bad input."""
    try:
        return load_trace(t)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(
            t if not isinstance(t, Trace) else t.path, "last line", f"not a valid summary record ({exc!r})"
        ) from None


def _config_short(c: dict[str, Any]) -> str:
    if not c:
        return ""
    parts = []
    if "block_count" in c:
        parts.append(f"{c['block_count']} layers")
    if c.get("expert_count"):
        parts.append(f"{c.get('expert_used_count')}/{c['expert_count']} experts")
    if "embedding_length" in c:
        parts.append(f"d {c['embedding_length']}")
    if "vocab_size" in c:
        parts.append(f"vocab {c['vocab_size']}")
    return ", ".join(parts)


def _timeline_data(
    scan: _Scan, name: str, first: dict[str, Any] | None, classes: list[str]
) -> dict[str, Any]:
    """What the page's script needs of a trace; `classes` grows by any class it does not know."""
    strings = _Strings()
    stacks: list[list[str]] = []
    K = []
    for k in scan.kinds:
        stack = -1
        if k.stack:
            stack = len(stacks)
            stacks.append(_stack_lines(k.stack))
        tr = k.transfer
        tr_text = None
        if tr is not None:
            try:
                nbytes = _fmt_bytes(int(tr.get("bytes") or 0))
            except (TypeError, ValueError):
                nbytes = "?"
            how = "explicit" if tr.get("explicit") else "implicit"
            tr_text = f"{tr.get('from')} \u2192 {tr.get('to')}, {nbytes} ({how})"
        K.append(
            [
                strings(k.op),
                strings(k.module),
                strings(k.expected),
                _class_index(classes, k.cls),
                strings(",".join(k.devices)),
                strings(k.sig),
                strings(k.source),
                strings(k.tensors),
                (F_ALIAS if k.alias else 0) | (F_TRANSFER if tr is not None else 0),
                strings(k.error),
                strings(tr_text),
                stack,
            ]
        )
    seqs = scan.ev_seq
    contiguous = all(b - a == 1 for a, b in zip(seqs, seqs[1:], strict=False))
    return {
        "name": name,
        "S": strings.values,
        "K": K,
        "ev": scan.ev_kind,
        "seq0": seqs[0] if seqs and contiguous else None,
        "seq": None if contiguous else seqs,
        "steps": scan.steps,
        "stacks": stacks,
        "total": scan.total,
        "note": scan.note,
        "first_seq": None if first is None else first.get("seq"),
    }


def _class_index(classes: list[str], cls: str) -> int:
    if cls not in classes:
        classes.append(cls)
    return classes.index(cls)


def _diff_side(value: Any, limit: int = 12) -> str | None:
    """One side of a difference: a label, or a list of op names (shortened)."""
    if value is None or isinstance(value, str):
        return value
    ops = [str(v) for v in value]
    if not ops:
        return "(none)"
    more = f" \u2026 (+{len(ops) - limit})" if len(ops) > limit else ""
    return " ".join(ops[:limit]) + more


_DIFF_ORDER = {"placement": 0, "devices": 1, "class": 2, "ops": 3}


def _diff(runs: list[dict[str, Any]], a: Trace, b: Trace, ia: int, ib: int) -> dict[str, Any]:
    """`harness.trace.diff` of two traces, the differences of devices and classes first."""
    from harness.trace.diff import diff

    d = diff(a, b, max_differences=MAX_DIFFERENCES)
    ordered = sorted(d.differences, key=lambda x: _DIFF_ORDER.get(x.kind, 9))  # stable within a kind
    rows = [
        {
            "kind": x.kind,
            "module": x.module,
            "step": x.step,
            "op": x.op,
            "a": _diff_side(x.a),
            "b": _diff_side(x.b),
            "seq_a": x.seq_a,
            "seq_b": x.seq_b,
        }
        for x in ordered[:MAX_TABLE_ROWS]
    ]
    kinds: dict[str, int] = {}
    for x in d.differences:
        kinds[x.kind] = kinds.get(x.kind, 0) + 1
    stopped = []
    for side, run in (("a", runs[ia]), ("b", runs[ib])):
        first = run["first"]
        if first and first.get("error") and first.get("seq") is not None:
            stopped.append(
                f"{side} stopped at event #{first['seq']}, where its first offence raised: the ops "
                f"after it are only in the other trace."
            )
    return {
        "a": runs[ia]["name"],
        "b": runs[ib]["name"],
        "ia": ia,
        "ib": ib,
        "count": len(d),
        "by_kind": sorted(kinds.items(), key=lambda kv: _DIFF_ORDER.get(kv[0], 9)),
        "rows": rows,
        "more": len(d) - len(rows),
        "steps_only_in_a": d.steps_only_in_a,
        "steps_only_in_b": d.steps_only_in_b,
        "stopped": stopped,
    }


# ---- writing -------------------------------------------------------------------------------------

_JSON_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def json_for_html(value: Any) -> Markup:
    """JSON text safe inside a <script> element: no `<`, `>`, `&` (so no `</script>`)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return Markup(text.translate(_JSON_ESCAPES))


def check_report_path(out_path: str | os.PathLike) -> Path:
    """The report's path, its folder made if missing; UsageError naming it if it cannot be
    written there. Call it before a long run whose report would otherwise be lost."""
    out = Path(out_path)
    try:
        if out.is_dir():
            raise IsADirectoryError(21, "it is a directory")
        for folder in out.parents:
            if folder.exists():
                if not folder.is_dir():
                    raise NotADirectoryError(20, f"{folder} is not a directory")
                break
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, f"no permission to write in {out.parent}")
        if out.exists() and not os.access(out, os.W_OK):
            raise PermissionError(13, "no permission to replace it")
    except OSError as exc:
        raise UsageError(out, None, f"cannot write the report here ({exc.strerror or exc})") from None
    return out


def _write_atomic(out: Path, text: str) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        tmp = None
    except OSError as exc:
        raise UsageError(out, None, f"cannot write the report here ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(os.path.dirname(os.path.abspath(__file__))),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["tojson_html"] = json_for_html
    env.filters["num"] = lambda n: "" if n is None else f"{n:,}"
    return env


def build_report(
    traces: Sequence[str | os.PathLike | Trace],
    out_path: str | os.PathLike,
    title: str | None = None,
    diff_pairs: Sequence[tuple[int, int]] | None = None,
    *,
    names: Sequence[str | None] | None = None,
    routing: Sequence[Any] | None = None,
    max_events: int = MAX_EVENTS,
    tests: Sequence[dict[str, Any] | None] | None = None,
    command: str | None = None,
) -> Path:
    """Write one self-contained HTML report of `traces` (paths or loaded `Trace`s) to `out_path`.

    - `title`: the page's title (default: "Device trace report");
    - `diff_pairs`: (i, j) index pairs of traces to compare with `harness.trace.diff`; by
      default the two traces of a two-trace report (say a CPU run and a CUDA run), none else;
    - `names`: a name per trace (default: the header's `test`, `nodeid`, `case` or `name`, else
      the file name);
    - `routing`: a routing matrix per trace (a `RoutingCounts` from `collect_routing`, a
      [layers, experts] tensor or nested lists, or None: the trace's own, when its tracer
      collected it), for the heatmap;
    - `max_events`: events embedded in the timeline over all traces (see the module doc);
    - `tests`: per trace, the pytest test that made it: {"outcome", "duration"} (seconds), shown
      beside its verdict (the pytest plugin gives them);
    - `command`: the command that was run (shown at the top).

    A trace whose header says `expected_verdict` (a demo or a fault case meant to be dirty) is
    marked "expected" where its verdict is that.

    The file is written atomically (a temporary file in the same folder, then renamed). Bad
    input (a missing or garbled trace, a path that cannot be written) raises a `HarnessError`
    that names the file, and the line where there is one. Returns the path written."""
    out = check_report_path(out_path)
    loaded = [_load(t) for t in traces]
    if not loaded:
        raise UsageError(None, "traces", "no trace to report on")
    if names is not None and len(names) != len(loaded):
        raise UsageError(None, "names", f"{len(names)} names for {len(loaded)} traces")
    if tests is not None and len(tests) != len(loaded):
        raise UsageError(None, "tests", f"{len(tests)} test outcomes for {len(loaded)} traces")
    if routing is not None and not isinstance(routing, (list, tuple)):
        routing = [routing]
    if routing is not None and len(routing) != len(loaded):
        raise UsageError(None, "routing", f"{len(routing)} routing matrices for {len(loaded)} traces")
    if diff_pairs is None:
        diff_pairs = [(0, 1)] if len(loaded) == 2 else []
    for pair in diff_pairs:
        if len(pair) != 2 or not all(isinstance(x, int) and 0 <= x < len(loaded) for x in pair):
            raise UsageError(None, "diff_pairs", f"{pair!r} does not name two of the {len(loaded)} traces")

    cap = max(max_events // len(loaded), MIN_EVENTS_PER_TRACE)
    runs, timelines = [], []
    classes = list(CLASSES)
    devices: list[str] = []
    for i, trace in enumerate(loaded):
        scan = _Scan(trace, cap)
        given = routing[i] if routing else None
        if given is None and trace.summary is not None:
            given = trace.summary.routing  # collected by the tracer (`Tracer(routing=True)`)
        run = _run(i, trace, names[i] if names else None, scan, given, tests[i] if tests else None)
        runs.append(run)
        timelines.append(_timeline_data(scan, run["name"], run["first"], classes))
        placement = _placement(trace.placement) or {}
        devices += [
            str(placement.get("embed")),
            *map(str, placement.get("layers") or []),
            str(placement.get("head")),
        ]
        devices += [d for k in scan.kinds for d in k.devices]
    devices = [d for d in dict.fromkeys(devices) if d and d != "None"]
    colors = _colors(sorted(devices, key=_device_order))
    diffs = [_diff(runs, loaded[a], loaded[b], a, b) for a, b in diff_pairs]
    # One color per direction across the report's charts.
    directions = sorted(
        {(d["src"], d["dst"]) for r in runs if r["bytes_chart"] for d in r["bytes_chart"]["directions"]}
    )
    for r in runs:
        for d in (r["bytes_chart"] or {}).get("directions", []):
            k = directions.index((d["src"], d["dst"]))
            d["color"] = _DIRECTION_PALETTE[k % len(_DIRECTION_PALETTE)]
    dirty = [r for r in runs if r["dirty"]]
    surprises = [r for r in dirty if not r["as_expected"]]
    data = {
        "classes": classes,
        "classColors": {c: _CLASS_COLORS.get(c, _OTHER_COLOR) for c in classes},
        "deviceColors": colors,
        "offending": sorted(OFFENDING),
        "traces": timelines,
    }
    page = (
        _environment()
        .get_template(_TEMPLATE)
        .render(
            title=title or "Device trace report",
            generated=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
            runs=runs,
            dirty=dirty,
            surprises=surprises,
            command=command,
            with_tests=any(r["test"] for r in runs),
            diffs=diffs,
            classes=classes,
            class_colors={c: _CLASS_COLORS.get(c, _OTHER_COLOR) for c in classes},
            device_colors=colors,
            offending=OFFENDING,
            data=data,
            open_details=len(runs) <= 4,
        )
    )
    _write_atomic(out, page)
    return out
