"""YAML case files collected as tests, from the paths the ini option `harness_cases` names only.

A file is collected when it lies under one of those paths, ends in .yaml/.yml and declares the
case schema (a top-level `schema: harness-case/1`); it becomes one test named by its case:
`cases/foo.yaml::foo`. Nothing else is read: with `harness_cases` unset (the default) the
plugin never opens a project's YAML. A declared file that is broken fails collection with its
`file:line: key: problem`. `--harness-no-cases` turns collection off. Traces go to
`harness_cases_output` (default reports/cases, relative to the rootdir) and into the session's
`--harness-report`, beside the `harness_tracer` fixture's. A case that fails
reports expected against got; `accelerator: real` cases get the cuda marker with real=True.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_harness import merge

# The declaration `harness.cases.loader.declares_schema` looks for (checked here on the text,
# so that deciding costs no import of harness); tests/test_plugin.py keeps the two in step.
SCHEMA_FAMILY = "harness-case"
_DECLARATION = re.compile(r"^schema[ \t]*:[ \t]*[\"']?" + re.escape(SCHEMA_FAMILY) + "/", re.MULTILINE)
SUFFIXES = (".yaml", ".yml")


def case_paths(config: pytest.Config) -> list[Path]:
    if config.getoption("harness_no_cases"):
        return []
    return [Path(p) for p in config.getini("harness_cases")]


def is_case_file(path, config: pytest.Config) -> bool:
    """Whether pytest collects `path` as a case file (the rule above)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        return False
    roots = case_paths(config)
    if not any(path == root or path.is_relative_to(root) for root in roots):
        return False
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return _DECLARATION.search(text) is not None


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if is_case_file(file_path, parent.config):
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
        from pytest_harness.devices import marker_name

        try:
            shown = self.path.relative_to(self.config.rootpath)
        except ValueError:
            shown = self.path
        try:
            case = load_case(self.path, shown_as=str(shown))
        except CaseError as exc:
            raise self.CollectError(f"malformed case file: {exc}") from None
        item = CaseItem.from_parent(self, name=case.name, case=case)
        if case.accelerator == "real":  # never emulated: it says real
            item.add_marker(getattr(pytest.mark, marker_name(self.config))(real=True))
        if case.model.missing_variable():  # a skip mark, so that -rs names the case file, not this module
            item.add_marker(pytest.mark.skip(reason=case.model.missing_variable()))
        yield item


class CaseItem(pytest.Item):
    """One YAML case, run by `harness.cases.run_case`."""

    def __init__(self, *, case, **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.result = None

    def runtest(self) -> None:
        from harness.cases import run_case

        output = self.config.getini("harness_cases_output")
        result = self.result = run_case(self.case, out_dir=self.config.rootpath / output)
        if result.trace_path is not None:
            self.user_properties.append(("trace", str(result.trace_path)))
            merge.session(self.config).register(self.nodeid, None, result.trace_path)  # --harness-report
        if result.summary is not None:
            self.user_properties.append(("harness_verdict", result.summary["verdict"]))
        if result.skipped:
            if self.case.accelerator == "real" and self.config.getoption("harness_require_cuda"):
                pytest.fail(f"--harness-require-cuda: {result.skip_reason}", pytrace=False)
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
