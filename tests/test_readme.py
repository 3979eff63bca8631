"""README.md's code, as written: a user copies it into a project of their own and expects it to run.

Each ```python block runs unchanged: the library's blocks in a folder holding the `model.gguf`
they name (made with `harness synth`, as the README says), on the emulated accelerator where
there is no GPU; the test-suite block as a test file of a pytest session of its own. So does the
example at the top of `harness.strategies`, the other piece of code users copy.
"""

from __future__ import annotations

import re
import runpy
import textwrap
from pathlib import Path

import pytest

from harness.cli import main
from tests.plugin_util import plugin_args

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), re.S | re.M)


def block_with(marker: str) -> str:
    (block,) = [b for b in python_blocks() if marker in b]
    return block


def test_the_readme_has_the_blocks_these_tests_run():
    assert len(python_blocks()) == 3


@pytest.fixture
def in_a_folder_with_model_gguf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "model.gguf", "--preset", "tiny", "--quiet"]) == 0
    return tmp_path


def test_the_library_blocks_run_as_written(in_a_folder_with_model_gguf):
    folder = in_a_folder_with_model_gguf
    (folder / "from_python.py").write_text(block_with("harness.open_gguf"), encoding="utf-8")
    names = runpy.run_path(str(folder / "from_python.py"), run_name="__main__")
    assert names["router"].dequantize().shape == (4, 256)  # the tiny preset: 4 experts, width 256

    (folder / "tracing.py").write_text(block_with("Tracer("), encoding="utf-8")
    names = runpy.run_path(str(folder / "tracing.py"), run_name="__main__")
    assert names["tracer"].summary.verdict == "clean"
    assert (folder / "cpu.jsonl").is_file() and (folder / "cuda.jsonl").is_file()


@pytest.fixture
def not_a_worker(monkeypatch):
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


def test_the_test_suite_block_runs_as_written(pytester, not_a_worker):
    """Both of its tests pass, with the command the README gives after it, under strict pytest."""
    pytester.makeini("[pytest]\naddopts = --strict-markers --strict-config\nfilterwarnings = error\n")
    pytester.makepyfile(test_from_readme=block_with("harness_tracer"))
    result = pytester.runpytest_subprocess(
        *plugin_args(),
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        "--harness-device",
        "emulated",
        "--harness-report",
        "report.html",
        "--junitxml",
        "junit.xml",
    )
    result.assert_outcomes(passed=2)
    assert (pytester.path / "report.html").is_file()
    junit = (pytester.path / "junit.xml").read_text(encoding="utf-8")
    assert junit.count('name="harness_verdict" value="dirty"') == 1
    assert junit.count('name="harness_verdict" value="clean"') == 1


def test_the_strategies_example_runs_as_written(pytester, not_a_worker):
    """Its given() names its argument (positional strategies fill the rightmost parameters, which
    once made `case` a fixture that did not exist) and it uses no function-scoped fixture
    (hypothesis's health check refuses tmp_path)."""
    import harness.strategies

    doc = harness.strategies.__doc__
    example = doc[doc.index("    import torch") : doc.index("What each strategy gives")]
    pytester.makeconftest(
        "from hypothesis import settings\n"
        "settings.register_profile('two', max_examples=2)\n"
        "settings.load_profile('two')\n"
    )
    pytester.makepyfile(test_property=textwrap.dedent(example))
    result = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
