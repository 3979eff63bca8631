"""The session's traces and the one HTML report made from them (`--harness-report PATH`): those
of the `harness_tracer` fixture (in a folder of the session's) and of YAML cases (where
`harness_cases_output` puts them), each registered under its test id.

pytest-xdist: the controller makes a folder and hands it to the workers (`workerinput`); each
worker writes its traces there and, after every trace it starts, rewrites its part (a small JSON
file: trace paths, test ids, outcomes), so a worker that dies mid-run still leaves what it
recorded. The controller merges the parts into one report at `pytest_sessionfinish`, with each
test's outcome and duration (from the reports the workers send back) beside its verdict.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

_PARTS_KEY = "harness_parts_dir"  # workerinput key: the folder shared with the controller


class TraceSession:
    """The traces one session records (one per process: controller or xdist worker)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.workerinput = getattr(config, "workerinput", None)
        self.worker = self.workerinput.get("workerid") if self.workerinput else None
        self.report_path = config.getoption("harness_report")
        self._dir = Path(self.workerinput[_PARTS_KEY]) if self.workerinput else None
        self.owns_dir = self.workerinput is None
        self.records: list[dict] = []  # {"test", "name", "path"} in the order traces were started
        self.outcomes: dict[str, dict] = {}  # test id -> {"outcome", "duration"}
        self.report_line: str | None = None

    @property
    def dir(self) -> Path:
        """The folder of traces and parts, made on first use (a session that traces nothing has none)."""
        if self._dir is None:
            import tempfile  # here, not at the top: a session that traces nothing never pays for it

            self._dir = Path(tempfile.mkdtemp(prefix="harness-pytest-"))
        return self._dir

    # -- hooks (this object is registered as a plugin for the session) ---------------------------

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        """pytest-xdist, on the controller: tell a worker where to write its part."""
        node.workerinput[_PARTS_KEY] = str(self.dir)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Each test's outcome and duration (on the controller the workers' reports come here too)."""
        if self.report_path is None or self.worker is not None:
            return
        entry = self.outcomes.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0})
        entry["duration"] += report.duration
        if report.failed:
            if report.when == "call":
                entry["outcome"] = "failed"
            elif entry["outcome"] != "failed":
                entry["outcome"] = "error"
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
        if report.when == "call" and hasattr(report, "wasxfail"):
            entry["outcome"] = "xfailed" if report.skipped else "xpassed"

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker is not None:
            if self.records:
                self.write_part()
        elif self.report_path is not None:
            self.build_report()

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.worker is None and self.report_line:
            terminalreporter.write_line(self.report_line)

    # -- traces ------------------------------------------------------------------------------------

    @property
    def part_path(self) -> Path:
        return self.dir / f"part-{self.worker or 'main'}.json"

    def trace_path(self, nodeid: str) -> Path:
        folder = self.dir / (self.worker or "main")
        folder.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-80:].strip("_") or "test"
        return folder / f"{len(self.records):05d}-{slug}.jsonl"

    def register(self, test: str, name: str | None, path: Path) -> None:
        self.records.append({"test": test, "name": name, "path": str(path)})
        if self.worker is not None:
            self.write_part()

    def write_part(self) -> None:
        """This worker's part, replaced atomically: whatever happens next, the last one is whole."""
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=self.dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"worker": self.worker, "traces": self.records}, f)
        os.replace(tmp, self.part_path)

    def all_records(self) -> tuple[list[dict], list[str]]:
        """Every record of the session: this process's and every worker's part; problems found."""
        records, problems = list(self.records), []
        if self._dir is None:
            return records, problems
        for part in sorted(self._dir.glob("part-*.json")):
            try:
                records.extend(json.loads(part.read_text(encoding="utf-8"))["traces"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problems.append(f"{part.name}: unreadable part ({exc})")
        return records, problems

    def build_report(self) -> None:
        from harness.errors import HarnessError
        from harness.report.build import build_report
        from harness.trace import load_trace

        records, problems = self.all_records()
        traces, names, outcomes, tests, seen = [], [], [], set(), {}
        for rec in sorted(records, key=lambda r: r["test"]):
            path = Path(rec["path"])
            if not path.is_file() or path.stat().st_size == 0:
                continue  # a tracer made but never entered (or a worker that died first)
            try:
                trace = load_trace(path)
                trace.header  # noqa: B018 (read now: a garbled file is skipped, not fatal)
            except (HarnessError, OSError, ValueError) as exc:
                problems.append(f"{rec['test']}: trace skipped ({exc})")
                continue
            label = rec["test"] if not rec.get("name") else f"{rec['test']} [{rec['name']}]"
            seen[label] = seen.get(label, 0) + 1
            names.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
            traces.append(trace)
            outcomes.append(self.outcomes.get(rec["test"]))
            tests.add(rec["test"])
        if not traces:
            self.report_line = (
                "no traces were recorded (by the `harness_tracer` fixture or a YAML case): no report written"
            )
            return
        title = f"pytest report: {len(traces)} traces from {len(tests)} tests"
        try:
            out = build_report(
                traces,
                self.report_path,
                title=title,
                names=names,
                tests=outcomes,
                command=_command_line(self.config),
            )
        except HarnessError as exc:
            self.report_line = f"harness report not written: {exc}"
            return
        self.report_line = f"harness report: {out} ({len(traces)} traces from {len(tests)} tests)"
        if problems:
            self.report_line += "; " + "; ".join(problems)


def _command_line(config: pytest.Config) -> str:
    """The command as it was run: `pytest` and its arguments as typed."""
    import shlex

    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "pytest"
    if prog in ("__main__.py", "pytest", "py.test") or prog.startswith("pytest"):
        prog = "pytest" if prog != "__main__.py" else "python -m pytest"
    return " ".join([prog, *map(shlex.quote, config.invocation_params.args)])


_SESSION = pytest.StashKey[TraceSession]()


def session(config: pytest.Config) -> TraceSession:
    return config.stash[_SESSION]


def configure(config: pytest.Config) -> None:
    trace_session = config.stash[_SESSION] = TraceSession(config)
    config.pluginmanager.register(trace_session, "harness-trace-session")
    if trace_session.report_path is not None and trace_session.worker is None:
        from harness.errors import HarnessError
        from harness.report.build import check_report_path

        try:
            trace_session.report_path = str(check_report_path(trace_session.report_path))
        except HarnessError as exc:
            raise pytest.UsageError(f"--harness-report: {exc}") from None


def unconfigure(config: pytest.Config) -> None:
    trace_session = config.stash.get(_SESSION, None)
    if trace_session is None:
        return
    config.pluginmanager.unregister(trace_session)
    if trace_session.owns_dir and trace_session._dir is not None:
        import shutil

        shutil.rmtree(trace_session._dir, ignore_errors=True)
