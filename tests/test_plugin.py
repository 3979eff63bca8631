"""The pytest plugin: the `cuda` marker on the emulated accelerator, options, fixtures, the
mismatch report and its merge across pytest-xdist workers (one of which crashes)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

from harness import pytest_plugin
from harness.pytest_plugin import parse_device, worker_index

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="checks what happens on a machine without a GPU")


@pytest.fixture(autouse=True)
def not_a_worker(monkeypatch):
    """The runs below are sessions of their own, not parts of this one's xdist worker."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


def _args(*more: str) -> list[str]:
    installed = any(ep.name == "harness" for ep in importlib.metadata.entry_points(group="pytest11"))
    plugin = [] if installed else ["-p", "harness.pytest_plugin"]
    return ["-p", "no:benchmark", "-p", "no:cacheprovider", "-p", "no:randomly", *plugin, *more]


def _inprocess(pytester: pytest.Pytester, *args: str):
    return pytester.runpytest_inprocess(*_args("-p", "no:xdist", *args))


# -- the cuda marker ----------------------------------------------------------------------------------

CUDA_TESTS = """
import pytest
import torch

from harness.trace import emulated


@pytest.fixture
def on_cuda():
    return torch.ones(2, device="cuda:1")  # set up inside the emulation too


@pytest.mark.cuda
def test_emulated(on_cuda, device):
    assert emulated.active() is not None and torch.cuda.device_count() == 2
    assert on_cuda.device == torch.device("cuda:1") and device == torch.device("cuda:0")
    assert (torch.zeros(3, device=device) + 1).device == device


@pytest.mark.cuda(real=True)
def test_real_only():
    raise AssertionError("never runs without a GPU")


def test_plain(device):
    assert emulated.active() is None and not torch.cuda.is_available()
    assert device == torch.device("cpu")
"""


@needs_no_gpu
def test_cuda_test_runs_emulated_and_says_so(pytester):
    pytester.makepyfile(test_it=CUDA_TESTS)
    result = _inprocess(pytester, "-rA")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*Captured harness setup*",
            "this `cuda` test ran on the emulated accelerator (no GPU here)",
            "1 cuda test ran on the emulated accelerator (no GPU here)",
            "SKIPPED * test_it.py:*: needs real CUDA (marked cuda(real=True)); no CUDA GPU here",
        ]
    )
    reports = result.reprec.getreports("pytest_runtest_logreport")
    call = next(r for r in reports if r.when == "call" and r.nodeid.endswith("test_emulated"))
    assert ("harness_accelerator", "emulated") in call.user_properties


@needs_no_gpu
def test_require_cuda_is_a_usage_error_without_a_gpu(pytester):
    pytester.makepyfile(test_it=CUDA_TESTS)
    result = _inprocess(pytester, "--require-cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--require-cuda: tests marked `cuda` were selected but no CUDA GPU*"])
    # Deselecting the cuda tests leaves nothing to complain about.
    assert _inprocess(pytester, "--require-cuda", "-m", "not cuda").ret == pytest.ExitCode.OK


def test_marker_help_documents_real():
    assert "cuda(real=True)" in pytest_plugin.MARKERS["cuda"]


# -- devices ------------------------------------------------------------------------------------------


def test_parse_device_and_worker_gpus():
    cpu, cuda = torch.device("cpu"), torch.device
    assert parse_device(None, 0, 2) == (cpu, False)
    assert parse_device(None, 4, 2, worker=6) == (cuda("cuda", 2), False)  # gw6 of 4 GPUs
    assert parse_device("cuda", 3, 2, worker=4) == (cuda("cuda", 1), False)
    assert parse_device("cuda:2", 3, 2, worker=4) == (cuda("cuda", 2), False)  # named: kept
    assert parse_device("emulated", 0, 2, worker=3) == (cuda("cuda", 1), True)
    assert parse_device("CPU", 0, 1) == (cpu, False)
    with pytest.raises(ValueError, match="no CUDA GPU here .use --device emulated"):
        parse_device("cuda", 0, 2)
    with pytest.raises(ValueError, match=r"there are 2 CUDA GPUs \(cuda:0..cuda:1\)"):
        parse_device("cuda:2", 2, 2)
    with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N or emulated"):
        parse_device("tpu", 0, 2)
    assert worker_index("gw7") == 7 and worker_index("master") == 0 and worker_index("") == 0


def test_device_option(pytester):
    pytester.makepyfile(
        test_it="""
        import torch
        from harness.trace import emulated

        def test_device(device):
            print("DEVICE", device, emulated.active() is not None, torch.cuda.is_available())
        """
    )
    result = _inprocess(pytester, "-s", "--device", "emulated", "--emulated-devices", "3")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*DEVICE cuda:0 True True*"])
    result = _inprocess(pytester, "-s", "--device", "cpu")
    result.stdout.fnmatch_lines(["*DEVICE cpu False*"])
    bad = _inprocess(pytester, "--device", "tpu")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --device 'tpu': expected cpu, cuda, cuda:N or emulated"])
    if NO_GPU:
        bad = _inprocess(pytester, "--device", "cuda")
        bad.stderr.fnmatch_lines(["ERROR: --device cuda: no CUDA GPU here (use --device emulated*"])


# -- fixtures and the mismatch report -----------------------------------------------------------------

REPORTED = """
import pytest
import torch

from harness import faults
from harness.trace import emulated

TOKENS = torch.tensor([1, 5, 9])


def test_clean(tiny_mixtral, tracer, device):
    model = tiny_mixtral()
    assert emulated.active() is not None and device.type == "cuda"
    assert any(b.device == device for b in model.buffers())
    with torch.inference_mode(), tracer(model) as t:
        model(TOKENS)
    assert t.summary.verdict == "clean"


def test_candle_1815(tiny_mixtral, tracer):
    model = tiny_mixtral(layout="per-expert", router="f16")
    with faults.get("candle-1815").inject(model):
        with torch.inference_mode(), tracer(model, name="faulty") as t, pytest.raises(RuntimeError):
            model(TOKENS)
    first = t.summary.first_offence
    assert (first["module"], first["tensor"]) == ("layers.0.moe.router", "blk.0.ffn_gate_inp.weight")
    assert t.path.is_file()
"""


def test_tiny_mixtral_tracer_and_mismatch_report(pytester):
    pytester.makepyfile(test_rep=REPORTED)
    out = pytester.path / "reports" / "run.html"
    result = _inprocess(pytester, "--device", "emulated", "--mismatch-report", str(out))
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"mismatch report: {out} (2 traces from 2 tests)"])
    html = out.read_text(encoding="utf-8")
    assert "test_rep.py::test_clean" in html and "test_rep.py::test_candle_1815 [faulty]" in html
    assert "blk.0.ffn_gate_inp.weight" in html and "layers.0.moe.router" in html
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary left


def test_no_traces_no_report(pytester):
    pytester.makepyfile(test_it="def test_nothing():\n    pass\n")
    out = pytester.path / "r.html"
    result = _inprocess(pytester, "--mismatch-report", str(out))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*no traces were recorded by the `tracer` fixture: no mismatch report written"]
    )
    assert not out.exists()


def test_unwritable_report_path_is_a_usage_error_at_startup(pytester):
    pytester.makepyfile(test_it="def test_never():\n    raise AssertionError\n")
    (pytester.path / "afile").write_text("not a folder")
    result = _inprocess(pytester, "--mismatch-report", str(pytester.path / "afile" / "r.html"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: --mismatch-report: ")
    assert "cannot write the report here" in errors[0] and "Traceback" not in result.stderr.str()


def test_mixtral_gguf(pytester, monkeypatch, tmp_path):
    pytester.makepyfile(test_it="def test_real(mixtral_gguf):\n    print('GGUF', mixtral_gguf)\n")
    monkeypatch.delenv("HARNESS_GGUF", raising=False)
    result = _inprocess(pytester, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *HARNESS_GGUF is not set (the path of a real Mixtral GGUF file)"])

    monkeypatch.setenv("HARNESS_GGUF", str(tmp_path / "nope.gguf"))
    result = _inprocess(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*HARNESS_GGUF={tmp_path / 'nope.gguf'}: does not exist"])

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("HARNESS_GGUF", str(tmp_path / "m.gguf"))
    result = _inprocess(pytester, "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*GGUF {tmp_path / 'm.gguf'}*"])


# -- pytest-xdist -------------------------------------------------------------------------------------

TRACED = """
import os

import torch


def _run(tracer):
    lin = torch.nn.Linear(4, 2)
    with torch.no_grad(), tracer(lin) as t:
        lin(torch.ones(3, 4))
    return t


def test_{f}1(tracer):
    _run(tracer)


def test_{f}2(tracer):
    _run(tracer)
"""


def test_xdist_workers_merge_one_report_and_a_crash_loses_nothing_else(pytester, monkeypatch):
    # The workers import harness (and find its pytest11 entry point) the way this process does.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(
        test_a=TRACED.format(f="a") + "\n\ndef test_a3_crash(tracer):\n    _run(tracer)\n    os._exit(1)\n",
        test_b=TRACED.format(f="b"),
    )
    out = pytester.path / "merged.html"
    result = pytester.runpytest_subprocess(*_args("-p", "xdist", "-n", "2", "--mismatch-report", str(out)))
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running*test_a3_crash*"])
    result.stdout.fnmatch_lines([f"mismatch report: {out} (5 traces from 5 tests)"])
    html = out.read_text(encoding="utf-8")
    for test in ("test_a1", "test_a2", "test_a3_crash", "test_b1", "test_b2"):
        assert f"::{test}" in html, test
