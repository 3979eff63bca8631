"""pytest plugin (entry point `pytest11: harness`): markers and the `--require-cuda` option.

Later issues add the tracer fixtures, the mismatch report and the emulated accelerator.
"""

from __future__ import annotations

import pytest

MARKERS = {
    "cuda": "needs a CUDA GPU; skipped where there is none unless --require-cuda makes that an error",
    "slow": "takes more than a few seconds",
    "llamacpp": "cross-checks against llama.cpp through llama-cpp-python; skipped when it is absent",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "device-consistency harness")
    group.addoption(
        "--require-cuda",
        action="store_true",
        default=False,
        help="fail, rather than skip, `cuda` tests when no CUDA GPU is present",
    )
    _add_case_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    if config.getoption("--require-cuda"):
        if any(item.get_closest_marker("cuda") for item in items):
            raise pytest.UsageError(
                "--require-cuda: tests marked `cuda` were selected but no CUDA GPU is present"
            )
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


# ---- hypothesis profiles (ci, dev, nightly) -------------------------------------------------------
# Registered when pytest loads this plugin, so every project using it has them:
# `--hypothesis-profile NAME` (hypothesis's own option) picks one. When nothing else chose a profile
# (still hypothesis's "default" when the plugin loads), "ci" is loaded if the CI environment variable
# is set (CI=true on GitHub Actions and most CI services), else "dev"; HARNESS_HYPOTHESIS_PROFILE
# names another (e.g. "default" to keep hypothesis's own). `--hypothesis-profile`, applied later by
# hypothesis's plugin, and a profile a conftest.py registers or loads win over this choice.
# - ci: 15 examples per property, derandomized: every CI run tries the same examples, so a red
#   build is a change in the code (not a new random draw), and the failure reproduces anywhere with
#   `--hypothesis-profile ci`; no example database (nothing to keep on a throwaway runner).
# - dev: the local default: 25 random examples, failures kept in .hypothesis/ and replayed first.
# - nightly: 500 random examples, to find what ci's fixed 15 cannot.
# Examples run whole models (tenths of a second each), so no deadline and no too_slow health check.


def _register_hypothesis_profiles() -> None:
    import os

    from hypothesis import HealthCheck, settings

    common = dict(
        parent=settings.get_profile("default"),  # else unset fields follow whichever profile is loaded
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("ci", max_examples=15, derandomize=True, database=None, **common)
    settings.register_profile("dev", max_examples=25, **common)
    settings.register_profile("nightly", max_examples=500, **common)
    if settings.get_current_profile_name() == "default":
        ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
        settings.load_profile(os.environ.get("HARNESS_HYPOTHESIS_PROFILE") or ("ci" if ci else "dev"))


_register_hypothesis_profiles()


# ---- YAML cases collected as tests ----------------------------------------------------------------
# Rule: a `.yaml`/`.yml` file inside a directory named `cases` (at any depth) whose text has a
# top-level block key `model:` or `expect:` is a case file (harness.cases gives the schema), and
# becomes one test named by the case's name: `cases/foo.yaml::foo`. The key test keeps other YAML
# that happens to sit in a `cases` directory of a project using this plugin out of it, and a broken
# case file (say, bad indentation) still has those keys, so it fails collection with its file:line
# message. Opt out with `--harness-no-cases` or the ini option `harness_cases = false`. Traces go
# to `harness_cases_output` (default reports/cases, relative to the rootdir). A case that fails
# reports expected against got; `accelerator: real` cases are marked `cuda`.

_CASE_KEYS = None  # the compiled pattern, made on first use


def _add_case_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "device-consistency harness")
    group.addoption(
        "--harness-no-cases",
        action="store_true",
        default=False,
        help="do not collect YAML case files (cases/*.yaml) as tests",
    )
    parser.addini(
        "harness_cases", type="bool", default=True, help="collect YAML case files (cases/*.yaml) as tests"
    )
    parser.addini(
        "harness_cases_output",
        default="reports/cases",
        help="where case tests write their traces, relative to the rootdir (default reports/cases)",
    )


def _cases_enabled(config: pytest.Config) -> bool:
    if config.getoption("harness_no_cases", default=False):
        return False
    try:
        return bool(config.getini("harness_cases"))
    except ValueError:  # the ini option is not registered
        return True


def is_case_file(path, config: pytest.Config | None = None) -> bool:
    """Whether pytest collects `path` as a case file (the rule above)."""
    import re
    from pathlib import Path

    global _CASE_KEYS
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        return False
    parts = path.parent.parts
    if config is not None and path.parent.is_relative_to(config.rootpath):
        parts = path.parent.relative_to(config.rootpath).parts
    if "cases" not in parts:
        return False
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    if _CASE_KEYS is None:
        _CASE_KEYS = re.compile(r"^(?:model|expect)[ \t]*:", re.MULTILINE)
    return bool(_CASE_KEYS.search(text))


def pytest_collect_file(file_path, parent: pytest.Collector):
    if _cases_enabled(parent.config) and is_case_file(file_path, parent.config):
        return CaseFile.from_parent(parent, path=file_path)
    return None


class CaseFailed(Exception):
    """A case whose run did not match its `expect`; carries the `CaseResult`."""

    def __init__(self, result):
        super().__init__(result.report())
        self.result = result


class CaseFile(pytest.File):
    """A YAML case file: one `CaseItem`. A malformed file fails collection with `file:line: key: ...`."""

    def collect(self):
        from harness.cases import CaseError, load_case

        try:
            shown = self.path.relative_to(self.config.rootpath)
        except ValueError:
            shown = self.path
        try:
            case = load_case(self.path, shown_as=str(shown))
        except CaseError as exc:
            raise self.CollectError(f"malformed case file: {exc}") from None
        item = CaseItem.from_parent(self, name=case.name, case=case)
        if case.accelerator == "real":
            item.add_marker(pytest.mark.cuda)
        yield item


class CaseItem(pytest.Item):
    """One YAML case, run by `harness.cases.run_case`."""

    def __init__(self, *, case, **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.result = None

    def runtest(self) -> None:
        from harness.cases import run_case

        try:
            output = self.config.getini("harness_cases_output")
        except ValueError:
            output = "reports/cases"
        result = self.result = run_case(self.case, out_dir=self.config.rootpath / output)
        if result.trace_path is not None:
            self.user_properties.append(("trace", str(result.trace_path)))
        if result.skipped:
            if self.case.accelerator == "real" and self.config.getoption("--require-cuda", default=False):
                pytest.fail(f"--require-cuda: {result.skip_reason}", pytrace=False)
            pytest.skip(result.skip_reason)
        if not result.passed:
            raise CaseFailed(result)

    def repr_failure(self, excinfo, style=None):
        from harness.errors import HarnessError

        if isinstance(excinfo.value, CaseFailed):
            return str(excinfo.value)
        if isinstance(excinfo.value, HarnessError):  # the case file names something unusable
            return f"bad case: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        line = self.case.lines.get("", 1) - 1
        return self.path, line, f"case {self.case.name}"
