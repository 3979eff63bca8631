"""The pytest plugin: the `cuda` marker on the emulated accelerator, options, fixtures, the
mismatch report and its merge across pytest-xdist workers (one of which crashes)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

from pytest_harness.devices import marker_help, parse_device, worker_index
from tests.plugin_util import plugin_args

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
    return [*plugin_args(), "-p", "no:cacheprovider", "-p", "no:randomly", *more]


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


@pytest.mark.harness_cuda
def test_emulated(on_cuda, harness_device):
    device = harness_device
    assert emulated.active() is not None and torch.cuda.device_count() == 2
    assert on_cuda.device == torch.device("cuda:1") and device == torch.device("cuda:0")
    assert (torch.zeros(3, device=device) + 1).device == device


@pytest.mark.harness_cuda(real=True)
def test_real_only():
    raise AssertionError("never runs without a GPU")


def test_plain(harness_device):
    device = harness_device
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
            "this `harness_cuda` test ran on the emulated accelerator (no GPU here)",
            "1 harness_cuda test ran on the emulated accelerator (no GPU here)",
            "SKIPPED * test_it.py:*: needs real CUDA (marked harness_cuda(real=True)); no CUDA GPU here",
        ]
    )
    reports = result.reprec.getreports("pytest_runtest_logreport")
    call = next(r for r in reports if r.when == "call" and r.nodeid.endswith("test_emulated"))
    assert ("harness_accelerator", "emulated") in call.user_properties


@needs_no_gpu
def test_require_cuda_is_a_usage_error_without_a_gpu(pytester):
    pytester.makepyfile(test_it=CUDA_TESTS)
    result = _inprocess(pytester, "--harness-require-cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--harness-require-cuda: tests marked `harness_cuda` were selected but no CUDA GPU*"]
    )
    # Deselecting the cuda tests leaves nothing to complain about.
    assert _inprocess(pytester, "--harness-require-cuda", "-m", "not harness_cuda").ret == pytest.ExitCode.OK


def test_marker_help_documents_real():
    assert "cuda(real=True)" in marker_help("cuda")


# -- devices ------------------------------------------------------------------------------------------


def test_parse_device_and_worker_gpus():
    cpu, cuda = torch.device("cpu"), torch.device
    assert parse_device(None, 0, 2) == (cpu, False)
    assert parse_device(None, 4, 2, worker=6) == (cuda("cuda", 2), False)  # gw6 of 4 GPUs
    assert parse_device("cuda", 3, 2, worker=4) == (cuda("cuda", 1), False)
    assert parse_device("cuda:2", 3, 2, worker=4) == (cuda("cuda", 2), False)  # named: kept
    assert parse_device("emulated", 0, 2, worker=3) == (cuda("cuda", 1), True)
    assert parse_device("CPU", 0, 1) == (cpu, False)
    with pytest.raises(ValueError, match="no CUDA GPU here .use --harness-device emulated"):
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

        def test_device(harness_device):
            print("DEVICE", harness_device, emulated.active() is not None, torch.cuda.is_available())
        """
    )
    result = _inprocess(pytester, "-s", "--harness-device", "emulated", "--harness-emulated-devices", "3")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*DEVICE cuda:0 True True*"])
    result = _inprocess(pytester, "-s", "--harness-device", "cpu")
    result.stdout.fnmatch_lines(["*DEVICE cpu False*"])
    bad = _inprocess(pytester, "--harness-device", "tpu")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --harness-device 'tpu': expected cpu, cuda, cuda:N or emulated"])
    if NO_GPU:
        bad = _inprocess(pytester, "--harness-device", "cuda")
        bad.stderr.fnmatch_lines(
            ["ERROR: --harness-device cuda: no CUDA GPU here (use --harness-device emulated*"]
        )


# -- fixtures and the mismatch report -----------------------------------------------------------------

REPORTED = """
import pytest
import torch

from harness import faults
from harness.trace import emulated

TOKENS = torch.tensor([1, 5, 9])


def test_clean(harness_tiny_mixtral, harness_tracer, harness_device):
    tracer, device = harness_tracer, harness_device
    model = harness_tiny_mixtral()
    assert emulated.active() is not None and device.type == "cuda"
    assert any(b.device == device for b in model.buffers())
    with torch.inference_mode(), tracer(model) as t:
        model(TOKENS)
    assert t.summary.verdict == "clean"


def test_candle_1815(harness_tiny_mixtral, harness_tracer):
    tracer = harness_tracer
    model = harness_tiny_mixtral(layout="per-expert", router="f16")
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
    result = _inprocess(pytester, "--harness-device", "emulated", "--harness-report", str(out))
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"harness report: {out} (2 traces from 2 tests)"])
    html = out.read_text(encoding="utf-8")
    assert "test_rep.py::test_clean" in html and "test_rep.py::test_candle_1815 [faulty]" in html
    assert "blk.0.ffn_gate_inp.weight" in html and "layers.0.moe.router" in html
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary left


def test_no_traces_no_report(pytester):
    pytester.makepyfile(test_it="def test_nothing():\n    pass\n")
    out = pytester.path / "r.html"
    result = _inprocess(pytester, "--harness-report", str(out))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*no traces were recorded (by the `harness_tracer` fixture or a YAML case): no report written"]
    )
    assert not out.exists()


def test_unwritable_report_path_is_a_usage_error_at_startup(pytester):
    pytester.makepyfile(test_it="def test_never():\n    raise AssertionError\n")
    (pytester.path / "afile").write_text("not a folder")
    result = _inprocess(pytester, "--harness-report", str(pytester.path / "afile" / "r.html"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: --harness-report: ")
    assert "cannot write the report here" in errors[0] and "Traceback" not in result.stderr.str()


def test_mixtral_gguf(pytester, monkeypatch, tmp_path):
    pytester.makepyfile(
        test_it="def test_real(harness_mixtral_gguf):\n    print('GGUF', harness_mixtral_gguf)\n"
    )
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


def _run(harness_tracer):
    tracer = harness_tracer
    lin = torch.nn.Linear(4, 2)
    with torch.no_grad(), tracer(lin) as t:
        lin(torch.ones(3, 4))
    return t


def test_{f}1(harness_tracer):
    _run(harness_tracer)


def test_{f}2(harness_tracer):
    _run(harness_tracer)
"""


def test_xdist_workers_merge_one_report_and_a_crash_loses_nothing_else(pytester, monkeypatch):
    # The workers import harness (and find its pytest11 entry point) the way this process does.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(
        test_a=TRACED.format(f="a")
        + "\n\ndef test_a3_crash(harness_tracer):\n    _run(harness_tracer)\n    os._exit(1)\n",
        test_b=TRACED.format(f="b"),
    )
    out = pytester.path / "merged.html"
    result = pytester.runpytest_subprocess(*_args("-p", "xdist", "-n", "2", "--harness-report", str(out)))
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running*test_a3_crash*"])
    result.stdout.fnmatch_lines([f"harness report: {out} (5 traces from 5 tests)"])
    html = out.read_text(encoding="utf-8")
    for test in ("test_a1", "test_a2", "test_a3_crash", "test_b1", "test_b2"):
        assert f"::{test}" in html, test


# -- a good guest: nothing heavy imported, nothing read, nothing changed unless asked ----------------

HEAVY = ("torch", "harness", "hypothesis", "numpy", "yaml", "jinja2")


def test_importing_the_plugin_imports_neither_torch_nor_harness():
    code = "import sys, pytest_harness.plugin; print(sorted({m.split('.')[0] for m in sys.modules}))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = set(ast.literal_eval(out.stdout))
    assert "pytest_harness" in loaded and not loaded & set(HEAVY), loaded & set(HEAVY)


def test_a_session_that_uses_nothing_imports_nothing(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(
        test_it="""
        import sys

        def test_light():
            print("HEAVY", sorted(m for m in ("torch", "harness") if m in sys.modules))
        """
    )
    result = pytester.runpytest_subprocess(*_args("-p", "no:xdist", "-s"))  # this process has torch
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*HEAVY []*"])


def test_case_declaration_matches_the_schema():
    from harness.cases import SCHEMA
    from pytest_harness.cases import SCHEMA_FAMILY

    assert SCHEMA.startswith(SCHEMA_FAMILY + "/")


def test_profiles_are_registered_and_loaded_only_when_asked(pytester, monkeypatch):
    # hypothesis's settings are global to a process: each run gets its own.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(
        test_it="""
        from hypothesis import settings

        def test_profile():
            print("PROFILE", settings.get_current_profile_name(), settings().max_examples)
        """
    )

    def run(*args: str):
        return pytester.runpytest_subprocess(*_args("-p", "no:xdist", "-s", *args))

    run().stdout.fnmatch_lines(["*PROFILE default 100*"])
    run("--hypothesis-profile", "harness-ci").stdout.fnmatch_lines(["*PROFILE harness-ci 15*"])
    pytester.makeini("[pytest]\nharness_hypothesis_profile = harness-nightly\n")
    run().stdout.fnmatch_lines(["*PROFILE harness-nightly 500*"])
    run("--hypothesis-profile", "default").stdout.fnmatch_lines(
        ["*PROFILE default 100*"]
    )  # the command line wins
    pytester.makeini("[pytest]\nharness_hypothesis_profile = auto\n")  # harness-dev, or with CI:
    monkeypatch.setenv("CI", "true")
    run().stdout.fnmatch_lines(["*PROFILE harness-ci 15*"])
    pytester.makeini("[pytest]\nharness_hypothesis_profile = harness-weekly\n")
    bad = run()
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: harness_hypothesis_profile: 'harness-weekly' is not one of*"])
    # A misspelt harness profile on the command line: one line, not hypothesis's INTERNALERROR.
    pytester.makeini("[pytest]\n")
    bad = run("--hypothesis-profile", "harness-weekly")
    assert (
        bad.ret == pytest.ExitCode.USAGE_ERROR and "INTERNALERROR" not in bad.stdout.str() + bad.stderr.str()
    )
    bad.stderr.fnmatch_lines(
        [
            "ERROR: --hypothesis-profile: 'harness-weekly' is not one of harness-ci, harness-dev, harness-nightly"
        ]
    )


# -- assertions people read ---------------------------------------------------------------------------

VERDICT_TESTS = """
class Verdict(str):
    # A stand-in for harness's own: a str subclass with the first offence in one paragraph.
    def __new__(cls, value, explanation=""):
        self = super().__new__(cls, value)
        self.explanation = explanation
        return self


def test_dirty():
    verdict = Verdict("dirty", "mismatch in MoE router layers.0.moe.router (tensor blk.0.ffn_gate_inp.weight):\\n"
                      "aten::mm on cpu, cuda:0 (expected cuda:0) at mixtral.py:120")
    assert verdict == "clean"


def test_plain_strings_untouched():
    assert "dirty" == "clean"
"""


def test_a_failed_verdict_comparison_explains_the_first_offence(pytester):
    pytester.makepyfile(test_v=VERDICT_TESTS)
    result = _inprocess(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "E       AssertionError: assert 'dirty' == 'clean'",
            "E         the run is dirty:",
            "E         mismatch in MoE router layers.0.moe.router (tensor blk.0.ffn_gate_inp.weight):",
            "E         aten::mm on cpu, cuda:0 (expected cuda:0) at mixtral.py:120",
        ]
    )
    # Only the failure sections: pytest's short summary repeats messages untruncated when CI is set.
    failures = result.stdout.str().split("short test summary info")[0]
    assert failures.count("the run is dirty") == 1  # the plain strings get pytest's own diff


def test_junit_xml_carries_the_verdict_and_first_offence(pytester):
    pytester.makepyfile(test_rep=REPORTED)
    xml = pytester.path / "junit.xml"
    result = _inprocess(pytester, "--harness-device", "emulated", f"--junitxml={xml}")
    result.assert_outcomes(passed=2)
    root = ElementTree.parse(xml).getroot()
    props = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in root.iter("testcase")
    }
    assert props["test_clean"]["harness_verdict"] == "clean"
    assert "harness_first_offence" not in props["test_clean"]
    dirty = props["test_candle_1815"]
    assert dirty["harness_verdict"] == "dirty"
    assert "layers.0.moe.router" in dirty["harness_first_offence"]
    assert "blk.0.ffn_gate_inp.weight" in dirty["harness_first_offence"]


UNJUDGED = """
import pytest
import torch


def test_raised(harness_tracer):
    model = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError), harness_tracer(model):
        model(torch.ones(3, 5))  # a shape error, not a device error


def test_ran_nothing(harness_tracer):
    with harness_tracer(torch.nn.Linear(4, 4)):
        pass


def test_never_entered(harness_tracer):
    harness_tracer(torch.nn.Linear(4, 4))
"""


def test_junit_xml_says_why_a_run_was_not_judged(pytester):
    """A run that raised or ran nothing has no first offence: the property says why instead; a
    tracer made but never entered says nothing."""
    pytester.makepyfile(test_unjudged=UNJUDGED)
    xml = pytester.path / "junit.xml"
    _inprocess(pytester, f"--junitxml={xml}").assert_outcomes(passed=3)
    props = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in ElementTree.parse(xml).getroot().iter("testcase")
    }
    raised, nothing = props["test_raised"], props["test_ran_nothing"]
    assert raised["harness_verdict"] == "error" and "harness_first_offence" not in raised
    assert "the run raised RuntimeError: mat1 and mat2 shapes" in raised["harness_explanation"]
    assert nothing["harness_verdict"] == "inconclusive"
    assert "no op was recorded" in nothing["harness_explanation"]
    assert props["test_never_entered"] == {}


def test_assertrepr_explains_harness_own_verdict():
    from harness.trace.events import Verdict
    from pytest_harness.assertions import pytest_assertrepr_compare

    dirty = Verdict(
        "dirty", "mismatch in layers.0.moe.router (blk.0.ffn_gate_inp.weight): aten.mm on cuda:0, cpu"
    )
    lines = pytest_assertrepr_compare(None, "==", dirty, "clean")
    assert lines[0] == "'dirty' == 'clean'"
    assert lines[2:] == ["the run is dirty:", str(dirty.explanation)]
    assert pytest_assertrepr_compare(None, "==", "dirty", "clean") is None  # plain strings: pytest's own
    assert pytest_assertrepr_compare(None, "<", dirty, "clean") is None


def test_a_failed_summary_assertion_shows_the_callers_line_not_the_harness_frame(pytester):
    pytester.makepyfile(
        test_s="""
        from harness.trace.events import Summary

        def test_dirty():
            summary = Summary("dirty", {"mismatch": 1})
            summary.assert_clean()
        """
    )
    result = _inprocess(pytester)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "summary.assert_clean()" in out
    assert "harness/trace/events.py" not in out and "def assert_clean" not in out
