"""Chrome/Perfetto trace-event JSON from a saved trace: the format checked strictly (the rules of
Chrome's Trace Event Format that Perfetto's JSON importer applies: complete slices, flows bound to
slices on their tracks, metadata naming every track), what it says about the run (one track per
device, every op a slice, every transfer a flow with its bytes, the offending ops marked), and
the file parsed and drawn by a minimal viewer page in headless Chromium (skipped without it)."""

from __future__ import annotations

import html as html_module
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from harness.cases import parse_case, run_case
from harness.errors import HarnessError
from harness.trace import OFFENDING, load_trace
from harness.trace.perfetto import perfetto_trace, write_perfetto

CASE = """\
name: topk-two-gpus
model: {synth: tiny, layout: merged, router: f32}
device_map: {embed: cuda:0, layers.0: cuda:0, layers.1: cuda:1, head: cuda:1}
fault: router-topk-on-host
tokens: [1, 5, 9]
decode: 2
expect: {verdict: dirty, class: sync, module: layers.0.moe}
"""

PHASES = {"X", "s", "f", "i", "M"}


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("perfetto")
    result = run_case(parse_case(CASE, out / "case.yaml"), out_dir=out)
    assert result.passed, result.report()
    return result.trace_path


def _check_format(doc: dict) -> dict:
    """The rules of the trace-event format this writer relies on; returns what it found."""
    assert set(doc) == {"traceEvents", "displayTimeUnit", "otherData"}
    assert doc["displayTimeUnit"] in ("ms", "ns")
    events = doc["traceEvents"]
    assert isinstance(events, list) and events
    names: dict[int, str] = {}
    slices: dict[int, list[tuple[int, int]]] = {}
    flows: dict[int, dict[str, dict]] = {}
    for e in events:
        assert e["ph"] in PHASES, e
        assert isinstance(e["pid"], int) and isinstance(e["name"], str) and e["name"], e
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name", "thread_sort_index"), e
            if e["name"] == "thread_name":
                names[e["tid"]] = e["args"]["name"]
            continue
        assert isinstance(e["tid"], int) and isinstance(e["ts"], (int, float)) and e["ts"] >= 0, e
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] > 0, e
            slices.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
        elif e["ph"] == "i":
            assert e["s"] in ("t", "p", "g"), e
        else:  # a flow's start or end
            flow = flows.setdefault(e["id"], {})
            assert e["ph"] not in flow, f"flow {e['id']} has two {e['ph']}"
            flow[e["ph"]] = e
    for tid in slices:
        assert tid in names, f"track {tid} has no thread_name"
    for fid, flow in flows.items():
        assert set(flow) == {"s", "f"}, f"flow {fid} is not a pair"
        s, f = flow["s"], flow["f"]
        assert s["cat"] == f["cat"] and s["name"] == f["name"] and f.get("bp") == "e"
        assert f["ts"] >= s["ts"]
        for end in (s, f):  # each end lies in a slice of its own track, which it binds to
            assert any(a <= end["ts"] < b for a, b in slices[end["tid"]]), end
    return {"names": names, "flows": flows, "events": events}


def test_perfetto_json_follows_the_format_and_tells_the_run(trace_path, tmp_path):
    out = write_perfetto(trace_path, tmp_path / "run.perfetto.json")
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc == perfetto_trace(trace_path)  # streamed to the file, the same as in memory
    found = _check_format(doc)
    events = found["events"]
    trace = load_trace(trace_path)
    traced = list(trace.events())

    # One track per device, cpu first, then cuda:0 and cuda:1; the forward steps above them.
    order = {
        e["tid"]: e["args"]["sort_index"]
        for e in events
        if e["ph"] == "M" and e["name"] == "thread_sort_index"
    }
    tracks = [found["names"][tid] for tid in sorted(order, key=order.get)]
    assert tracks == ["forward steps", "cpu", "cuda:0", "cuda:1"]
    steps = [e["name"] for e in events if e["ph"] == "X" and e["cat"] == "step"]
    assert steps == ["prefill", "decode 1", "decode 2"]

    # Every op is one slice at its sequence number, on the device it ran on.
    ops = [
        e
        for e in events
        if e["ph"] == "X" and e["cat"] not in ("step",) and not e["name"].startswith("copy to ")
    ]
    assert len(ops) == len(traced)
    by_seq = {e["args"]["seq"]: e for e in ops}
    for ev in traced:
        sl = by_seq[ev.seq]
        assert sl["ts"] == ev.seq and sl["args"]["class"] == ev.cls
        specs = ev.outputs or ev.inputs
        if ev.transfer:
            assert found["names"][sl["tid"]] == ev.transfer["to"]
        elif specs:
            assert found["names"][sl["tid"]] == specs[0][0]

    # Every transfer is a flow from the source's track to the destination's, with its bytes.
    transfers = [ev for ev in traced if ev.transfer]
    assert len(found["flows"]) == len(transfers) > 0
    pairs = Counter(
        (found["names"][f["s"]["tid"]], found["names"][f["f"]["tid"]], f["s"]["args"]["bytes"])
        for f in found["flows"].values()
    )
    assert pairs == Counter(
        (ev.transfer["from"], ev.transfer["to"], ev.transfer["bytes"]) for ev in transfers
    )
    assert {("cuda:0", "cuda:1"), ("cuda:0", "cpu")} <= {(a, b) for a, b, _ in pairs}

    # The offending ops: named by their class, in category offending, each with an instant mark;
    # the first offence has a global mark where the summary says.
    offending = [ev for ev in traced if ev.cls in OFFENDING]
    marked = [e for e in ops if e["cat"] == "offending"]
    assert len(marked) == len(offending) > 0
    assert all(e["name"].split()[0].lower() in OFFENDING for e in marked)
    marks = [e for e in events if e["ph"] == "i" and e["s"] == "t"]
    assert len(marks) == len(offending)
    first = [e for e in events if e["ph"] == "i" and e["s"] == "g"]
    assert len(first) == 1 and first[0]["ts"] == trace.summary.first_offence["seq"]
    assert first[0]["args"]["module"] == "layers.0.moe"
    assert doc["otherData"]["verdict"] == "dirty"


def test_an_unfinished_trace_and_bad_paths(trace_path, tmp_path):
    lines = trace_path.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:40]) + lines[40][:25], encoding="utf-8")  # died mid-line
    doc = perfetto_trace(cut)
    _check_format(doc)
    assert doc["otherData"]["verdict"] == "unfinished"
    assert sum(1 for e in doc["traceEvents"] if e["ph"] == "X" and e["cat"] != "step") >= 38
    with pytest.raises(HarnessError, match="does not exist"):
        write_perfetto(trace_path, tmp_path / "no" / "such" / "out.json")
    with pytest.raises(HarnessError, match="is a directory"):
        write_perfetto(trace_path, tmp_path)
    with pytest.raises(HarnessError, match="no such trace file"):
        write_perfetto(tmp_path / "missing.jsonl", tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


# -- in a browser -----------------------------------------------------------------------------------

# A minimal viewer: parses the JSON as a browser does, lays out one row per track by the
# metadata, draws the slices (offending ones red) and the flows (arrows between tracks), and
# writes what it found into #result.
VIEWER = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>trace-event viewer</title>
<style>body { margin: 0; font: 12px sans-serif; } canvas { display: block; }</style></head>
<body><canvas id="c" width="1200" height="260"></canvas><pre id="result"></pre>
<script type="application/json" id="trace">__TRACE__</script>
<script>
var out = {};
try {
  var doc = JSON.parse(document.getElementById("trace").textContent);
  var ev = doc.traceEvents, names = {}, sort = {}, x = [], flows = {};
  ev.forEach(function (e) {
    if (e.ph === "M" && e.name === "thread_name") names[e.tid] = e.args.name;
    if (e.ph === "M" && e.name === "thread_sort_index") sort[e.tid] = e.args.sort_index;
    if (e.ph === "X") x.push(e);
    if (e.ph === "s" || e.ph === "f") { flows[e.id] = flows[e.id] || {}; flows[e.id][e.ph] = e; }
  });
  var tids = Object.keys(names).map(Number).sort(function (a, b) { return sort[a] - sort[b]; });
  var row = {}; tids.forEach(function (t, i) { row[t] = i; });
  var end = Math.max.apply(null, x.map(function (e) { return e.ts + e.dur; }));
  var c = document.getElementById("c"), g = c.getContext("2d"), left = 90, w = c.width - left - 10, h = 50;
  var X = function (ts) { return left + w * ts / end; };
  g.fillStyle = "#fff"; g.fillRect(0, 0, c.width, c.height);
  tids.forEach(function (t, i) { g.fillStyle = "#333"; g.fillText(names[t], 4, 18 + i * h + 14); });
  var bound = 0, drawn = 0;
  x.forEach(function (e) {
    g.fillStyle = e.cat === "offending" ? "#d32f2f" : e.cat === "step" ? "#90a4ae" : e.cat === "transfer" ? "#1565c0" : "#81c784";
    g.fillRect(X(e.ts), 10 + row[e.tid] * h, Math.max(X(e.ts + e.dur) - X(e.ts), 1), 30); drawn++;
  });
  function inside(p) {
    return x.some(function (e) { return e.tid === p.tid && e.ts <= p.ts && p.ts < e.ts + e.dur; });
  }
  g.strokeStyle = "#1565c0"; g.lineWidth = 1.5;
  Object.keys(flows).forEach(function (id) {
    var f = flows[id];
    if (f.s && f.f && inside(f.s) && inside(f.f)) bound++;
    g.beginPath(); g.moveTo(X(f.s.ts), 25 + row[f.s.tid] * h); g.lineTo(X(f.f.ts) + 3, 25 + row[f.f.tid] * h); g.stroke();
  });
  out = { tracks: tids.map(function (t) { return names[t]; }), slices: drawn, flows: Object.keys(flows).length,
          bound: bound, offending: x.filter(function (e) { return e.cat === "offending"; }).length };
} catch (err) { out.error = String(err); }
document.getElementById("result").textContent = JSON.stringify(out);
</script></body></html>
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium here (Debian: apt-get install -y chromium)")


def test_a_browser_parses_and_draws_it(trace_path, tmp_path):
    chromium = _chromium()
    out = write_perfetto(trace_path, tmp_path / "run.perfetto.json")
    text = out.read_text(encoding="utf-8").replace("<", "\\u003c")  # inside a <script> element
    page = tmp_path / "viewer.html"
    page.write_text(VIEWER.replace("__TRACE__", text), encoding="utf-8")
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    common += [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,300", "--hide-scrollbars"]
    done = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(html_module.unescape(re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)[1]))
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert "error" not in seen
    assert seen["tracks"] == ["forward steps", "cpu", "cuda:0", "cuda:1"]
    assert seen["slices"] == sum(1 for e in doc["traceEvents"] if e["ph"] == "X")
    assert seen["flows"] == seen["bound"] > 0  # every flow's ends bind to slices on their tracks
    assert seen["offending"] > 0
    png = tmp_path / "viewer.png"
    done = subprocess.run([*common, f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=120)
    assert done.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reports = Path(__file__).resolve().parents[1] / "reports"
    if reports.is_dir():  # kept for a person to look at (reports/ is not committed)
        shutil.copy(png, reports / "perfetto-viewer.png")
