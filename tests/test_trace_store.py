"""Traces on disk (JSON Lines written as the run goes), reading them back, diffs, and `harness trace`."""

from __future__ import annotations

import json
import os

import pytest
import torch

from harness.cli import main
from harness.errors import UsageError
from harness.model.generate import generate
from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN, Mixtral, MoE
from harness.synth import synthesize
from harness.trace import CLASSES, CLEAN, DIRTY, MISMATCH, SYNC, Event, Tracer, diff, emulated, load_trace
from harness.trace.store import TraceWriter

TOKENS = [1, 5, 9]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are small: intra-op threads only contend (badly, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return synthesize(
        tmp_path_factory.mktemp("store") / "tiny.gguf", "tiny", layout="per-expert", router="f16"
    )


@pytest.fixture(scope="module")
def cpu_model(tiny_path):
    return Mixtral.from_gguf(tiny_path, device="cpu", max_seq_len=32)


@pytest.fixture(scope="module")
def cpu_trace(cpu_model, tmp_path_factory):
    """A traced CPU run of prefill and one decode step, kept in memory too."""
    path = tmp_path_factory.mktemp("runs") / "cpu.jsonl"
    with Tracer(cpu_model, path=path, keep_events=True) as tracer:
        generate(cpu_model, TOKENS, 2)
    return path, tracer


# -- writing as the run goes ----------------------------------------------------------------------


def test_file_grows_during_the_run_and_no_event_stays_in_memory(cpu_model, tmp_path):
    path = tmp_path / "t.jsonl"
    sizes = []
    handle = cpu_model.register_forward_pre_hook(lambda module, args: sizes.append(path.stat().st_size))
    try:
        with Tracer(cpu_model, path=path) as tracer:
            generate(cpu_model, TOKENS, 4)
            assert tracer.events_in_memory == 0
    finally:
        handle.remove()
    final = path.stat().st_size
    assert len(sizes) == 4
    assert sizes[1] < sizes[2] < sizes[3] < final  # flushed at the end of every forward call
    assert tracer.events_in_memory == 0 and tracer.summary.events > 1000
    lines = path.read_text().splitlines()
    assert len(lines) == tracer.summary.events + 2  # header, events, summary


def test_round_trip(cpu_trace, tiny_path):
    path, tracer = cpu_trace
    trace = load_trace(path)
    h = trace.header
    assert h["record"] == "header" and h["format"] == "harness-trace/1"
    assert h["model"] == str(tiny_path)
    assert h["config"]["block_count"] == 2 and h["config"]["expert_count"] == 4
    assert h["placement"] == {"embed": "cpu", "layers.0-1": "cpu", "head": "cpu"}
    assert h["placement_full"] == {"embed": "cpu", "layers": ["cpu", "cpu"], "head": "cpu"}
    assert h["torch"] == torch.__version__ and "cpu" in h["devices"]
    events = list(trace.events())
    assert len(events) == len(tracer.events) == tracer.summary.events
    assert [e.to_dict() for e in events] == [e.to_dict() for e in tracer.events]
    assert trace.summary.to_dict() == json.loads(json.dumps(tracer.summary.to_dict()))
    # Each line is the event's own dict.
    second = json.loads(path.read_text().splitlines()[1])
    assert second == tracer.events[0].to_dict()
    assert Event.from_dict(second) == tracer.events[0]


def test_summary_record(cpu_trace):
    path, tracer = cpu_trace
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["record"] == "summary" and last["verdict"] == CLEAN
    assert set(last["counts"]) == set(CLASSES) and sum(last["counts"].values()) == last["events"]
    assert last["first_offence"] is None
    assert last["steps"] == {"traced": 2, "skipped": 0}
    assert last["modules"]["layers.0.moe.router"] == {
        "cpu": tracer.summary.modules["layers.0.moe.router"]["cpu"]
    }


def test_dirty_run_on_disk(tiny_path, tmp_path):
    path = tmp_path / "dirty.jsonl"
    with emulated.EmulatedCuda():
        model = Mixtral.from_gguf(tiny_path, device="cuda", max_seq_len=32)
        router = model.layers[1].moe.router
        router.weight = router.weight.cpu()  # candle#1815
        with pytest.raises(RuntimeError, match="same device"), Tracer(model, path=path):
            model(torch.tensor(TOKENS), 0)
    trace = load_trace(path)
    f = trace.summary.first_offence
    assert trace.summary.verdict == DIRTY
    assert {k: f[k] for k in ("class", "module", "tensor")} == {
        "class": MISMATCH,
        "module": "layers.1.moe.router",
        "tensor": "blk.1.ffn_gate_inp.weight",
    }
    assert set(f["devices"]) == {"cuda:0", "cpu"} and f["source"] and f["op"]
    last = list(trace.events())[-1]  # recorded before it ran: the op that raised is the last
    assert last.cls == MISMATCH and last.outputs is None and "same device" in last.error
    assert last.stack and last.tensors == ("blk.1.ffn_gate_inp.weight",)


def test_unfinished_trace_reads_back(cpu_trace, tmp_path):
    lines = cpu_trace[0].read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:50]) + lines[50][:20])  # died mid-line, no summary
    trace = load_trace(cut)
    assert trace.summary is None
    assert len(list(trace.events())) == 49


def test_not_a_trace(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seq": 0}\n')
    with pytest.raises(UsageError, match="not a harness trace"):
        load_trace(bad)
    with pytest.raises(UsageError, match="no such trace file"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="not a directory"):
        TraceWriter(tmp_path / "missing" / "t.jsonl")


def _lines(cpu_trace) -> list[str]:
    return cpu_trace[0].read_text().splitlines(keepends=True)


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "fifo", "folder"])
def test_only_regular_files_are_read(tmp_path, path):
    if path == "fifo":
        path = tmp_path / "t.jsonl"
        os.mkfifo(path)
    elif path == "folder":
        path = tmp_path
    with pytest.raises(UsageError, match="not a regular file"):
        load_trace(path)


def test_line_length_is_capped(cpu_trace, tmp_path, monkeypatch):
    from harness.trace import store

    monkeypatch.setattr(store, "MAX_LINE_BYTES", 4096)
    lines = _lines(cpu_trace)
    long = tmp_path / "long.jsonl"
    long.write_text(lines[0] + "[" + " " * 10000 + "\n" + "".join(lines[1:]))
    with pytest.raises(UsageError, match="long.jsonl: line 2: longer than 4096 bytes"):
        list(load_trace(long).events())
    one = tmp_path / "one.jsonl"
    one.write_text(" " * 10000)  # no newline at all: a header of no end
    with pytest.raises(UsageError, match="one.jsonl: line 1: longer than 4096 bytes"):
        load_trace(one)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"seq": "x", "op": "aten::add"}\n', "line 3: not a trace event: seq and step must be integers"),
        (b'{"seq": 1, "op": ["a"]}\n', "line 3: not a trace event: op must be a string"),
        (b'{"seq": 1, "op": "a", "in": [["cpu"]]}\n', "line 3: not a trace event: in must be a list of"),
        (b'{"seq": 1, "op": "a", "module": {}}\n', "line 3: not a trace event: module must be a string"),
        (b"[1, 2]\n", "line 3: not a JSON object"),
        (b"\xff\xfe\n", "line 3: not UTF-8"),
        (b"[" * 100000 + b"\n", "line 3: (not JSON|JSON nested too deep)"),
        (b'{"seq": ' + b"1" * 5000 + b"}\n", "line 3: not JSON"),
    ],
)
def test_malformed_event_lines_name_the_line(cpu_trace, tmp_path, line, message):
    lines = [x.encode() for x in _lines(cpu_trace)]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines[:2]) + line + b"".join(lines[2:]))
    with pytest.raises(UsageError, match=f"bad.jsonl: {message}"):
        list(load_trace(bad).events())


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ({"embed": "cpu", "head": "cpu"}, "placement_full needs a list of layer devices"),
        ({"embed": "cpu", "layers": "cpu", "head": "cpu"}, "placement_full needs a list of layer devices"),
        ({"layers": ["cpu"], "head": 3}, "placement_full needs embed and head devices"),
        ([], "placement_full must be an object"),
    ],
)
def test_header_placement_is_checked(cpu_trace, tmp_path, placement, message):
    lines = _lines(cpu_trace)
    header = json.loads(lines[0])
    header["placement_full"] = placement
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(UsageError, match=f"bad.jsonl: line 1: {message}"):
        load_trace(bad)
    with pytest.raises(UsageError, match="bad.jsonl: line 1"):  # diff raised KeyError here
        diff(cpu_trace[0], bad)


def test_malformed_summary_names_the_last_line(cpu_trace, tmp_path):
    lines = _lines(cpu_trace)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:-1]) + json.dumps({"record": "summary", "verdict": ["clean"]}) + "\n")
    with pytest.raises(UsageError, match="bad.jsonl: last line: not a trace summary"):
        load_trace(bad)
    summary = json.loads(lines[-1])
    summary["first_offence"] = ["not", "a", "dict"]
    bad.write_text("".join(lines[:-1]) + json.dumps(summary) + "\n")
    with pytest.raises(
        UsageError, match="bad.jsonl: last line: not a trace summary: first_offence has the wrong type"
    ):
        load_trace(bad)


# -- diff -----------------------------------------------------------------------------------------


def _emulated_trace(tiny_path, path, device_map=None, patch=None):
    with emulated.EmulatedCuda(device_count=2):
        device = None if device_map else "cuda"
        model = Mixtral.from_gguf(tiny_path, device=device, device_map=device_map, max_seq_len=32)
        with Tracer(model, path=path):
            generate(model, TOKENS, 2)
    return load_trace(path)


def test_diff_cpu_and_accelerator_runs(cpu_trace, tiny_path, tmp_path, monkeypatch):
    cpu = load_trace(cpu_trace[0])
    same = _emulated_trace(tiny_path, tmp_path / "cuda.jsonl")
    d = diff(cpu, same)
    assert not d, str(d)  # cpu everywhere vs cuda:0 everywhere: the same relative placement

    moved = _emulated_trace(
        tiny_path,
        tmp_path / "split.jsonl",
        device_map={"embed": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:1", "head": "cuda:1"},
    )
    d = diff(same, moved)
    assert d
    placement = {(x.module, x.a, x.b) for x in d if x.kind == "placement"}
    assert placement == {("layers.1", "d0", "d1"), ("head", "d0", "d1")}

    # A host-built mask in one run only: its ops are off the placement there.
    def forward(self, x, residual=None):
        logits = self.router(x)
        mask = torch.zeros(logits.shape, dtype=torch.bool)  # on the host
        logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
        weights, chosen = logits.float().softmax(-1).topk(self.n_used, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=ROUTER_WEIGHT_SUM_MIN)
        return self.experts(x, weights, chosen, residual)

    monkeypatch.setattr(MoE, "forward", forward)
    stray = _emulated_trace(tiny_path, tmp_path / "stray.jsonl")
    d = diff(same, stray)
    assert d and all(x.kind != "placement" for x in d)
    assert {x.module for x in d} == {"layers.0.moe", "layers.1.moe"}
    assert d.to_dict()["count"] == len(d)


# -- the command line -------------------------------------------------------------------------------


def test_cli_trace_clean(tiny_path, tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    code = main(
        [
            "trace",
            str(tiny_path),
            "--device",
            "emulated",
            "--tokens",
            "1,2,3",
            "--decode",
            "1",
            "-o",
            str(out),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["verdict"] == CLEAN and summary["counts"][MISMATCH] == 0
    assert summary == load_trace(out).summary.to_dict()
    assert load_trace(out).header["placement"] == {
        "embed": "cuda:0",
        "layers.0-1": "cuda:0",
        "head": "cuda:0",
    }
    assert captured.err.startswith("trace: clean")


def test_cli_trace_finds_a_sync(tiny_path, tmp_path, capsys, monkeypatch):
    def forward(self, x, residual=None):
        logits = self.router(x)
        assert logits.abs().max().item() < 1e9  # a host read in the routing
        weights, chosen = logits.float().softmax(-1).topk(self.n_used, dim=-1)
        return self.experts(x, weights / weights.sum(-1, keepdim=True), chosen, residual)

    monkeypatch.setattr(MoE, "forward", forward)
    code = main(["trace", str(tiny_path), "--device", "emulated", "--tokens", "1,2,3", "--json"])
    captured = capsys.readouterr()
    assert code == 1
    f = json.loads(captured.out)["first_offence"]
    assert (f["class"], f["module"]) == (SYNC, "layers.0.moe")
    assert captured.err.startswith("trace: SYNC in layers.0.moe")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--decode", "-1"], "--decode: must be in [0, 2147483647], got -1"),
        (["--sample-every", "0"], "--sample-every"),
        (["--tokens", "1,x"], "--tokens: item 2: expected an integer, got 'x'"),
        (["--tokens", "1", "--prompt", "hi"], "not allowed with"),
        (["--device", "gpu"], "'gpu' is not a device name"),
    ],
)
def test_cli_trace_bad_input(tiny_path, capsys, args, message):
    assert main(["trace", str(tiny_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness: error:") and message in err and len(err.splitlines()) == 1
