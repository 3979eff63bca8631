"""The command line: each command's output, llama.cpp's flags, and bad input at its edges.

Bad input is one line on stderr and exit 2, never a traceback and never a hang; the table
`BAD_INPUTS` lists the cases seen so far, and a hypothesis test throws argument sets at every
command. Exit statuses: 0 clean, 1 found a problem, 2 bad input, 3 a traced run not judged.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from harness.cli import main
from harness.gguf_file import PRESETS

HANG_SECONDS = (
    180  # a command still running after this long is taken for a hang (a loaded 2-core CI box is slow)
)


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The real entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=300, **kwargs
    )


class Hang(BaseException):
    """Raised into a command that runs too long (a BaseException: no `except Exception` hides it)."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails the test (Hang) if the block runs longer than `seconds`, even when it is blocked
    in a system call such as the open of a FIFO."""

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def call(argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with deadline(HANG_SECONDS), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, a clean and a dirty trace, a FIFO and a plain file, made once."""
    d = tmp_path_factory.mktemp("cli")
    tiny = d / "tiny.gguf"
    assert main(["synth", str(tiny), "--layout", "per-expert", "--router", "f16", "--quiet"]) == 0
    fifo = d / "pipe"
    os.mkfifo(fifo)
    (d / "file.txt").write_text("just text\n")
    clean, dirty = d / "clean.jsonl", d / "dirty.jsonl"
    assert call(["trace", str(tiny), "--device", "emulated", "-o", str(clean)])[0] == 0
    assert (
        call(["trace", str(tiny), "--device", "emulated", "--fault", "candle-1815", "-o", str(dirty)])[0] == 1
    )
    return {"dir": d, "tiny": tiny, "fifo": fifo, "file": d / "file.txt", "clean": clean, "dirty": dirty}


@pytest.fixture(scope="module")
def tiny(files):
    return files["tiny"]


# -- llama.cpp habits ---------------------------------------------------------------------------


def test_every_command_has_help():
    for command in [
        "bench",
        "cases",
        "demo",
        "faults",
        "inspect",
        "logits",
        "report",
        "run",
        "synth",
        "tokenize",
        "trace",
    ]:
        code, out, _ = call([command, "--help"])
        assert code == 0 and out.startswith(f"usage: harness {command} ")


def test_version():
    done = run_cli("--version")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("harness ") and "torch " in done.stdout


def test_no_command_is_one_line_with_the_commands():
    done = run_cli()
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "harness: error: no command given; one of: demo, trace, report, cases, faults, synth, inspect, "
        "run, logits, tokenize, bench (harness --help says more)"
    ]


def test_run_streams_with_llama_cli_flags(tiny):
    """-m, -p, -n, -ngl as llama-cli spells them; the streamed text is the generated text."""
    code, out, err = call(["run", "-m", str(tiny), "-p", "The cat", "-n", "6"])
    assert code == 0, err
    assert out.startswith("The cat") and out.endswith("\n")
    assert "prefill: " in err and "decode: 6 tokens" in err
    code, doc, _ = call(["run", "-m", str(tiny), "-p", "The cat", "-n", "6", "--json"])
    doc = json.loads(doc)
    assert len(doc["tokens"]) == 6
    assert out == "The cat" + doc["text"] + "\n"
    # -n 0: the prompt is echoed and nothing run; no "0.0 tokens/s" of a prefill that never ran.
    assert call(["run", "-m", str(tiny), "-p", "The cat", "-n", "0"]) == (
        0,
        "The cat\n",
        "no token to generate: the prompt was not run\n",
    )
    # -ngl 1 with the emulated accelerator: the last layer and nothing else on the GPU.
    code, doc, err = call(
        ["run", str(tiny), "-p", "hi", "-n", "2", "-ngl", "1", "--device", "emulated", "--json"]
    )
    assert code == 0, err
    assert json.loads(doc)["placement"] == {
        "embed": "cpu",
        "layers.0": "cpu",
        "layers.1": "cuda:0",
        "head": "cpu",
    }


def test_run_n_minus_1_fills_the_context(tiny, monkeypatch):
    """-n -1, as in llama-cli: generate until EOS or the context (512 for tiny) is full."""
    from harness.model import generate as generation

    asked = []

    def generate(model, prompt, n, **kwargs):
        asked.append((prompt, n))
        return generation.Generation(prompt=prompt)

    monkeypatch.setattr(generation, "generate", generate)
    assert call(["run", str(tiny), "-p", "hi", "-n", "-1", "--json"])[0] == 0
    [(prompt, n)] = asked
    assert len(prompt) + n == 512


class _Writes(list):
    def write(self, text):
        self.append(text)

    def flush(self):
        pass


def test_text_stream_writes_each_token_as_it_comes_and_holds_half_characters(tiny):
    from harness.cli.generation import TextStream, generated_text
    from harness.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(tiny)
    prompt = tok.encode("hello")
    words = tok.encode("hello world again", add_bos=False)
    writes = _Writes()
    stream = TextStream(tok, prompt, writes)
    for i, t in enumerate(words, start=1):
        stream.push(t)
        assert "".join(writes) == generated_text(tok, prompt, words[:i])  # nothing waits for the end
    # A character split over byte tokens is written once it is whole, never as U+FFFD.
    euro = [tok.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    assert None not in euro, "the tiny vocabulary has byte tokens"
    writes.clear()
    stream = TextStream(tok, prompt, writes)
    stream.push(euro[0])
    stream.push(euro[1])
    assert writes == []
    stream.push(euro[2])
    stream.finish()
    assert "".join(writes) == "€\n"


def test_emulated_device_wherever_there_is_a_device(tiny, tmp_path):
    import numpy as np

    out = tmp_path / "l.npy"
    code, text, err = call(["logits", str(tiny), "--tokens", "1,5", "--device", "emulated", "-o", str(out)])
    assert code == 0, err
    assert np.load(out).shape == (2, PRESETS["tiny"].vocab_size)
    assert call(["run", str(tiny), "-p", "hi", "-n", "1", "--device", "emulated"])[0] == 0
    assert call(["trace", str(tiny), "--device", "emulated"])[0] == 0


def test_inspect_prints_every_metadata_key_and_the_file_type(tiny):
    from harness.gguf_file import read_metadata

    code, out, _ = call(["inspect", str(tiny)])
    assert code == 0
    first = out.splitlines()[0]
    assert first.startswith(f"{tiny}: GGUF v3, ") and first.endswith(", llama, file type Q4_K_M (15)")
    assert "layout per-expert, router F16" in out and "experts 4 (2 used)" in out
    metadata = read_metadata(tiny)
    assert f"  {len(metadata)} metadata keys:" in out
    for key in metadata:
        assert f": {key} " in out
    tokens_line = next(line for line in out.splitlines() if ": tokenizer.ggml.tokens " in line)
    assert "[str x 384]" in tokens_line and "'<unk>', '<s>', '</s>'" in tokens_line
    table_row = next(line for line in out.splitlines() if "token_embd.weight" in line)
    assert "[256, 384]" in table_row  # ggml order: ne0 (row length) first


def test_inspect_shows_the_metadata_of_a_gguf_it_cannot_run(tmp_path):
    """Another architecture (a vocabulary-only file here): its keys on stdout, then why not, exit 2."""
    import gguf

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_file_type(7)
    writer.add_string("tokenizer.ggml.model", "gpt2\nforged line")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    code, out, err = call(["inspect", str(path)])
    assert code == 2 and len(err.splitlines()) == 1 and str(path) in err
    assert out.splitlines()[0] == f"{path}: qwen2, file type Q8_0 (7)"  # as for a model it runs
    assert (
        "general.architecture" in out and "3: tokenizer.ggml.model  str  'gpt2\\nforged line'" in out
    )  # one line, quoted
    bare = tmp_path / "bare.gguf"  # no general.file_type at all
    writer = gguf.GGUFWriter(bare, "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    code, out, _ = call(["inspect", str(bare)])
    assert code == 2 and out.splitlines()[0] == f"{bare}: gpt2, file type not given"  # not "file type None"


def test_inspect_json(tiny):
    code, out, _ = call(["inspect", "-m", str(tiny), "--json"])
    info = json.loads(out)
    assert info["layout"] == "per-expert"
    assert info["file_type"] == {"id": 15, "name": "Q4_K_M"}
    assert info["metadata"]["llama.expert_count"] == PRESETS["tiny"].expert_count
    assert len(info["metadata"]["tokenizer.ggml.tokens"]) == PRESETS["tiny"].vocab_size
    by_name = {t["name"]: t for t in info["tensors"]}
    assert by_name["blk.0.ffn_gate_inp.weight"]["type"] == "F16"
    assert by_name["blk.0.ffn_gate_inp.weight"]["bytes"] == 4 * 256 * 2
    assert sum(t["bytes"] for t in info["tensors"]) < info["file_bytes"]


def test_json_is_machine_readable_stdout_everywhere(files, tmp_path):
    """`--json`: one JSON document on stdout, whatever the command; files come from -o/--out."""
    tiny = str(files["tiny"])
    for argv in (
        ["inspect", tiny, "--json"],
        ["run", tiny, "-p", "a", "-n", "1", "--json"],
        ["logits", tiny, "--tokens", "1", "-o", str(tmp_path / "l.npy"), "--json"],
        ["tokenize", tiny, "hi", "--json"],
        ["trace", tiny, "--device", "emulated", "-o", str(tmp_path / "t.jsonl"), "--json"],
        ["report", str(files["clean"]), "-o", str(tmp_path / "r.html"), "--json"],
        ["synth", str(tmp_path / "s.gguf"), "--quiet", "--json"],
        ["faults", "--json"],
    ):
        code, out, err = call(argv)
        assert code == 0, (argv, err)
        json.loads(out)


def test_trace_writes_with_out_and_the_old_json_file_spelling_is_explained(files, tmp_path):
    out = tmp_path / "t.jsonl"
    code, text, _ = call(["trace", str(files["tiny"]), "--device", "emulated", "-o", str(out)])
    assert code == 0 and text.startswith("trace: clean, ") and text.rstrip().endswith(f"-> {out}")
    assert out.is_file()
    header = json.loads(out.read_text().splitlines()[0])
    assert header["command"] == f"harness trace {files['tiny']} --device emulated -o {out}"
    code, _, err = call(["trace", str(files["tiny"]), "--json", str(out)])
    assert code == 2
    assert err == (
        "harness: error: --json: takes no file now (it prints the summary as JSON on stdout); "
        f"write the trace with -o {out}\n"
    )


def test_tokenize_prints_ids_as_llama_tokenize(tiny):
    from harness.model.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(tiny).encode("hello world")
    code, out, _ = call(["tokenize", str(tiny), "hello world"])
    assert code == 0
    lines = out.splitlines()
    assert [int(line.split(" -> ")[0]) for line in lines] == ids
    assert lines[0] == "     1 -> '<s>'"
    assert json.loads(call(["tokenize", str(tiny), "hello world", "--no-bos", "--json"])[1]) == ids[1:]
    # llama-tokenize's spelling, and the text after -m MODEL, give the same lines.
    assert call(["tokenize", "-m", str(tiny), "-p", "hello world"])[:2] == (0, out)
    assert call(["tokenize", "-m", str(tiny), "hello world"])[:2] == (0, out)
    # A missing text is said as such (it was "no model given", the model taken for the text).
    code, _, err = call(["tokenize", str(tiny)])
    assert (code, err) == (
        2,
        "harness: error: no text given: harness tokenize MODEL.gguf TEXT (or -p TEXT)\n",
    )
    code, _, err = call(["tokenize", str(tiny), "a", "-p", "b"])
    assert (code, err) == (2, "harness: error: -p: the text is given twice (as an argument and with -p)\n")


def test_report_fail_on_dirty(files, tmp_path):
    out = str(tmp_path / "r.html")
    assert call(["report", str(files["clean"]), "-o", out, "--fail-on-dirty"])[0] == 0
    code, _, err = call(["report", str(files["clean"]), str(files["dirty"]), "-o", out, "--fail-on-dirty"])
    assert code == 1 and err == "report: not clean: dirty.jsonl dirty\n"
    assert call(["report", str(files["dirty"]), "-o", out])[0] == 0  # without the flag: the report only
    unfinished = tmp_path / "unfinished.jsonl"
    unfinished.write_text(files["clean"].read_text().splitlines()[0] + "\n")  # the header, no summary
    code, _, err = call(["report", str(unfinished), str(files["dirty"]), "-o", out, "--fail-on-dirty"])
    assert code == 3 and "unfinished.jsonl unfinished" in err  # not judged outranks dirty
    # Nothing to write: only the check (a CI gate on saved traces), or only the verdicts as JSON.
    clean, dirty = str(files["clean"]), str(files["dirty"])
    code, out_text, err = call(["report", clean, dirty, "--fail-on-dirty"])
    assert (code, out_text) == (1, f"{clean}: clean\n{dirty}: dirty\n") and "dirty.jsonl dirty" in err
    assert call(["report", clean, "--fail-on-dirty"])[:2] == (0, f"{clean}: clean\n")
    code, out_text, _ = call(["report", clean, dirty, "--json"])
    assert code == 0 and json.loads(out_text) == {
        "traces": [{"trace": clean, "verdict": "clean"}, {"trace": dirty, "verdict": "dirty"}]
    }


def test_synth_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "m.gguf"
    assert call(["synth", str(out), "--quiet"])[0] == 0
    before = out.read_bytes()
    code, _, err = call(["synth", str(out), "--quiet", "--seed", "1"])
    assert code == 2 and err == f"harness: error: {out}: already exists (pass --force to replace it)\n"
    assert out.read_bytes() == before
    assert call(["synth", str(out), "--quiet", "--seed", "1", "--force"])[0] == 0
    assert out.read_bytes() != before


def test_trace_error_and_inconclusive_exit_3(tiny, monkeypatch):
    """A run that raised a non-device error, or traced no op, is not judged: exit 3."""
    from harness.model import generate as generation
    from harness.model.mixtral import MoE

    def broken(self, x, residual=None):
        raise ValueError("a bug in the model")

    monkeypatch.setattr(MoE, "forward", broken)
    code, out, err = call(["trace", str(tiny), "--device", "emulated"])
    assert code == 3, err
    assert out.startswith("trace: ERROR: ") and "a bug in the model" in out
    monkeypatch.undo()
    monkeypatch.setattr(generation, "generate", lambda *a, **k: None)  # the model never runs
    code, out, _ = call(["trace", str(tiny), "--device", "emulated", "--json"])
    assert code == 3 and json.loads(out)["verdict"] == "inconclusive"


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


def test_logits_writes_one_row_per_position(tiny, tmp_path):
    import numpy as np
    import torch

    from harness.model.mixtral import Mixtral

    out = tmp_path / "logits.npy"
    assert main(["logits", str(tiny), "--tokens", "1, 5,9,200", "--out", str(out)]) == 0
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (4, PRESETS["tiny"].vocab_size)
    expected = Mixtral.from_gguf(tiny)(torch.tensor([1, 5, 9, 200]), 0).numpy()
    assert np.array_equal(logits, expected)


@pytest.fixture(scope="module")
def overflowing(files):
    """The tiny model with finite but huge output-norm weights (3e38): the loader accepts it, as
    llama.cpp does, and every logit of its forward overflows."""
    from tests.gguf_edit import rewrite

    def huge(raw):
        raw = raw.copy()
        raw[:] = 3.0e38
        return raw

    return rewrite(files["tiny"], files["dir"] / "overflowing.gguf", edit={"output_norm.weight": huge})


def test_non_finite_logits_are_an_error_not_a_result(overflowing, tmp_path):
    """`logits` writes no .npy of NaN, `run` prints no tokens sampled from them as an answer,
    `trace` is not clean: each says so in one line naming the file, and exits 3."""
    out = tmp_path / "logits.npy"
    code, stdout, err = call(["logits", str(overflowing), "--tokens", "1,5,9", "--out", str(out)])
    assert code == 3 and not out.exists()
    assert err.count("\n") == 1
    assert err.startswith(f"harness: error: {overflowing}: logits: ") and "NaN or inf" in err
    assert "first at position 0" in err
    code, stdout, err = call(["run", str(overflowing), "-p", "Hello", "-n", "2", "--json"])
    assert code == 3 and stdout == "" and err.startswith(f"harness: error: {overflowing}: logits: ")
    code, stdout, _ = call(["trace", str(overflowing), "--device", "emulated"])
    assert code == 3
    assert stdout.startswith("trace: ERROR: ") and "a run without a finite result is never clean" in stdout


def test_faults_lists_the_catalog(capsys):
    from harness.faults import CATALOG

    assert main(["faults"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CATALOG) >= 10
    assert lines[0].split()[:2] == ["candle-1815", "mismatch"]
    assert main(["faults", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(CATALOG)


def test_trace_with_a_fault_is_caught_and_exits_1(files):
    code, out, _ = call(
        ["trace", str(files["tiny"]), "--device", "emulated", "--fault", "candle-1815", "--json"]
    )
    assert code == 1
    first = json.loads(out)["first_offence"]
    assert (first["class"], first["module"], first["tensor"]) == (
        "mismatch",
        "layers.0.moe.router",
        "blk.0.ffn_gate_inp.weight",
    )


# -- bad input: one line on stderr, exit 2 --------------------------------------------------------

# (argv, the one stderr line after "harness: error: ", or its start when it ends in "...");
# {tiny}, {fifo}, {dir}, ... are the fixture's files.
BAD_INPUTS = [
    (
        ["report", "{clean}", "-o", "{dir}/nonexistent/r.html"],
        "-o: {dir}/nonexistent/r.html: the folder {dir}/nonexistent does not exist",
    ),
    (
        ["report", "{tiny}", "-o", "{dir}/r.html"],
        "{tiny}: is a GGUF model, not a trace (write one with: harness trace MODEL -o T.jsonl)",
    ),
    (["report", "{fifo}", "-o", "{dir}/r.html"], "{fifo}: is a FIFO (named pipe), not a regular file"),
    (["report", "/dev/zero", "-o", "{dir}/r.html"], "/dev/zero: is a device, not a regular file"),
    (
        ["report", "{clean}", "-o", "{fifo}"],
        "-o: {fifo}: is a FIFO (named pipe); give the path of a regular file to write",
    ),
    (["report", "{clean}", "-o", ""], "-o: must not be empty"),
    (
        ["trace", "{tiny}", "-o", "{fifo}"],
        "-o: {fifo}: is a FIFO (named pipe); give the path of a regular file to write",
    ),
    (["trace", "{tiny}", "--report", ""], "--report: must not be empty"),
    (["trace", "{tiny}", "--fault", ""], "--fault: must not be empty"),
    (
        ["trace", "{tiny}", "--device", "meta"],
        "--device: 'meta' holds no data; use cpu, cuda, cuda:N or emulated",
    ),
    (["trace", "{tiny}", "--tokens", "1,,2"], "--tokens: item 2 of '1,,2' is empty"),
    (["trace", "{tiny}", "--tokens", "1,-3"], "--tokens: item 2: must be in [0, 2147483647], got -3"),
    (["run", "{tiny}", "-p", "hi", "--device", ""], "--device: must not be empty"),
    (
        ["run", "{tiny}", "-p", "hi", "--device", "meta"],
        "--device: 'meta' holds no data; use cpu, cuda, cuda:N or emulated",
    ),
    (
        ["logits", "{tiny}", "--tokens", "1", "--device", "meta", "-o", "{dir}/l.npy"],
        "--device: 'meta' holds no data; use cpu, cuda, cuda:N or emulated",
    ),
    (["logits", "{tiny}", "--tokens", "1", "--out", ""], "--out: must not be empty"),
    (
        ["run", "{tiny}", "-p", "hi", "--temperature", "nan"],
        "--temperature: must be a finite number, got 'nan'",
    ),
    (["run", "{tiny}", "-p", "hi", "--temp", "inf"], "--temp: must be a finite number, got 'inf'"),
    (["run", "{tiny}", "-p", "hi", "--temp", "-0.5"], "--temp: must be in [0, inf], got -0.5"),
    (["run", "{tiny}", "-p", "hi", "--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
    (
        ["run", "{tiny}", "-p", "hi", "--seed", "18446744073709551616"],
        "--seed: must be in [0, 18446744073709551615], got 18446744073709551616",
    ),
    (
        ["run", "{tiny}", "-p", "hi", "-n", "-2"],
        "-n: must be in [-1, 2147483647] (-1: until the context is full), got -2",
    ),
    (["run", "{tiny}", "-p", "hi", "-n", "x"], "-n: expected an integer, got 'x'"),
    (
        ["run", "{tiny}", "-p", "hi", "--max-tokens", "5000"],
        "--max-tokens: 4 prompt tokens + 5000 new exceed the context of 512",
    ),
    (["run", "{tiny}", "-p", "hi", "-n", "5000"], "-n: 4 prompt tokens + 5000 new exceed the context of 512"),
    (["run", "{tiny}", "-p", ""], "-p: the prompt is empty"),
    (["run", "-p", "hi"], "no model given: harness run MODEL.gguf ... (or -m MODEL.gguf)"),
    (["run", "{fifo}", "-p", "hi"], "{fifo}: is a FIFO (named pipe), not a regular file"),
    (["run", "{tiny}", "-p", "hi", "-ngl", "-1"], "-ngl: must be in [0, 2147483647], got -1"),
    (["cases", "--out-dir", "{file}"], "--out-dir: {file}: is not a directory"),
    (["synth", "{dir}/x.gguf", "--seed", "-1"], "--seed: must be in [0, 18446744073709551615], got -1"),
    (["inspect", "{dir}/absent.gguf"], "{dir}/absent.gguf: no such file"),
    (["inspect", "{file}"], "{file}: magic: not a GGUF file..."),
    (["tokenize", "/dev/zero", "x"], "/dev/zero: is a device, not a regular file"),
    (
        ["bench", "{tiny}", "--device", "emulated"],
        "--device: emulated devices compute on the CPU, so their speed means nothing; bench cpu or a real cuda device",
    ),
    (["bench", "{tiny}", "-r", "0"], "-r: must be in [1, 1000], got 0"),
    (["bench", "{tiny}", "-o", "yaml"], "-o: invalid choice: 'yaml' (choose from 'md', 'json', 'csv')"),
    (
        ["bench", "{tiny}", "--compare-llamacpp", "{file}"],
        "--compare-llamacpp: '{file}' is not an executable; give its path: --compare-llamacpp /path/to/llama-bench",
    ),
    (
        ["report", "{clean}", "-o", "{clean}"],
        "-o: {clean}: is also '{clean}', which this command reads or writes; give another path",
    ),
    (
        ["logits", "{tiny}", "--tokens", "1", "-o", "{tiny}"],
        "-o: {tiny}: is also '{tiny}', which this command reads or writes; give another path",
    ),
    (
        ["trace", "{tiny}", "-o", "{dir}/t.jsonl", "--report", "{dir}/t.jsonl"],
        "--report: {dir}/t.jsonl: is also '{dir}/t.jsonl', which this command reads or writes; give another path",
    ),
    (["report", "{clean}", "{dirty}", "--perfetto", "{dir}/p.json"], "--perfetto: converts one trace, got 2"),
    (
        ["report", "{clean}"],
        "nothing to do: give -o OUT.html, --perfetto OUT.json, --json or --fail-on-dirty",
    ),
    (
        ["trace", "{tiny}", "--perfetto", "{fifo}"],
        "--perfetto: {fifo}: is a FIFO (named pipe); give the path of a regular file to write",
    ),
    (["explode"], "COMMAND: invalid choice: 'explode' (choose from ..."),
    (["synth", "{dir}/t.gguf", "--type", "Q9"], "--type: unknown file type 'Q9' (types: F32, F16, ..."),
    (["trace", "{tiny}", "--fault", "nope"], "--fault: unknown fault 'nope'; `harness faults` lists the..."),
    (
        ["logits", "{tiny}", "--tokens", "1", "--device", "cuda:99", "-o", "{dir}/l.npy"],
        "--device: device cuda:99 does not exist here...",
    ),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(files, argv, expected):
    code, out, err = call([a.format(**files) for a in argv])
    assert code == 2, (out, err)
    line = f"harness: error: {expected.format(**files)}"
    assert len(err.splitlines()) == 1, err
    if line.endswith("..."):
        assert err.startswith(line[:-3]), err
    else:
        assert err == line + "\n"
    assert not (files["dir"] / "nonexistent").exists()  # a missing folder is an error, never made


def test_a_device_that_is_not_here_names_the_flag_that_asked_and_the_way_out(tiny):
    """-ngl puts layers on cuda:0: without a GPU the message names -ngl (as typed) and the emulation."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("there is a GPU here: cuda:0 exists")
    for flag in ("-ngl", "--n-gpu-layers"):
        code, _, err = call(["run", str(tiny), "-p", "hi", flag, "1"])
        assert code == 2
        assert err == (
            f"harness: error: {flag}: device cuda:0 does not exist here "
            "(no CUDA GPU here; --device emulated runs on the emulated one)\n"
        )
    code, _, err = call(["trace", str(tiny), "--device-map", "embed=cpu,layers.0-1=cuda:1,head=cpu"])
    assert code == 2 and err.startswith(
        "harness: error: --device-map ['layers.0-1']: device cuda:1 does not"
    ), err


def test_cases_outside_a_checkout_needs_paths_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """`harness cases` in a folder without cases/: one line, exit 2, and no reports/ folder made."""
    monkeypatch.chdir(tmp_path)
    code, out, err = call(["cases"])
    assert code == 2 and out == ""
    assert (
        err == "harness: error: no case files given, and there is no cases/ folder here to run by default\n"
    )
    code, _, err = call(["cases", "absent.yaml"])
    assert code == 2 and err == "harness: error: absent.yaml: no such file or directory\n"
    assert list(tmp_path.iterdir()) == []  # the default --out-dir reports/cases was not made


def test_a_closed_pipe_ends_quietly(tiny):
    """`harness run ... | head`: the reader is gone before the first write; no message, exit 0."""
    for argv in (["run", str(tiny), "-p", "hi", "-n", "50"], ["faults"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc.stdout.close()  # nobody reads: the first write fails with EPIPE
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 0
        assert err == ""


def test_errors_are_one_line_whatever_the_file_holds(files, tmp_path):
    """A trace whose first line is 30,000 bytes of binary: one short line, not the bytes."""
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(bytes(range(1, 256)) * 120)
    code, _, err = call(["report", str(junk), "-o", str(tmp_path / "r.html")])
    assert code == 2
    assert len(err.splitlines()) == 1 and len(err) < 700


def test_bad_input_through_the_entry_point_has_no_traceback(files):
    done = run_cli("report", str(files["dir"] / "pipe"), "-o", str(files["dir"] / "nonexistent" / "r.html"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# -- any argument set: exit 0, 1 or 2; one stderr line on 2; never a traceback or a hang ------------

# Each pool: (values that should work, values that should be refused).
_INTS = (["0", "1", "2", " 2"], ["-2", "x", "", "1e3", "99999999999999999999999"])
_FLOATS = (["0", "0.7", "1"], ["1.5", "-0.1", "nan", "inf", "-inf", "", "x"])
_DEVICES = (["cpu", "emulated", "cpu:0"], ["meta", "", "cuda:7", "gpu"])
_OUTPUTS = (["{dir}/out.any"], ["{fifo}", "/dev/null", "{dir}/nonexistent/o", "", "{dir}"])
_MODELS = (["{tiny}"], ["{fifo}", "/dev/zero", "{dir}", "{file}", "{dir}/absent", "", "{clean}"])
_TRACES = (["{clean}", "{dirty}"], ["{tiny}", "{fifo}", "/dev/zero", "{dir}", "{file}", "{dir}/absent", ""])
_TOKENS = (["1,2", "5", " 3 , 4 "], ["1,,2", "", "1,99999", "x"])
_TEXTS = (["hi", "the cat"], [""])

_FLAGS = {
    "run": {
        "-p": _TEXTS,
        "-n": _INTS,
        "--temp": _FLOATS,
        "--top-p": _FLOATS,
        "-s": _INTS,
        "--device": _DEVICES,
        "-ngl": _INTS,
        "--json": None,
    },
    "logits": {"--tokens": _TOKENS, "-o": _OUTPUTS, "--device": _DEVICES, "--json": None},
    "trace": {
        "--tokens": _TOKENS,
        "--decode": _INTS,
        "--sample-every": (["1", "2"], ["0", "-1", "x"]),
        "-o": _OUTPUTS,
        "--report": _OUTPUTS,
        "--perfetto": _OUTPUTS,
        "--fault": (["candle-1815"], ["", "nope"]),
        "--device": _DEVICES,
        "--json": None,
    },
    "inspect": {"--json": None},
    "tokenize": {"--json": None, "--no-bos": None},
    "report": {"-o": _OUTPUTS, "--perfetto": _OUTPUTS, "--fail-on-dirty": None, "--json": None},
    "synth": {"--seed": _INTS, "--type": (["Q8_0"], ["", "Q9"]), "--force": None},
    "bench": {
        "-p": (["1", "4"], ["0", "x"]),
        "-n": (["1", "2"], ["0", "-1"]),
        "-r": (["1"], ["0", ""]),
        "--warmup": (["0"], ["-1"]),
        "--device": (["cpu"], ["emulated", "meta", "", "cuda:7"]),
        "-o": (["md", "json", "csv"], ["", "yaml"]),
        "--json": None,
    },
    "cases": {"--out-dir": (["{dir}/cases/out"], ["{file}", "{fifo}", ""]), "--json": None},
}
_FIRST = {
    "bench": _MODELS,
    "run": _MODELS,
    "logits": _MODELS,
    "trace": _MODELS,
    "inspect": _MODELS,
    "tokenize": _MODELS,
    "report": _TRACES,
    "synth": _OUTPUTS,
    "cases": ([], ["{dir}/absent", "{file}", "{fifo}"]),
}


@st.composite
def argument_sets(draw):
    """A command, its first argument and up to four flags; each value is one that should work
    four times in five, so that about half the sets run and half are refused."""

    def pick(pool):
        good, bad = pool
        return draw(st.sampled_from(good if good and draw(st.integers(0, 4)) else bad))

    command = draw(st.sampled_from(sorted(_FLAGS)))
    argv = [command, pick(_FIRST[command])]
    if command == "tokenize":
        argv.append(pick(_TEXTS))
    if command == "bench":  # small tests unless drawn below (the last of a flag counts)
        argv += ["-p", "4", "-n", "1", "-r", "1", "--warmup", "0"]
    for flag in draw(st.lists(st.sampled_from(sorted(_FLAGS[command])), unique=True, max_size=4)):
        values = _FLAGS[command][flag]
        argv += [flag] if values is None else [flag, pick(values)]
    if command == "run" and "-p" not in argv:
        argv += ["-p", "hi"]
    return argv


@settings(max_examples=25, deadline=None)
@given(argv=argument_sets())
def test_any_argument_set_ends_in_time_with_a_clear_status(files, argv):
    argv = [a.format(**files) for a in argv]
    code, _, err = call(argv)  # a hang raises Hang; an escaped exception fails the test
    event(f"{argv[0]} exit {code}")  # --hypothesis-show-statistics shows the mix
    assert code in (0, 1, 2), (argv, err)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("harness: error: "), (argv, err)


# -- harness bench ----------------------------------------------------------------------------------

FAKE_LLAMA_BENCH = """#!/bin/sh
echo "$@" > "$(dirname "$0")/argv"
cat <<'JSON'
[{"n_prompt": 8, "n_gen": 0, "avg_ts": 100.0, "stddev_ts": 2.0, "samples_ts": [98.0, 102.0],
  "model_filename": "tiny.gguf", "model_size": 2105000, "gpu_info": ""},
 {"n_prompt": 0, "n_gen": 2, "avg_ts": 50.0, "stddev_ts": 1.0, "samples_ts": [49.0, 51.0],
  "model_filename": "tiny.gguf", "model_size": 2105000, "gpu_info": ""}]
JSON
"""


def test_bench_as_llama_bench(tiny, tmp_path):
    """pp and tg rows with mean ± sd over the repetitions; -o json; llama-bench's rows beside."""
    code, out, err = call(["bench", str(tiny), "-p", "8", "-n", "2", "-r", "2", "--warmup", "0"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "| engine | model | size | device | test | t/s |"
    assert [line.split(" | ")[4] for line in lines[2:]] == ["pp8", "tg2"]
    assert all(" ± " in line for line in lines[2:])
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH)
    fake.chmod(0o755)
    code, out, err = call(
        ["bench", str(tiny), "-p", "8", "-n", "2", "-r", "2", "-o", "json", "--compare-llamacpp", str(fake)]
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["engine"], r["test"]) for r in rows] == [
        ("harness", "pp8"),
        ("harness", "tg2"),
        ("llama.cpp", "pp8"),
        ("llama.cpp", "tg2"),
    ]
    assert rows[2]["ts_mean"] == 100.0 and rows[3]["ts_median"] == 50.0
    assert (tmp_path / "argv").read_text().split() == [
        "-m",
        str(tiny),
        "-p",
        "8",
        "-n",
        "2",
        "-ngl",
        "0",
        "-r",
        "2",
        "-fa",
        "0",
        "-o",
        "json",
    ]


# -- Perfetto ---------------------------------------------------------------------------------------


def test_perfetto_from_trace_and_from_report(files, tmp_path):
    """--perfetto OUT.json writes the trace-event JSON, from a run or from a saved trace."""
    out = tmp_path / "run.json"
    argv = [
        "trace",
        str(files["tiny"]),
        "--device",
        "emulated",
        "--fault",
        "candle-1815",
        "--perfetto",
        str(out),
    ]
    code, _, err = call(argv)
    assert code == 1 and f"perfetto -> {out}" in err
    doc = json.loads(out.read_text())
    assert doc["otherData"]["verdict"] == "dirty"
    assert any(e["name"].startswith("MISMATCH ") for e in doc["traceEvents"] if e.get("ph") == "X")
    saved = tmp_path / "saved.json"
    code, text, err = call(["report", str(files["dirty"]), "--perfetto", str(saved), "--json"])
    assert code == 0, err
    assert json.loads(text) == {
        "perfetto": str(saved),
        "traces": [{"trace": str(files["dirty"]), "verdict": "dirty"}],
    }
    assert json.loads(saved.read_text())["otherData"]["verdict"] == "dirty"
