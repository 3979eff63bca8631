"""A saved trace as Chrome/Perfetto trace-event JSON (ui.perfetto.dev, chrome://tracing).

    write_perfetto("run.jsonl", "run.perfetto.json")

The file is the JSON object form of Chrome's Trace Event Format: `{"traceEvents": [...],
"displayTimeUnit": "ns", "otherData": {...}}`. One process (the run), and in it:

- one track (thread) per device, cpu first, then cuda:0, cuda:1, ... in order; each op is a
  complete slice (`ph: "X"`) on the track of the device it ran on (its first output's, else its
  first input's), named by the op, with module, GGUF tensors, devices, class and source in args;
- a "forward steps" track above them: one slice per traced forward call (prefill, decode 1, ...);
- a transfer (a copy across devices) is a slice "copy to DEV" on the source device's track and
  a flow arrow (`ph: "s"`/`"f"`, category `transfer`) to the op on the destination's track; the
  bytes are in the args of both;
- offending ops (mismatch, sync, stray) are named `MISMATCH aten::mm` (the class in capitals)
  in category `offending`, coloured (`cname`), and marked by an instant event (`ph: "i"`) on
  their track; the first offence by a global instant "first offence".

A trace has no clock: events are in the order the ops ran. Time here is that order, one
microsecond per op (`ts` = the event's sequence number), which `otherData.time` says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.paths import check_output_file
from harness.trace.events import OFFENDING, TRANSFER, Event
from harness.trace.store import Trace, load_trace

__all__ = ["perfetto_trace", "write_perfetto"]

PID = 1
STEPS_TID = 0  # the track of forward steps; devices are 1, 2, ... in device order
# Chrome's reserved colour names (chrome://tracing; Perfetto colours by name).
_CNAMES = {"mismatch": "terrible", "sync": "bad", "stray": "bad", "transfer": "yellow", "allowed": "grey"}


def _track_order(device: str) -> tuple:
    """cpu first, then each kind of device by index (cuda:2 before cuda:10)."""
    kind, _, index = device.partition(":")
    return (device != "cpu", kind, int(index) if index.isdigit() else -1)


def _run_on(ev: Event) -> str | None:
    specs = ev.outputs or ev.inputs
    if specs:
        return str(specs[0][0])
    devices = ev.devices
    return devices[0] if devices else None


def _args(ev: Event) -> dict[str, Any]:
    args: dict[str, Any] = {
        "seq": ev.seq,
        "step": ev.step,
        "class": ev.cls,
        "module": "<outside the model>" if ev.module is None else (ev.module or "<model>"),
        "devices": ", ".join(ev.devices),
    }
    if ev.expected is not None:
        args["expected"] = ev.expected
    if ev.tensors:
        args["tensors"] = ", ".join(ev.tensors)
    if ev.source:
        args["source"] = ev.source
    if ev.error:
        args["error"] = ev.error
    if ev.transfer:
        args["bytes"] = ev.transfer.get("bytes")
    return args


def _step_name(step: int) -> str:
    return "prefill" if step == 0 else f"decode {step}"


def _events(trace: Trace, name: str) -> Iterator[dict[str, Any]]:
    """The trace events, metadata for the tracks last (the tracks are known at the end)."""
    tids: dict[str, int] = {}
    first_seq = (trace.summary.first_offence or {}).get("seq") if trace.summary else None
    step_start = step = None
    last_ts = 0
    flow = 0
    for ev in trace.events():
        ts = ev.seq
        last_ts = ts + 1
        if ev.step != step:
            if step is not None:
                yield _step_slice(step, step_start, ts)
            step, step_start = ev.step, ts
        device = _run_on(ev) or "?"
        tid = tids.setdefault(device, len(tids) + 1)
        offending = ev.cls in OFFENDING
        slice_ = {
            "ph": "X",
            "pid": PID,
            "tid": tid,
            "ts": ts,
            "dur": 1,
            "name": f"{ev.cls.upper()} {ev.op}" if offending else ev.op,
            "cat": "offending" if offending else str(ev.cls),
            "args": _args(ev),
        }
        if ev.cls in _CNAMES:
            slice_["cname"] = _CNAMES[ev.cls]
        if ev.transfer:
            src, dst = str(ev.transfer.get("from")), str(ev.transfer.get("to"))
            nbytes = ev.transfer.get("bytes")
            src_tid = tids.setdefault(src, len(tids) + 1)
            dst_tid = tids.setdefault(dst, len(tids) + 1)
            slice_["tid"] = dst_tid
            flow += 1
            yield {
                "ph": "X",
                "pid": PID,
                "tid": src_tid,
                "ts": ts,
                "dur": 1,
                "name": f"copy to {dst}",
                "cat": TRANSFER,
                "args": {"seq": ev.seq, "to": dst, "bytes": nbytes, "class": ev.cls},
            }
            flow_common = {"pid": PID, "id": flow, "name": f"{src} \u2192 {dst}", "cat": TRANSFER}
            yield {**flow_common, "ph": "s", "tid": src_tid, "ts": ts, "args": {"bytes": nbytes}}
            yield {**flow_common, "ph": "f", "bp": "e", "tid": dst_tid, "ts": ts, "args": {"bytes": nbytes}}
        yield slice_
        if offending:
            yield {
                "ph": "i",
                "s": "t",
                "pid": PID,
                "tid": slice_["tid"],
                "ts": ts,
                "name": f"{ev.cls}: {ev.op}",
                "cat": "offending",
                "args": {"module": slice_["args"]["module"], "tensors": slice_["args"].get("tensors")},
            }
            if ev.seq == first_seq:
                yield {
                    "ph": "i",
                    "s": "g",
                    "pid": PID,
                    "tid": slice_["tid"],
                    "ts": ts,
                    "name": "first offence",
                    "cat": "offending",
                    "args": _args(ev),
                }
    if step is not None:
        yield _step_slice(step, step_start, last_ts)
    yield _meta("process_name", None, {"name": name})
    yield _meta("thread_name", STEPS_TID, {"name": "forward steps"})
    yield _meta("thread_sort_index", STEPS_TID, {"sort_index": 0})
    for i, device in enumerate(sorted(tids, key=_track_order), start=1):
        yield _meta("thread_name", tids[device], {"name": device})
        yield _meta("thread_sort_index", tids[device], {"sort_index": i})


def _step_slice(step: int, start: int, end: int) -> dict[str, Any]:
    return {
        "ph": "X",
        "pid": PID,
        "tid": STEPS_TID,
        "ts": start,
        "dur": max(end - start, 1),
        "name": _step_name(step),
        "cat": "step",
        "args": {"step": step},
    }


def _meta(what: str, tid: int | None, args: dict[str, Any]) -> dict[str, Any]:
    d = {"ph": "M", "pid": PID, "name": what, "args": args}
    if tid is not None:
        d["tid"] = tid
    return d


def _trace_name(trace: Trace) -> str:
    h = trace.header
    for key in ("test", "case", "name"):
        if h.get(key):
            return str(h[key])
    model = h.get("model")
    return f"{Path(str(model)).name} ({trace.path.name})" if model else trace.path.name


def perfetto_trace(trace: str | os.PathLike | Trace, name: str | None = None) -> dict[str, Any]:
    """The trace-event JSON object of a saved trace (see the module doc), in memory."""
    trace = load_trace(trace)
    name = name or _trace_name(trace)
    return {
        "traceEvents": list(_events(trace, name)),
        "displayTimeUnit": "ns",
        "otherData": _other_data(trace),
    }


def _other_data(trace: Trace) -> dict[str, Any]:
    s = trace.summary
    return {
        "source": "harness",
        "trace": str(trace.path),
        "time": "one microsecond per op: ts is the op's sequence number (a trace has no clock)",
        "verdict": s.verdict if s is not None else "unfinished",
        "model": str(trace.header.get("model")),
    }


def write_perfetto(
    trace: str | os.PathLike | Trace, out_path: str | os.PathLike, name: str | None = None
) -> Path:
    """Write a saved trace as Chrome/Perfetto trace-event JSON to `out_path`; returns the path.

    Streams: the events are written as they are read, so a long trace needs no more memory than
    a short one; the file appears whole or not at all (written beside it, then renamed). Bad
    input (a missing or garbled trace, a folder that does not exist) raises a `HarnessError`
    naming the file."""
    out = check_output_file(out_path)
    trace = load_trace(trace)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"traceEvents":[\n')
            for i, event in enumerate(_events(trace, name or _trace_name(trace))):
                f.write((",\n" if i else "") + json.dumps(event, separators=(",", ":")))
            f.write('\n],"displayTimeUnit":"ns","otherData":')
            f.write(json.dumps(_other_data(trace)) + "}\n")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(out, None, f"cannot write: {exc.strerror or exc}") from None
    return out
