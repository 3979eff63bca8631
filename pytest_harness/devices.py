"""Devices: `--harness-device`, and the cuda marker on real CUDA or the emulated accelerator.

The marker (named by the ini option `harness_cuda_marker`, `harness_cuda` unless a project
names it; this repository calls it `cuda`): where there is a GPU the test runs on real CUDA.
Where there is none it runs on the emulated accelerator (`harness.trace.emulated.EmulatedCuda`,
entered for its setup, call and teardown, with `--harness-emulated-devices` devices), which the
terminal summary and the test's report sections say; `--harness-require-cuda` makes a missing
GPU a usage error instead. `marker(real=True)`: only real CUDA means anything (compiled Triton
kernels, comparisons with real CUDA): skipped without a GPU, never emulated.

torch is imported only when a selected test carries the marker, a fixture asks for a device, or
`--harness-device` is given.
"""

from __future__ import annotations

import contextlib
import os
import re

import pytest

from pytest_harness.options import DEVICE_CHOICES

EMULATED_NOTE = "ran on the emulated accelerator (no GPU here)"
ACCELERATOR_PROPERTY = "harness_accelerator"  # user property of a cuda test's reports
_REAL_GPUS = pytest.StashKey[int]()


def marker_name(config: pytest.Config) -> str:
    return config.getini("harness_cuda_marker").strip() or "harness_cuda"


def marker_help(name: str) -> str:
    return (
        f"{name}(real=False): needs a CUDA GPU: runs on real CUDA where there is one, else on the "
        "emulated accelerator (said in the summary); --harness-require-cuda makes a missing GPU an "
        f"error. {name}(real=True): meaningful on real CUDA only (compiled kernels, comparisons with "
        "real CUDA): skipped without a GPU, never emulated"
    )


def real_cuda_count() -> int:
    """CUDA GPUs really present (an active `EmulatedCuda` is seen through)."""
    import torch

    from harness.trace import emulated

    ctx = emulated.active()
    if ctx is not None:  # torch.cuda's queries answer for the emulation
        return torch._C._cuda_getDeviceCount() if ctx._real_cuda else 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def real_gpus(config: pytest.Config) -> int:
    """`real_cuda_count()`, asked once per session (the first time something needs it)."""
    if _REAL_GPUS not in config.stash:
        config.stash[_REAL_GPUS] = real_cuda_count()
    return config.stash[_REAL_GPUS]


def worker_index(worker: str | None = None) -> int:
    """The pytest-xdist worker's number (gw3 -> 3); 0 outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "") if worker is None else worker
    m = re.fullmatch(r"gw(\d+)", worker or "")
    return int(m.group(1)) if m else 0


def parse_device(spec: str | None, real_gpus: int, emulated_gpus: int, worker: int = 0):
    """(torch.device, emulated?) for a `--harness-device` value; ValueError with a one-line reason.

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
        raise ValueError(f"--harness-device {spec!r}: expected {DEVICE_CHOICES}")
    if not real_gpus:
        raise ValueError(
            f"--harness-device {spec}: no CUDA GPU here (use --harness-device emulated for the emulated one)"
        )
    index = worker % real_gpus if m.group(1) is None else int(m.group(1))
    if index >= real_gpus:
        raise ValueError(
            f"--harness-device {spec}: there are {real_gpus} CUDA GPUs (cuda:0..cuda:{real_gpus - 1})"
        )
    return torch.device("cuda", index), False


def emulation(config: pytest.Config):
    """A context entering the emulated accelerator, or nothing when one is already active."""
    from harness.trace import emulated

    if emulated.active() is not None:
        return contextlib.nullcontext()
    return emulated.EmulatedCuda(device_count=config.getoption("harness_emulated_devices"))


def cuda_mode(item: pytest.Item) -> str | None:
    """How a test runs: None (not a cuda test), "cuda", "emulated" or "skip"."""
    marker = item.get_closest_marker(marker_name(item.config))
    if marker is None:
        return None
    if real_gpus(item.config):
        return "cuda"
    return "skip" if marker.kwargs.get("real", False) else "emulated"


# ---- hooks ------------------------------------------------------------------------------------------


class _EmulatedCount:
    """Counts the cuda tests run emulated (on the controller, the workers' too) for the summary."""

    def __init__(self):
        self.count = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and (ACCELERATOR_PROPERTY, "emulated") in report.user_properties:
            self.count += 1

    def pytest_terminal_summary(self, terminalreporter, config: pytest.Config) -> None:
        if self.count and not hasattr(config, "workerinput"):
            n = self.count
            terminalreporter.write_line(
                f"{n} {marker_name(config)} test{'s' if n != 1 else ''} {EMULATED_NOTE}"
            )


def configure(config: pytest.Config) -> None:
    name = marker_name(config)
    config.addinivalue_line("markers", f"{name}: {marker_help(name)}")
    config.pluginmanager.register(_EmulatedCount(), "harness-emulated-count")
    if config.getoption("harness_emulated_devices") < 1:
        raise pytest.UsageError("--harness-emulated-devices: must be at least 1")
    spec = config.getoption("harness_device")
    if spec is not None:
        try:
            parse_device(spec, real_gpus(config), 1)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: "selected" means what will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    name = marker_name(config)
    marked = [item for item in items if item.get_closest_marker(name)]
    if not marked or real_gpus(config):
        return
    if config.getoption("harness_require_cuda"):
        raise pytest.UsageError(
            f"--harness-require-cuda: tests marked `{name}` were selected but no CUDA GPU is present"
        )
    skip = pytest.mark.skip(reason=f"needs real CUDA (marked {name}(real=True)); no CUDA GPU here")
    for item in marked:
        if cuda_mode(item) == "skip":
            item.add_marker(skip)


# A cuda test run emulated is inside the emulation for each of its phases: fixtures it sets up
# (a model loaded onto "cuda") and its teardown see the same devices as its body.


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    if cuda_mode(item) != "emulated":
        return (yield)
    item.user_properties.append((ACCELERATOR_PROPERTY, "emulated"))
    item.add_report_section("setup", "harness", f"this `{marker_name(item.config)}` test {EMULATED_NOTE}")
    with emulation(item.config):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if cuda_mode(item) != "emulated":
        return (yield)
    with emulation(item.config):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    if cuda_mode(item) != "emulated":
        return (yield)
    with emulation(item.config):
        return (yield)
