"""Traces on disk: JSON Lines written as the run goes, read back lazily.

Line 1 is the header (`{"record": "header", ...}`: format, model path, config, placement,
torch version, device names, sampling), then one line per event (no "record" key: events are
the bulk), and last the summary (`{"record": "summary", "verdict", "counts", "first_offence",
...}`). A run that died leaves no summary line; `load_trace` then gives `summary` None.

The writer encodes events by hand from cached fragments (op names, module paths, tensor specs
repeat endlessly), which is several times faster than `json.dumps` of a dict; the file is
buffered and flushed at the end of every forward call, so it grows during the run while the
tracer keeps no events in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.errors import UsageError, shown
from harness.paths import check_input_file
from harness.trace.events import Event, Summary

FORMAT = "harness-trace/1"
BATCH = 4096  # pieces of event lines joined into one write (a line is one piece, or four:)
# An event line is LINE_OPEN, its seq, `step_text(step)`, then its `body`: the tracer writes a
# repeated event as these four pieces, its body the same every time (a string over 512 bytes
# made per event is slow to allocate; the four are copied once, when the buffer is written).
LINE_OPEN = '{"seq":'


def step_text(step: int) -> str:
    """The piece of an event line between its seq and its body."""
    return f',"step":{step},'


_CACHE_LIMIT = 1 << 16


class _Fragments(dict):
    """JSON text of a value (a string, None, a tuple of strings), computed once per value."""

    def __missing__(self, key):
        if len(self) > _CACHE_LIMIT:
            self.clear()
        text = self[key] = json.dumps(key)
        return text


class _SpecTexts(dict):
    """JSON text of a tensor spec (device, dtype, shape, nbytes), computed once per spec."""

    def __missing__(self, spec):
        if len(self) > _CACHE_LIMIT:
            self.clear()
        device, dtype, shape, nbytes = spec
        text = self[spec] = f'["{device}","{dtype}",[{",".join(str(int(n)) for n in shape)}],{nbytes}]'
        return text


# Shared by every writer of the process: the texts depend on the values alone, so a tracer started
# again on the same model (a trace per generation) writes its first lines without JSON encoding.
_FRAGMENTS = _Fragments()
_SPEC_TEXTS = _SpecTexts()


class TraceWriter:
    """Writes a trace file record by record. `header()` first, `summary()` last."""

    def __init__(self, path: str | os.PathLike, buffer_bytes: int = 1 << 16):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.is_dir():
            raise UsageError(self.path, None, f"cannot write here: {self.path.parent} is not a directory")
        self._f = open(self.path, "w", encoding="utf-8", buffering=buffer_bytes)  # noqa: SIM115
        self._frag = _FRAGMENTS
        self._spec_texts = _SPEC_TEXTS
        self.lines: list[str] = []  # encoded lines (or their pieces) not yet handed to the file

    def header(self, header: dict[str, Any]) -> None:
        self._write_obj({"record": "header", "format": FORMAT, **header})

    def summary(self, summary: Summary | dict[str, Any]) -> None:
        self._write_obj(summary.to_dict() if isinstance(summary, Summary) else summary)

    def _write_obj(self, obj: dict[str, Any]) -> None:
        self.flush()
        self._f.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")

    def event(self, ev: Event) -> None:
        self.write(self.encode(ev))

    def write(self, line: str) -> None:
        """Writes a line already encoded (by `encode`), through a buffer of `BATCH` pieces."""
        lines = self.lines
        lines.append(line)
        if len(lines) >= BATCH:
            self.drain()

    def drain(self) -> None:
        """Moves the buffered lines to the file (its own buffer; `flush` pushes that out too)."""
        if self.lines:
            self._f.write("".join(self.lines))
            self.lines.clear()

    def encode(self, ev: Event) -> str:
        """One event as a JSON line (the same object as `ev.to_dict()`)."""
        return f"{LINE_OPEN}{ev.seq}{step_text(ev.step)}{self.body(ev)}"

    def body(self, ev: Event) -> str:
        """The line of an event after its seq and step (the same for every repeat of an op)."""
        text = self.plain_body(ev.op, ev.module, ev.expected, ev.cls, ev.source, ev.inputs, ev.outputs)
        if ev.tensors:
            text += f',"tensors":{self._frag[ev.tensors]}'
        if ev.alias:
            text += ',"alias":true'
        if ev.error is not None:
            text += f',"error":{json.dumps(ev.error)}'
        if ev.transfer is not None:
            text += f',"transfer":{json.dumps(ev.transfer, separators=(",", ":"))}'
        if ev.stack is not None:
            text += f',"stack":{json.dumps(ev.stack)}'
        if ev.named_devices is not None:
            text += f',"devices":{json.dumps(ev.named_devices)}'
        return text + "}\n"

    def ok_body(self, op, module, expected, source, inputs, outputs, tensors, alias) -> str:
        """`body` of an ok event without error, transfer or stack, from its fields."""
        text = self.plain_body(op, module, expected, "ok", source, inputs, outputs)
        if tensors:
            text += f',"tensors":{self._frag[tensors]}'
        return text + (',"alias":true}\n' if alias else "}\n")

    def plain_body(self, op, module, expected, cls, source, inputs, outputs) -> str:
        f = self._frag
        texts = self._spec_texts
        ins_text = ",".join([texts[s] for s in inputs])
        outs_text = "null" if outputs is None else "[" + ",".join([texts[s] for s in outputs]) + "]"
        return (
            f'"op":{f[op]},"module":{f[module]},"expected":{f[expected]},"class":"{cls}",'
            f'"source":{f[source]},"in":[{ins_text}],"out":{outs_text}'
        )

    def flush(self) -> None:
        self.drain()
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed


MAX_LINE_BYTES = 64 << 20  # no record the tracer writes comes near this
MAX_TRACE_BYTES = 256 << 30


def _event_problem(d: dict[str, Any]) -> str | None:
    """What makes `d` not an event line as the writer writes it, or None."""
    if not isinstance(d.get("seq"), int) or not isinstance(d.get("step", 0), int):
        return "seq and step must be integers"
    if not isinstance(d.get("op"), str):
        return "op must be a string"
    for key in ("module", "expected", "source", "class", "error"):
        if d.get(key) is not None and not isinstance(d[key], str):
            return f"{key} must be a string"
    for key in ("in", "out"):
        specs = d.get(key)
        if specs is None:
            continue
        if not isinstance(specs, list) or not all(
            isinstance(s, list)
            and len(s) == 4
            and isinstance(s[0], str)
            and isinstance(s[1], str)
            and isinstance(s[2], list)
            and all(isinstance(n, int) for n in s[2])
            and isinstance(s[3], int)
            for s in specs
        ):
            return f"{key} must be a list of [device, dtype, shape, bytes] tensor specs"
    if d.get("tensors") is not None and not (
        isinstance(d["tensors"], list) and all(isinstance(t, str) or t is None for t in d["tensors"])
    ):
        return "tensors must be a list of names"
    if d.get("devices") is not None and not isinstance(d["devices"], list):
        return "devices must be a list"
    return None


_SUMMARY_FIELDS = {
    "counts": dict,
    "first_offence": (dict, type(None)),
    "events": int,
    "steps": dict,
    "unrecorded": int,
    "transfers": list,
    "modules": dict,
    "seconds": (int, float),
    "routing": (dict, type(None)),
    "inside": (int, type(None)),
    "traffic": dict,
    "error": (dict, type(None)),
}


def _summary_problem(d: dict[str, Any]) -> str | None:
    """What makes `d` not a summary record as the writer writes it, or None."""
    if not isinstance(d.get("verdict"), str):
        return "the verdict must be a string"
    for key, kind in _SUMMARY_FIELDS.items():
        if key in d and (not isinstance(d[key], kind) or isinstance(d[key], bool)):
            return f"{key} has the wrong type ({type(d[key]).__name__})"
    return None


def _placement_problem(p: Any) -> str | None:
    if not isinstance(p, dict):
        return "must be an object"
    if not isinstance(p.get("embed"), str) or not isinstance(p.get("head"), str):
        return "needs embed and head devices"
    layers = p.get("layers")
    if not isinstance(layers, list) or not all(isinstance(d, str) for d in layers):
        return "needs a list of layer devices"
    return None


class Trace:
    """A trace file read back: `header` and `summary` (None when the run did not finish) are
    read at once; events are read lazily, one line at a time, by iterating or `events()`.

    Only a regular file is read (a FIFO or device could block or never end), and no line
    longer than `MAX_LINE_BYTES`; every malformed line is a UsageError naming the file and line."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_input_file(path, max_bytes=MAX_TRACE_BYTES, what="trace file")
        with open(self.path, "rb") as f:
            first = self._read_line(f, 1)
        if not first.strip():
            raise UsageError(self.path, "line 1", "not a harness trace (the file is empty)")
        self.header = self._parse(first, 1)
        if self.header.get("record") != "header":
            raise UsageError(self.path, "line 1", "not a harness trace (no header record)")
        placement = self.header.get("placement_full")
        if placement is not None and (problem := _placement_problem(placement)):
            raise UsageError(self.path, "line 1", f"placement_full {problem}")
        try:
            record = json.loads(self._last_line())
        except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, a 5,000-digit number
            record = None  # a run that died mid-line
        is_summary = isinstance(record, dict) and record.get("record") == "summary"
        self.summary = None
        if is_summary:
            problem = _summary_problem(record)
            if problem:
                raise UsageError(self.path, "last line", f"not a trace summary: {problem}")
            try:
                self.summary = Summary.from_dict(record)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise UsageError(self.path, "last line", f"not a trace summary ({shown(exc)})") from None

    def _read_line(self, f, lineno: int) -> str:
        line = f.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise UsageError(self.path, f"line {lineno}", f"longer than {MAX_LINE_BYTES} bytes")
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(self.path, f"line {lineno}", f"not UTF-8 (byte {exc.start})") from None

    def _parse(self, line: str, lineno: int | None) -> dict[str, Any]:
        where = f"line {lineno}" if lineno else "last line"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(self.path, where, f"not JSON ({exc.msg})") from None
        except ValueError as exc:  # e.g. an integer past Python's 4,300-digit limit
            raise UsageError(self.path, where, f"not JSON ({shown(str(exc), 80)})") from None
        except RecursionError:
            raise UsageError(self.path, where, "JSON nested too deep") from None
        if not isinstance(value, dict):
            raise UsageError(self.path, where, "not a JSON object")
        return value

    def _last_line(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            size = 4096
            while True:
                start = max(end - size, 0)
                f.seek(start)
                chunk = f.read(end - start)
                lines = chunk.rstrip(b"\n").split(b"\n")
                if len(lines) > 1 or start == 0:
                    return lines[-1].decode("utf-8")
                if size > MAX_LINE_BYTES:
                    raise UsageError(self.path, "last line", f"longer than {MAX_LINE_BYTES} bytes")
                size *= 4

    def events(self) -> Iterator[Event]:
        """The events in order, parsed one line at a time."""
        with open(self.path, "rb") as f:
            self._read_line(f, 1)
            lineno = 1
            while True:
                lineno += 1
                line = self._read_line(f, lineno)
                if not line:
                    return
                if not line.strip():
                    continue
                if not line.endswith("\n"):
                    try:
                        d = json.loads(line)
                    except (ValueError, RecursionError):
                        return  # the run died while writing this line
                    if not isinstance(d, dict):
                        raise UsageError(self.path, f"line {lineno}", "not a JSON object")
                else:
                    d = self._parse(line, lineno)
                if "record" in d:
                    continue
                problem = _event_problem(d)
                if problem:
                    raise UsageError(self.path, f"line {lineno}", f"not a trace event: {problem}")
                yield Event.from_dict(d)

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    @property
    def placement(self) -> dict[str, Any] | None:
        """{"embed": dev, "layers": [dev, ...], "head": dev} as the header gives it."""
        return self.header.get("placement_full")

    def __repr__(self) -> str:
        verdict = self.summary.verdict if self.summary else "unfinished"
        return f"Trace({str(self.path)!r}, {verdict})"


def load_trace(path: str | os.PathLike | Trace) -> Trace:
    """Open a trace written by the tracer (`Trace`: header, summary, events())."""
    return path if isinstance(path, Trace) else Trace(path)
