"""pytest plugin (entry point `pytest11: harness`): markers, options, fixtures, the mismatch report.

Markers (registered in `pytest_configure`):
- `cuda`: needs a CUDA GPU. Where there is one the test runs on real CUDA. Where there is none it
  runs on the emulated accelerator (`harness.trace.emulated.EmulatedCuda`, entered for its setup,
  call and teardown, with `--emulated-devices` devices), which the terminal summary and the test's
  report sections say; `--require-cuda` makes a missing GPU a usage error instead.
  `cuda(real=True)`: only real CUDA means anything (compiled Triton kernels, comparisons with
  real CUDA): skipped without a GPU, never emulated. `-m cuda` selects both kinds.
- `slow`, `llamacpp` (see MARKERS).

Options (group "harness"): `--device` (the `device` fixture's device), `--mismatch-report PATH`
(one HTML report at session end from every trace the `tracer` fixture recorded, named by test
id), `--require-cuda`, `--emulated-devices N`.

Fixtures: `device`, `tracer`, `tiny_mixtral`, `mixtral_gguf` (their docstrings say more).

pytest-xdist: the controller makes a folder and hands it to the workers (`workerinput`); each
worker writes its traces there and, after every trace it starts, rewrites its part (a small JSON
file: trace paths and test ids), so a worker that dies mid-run still leaves what it recorded.
The controller merges the parts into one report at `pytest_sessionfinish`. With several real GPUs
worker gwN's `device` is `cuda:{N % device_count}`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

MARKERS = {
    "cuda": "cuda(real=False): needs a CUDA GPU: runs on real CUDA where there is one, else on the "
    "emulated accelerator (said in the summary); --require-cuda makes a missing GPU an error. "
    "cuda(real=True): meaningful on real CUDA only (compiled kernels, comparisons with real CUDA): "
    "skipped without a GPU, never emulated",
    "slow": "takes more than a few seconds",
    "llamacpp": "cross-checks against llama.cpp through llama-cpp-python; skipped when it is absent",
}

DEVICE_CHOICES = "cpu, cuda, cuda:N or emulated"
EMULATED_NOTE = "ran on the emulated accelerator (no GPU here)"
_OPTION_GROUP = ("harness", "device-consistency harness")  # every option of the plugin is in it
_PROPERTY = "harness_accelerator"  # user property of a cuda test's reports: "cuda" or "emulated"
_PARTS_KEY = "harness_parts_dir"  # workerinput key: the folder shared with the controller


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(*_OPTION_GROUP)
    group.addoption(
        "--device",
        dest="harness_device",
        default=None,
        metavar="DEVICE",
        help=f"device of the `device` fixture: {DEVICE_CHOICES} (default: cuda if there is a GPU, else "
        "cpu; in a `cuda` test run emulated, the emulated cuda)",
    )
    group.addoption(
        "--mismatch-report",
        dest="harness_mismatch_report",
        default=None,
        metavar="PATH",
        help="write one HTML report to PATH at the end of the session, from the traces the `tracer` "
        "fixture recorded (named by test id); merged across pytest-xdist workers",
    )
    group.addoption(
        "--require-cuda",
        action="store_true",
        default=False,
        help="make `cuda` tests a usage error, rather than emulated or skipped, when no CUDA GPU is present",
    )
    group.addoption(
        "--emulated-devices",
        dest="harness_emulated_devices",
        type=int,
        default=2,
        metavar="N",
        help="CUDA devices of the emulated accelerator (cuda:0..cuda:N-1; default 2)",
    )
    _add_case_options(parser)


# ---- devices --------------------------------------------------------------------------------------


def real_cuda_count() -> int:
    """CUDA GPUs really present (an active `EmulatedCuda` is seen through)."""
    import torch

    from harness.trace import emulated

    ctx = emulated.active()
    if ctx is not None:  # torch.cuda's queries answer for the emulation
        return torch._C._cuda_getDeviceCount() if ctx._real_cuda else 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_index(worker: str | None = None) -> int:
    """The pytest-xdist worker's number (gw3 -> 3); 0 outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "") if worker is None else worker
    m = re.fullmatch(r"gw(\d+)", worker or "")
    return int(m.group(1)) if m else 0


def parse_device(spec: str | None, real_gpus: int, emulated_gpus: int, worker: int = 0):
    """(torch.device, emulated?) for a `--device` value; ValueError with a one-line reason.

    `cuda` (and the default, where there is a GPU) picks `cuda:{worker % GPUs}`, so each xdist
    worker has its own GPU; `emulated` does the same over the emulated devices."""
    import torch

    if spec is None:
        spec = "cuda" if real_gpus else "cpu"
    spec = spec.strip().lower()
    if spec == "cpu":
        return torch.device("cpu"), False
    if spec == "emulated":
        return torch.device("cuda", worker % emulated_gpus), True
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not m:
        raise ValueError(f"--device {spec!r}: expected {DEVICE_CHOICES}")
    if not real_gpus:
        raise ValueError(f"--device {spec}: no CUDA GPU here (use --device emulated for the emulated one)")
    index = worker % real_gpus if m.group(1) is None else int(m.group(1))
    if index >= real_gpus:
        raise ValueError(f"--device {spec}: there are {real_gpus} CUDA GPUs (cuda:0..cuda:{real_gpus - 1})")
    return torch.device("cuda", index), False


def _emulation(config: pytest.Config):
    """A context entering the emulated accelerator, or nothing when one is already active."""
    from harness.trace import emulated

    if emulated.active() is not None:
        return contextlib.nullcontext()
    return emulated.EmulatedCuda(device_count=config.getoption("harness_emulated_devices"))


def _cuda_mode(item: pytest.Item) -> str | None:
    """How a test runs: None (not a `cuda` test), "cuda", "emulated" or "skip"."""
    marker = item.get_closest_marker("cuda")
    if marker is None:
        return None
    state = _state(item.config)
    if state.real_gpus:
        return "cuda"
    return "skip" if marker.kwargs.get("real", False) else "emulated"


# ---- session state: traces recorded, the mismatch report --------------------------------------------


class _State:
    """What the plugin keeps for one session (one per process: controller or xdist worker)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.real_gpus = real_cuda_count()
        self.workerinput = getattr(config, "workerinput", None)
        self.worker = self.workerinput.get("workerid") if self.workerinput else None
        self.report_path = config.getoption("harness_mismatch_report", default=None)
        shared = self.workerinput.get(_PARTS_KEY) if self.workerinput else None
        self.owns_dir = shared is None
        self.dir = Path(shared) if shared else Path(tempfile.mkdtemp(prefix="harness-pytest-"))
        self.records: list[dict] = []  # {"test", "name", "path"} in the order traces were started
        self.emulated_tests = 0
        self.report_line: str | None = None

    # -- hooks (this object is registered as a plugin for the session) ---------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # On the controller this sees the workers' reports too: user properties travel with them.
        if report.when == "call" and (_PROPERTY, "emulated") in report.user_properties:
            self.emulated_tests += 1

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker is not None:
            if self.records:
                self.write_part()
        elif self.report_path is not None:
            self.build_report()

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.worker is not None:
            return
        if self.emulated_tests:
            n = self.emulated_tests
            terminalreporter.write_line(f"{n} cuda test{'s' if n != 1 else ''} {EMULATED_NOTE}")
        if self.report_line:
            terminalreporter.write_line(self.report_line)

    @property
    def part_path(self) -> Path:
        return self.dir / f"part-{self.worker or 'main'}.json"

    def trace_path(self, nodeid: str) -> Path:
        folder = self.dir / (self.worker or "main")
        folder.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-80:].strip("_") or "test"
        return folder / f"{len(self.records):05d}-{slug}.jsonl"

    def register(self, test: str, name: str, path: Path) -> None:
        self.records.append({"test": test, "name": name, "path": str(path)})
        if self.worker is not None:
            self.write_part()

    def write_part(self) -> None:
        """This worker's part, replaced atomically: whatever happens next, the last one is whole."""
        fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=self.dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"worker": self.worker, "traces": self.records}, f)
        os.replace(tmp, self.part_path)

    def all_records(self) -> tuple[list[dict], list[str]]:
        """Every record of the session: this process's and every worker's part; problems found."""
        records, problems = list(self.records), []
        for part in sorted(self.dir.glob("part-*.json")):
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
        traces, names, seen, tests = [], [], {}, set()
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
            tests.add(rec["test"])
        if not traces:
            self.report_line = "no traces were recorded by the `tracer` fixture: no mismatch report written"
            return
        title = f"pytest mismatch report: {len(traces)} traces from {len(tests)} tests"
        try:
            out = build_report(traces, self.report_path, title=title, names=names)
        except HarnessError as exc:
            self.report_line = f"mismatch report not written: {exc}"
            return
        self.report_line = f"mismatch report: {out} ({len(traces)} traces from {len(tests)} tests)"
        if problems:
            self.report_line += "; " + "; ".join(problems)


_STATE = pytest.StashKey[_State]()


def _state(config: pytest.Config) -> _State:
    return config.stash[_STATE]


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if config.getoption("harness_emulated_devices", default=2) < 1:
        raise pytest.UsageError("--emulated-devices: must be at least 1")
    state = config.stash[_STATE] = _State(config)
    config.pluginmanager.register(state, "harness-session")
    try:
        parse_device(config.getoption("harness_device", default=None), state.real_gpus, 1)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if state.report_path is not None and state.worker is None:
        from harness.errors import HarnessError
        from harness.report.build import check_report_path

        try:
            state.report_path = str(check_report_path(state.report_path))
        except HarnessError as exc:
            raise pytest.UsageError(f"--mismatch-report: {exc}") from None


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    config.pluginmanager.unregister(state)
    if state.owns_dir:
        shutil.rmtree(state.dir, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist, on the controller: tell a worker where to write its part."""
    node.workerinput[_PARTS_KEY] = str(_state(node.config).dir)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: "selected" means what will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _state(config).real_gpus:
        return
    if config.getoption("--require-cuda"):
        if any(item.get_closest_marker("cuda") for item in items):
            raise pytest.UsageError(
                "--require-cuda: tests marked `cuda` were selected but no CUDA GPU is present"
            )
        return
    skip = pytest.mark.skip(reason="needs real CUDA (marked cuda(real=True)); no CUDA GPU here")
    for item in items:
        if _cuda_mode(item) == "skip":
            item.add_marker(skip)


# A `cuda` test run emulated is inside the emulation for each of its phases: fixtures it sets up
# (a model loaded onto "cuda") and its teardown see the same devices as its body.


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    if _cuda_mode(item) != "emulated":
        return (yield)
    item.user_properties.append((_PROPERTY, "emulated"))
    item.add_report_section("setup", "harness", f"this `cuda` test {EMULATED_NOTE}")
    with _emulation(item.config):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if _cuda_mode(item) != "emulated":
        return (yield)
    with _emulation(item.config):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    if _cuda_mode(item) != "emulated":
        return (yield)
    with _emulation(item.config):
        return (yield)


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def device(request: pytest.FixtureRequest):
    """The `torch.device` tests run on: `--device`, else cuda where there is a GPU, else cpu.

    In a `cuda` test run on the emulated accelerator the default is the emulated cuda. Under
    pytest-xdist, `cuda` (and `emulated`) is `cuda:{worker index % device count}`: with several
    GPUs each worker has its own. With `--device emulated` the test runs inside the emulation."""
    from harness.trace import emulated

    config = request.config
    spec = config.getoption("harness_device", default=None)
    if spec is None and emulated.active() is not None and _cuda_mode(request.node) == "emulated":
        spec = "emulated"
    dev, emulate = parse_device(
        spec, _state(config).real_gpus, config.getoption("harness_emulated_devices"), worker_index()
    )
    if not emulate:
        yield dev
        return
    with _emulation(config):
        yield dev


@pytest.fixture(scope="session")
def _harness_tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"dir": tmp_path_factory.mktemp("tiny-mixtral"), "files": {}}


@pytest.fixture
def tiny_mixtral(request: pytest.FixtureRequest, device, _harness_tiny_files):
    """A factory: `tiny_mixtral(layout="per-expert", router="f16", ...)` -> a loaded `Mixtral`.

    Synthesizes a tiny GGUF (`harness.synth.synthesize`; each combination of `config`,
    `file_type`, `layout`, `router`, `seed` once per session) and loads it, fresh each call, on
    the `device` fixture's device (or `on=`; other keyword arguments go to `Mixtral.from_gguf`).
    The defaults are the candle#1815 setting: TheBloke's per-expert layout with an F16 router."""
    from harness.model.mixtral import Mixtral
    from harness.synth import synthesize

    default_device = device

    def load(
        config: str = "tiny",
        *,
        layout: str = "per-expert",
        router: str = "f16",
        file_type: str = "Q4_K_M",
        seed: int = 0,
        on=None,
        max_seq_len: int = 64,
        **kwargs,
    ) -> Mixtral:
        key = (config, file_type, layout, router, seed)
        files = _harness_tiny_files["files"]
        if key not in files:
            name = "-".join(map(str, key)) + ".gguf"
            files[key] = synthesize(
                _harness_tiny_files["dir"] / name, config, file_type, layout, router, seed
            )
        placed = "device_map" in kwargs or "n_gpu_layers" in kwargs  # they place it themselves
        target = on if on is not None or placed else default_device
        return Mixtral.from_gguf(files[key], device=target, max_seq_len=max_seq_len, **kwargs)

    return load


@pytest.fixture
def tracer(request: pytest.FixtureRequest):
    """A factory: `with tracer(model) as t: model(tokens)` -> a `harness.trace.Tracer`.

    Its JSON Lines trace goes to the session's trace folder (or `path=`), its header names the
    test, and `--mismatch-report` puts it in the report under the test id (`name=` adds a label,
    e.g. "clean" and "candle-1815"). Other keyword arguments go to `Tracer`."""
    from harness.trace import Tracer

    state = _state(request.config)
    nodeid = request.node.nodeid

    def make(model=None, placement=None, *, name: str | None = None, path=None, header=None, **kwargs):
        path = Path(path) if path is not None else state.trace_path(nodeid)
        head = {"test": nodeid, **({"label": name} if name else {}), **(header or {})}
        t = Tracer(model, placement, path=path, header=head, **kwargs)
        state.register(nodeid, name, path)
        return t

    return make


@pytest.fixture(scope="session")
def mixtral_gguf() -> Path:
    """The real Mixtral GGUF named by `HARNESS_GGUF`: skipped when unset, failed when missing."""
    value = os.environ.get("HARNESS_GGUF", "").strip()
    if not value:
        pytest.skip("HARNESS_GGUF is not set (the path of a real Mixtral GGUF file)")
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        pytest.fail(f"HARNESS_GGUF={value}: {what}", pytrace=False)
    return path


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
# reports expected against got; `accelerator: real` cases are marked `cuda(real=True)`.

_CASE_KEYS = None  # the compiled pattern, made on first use


def _add_case_options(parser: pytest.Parser) -> None:
    group = parser.getgroup(*_OPTION_GROUP)
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
            item.add_marker(pytest.mark.cuda(real=True))  # never emulated: it says real
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
