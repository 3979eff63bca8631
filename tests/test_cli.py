"""The command line: output of synth, inspect and demo; one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.cli import main
from harness.gguf_file import PRESETS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    assert main(["synth", str(path), "--layout", "per-expert", "--router", "f16", "--quiet"]) == 0
    return path


def test_inspect_prints_config_layout_and_table(tiny, capsys):
    assert main(["inspect", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "layout per-expert, router F16" in out
    assert "experts 4 (2 used)" in out
    assert "blk.1.ffn_down.3.weight" in out
    table_row = next(line for line in out.splitlines() if "token_embd.weight" in line)
    assert "[256, 384]" in table_row  # ggml order: ne0 (row length) first


def test_inspect_json(tiny, capsys):
    assert main(["inspect", str(tiny), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "per-expert"
    assert info["config"]["expert_count"] == PRESETS["tiny"].expert_count
    by_name = {t["name"]: t for t in info["tensors"]}
    assert by_name["blk.0.ffn_gate_inp.weight"]["type"] == "F16"
    assert by_name["blk.0.ffn_gate_inp.weight"]["bytes"] == 4 * 256 * 2
    assert sum(t["bytes"] for t in info["tensors"]) < info["file_bytes"]


def test_synth_then_inspect_through_the_entry_point(tmp_path):
    out = tmp_path / "m.gguf"
    done = run_cli("synth", str(out), "--type", "Q8_0", "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    shown = run_cli("inspect", str(out))
    assert shown.returncode == 0
    assert "layout merged, router F32" in shown.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["inspect", "{tmp}/absent.gguf"], "absent.gguf: no such file"),
        (["inspect", "{tmp}/junk.gguf"], "junk.gguf: magic: not a GGUF file"),
        (["synth", "{tmp}/x.gguf", "--type", "Q9_Z"], "Q9_Z"),
        (["synth", "{tmp}/x.gguf", "--layout", "sideways"], "sideways"),
        (["synth", "{tmp}/x.gguf", "--seed", "abc"], "abc"),
        ([], "command"),
        (["explode"], "explode"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all, just text" * 4)
    done = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("harness: error: ")
    assert needle in lines[0]
    assert "Traceback" not in done.stderr


def test_truncated_model_is_one_line(tiny, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:-100])
    done = run_cli("inspect", str(cut))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "past the end of the file" in done.stderr


def test_demo(tmp_path):
    """The main job: the seed bug caught where it is, beside a clean run, in one report."""
    done = run_cli("demo", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "per-expert experts, F16 router" in done.stdout
    assert "PASS demo-clean  clean" in done.stdout
    assert (
        "PASS demo-candle-1815  dirty: mismatch at layers.0.moe.router (blk.0.ffn_gate_inp.weight)"
        in done.stdout
    )
    assert "caught: mismatch in layers.0.moe.router (blk.0.ffn_gate_inp.weight)" in done.stdout
    assert "harness/quant/qmatmul.py" in done.stdout  # the source line of the offending op
    report = tmp_path / "demo.html"
    assert report.is_file() and "blk.0.ffn_gate_inp.weight" in report.read_text()
    assert (tmp_path / "demo" / "demo-candle-1815.jsonl").is_file()


def test_run_prints_text_and_speeds(tiny):
    done = run_cli("run", str(tiny), "--prompt", "The cat", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The cat")
    assert "prefill: " in done.stderr and "tokens/s" in done.stderr


def test_run_json_is_greedy_and_deterministic(tiny):
    a = json.loads(run_cli("run", str(tiny), "--prompt", "hello there", "--max-tokens", "4", "--json").stdout)
    b = json.loads(run_cli("run", str(tiny), "--prompt", "hello there", "--max-tokens", "4", "--json").stdout)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 4
    assert a["prompt_tokens"][0] == 1  # BOS
    assert a["placement"] == {"embed": "cpu", "layers.0-1": "cpu", "head": "cpu"}


def test_logits_writes_one_row_per_position(tiny, tmp_path):
    import numpy as np
    import torch

    from harness.model.mixtral import Mixtral

    out = tmp_path / "logits.npy"
    assert main(["logits", str(tiny), "--tokens", "1,5,9,200", "--out", str(out)]) == 0
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (4, PRESETS["tiny"].vocab_size)
    expected = Mixtral.from_gguf(tiny)(torch.tensor([1, 5, 9, 200]), 0).numpy()
    assert np.array_equal(logits, expected)


def test_tokenize_prints_ids(tiny, capsys):
    from harness.model.tokenizer import Tokenizer

    assert main(["tokenize", str(tiny), "hello world"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == Tokenizer.from_gguf(tiny).encode("hello world")
    assert ids[0] == 1
    assert main(["tokenize", str(tiny), "hello world", "--no-bos"]) == 0
    assert json.loads(capsys.readouterr().out) == ids[1:]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "{model}", "--prompt", ""], "--prompt: the prompt is empty"),
        (["run", "{model}", "--prompt", "hi", "--device", "cuda:3"], "device cuda:3 does not exist here"),
        (["run", "{model}", "--prompt", "hi", "--max-tokens", "5000"], "exceed the context"),
        (["logits", "{model}", "--tokens", "1,2,99999", "--out", "{tmp}/l.npy"], "token id 99999 is outside"),
        (
            ["logits", "{model}", "--tokens", "1,x", "--out", "{tmp}/l.npy"],
            "--tokens: expected comma-separated",
        ),
        (
            [
                "logits",
                "{model}",
                "--tokens",
                "1",
                "--device-map",
                '{"embed": "cpu"}',
                "--out",
                "{tmp}/l.npy",
            ],
            "layers 0-1 are not placed",
        ),
        (
            ["logits", "{model}", "--tokens", "1", "--out", "{tmp}/no/such/dir/l.npy"],
            "No such file or directory",
        ),
    ],
)
def test_model_commands_bad_input(tiny, tmp_path, args, needle):
    done = run_cli(*[a.replace("{model}", str(tiny)).replace("{tmp}", str(tmp_path)) for a in args])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


def test_faults_lists_the_catalog(capsys):
    from harness.faults import CATALOG

    assert main(["faults"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CATALOG) >= 10
    assert lines[0].split()[:2] == ["candle-1815", "mismatch"]
    assert main(["faults", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(CATALOG)


def test_trace_with_a_fault_is_caught_and_exits_1(tiny, tmp_path):
    out = tmp_path / "t.jsonl"
    done = run_cli("trace", str(tiny), "--device", "emulated", "--fault", "candle-1815", "--json", str(out))
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert summary["verdict"] == "dirty"
    first = summary["first_offence"]
    assert (first["class"], first["module"], first["tensor"]) == (
        "mismatch",
        "layers.0.moe.router",
        "blk.0.ffn_gate_inp.weight",
    )
    clean = run_cli("trace", str(tiny), "--device", "emulated", "--json", str(out))
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["verdict"] == "clean"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "emulated", "--fault", "nope"], "unknown fault 'nope'"),
        (["--device", "cpu", "--fault", "candle-1815"], "candle-1815 does not apply"),
    ],
)
def test_trace_bad_fault(tiny, args, needle):
    done = run_cli("trace", str(tiny), *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
