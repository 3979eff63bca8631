"""The HTML report: what it shows, escaping, bad paths and input, size at 100k events, and the
page as headless Chromium renders it (Debian's `chromium` package; skipped where it is absent)."""

from __future__ import annotations

import html as html_module
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from harness.cases import parse_case, run_case
from harness.cli import loading, main
from harness.errors import HarnessError
from harness.model.generate import generate
from harness.model.mixtral import Mixtral
from harness.report import build_report, collect_routing
from harness.synth import synthesize
from harness.trace import CLASSES, CLEAN, DIRTY, Event, Summary, TensorSpec, Tracer, TraceWriter, load_trace

HOSTILE = "<script>alert(1)</script>"
TOKENS = [1, 5, 9]
N_NEW = 3  # tokens generated: a prefill of 3 tokens and 2 decode steps of 1


def _emulated(device_count: int = 1):
    try:
        from harness.trace.emulated import EmulatedCuda
    except ImportError:
        pytest.skip("the emulated accelerator (harness.trace.emulated) is not here")
    return EmulatedCuda(device_count=device_count)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    # TheBloke's layout: one tensor per expert, the router in F16 (candle#1815's setting).
    return synthesize(
        tmp_path_factory.mktemp("report") / "tiny.gguf", "tiny", layout="per-expert", router="f16"
    )


@pytest.fixture(scope="module")
def runs(tiny_path, tmp_path_factory) -> dict:
    """A clean run and a candle#1815 run on the emulated accelerator, and a clean CPU run."""
    d = tmp_path_factory.mktemp("traces")
    out = {}
    with _emulated():
        model = Mixtral.from_gguf(tiny_path, device="cuda", max_seq_len=32)
        with collect_routing(model) as routing, Tracer(model, path=d / "clean.jsonl") as tracer:
            generate(model, TOKENS, N_NEW)
        out["clean"], out["clean_summary"], out["routing"] = d / "clean.jsonl", tracer.summary, routing
        # candle#1815: the F16 router of layer 0 left on the CPU; the MoE forward fails.
        router = model.layers[0].moe.router
        on_device = router.weight
        router.weight = on_device.to("cpu")
        try:
            tracer = Tracer(model, path=d / "dirty.jsonl", header={"case": "candle-1815"})
            with pytest.raises(RuntimeError, match="same device"), tracer:
                generate(model, TOKENS, N_NEW)
        finally:
            router.weight = on_device
        out["dirty"], out["dirty_summary"] = d / "dirty.jsonl", tracer.summary
    cpu_model = Mixtral.from_gguf(tiny_path, device="cpu", max_seq_len=32)
    with Tracer(cpu_model, path=d / "cpu.jsonl"):
        generate(cpu_model, TOKENS, N_NEW)
    out["cpu"] = d / "cpu.jsonl"
    return out


def _data(html: str) -> dict:
    """The JSON block the page's script reads."""
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert m, "no data block"
    return json.loads(m[1])


# -- what the report shows ----------------------------------------------------------------------


def test_report_shows_verdicts_first_offence_transfers_and_routing(runs, tmp_path):
    out = build_report(
        [runs["clean"], runs["dirty"]],
        tmp_path / "r.html",
        title="router on the accelerator",
        routing=[runs["routing"], None],
    )
    html = out.read_text()
    assert runs["clean_summary"].verdict == CLEAN and runs["dirty_summary"].verdict == DIRTY
    assert "<title>router on the accelerator</title>" in html
    assert '<span class="verdict clean">clean</span>' in html
    assert '<span class="verdict dirty">dirty</span>' in html
    # The first offence: module, GGUF tensor, op, the source line and the stack's frames.
    first = runs["dirty_summary"].first_offence
    assert (first["module"], first["tensor"]) == ("layers.0.moe.router", "blk.0.ffn_gate_inp.weight")
    assert '<code class="offence-module">layers.0.moe.router</code>' in html
    assert '<code class="offence-tensor">blk.0.ffn_gate_inp.weight</code>' in html
    assert "harness/quant/qmatmul.py:61 in QMatMul.forward" in html or first["source"] in html
    assert "return x @ w.to(x.dtype).T" in html  # the source line
    assert "in MoE.forward" in html  # a frame of the stack
    assert "Expected all tensors to be on the same device" in html
    # Transfers: the token upload, host to device, 8 bytes per token id.
    assert re.search(r"cpu</span>&rarr; <span[^>]*>cuda:0</span>.*?allowed.*?>1</td>.*?>24 B<", html, re.S)
    # The heatmap: each layer's row adds up to tokens x experts used per token.
    counts = runs["routing"].counts
    assert list(counts.shape) == [2, 4]
    tokens_seen = len(TOKENS) + N_NEW - 1
    assert counts.sum(1).tolist() == [tokens_seen * 2, tokens_seen * 2]
    for layer, row in enumerate(counts.tolist()):
        for e, n in enumerate(row):
            assert f'title="layer {layer}, expert {e}: {n}"' in html
    assert "No routing recorded for this trace" in html  # the dirty one has none
    # The timeline's data: every event, and the first offence's seq to jump to.
    data = _data(html)
    clean, dirty = data["traces"]
    assert clean["total"] == len(clean["ev"]) == runs["clean_summary"].events
    assert dirty["first_seq"] == first["seq"]
    seqs = dirty["seq"] or [dirty["seq0"] + i for i in range(len(dirty["ev"]))]
    kind = dirty["K"][dirty["ev"][seqs.index(first["seq"])]]
    assert dirty["S"][kind[1]] == "layers.0.moe.router" and data["classes"][kind[3]] == "mismatch"
    # The module tree colours by device and marks the offending module.
    assert re.search(r'tn-name">router</span>\s*<span class="dev "[^>]*>cuda:0</span>', html)


def test_two_traces_get_a_diff(runs, tmp_path):
    html = build_report([runs["clean"], runs["dirty"]], tmp_path / "r.html").read_text()
    assert 'id="diff"' in html
    # The router's matmul ran with its weight off the placement in the dirty run only.
    assert re.search(
        r"<td>devices</td><td class=\"mono\">layers\.0\.moe\.router</td>.*?d0,d0 -&gt; d0.*?off:cpu",
        html,
        re.S,
    )
    one = build_report([runs["clean"]], tmp_path / "one.html").read_text()
    assert 'id="diff"' not in one
    three = build_report(
        [runs["clean"], runs["cpu"], runs["dirty"]], tmp_path / "three.html", diff_pairs=[(0, 1)]
    ).read_text()
    assert three.count("<h3>a: ") == 1


def test_summary_names_each_trace_and_its_placement(runs, tmp_path):
    html = build_report(
        [runs["cpu"], runs["clean"], runs["dirty"]], tmp_path / "r.html", names=["cpu run", "cuda run", None]
    ).read_text()
    assert (
        '<a href="#run-0" class="id" title="cpu run">cpu run</a>' in html
        and '<a href="#run-1" class="id" title="cuda run">cuda run</a>' in html
    )
    assert (
        '<a href="#run-2" class="id" title="candle-1815">candle-1815</a>' in html
    )  # from the header's case name
    assert "2 layers, 2/4 experts" in html
    assert "1 of 3 dirty" in html


# -- escaping -----------------------------------------------------------------------------------


def _spec(device="cuda:0", shape=(3, 8)) -> TensorSpec:
    return TensorSpec(device, "float32", shape, 4 * shape[0] * shape[1])


def _write_trace(path: Path, events: list[Event], header: dict | None = None, summary: bool = True) -> Path:
    """A trace in the store's format, events given by hand."""
    w = TraceWriter(path)
    w.header(
        {
            "model": "/models/tiny.gguf",
            "model_class": "Mixtral",
            "config": {"block_count": 2, "expert_count": 4, "expert_used_count": 2},
            "placement": {"embed": "cuda:0", "layers.0-1": "cuda:0", "head": "cuda:0"},
            "placement_full": {"embed": "cuda:0", "layers": ["cuda:0", "cuda:0"], "head": "cuda:0"},
            **(header or {}),
        }
    )
    counts = dict.fromkeys(CLASSES, 0)
    first = None
    for ev in events:
        w.event(ev)
        counts[ev.cls] += 1
        if first is None and ev.offending:
            from harness.trace.events import first_offence

            first = first_offence(ev)
    if summary:
        w.summary(
            Summary(verdict=DIRTY if first else CLEAN, counts=counts, first_offence=first, events=len(events))
        )
    w.close()
    return path


def test_hostile_strings_are_escaped(tmp_path):
    events = [
        Event(
            0,
            0,
            "aten.mul.Tensor",
            f"layers.0.{HOSTILE}",
            "cuda:0",
            (HOSTILE,),
            f"{HOSTILE}.py:1 in f",
            [_spec()],
            [_spec()],
            cls="ok",
        ),
        Event(
            1,
            0,
            f"aten.{HOSTILE}",
            "layers.0.moe.router",
            "cuda:0",
            (f"blk.0.{HOSTILE}",),
            "m.py:2 in g",
            [_spec(), _spec("cpu")],
            None,
            error=f"RuntimeError: {HOSTILE}",
            cls="mismatch",
            stack=[f"m.py:2 in g: x = {HOSTILE}"],
        ),
    ]
    trace = _write_trace(tmp_path / "hostile.jsonl", events, header={"case": HOSTILE, "fault": HOSTILE})
    html = build_report([trace, trace], tmp_path / "r.html", title=HOSTILE, names=[HOSTILE, None]).read_text()
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("</script>") == 3  # the error hook, the data block and the page's script
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in html
    data = _data(html)
    assert HOSTILE in data["traces"][0]["S"] and data["traces"][0]["name"] == HOSTILE
    assert f"blk.0.{HOSTILE}" in data["traces"][1]["S"]


# -- bad paths and bad input --------------------------------------------------------------------


def test_unwritable_report_path(runs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for bad in (blocker / "report.html", tmp_path):
        with pytest.raises(HarnessError, match=re.escape(str(bad))):
            build_report([runs["clean"]], bad)
        assert main(["report", str(runs["clean"]), "-o", str(bad)]) == 2
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1
            and str(bad) in err
            and ("is a directory" in err or "is not a directory" in err)
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no temporary file left


def test_report_folder_is_made_and_the_write_is_atomic(runs, tmp_path):
    out = tmp_path / "reports" / "nested" / "r.html"
    build_report([runs["clean"]], out)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_cli_report(runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(runs["clean"]), str(runs["dirty"]), "-o", str(out), "--title", "two"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    html = out.read_text()
    assert "<title>two</title>" in html and 'id="diff"' in html


def test_cli_report_bad_traces(runs, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["report", str(missing), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err
    lines = runs["clean"].read_text().splitlines(keepends=True)
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text("".join(lines[:5]) + '{"seq": 4, "op": \n' + "".join(lines[6:]))
    assert main(["report", str(garbled), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{garbled}: line 6: not JSON" in err
    assert not (tmp_path / "r.html").exists()
    not_a_trace = tmp_path / "x.jsonl"
    not_a_trace.write_text('{"record": "summary"}\n')
    assert main(["report", str(not_a_trace), "-o", str(tmp_path / "r.html")]) == 2
    assert "line 1" in capsys.readouterr().err


def test_unfinished_trace(tmp_path):
    """A run that died: no summary, a half-written last line; the offence is found in the events."""
    events = [
        Event(
            0,
            0,
            "aten.mul.Tensor",
            "layers.0.attn",
            "cuda:0",
            None,
            "m.py:1 in f",
            [_spec()],
            [_spec()],
            cls="ok",
        ),
        Event(
            1,
            0,
            "aten.item.default",
            "layers.0.moe",
            "cuda:0",
            None,
            "m.py:9 in routing",
            [_spec()],
            [_spec("cpu", (1, 1))],
            cls="sync",
        ),
    ]
    path = _write_trace(tmp_path / "died.jsonl", events, summary=False)
    with open(path, "a") as f:
        f.write('{"seq":2,"step":0,"op":"aten.add')
    html = build_report([path], tmp_path / "r.html").read_text()
    assert '<span class="verdict unfinished">unfinished</span>' in html
    assert '<code class="offence-module">layers.0.moe</code>' in html and "m.py:9 in routing" in html
    assert _data(html)["traces"][0]["total"] == 2


# -- routing ------------------------------------------------------------------------------------


def test_collect_routing_adds_nothing_to_the_trace(tiny_path):
    model = Mixtral.from_gguf(tiny_path, device="cpu", max_seq_len=32)
    with Tracer(model) as plain:
        generate(model, TOKENS, N_NEW)
    with Tracer(model) as traced, collect_routing(model) as routing:
        generate(model, TOKENS, N_NEW)
    assert traced.summary.counts == plain.summary.counts
    assert traced.summary.verdict == CLEAN
    assert routing.layers == ["layers.0.moe.experts", "layers.1.moe.experts"]
    assert routing.counts.sum().item() == 2 * 2 * (len(TOKENS) + N_NEW - 1)
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed


def test_a_tracer_with_routing_writes_it_into_the_trace(tiny_path, tmp_path):
    model = Mixtral.from_gguf(tiny_path, device="cpu", max_seq_len=32)
    with Tracer(model, path=tmp_path / "plain.jsonl") as plain:
        generate(model, TOKENS, N_NEW)
    with collect_routing(model) as live, Tracer(model, path=tmp_path / "r.jsonl", routing=True) as traced:
        generate(model, TOKENS, N_NEW)
    assert plain.summary.routing is None
    assert traced.summary.counts == plain.summary.counts  # counting adds no event
    record = traced.summary.routing
    assert record["layers"] == ["layers.0.moe.experts", "layers.1.moe.experts"]
    assert record["counts"] == live.counts.tolist()  # the same counts as collect_routing's
    assert sum(map(sum, record["counts"])) == 2 * 2 * (len(TOKENS) + N_NEW - 1)
    assert load_trace(tmp_path / "r.jsonl").summary.routing == record  # on disk, read back
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed
    # The report of the saved trace alone shows the heatmap, with the layers' names.
    html = build_report([tmp_path / "r.jsonl"], tmp_path / "r.html").read_text()
    assert "Tokens routed to each expert" in html
    n = record["counts"][1][3]
    assert f'title="layer 1, expert 3: {n}"' in html
    assert (
        "Tokens routed to each expert"
        not in build_report([tmp_path / "plain.jsonl"], tmp_path / "p.html").read_text()
    )


def test_routing_of_a_sampled_trace_counts_every_step(tiny_path):
    model = Mixtral.from_gguf(tiny_path, device="cpu", max_seq_len=32)
    with Tracer(model, sample_every=3, routing=True) as tracer:
        generate(model, TOKENS, N_NEW)
    assert tracer.summary.steps["skipped"] > 0
    assert sum(map(sum, tracer.summary.routing["counts"])) == 2 * 2 * (len(TOKENS) + N_NEW - 1)


# -- harness trace --report ---------------------------------------------------------------------


def test_trace_report_option(tiny_path, tmp_path, capsys, monkeypatch):
    _emulated()  # skips where the emulated accelerator is absent
    out, trace = tmp_path / "trace.html", tmp_path / "t.jsonl"
    argv = ["trace", str(tiny_path), "--device", "emulated", "--decode", "1", "--tokens", "1,5,9"]
    assert main([*argv, "-o", str(trace), "--report", str(out)]) == 0
    assert f"report -> {out}" in capsys.readouterr().err
    html = out.read_text()
    assert "Tokens routed to each expert" in html and 'title="layer 1, expert 3: ' in html
    assert '<a href="#run-0" class="id" title="t.jsonl">t.jsonl</a>' in html
    # Without -o the trace is a temporary file, gone afterwards.
    before = set(os.listdir(tempfile.gettempdir()))
    assert main([*argv, "--report", str(tmp_path / "t2.html")]) == 0
    after = set(os.listdir(tempfile.gettempdir()))
    assert not [n for n in after - before if n.startswith("harness-trace-")]
    assert (tmp_path / "t2.html").exists()
    # A run whose offending op raises still gets its report, and the exit status says dirty.
    load = loading.load_model

    def load_with_router_on_the_host(args):
        model = load(args)
        model.layers[0].moe.router.weight = model.layers[0].moe.router.weight.to("cpu")
        return model

    monkeypatch.setattr(loading, "load_model", load_with_router_on_the_host)
    assert main([*argv, "--report", str(tmp_path / "dirty.html")]) == 1
    html = (tmp_path / "dirty.html").read_text()
    assert '<code class="offence-tensor">blk.0.ffn_gate_inp.weight</code>' in html
    assert "No token reached the experts (the run stopped before they ran)." in html
    monkeypatch.undo()
    # An unwritable report path fails before the run.
    capsys.readouterr()
    assert main([*argv, "--report", str(tmp_path)]) == 2
    err = capsys.readouterr()
    assert (
        err.out == "" and err.err.count("\n") == 1 and "--report: " in err.err and "is a directory" in err.err
    )


# -- large traces -------------------------------------------------------------------------------


def _big_trace(path: Path, n: int) -> tuple[Path, int]:
    """`n` events: a forward pass of 8 layers repeated step after step, a transfer at each step's
    start, and a sync at every 997th event. Returns the path and the number of non-ok events."""
    templates = []
    for layer in range(8):
        for sub, op, tensor in (
            ("attn_norm", "aten.mul.Tensor", f"blk.{layer}.attn_norm.weight"),
            ("attn.wq", "aten.matmul.default", f"blk.{layer}.attn_q.weight"),
            ("attn", "aten.softmax.int", None),
            ("moe.router", "aten.matmul.default", f"blk.{layer}.ffn_gate_inp.weight"),
            ("moe", "aten.topk.default", None),
            ("moe.experts", "aten.index_select.default", f"blk.{layer}.ffn_gate_exps.weight"),
        ):
            templates.append((f"layers.{layer}.{sub}", op, (tensor,) if tensor else None))
    w = TraceWriter(path)
    w.header(
        {
            "model": "big.gguf",
            "config": {"block_count": 8, "expert_count": 8, "expert_used_count": 2},
            "placement_full": {"embed": "cuda:0", "layers": ["cuda:0"] * 8, "head": "cuda:0"},
        }
    )
    counts = dict.fromkeys(CLASSES, 0)
    step, special, first = 0, 0, None
    up = Event(
        0,
        0,
        "aten._to_copy.default",
        "",
        None,
        None,
        "gen.py:5 in generate",
        [_spec("cpu", (1, 1))],
        [_spec("cuda:0", (1, 1))],
        cls="allowed",
        transfer={"from": "cpu", "to": "cuda:0", "bytes": 4, "explicit": True},
    )
    for seq in range(n):
        i = seq % (len(templates) + 1)
        if i == 0:
            step += seq > 0
            ev = up
        else:
            module, op, tensors = templates[i - 1]
            ev = Event(
                0,
                0,
                op,
                module,
                "cuda:0",
                tensors,
                f"harness/model/mixtral.py:{100 + i} in f",
                [_spec()],
                [_spec()],
                cls="ok",
            )
        if seq % 997 == 996:
            ev = Event(
                0,
                0,
                "aten.item.default",
                "layers.3.moe",
                "cuda:0",
                None,
                "mixtral.py:250 in MoE.forward",
                [_spec("cuda:0", (1, 1))],
                [_spec("cpu", (1, 1))],
                cls="sync",
                stack=["mixtral.py:250 in MoE.forward: x.item()"] if first is None else None,
            )
        ev.seq, ev.step = seq, step
        w.event(ev)
        counts[ev.cls] += 1
        special += ev.cls != "ok"
        if first is None and ev.offending:
            from harness.trace.events import first_offence

            first = first_offence(ev)
    w.summary(Summary(verdict=DIRTY, counts=counts, first_offence=first, events=n))
    w.close()
    return path, special


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return _big_trace(tmp_path_factory.mktemp("big") / "big.jsonl", 100_000)


def test_100k_event_trace(big, tmp_path):
    path, special = big
    t0 = time.perf_counter()
    out = build_report([path], tmp_path / "big.html")
    seconds = time.perf_counter() - t0
    assert seconds < 30, f"took {seconds:.1f} s"  # a guard, not a benchmark: about 0.5 s here
    size = out.stat().st_size
    assert size < 2_000_000, f"{size} bytes"  # events are embedded as kind indices
    html = out.read_text()
    data = _data(html)["traces"][0]
    assert data["total"] == len(data["ev"]) == 100_000 and data["note"] is None
    assert len(data["K"]) < 100  # the repeats share their kinds
    assert "100,000" in html
    assert 'class="tl-row' not in html  # the event table's rows are made by the page, as scrolled


def test_large_trace_is_sampled_keeping_what_matters(big, tmp_path):
    path, special = big
    html = build_report([path], tmp_path / "big.html", max_events=20_000).read_text()
    data = _data(html)["traces"][0]
    assert 15_000 <= len(data["ev"]) <= 20_000
    assert data["seq"] is not None and data["total"] == 100_000
    kept_special = sum(1 for k in data["ev"] if data["K"][k][3] != CLASSES.index("ok"))
    assert kept_special == special  # every transfer and sync is kept
    assert re.match(
        r"The timeline shows [\d,]+ of 100,000 events: one ok event in \d+ and every event that is not ok\.",
        data["note"],
    )
    assert "Counts, transfers, syncs and the module tree cover every event." in html
    # The aggregates still count every event.
    assert re.search(r"Host syncs <span class=\"muted small\">100 in all", html)


# -- the page in a browser ----------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium here (Debian: apt-get install -y chromium)")


def _chrome(page: Path, tmp_path: Path, *mode: str, size: str = "1280,1600") -> subprocess.CompletedProcess:
    """Headless Chromium on `page` (`--dump-dom`, `--screenshot=...`); fails on a browser error."""
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000",
        f"--window-size={size}",
        *mode,
        page.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _render(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after the page's script ran, and the console lines Chromium logged."""
    done = _chrome(page, tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", size="1400,1800")
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


# Clicks through the page's controls after it loaded and writes what it saw into #selftest.
_INTERACT = """
<pre id="selftest"></pre>
<script>
setTimeout(function () {
  var out = {}, st = window.harnessReport.state, $ = function (id) { return document.getElementById(id); };
  var change = function (e) { e.dispatchEvent(new Event("change", { bubbles: true })); };
  var rows = function (col) {
    return Array.prototype.map.call(document.querySelectorAll(".tl-row"), function (r) { return r.children[col].textContent; });
  };
  out.selected = document.querySelector(".tl-row.sel").children[0].textContent;
  var ok = document.querySelector('#tl-classes input[data-cls="5"]');
  ok.checked = false; change(ok);
  out.status_without_ok = $("tl-status").textContent;
  out.classes_without_ok = rows(2);
  ok.checked = true; change(ok);
  $("tl-module").value = "moe.router";
  $("tl-module").dispatchEvent(new Event("input"));
  setTimeout(function () {
    try {
      out.router_modules = rows(3);
      var c = $("tl-canvas"), r = c.getBoundingClientRect();
      $("tl-reset").click();
      var before = st.v1 - st.v0;
      c.dispatchEvent(new WheelEvent("wheel", { deltaY: -100, clientX: r.left + r.width / 2, clientY: r.top + 40, bubbles: true, cancelable: true }));
      out.zoom = [before, st.v1 - st.v0];
      c.dispatchEvent(new MouseEvent("mousedown", { clientX: r.left + 300, clientY: r.top + 40, bubbles: true }));
      c.dispatchEvent(new MouseEvent("mouseup", { clientX: r.left + 300, clientY: r.top + 40, bubbles: true }));
      out.clicked = st.sel;
      out.clicked_row = document.querySelector(".tl-row.sel") !== null;
      $("tl-trace").value = "0"; change($("tl-trace"));
      out.clean_jump_disabled = $("tl-first").disabled;
      document.querySelector("#offences a.jump").click();
      out.trace_after_link = $("tl-trace").value;
      out.selected_after_link = document.querySelector(".tl-row.sel").children[0].textContent;
    } catch (e) { out.error = String(e); }
    $("selftest").textContent = JSON.stringify(out);
  }, 400);
}, 0);
</script>
</body>"""


def test_report_renders_in_chromium(runs, big, tmp_path):
    page = build_report([runs["clean"], runs["dirty"]], tmp_path / "r.html", routing=[runs["routing"], None])
    dom, console = _render(page, tmp_path)
    assert console == []
    assert '<ul id="js-errors" hidden=""></ul>' in dom
    assert 'data-ready="1"' in dom
    # The page opened the dirty trace at its first offence: the row is selected, its details shown.
    detail = dom.split('id="tl-detail"', 1)[1].split("</section>", 1)[0]
    assert "layers.0.moe.router" in detail and "blk.0.ffn_gate_inp.weight" in detail
    assert "mismatch" in detail and "Expected all tensors to be on the same device" in detail
    first = runs["dirty_summary"].first_offence["seq"]
    assert re.search(rf'class="tl-row sel" data-i="\d+"><div class="mono">{first}</div>', dom)
    assert re.search(r"\d[\d,]* of \d[\d,]* events shown", dom)

    # Filters, zoom, a click in the overview, the trace switch and a link to the timeline work.
    page.write_text(page.read_text().replace("</body>", _INTERACT))
    dom, console = _render(page, tmp_path)
    assert console == [] and '<ul id="js-errors" hidden=""></ul>' in dom
    seen = json.loads(html_module.unescape(re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)[1]))
    assert "error" not in seen
    assert seen["selected"] == str(first)
    counts = runs["dirty_summary"].counts
    assert seen["status_without_ok"].startswith(f"{counts['mismatch'] + counts['allowed']} of ")
    assert set(seen["classes_without_ok"]) == {"mismatch", "allowed"}
    assert seen["router_modules"] and set(seen["router_modules"]) <= {
        "layers.0.moe.router",
        "layers.1.moe.router",
    }
    assert seen["zoom"][1] < seen["zoom"][0]
    assert seen["clicked"] >= 0 and seen["clicked_row"]
    assert seen["clean_jump_disabled"] is True
    assert seen["trace_after_link"] == "1" and seen["selected_after_link"] == str(first)

    # A hostile name stays text, and 100k events render without a script error.
    events = [
        Event(
            0,
            0,
            "aten.mul.Tensor",
            f"layers.0.{HOSTILE}",
            "cuda:0",
            (HOSTILE,),
            "m.py:1 in f",
            [_spec()],
            [_spec("cpu")],
            cls="stray",
        ),
    ]
    hostile = _write_trace(tmp_path / "hostile.jsonl", events, header={"case": HOSTILE})
    page = build_report([hostile, big[0]], tmp_path / "h.html", title=HOSTILE, diff_pairs=[])
    dom, console = _render(page, tmp_path)
    assert console == []
    assert '<ul id="js-errors" hidden=""></ul>' in dom and 'data-ready="1"' in dom
    assert HOSTILE not in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_report_of_a_device_error_raised_before_any_aten_op(tmp_path):
    import torch.nn.functional as F

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attend()

        def forward(self, q, k, v):
            return self.attn(q, k, v)

    with _emulated():
        model = Model()
        k = torch.randn(2, 5, 4, device="cuda")
        tracer = Tracer(model, placement="cuda", path=tmp_path / "t.jsonl")
        with pytest.raises(RuntimeError, match="same device"), tracer:
            model(torch.randn(2, 3, 4), k, k)  # the query on the CPU
    html = build_report([tmp_path / "t.jsonl"], tmp_path / "r.html").read_text()
    assert '<span class="verdict dirty">dirty</span>' in html
    assert '<code class="offence-module">attn</code>' in html
    assert "&lt;raised before any aten op&gt;" in html
    assert "F.scaled_dot_product_attention(q, k, v)" in html  # the source line


# -- for CI people and users' own models: outcomes, folded stacks, pages that fit, charts -----------

REPO = Path(__file__).resolve().parents[1]

# A router's top-k fetched to the host on a model split over two GPUs: syncs, strays and
# transfers at the declared boundary, over a prefill and 3 decode steps.
TWO_GPUS = """\
name: {name}
model: {{synth: tiny, layout: merged, router: f32}}
device_map: {{embed: cuda:0, layers.0: cuda:0, layers.1: cuda:1, head: cuda:1}}
fault: {fault}
tokens: [1, 5, 9]
decode: 3
expect: {{verdict: {verdict}}}
"""


@pytest.fixture(scope="module")
def two_gpu_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-gpus")
    results = {}
    for name, fault, verdict in (("clean", "null", "clean"), ("topk", "router-topk-on-host", "dirty")):
        text = TWO_GPUS.format(name=name, fault=fault, verdict=verdict)
        results[name] = run_case(parse_case(text, out / f"{name}.yaml"), out_dir=out)
        assert results[name].passed, results[name].report()
    return results


PYTEST_STACK = [
    # what launched the runner (execnet's bootstrap in an xdist worker, the `pytest` script)
    "<string>:1 in <module>",
    "/venv/bin/pytest:8 in <module>: sys.exit(console_main())",
    "/usr/lib/python3/dist-packages/_pytest/python.py:157 in pytest_pyfunc_call: result = testfunction(**testargs)",
    "/usr/lib/python3/dist-packages/pluggy/_callers.py:103 in _multicall: res = hook_impl.function(*args)",
    "/usr/lib/python3/dist-packages/pluggy/_manager.py:120 in _hookexec: return self._inner_hookexec(hook_name, methods, kwargs, firstresult)",
    "/usr/lib/python3/dist-packages/_pytest/runner.py:178 in pytest_runtest_call: item.runtest()",
    "/usr/lib/python3/dist-packages/xdist/remote.py:195 in run_one_test: self.config.hook.pytest_runtestloop(session=self.session)",
    "/usr/lib/python3/dist-packages/execnet/gateway_base.py:1291 in executetask: do_exec(co, loc)",
    "tests/test_mine.py:12 in test_my_model: model(x)",
    "mypkg/model.py:40 in Net.forward: return self.proj(x.cpu())",
]


def test_outcomes_command_expected_and_folded_stacks(tmp_path):
    bad = Event(
        0,
        0,
        "aten.mm.default",
        "proj",
        "cuda:0",
        None,
        "mypkg/model.py:40 in Net.forward",
        [_spec(), _spec("cpu")],
        [_spec()],
        cls="mismatch",
        stack=PYTEST_STACK,
    )
    ok = Event(
        1,
        0,
        "aten.relu.default",
        "act",
        "cuda:0",
        None,
        "mypkg/model.py:41 in Net.forward",
        [_spec()],
        [_spec()],
        cls="ok",
    )
    model = tmp_path / "net.gguf"
    model.write_bytes(b"GGUF")
    plain = {
        "model": None,
        "model_class": "Net",
        "placement": {"embed": "cuda:0", "head": "cuda:0"},
        "placement_full": {"embed": "cuda:0", "layers": [], "head": "cuda:0"},
    }
    long_id = "tests/test_mine.py::test_my_model[" + "-".join(f"cuda{i}" for i in range(40)) + "]"
    meant = _write_trace(
        tmp_path / "meant.jsonl", [bad, ok], {**plain, "model": str(model), "expected_verdict": "dirty"}
    )
    surprise = _write_trace(
        tmp_path / "surprise.jsonl", [bad], {**plain, "model": str(tmp_path / "gone.gguf")}
    )
    clean = _write_trace(tmp_path / "clean.jsonl", [ok], plain)
    html = build_report(
        [meant, surprise, clean],
        tmp_path / "r.html",
        names=[long_id, None, None],
        tests=[{"outcome": "passed", "duration": 1.5}, {"outcome": "failed", "duration": 0.25}, None],
        command="pytest -n 2 --harness-report r.html",
    ).read_text()

    # Each test's outcome and duration beside its verdict; the command as run.
    assert '<span class="outcome passed">passed</span> <span class="muted small">1.50 s</span>' in html
    assert '<span class="outcome failed">failed</span> <span class="muted small">0.25 s</span>' in html
    assert "not a test" in html
    assert "command: <code>pytest -n 2 --harness-report r.html</code>" in html
    # The run meant to be dirty is marked expected; the other is the one surprise.
    assert html.count('<span class="tag" title="this run was meant to be dirty') == 2  # summary, details
    assert "2 of 3 dirty</span>" in html and '<span class="verdict expected">1 expected</span>' in html
    # A long id is cut on the page, whole in its tooltip.
    assert f'class="id" title="{long_id}">{long_id}</a>' in html
    # The model path: the one that exists has no warning, the missing one says so.
    assert f"{model}</dd>" in html
    assert f'{tmp_path / "gone.gguf"} <span class="tag bad-tag">not found here</span>' in html
    # A plain module is no Mixtral: one device for every module, no embed/head in its tree.
    assert '<dt class="mono">every module</dt>' in html
    assert (
        '<span class="tn-name">embed</span>' not in html and '<span class="tn-name">head</span>' not in html
    )
    # The stack shows the user's 2 frames and folds the 8 of the test runner and its launcher.
    assert "Python stack (2 of your frames, 8 of the test runner folded; innermost last)" in html
    assert "8 frames of launcher, pytest, pluggy, xdist, execnet</summary>" in html
    data = json.loads(html_module.unescape(re.search(r'id="report-data">(.*?)</script>', html, re.S)[1]))
    stacks = data["traces"][0]["stacks"]
    assert stacks == [
        [
            "\u22ef 8 frames of launcher, pytest, pluggy, xdist, execnet (folded)",
            "tests/test_mine.py:12 in test_my_model: model(x)",
            "mypkg/model.py:40 in Net.forward: return self.proj(x.cpu())",
        ]
    ]

    with pytest.raises(HarnessError, match="1 test outcomes for 3 traces"):
        build_report([meant, surprise, clean], tmp_path / "x.html", tests=[None])


def test_case_traces_name_an_existing_model_the_command_and_what_they_expect(two_gpu_runs):
    import sys

    from harness.trace import load_trace

    header = load_trace(two_gpu_runs["topk"].trace_path).header
    assert Path(header["model"]).is_file()  # kept beside the trace (`<out_dir>/models`)
    assert header["expected_verdict"] == "dirty"
    assert header["command"].split()[0] in (Path(sys.argv[0]).name, "python")


def test_bytes_per_step_and_layer_strip(two_gpu_runs, tmp_path):
    topk = two_gpu_runs["topk"]
    html = build_report([topk.trace_path], tmp_path / "r.html").read_text()
    chart = html.split('<svg class="bytes-chart"', 1)[1].split("</svg>", 1)[0]
    bars = re.findall(r'<g class="bar"><title>([^<]*)</title>', chart)
    assert [b.split(":")[0] for b in bars] == ["prefill", "decode 1", "decode 2", "decode 3"]
    # The trace's transfers, summed per step, are the bars' totals.
    from harness.trace import load_trace

    per_step: dict[int, int] = {}
    for ev in load_trace(topk.trace_path).events():
        if ev.transfer:
            per_step[ev.step] = per_step.get(ev.step, 0) + int(ev.transfer["bytes"])
    titles = re.findall(r"<rect [^>]*><title>([^<]*)</title>", chart)
    by_step = {}
    for t in titles:
        m = re.match(r"(prefill|decode (\d)): (\S+) \u2192 (\S+), ([\d,]+) bytes", html_module.unescape(t))
        step = 0 if m[1] == "prefill" else int(m[2])
        by_step[step] = by_step.get(step, 0) + int(m[5].replace(",", ""))
    assert by_step == per_step and len(per_step) == 4
    # One strip column per layer and top-level module; layer 0 holds the offence.
    strip = html.split('<div class="strip"', 1)[1].split("<h3>", 1)[0]
    labels = re.findall(r'<div class="strip-label mono">([^<]*)</div>', strip)
    assert labels == ["embed", "0", "1", "norm", "head"]
    offending = re.findall(r'<div class="strip-col offending" title="([^"]*)"', strip)
    assert len(offending) == 1 and offending[0].startswith("layers.0: placed on cuda:0")
    assert "on cpu" in offending[0]  # the host's share of layer 0's ops


# -- in a browser -----------------------------------------------------------------------------------


# Measures the laid-out page and writes what it saw into #probe.
_PROBE = """
<pre id="probe"></pre>
<script>
setTimeout(function () {
  var out = {};
  try {
    out.page_width = document.documentElement.clientWidth;
    out.scroll_width = document.documentElement.scrollWidth;
    out.tables = Array.prototype.map.call(document.querySelectorAll("table.grid"), function (t) {
      return [Math.round(t.getBoundingClientRect().width), Math.round(t.parentElement.getBoundingClientRect().width)];
    });
    out.ids_cut = Array.prototype.map.call(document.querySelectorAll("#summary a.id"), function (a) {
      return [a.scrollWidth > a.clientWidth, a.title.length > 0];
    });
    out.bars = Array.prototype.map.call(document.querySelectorAll("svg.bytes-chart rect"), function (r) {
      var b = r.getBoundingClientRect(); return [Math.round(b.width), Math.round(b.height)];
    });
    out.strip = Array.prototype.map.call(document.querySelectorAll(".strip-col"), function (c) {
      return [c.getBoundingClientRect().width > 10, c.querySelectorAll(".strip-ran i").length];
    });
    out.errors = document.getElementById("js-errors").children.length;
  } catch (e) { out.error = String(e); }
  document.getElementById("probe").textContent = JSON.stringify(out);
}, 200);
</script>
</body>"""


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_report_fits_the_page_and_draws_in_chromium(two_gpu_runs, tmp_path):
    long_id = (
        "tests/test_placement.py::test_two_gpus["
        + "-".join(f"layers.{i}-cuda{i % 2}" for i in range(24))
        + "]"
    )
    page = build_report(
        [two_gpu_runs["clean"].trace_path, two_gpu_runs["topk"].trace_path],
        tmp_path / "r.html",
        names=[long_id, None],
        tests=[{"outcome": "passed", "duration": 2.0}, {"outcome": "passed", "duration": 1.0}],
        command="pytest --harness-report r.html",
    )
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE))
    dom = _chrome(probe, tmp_path, "--dump-dom").stdout
    seen = json.loads(html_module.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)[1]))
    assert "error" not in seen and seen["errors"] == 0
    assert seen["scroll_width"] <= seen["page_width"]  # nothing runs off the page
    assert all(width <= room for width, room in seen["tables"]), seen["tables"]
    assert seen["ids_cut"][0] == [True, True] and seen["ids_cut"][1] == [False, True]
    assert len(seen["bars"]) >= 8 and all(w > 0 and h > 0 for w, h in seen["bars"])  # 2 traces x 4 steps
    assert len(seen["strip"]) == 10 and all(wide and n >= 1 for wide, n in seen["strip"])

    # The screenshot: the details of the dirty run (its strip and chart) on top.
    shown = tmp_path / "details.html"
    shown.write_text(
        page.read_text().replace(
            "</head>",
            "<style>#summary, #offences, #diff, #timeline, #run-0 { display: none; }</style></head>",
            1,
        )
    )
    png = tmp_path / "details.png"
    _chrome(shown, tmp_path, f"--screenshot={png}")
    assert _png_size(png) == (1280, 1600)
    reports = REPO / "reports"
    if reports.is_dir():  # kept for a person to look at (reports/ is not committed)
        shutil.copy(png, reports / "report-details.png")
    torch.manual_seed(0)  # (nothing random above; keeps the module's state tidy for others)


def test_plain_module_report_says_every_module(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad(), Tracer(model, placement="cpu", path=tmp_path / "t.jsonl"):
        model(torch.ones(2, 4))
    html = build_report([tmp_path / "t.jsonl"], tmp_path / "r.html").read_text()
    assert '<dt class="mono">every module</dt>' in html
    assert '<span class="tn-name">embed</span>' not in html
    labels = re.findall(r'<div class="strip-label mono">([^<]*)</div>', html)
    assert labels == ["0", "1", "2"]  # Sequential's children, in forward order
