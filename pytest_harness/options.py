"""Every option of the plugin: `--harness-*` on the command line, `harness_*` in the ini file.

A project that uses the plugin keeps its own option and fixture names: nothing here is named
`--device` or `device`, and nothing is read from the project unless an option says so.
"""

from __future__ import annotations

import pytest

GROUP = ("harness", "device-consistency harness (pytest_harness)")
DEVICE_CHOICES = "cpu, cuda, cuda:N or emulated"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(*GROUP)
    group.addoption(
        "--harness-device",
        dest="harness_device",
        default=None,
        metavar="DEVICE",
        help=f"device of the `harness_device` fixture: {DEVICE_CHOICES} (default: cuda if there is a "
        "GPU, else cpu; in a cuda test run emulated, the emulated cuda)",
    )
    group.addoption(
        "--harness-report",
        dest="harness_report",
        default=None,
        metavar="PATH",
        help="write one HTML report to PATH at the end of the session, from the traces the "
        "`harness_tracer` fixture recorded (named by test id); merged across pytest-xdist workers",
    )
    group.addoption(
        "--harness-require-cuda",
        dest="harness_require_cuda",
        action="store_true",
        default=False,
        help="make selected cuda tests a usage error, rather than emulated or skipped, when no CUDA "
        "GPU is present",
    )
    group.addoption(
        "--harness-emulated-devices",
        dest="harness_emulated_devices",
        type=int,
        default=2,
        metavar="N",
        help="CUDA devices of the emulated accelerator (cuda:0..cuda:N-1; default 2)",
    )
    group.addoption(
        "--harness-no-cases",
        dest="harness_no_cases",
        action="store_true",
        default=False,
        help="do not collect YAML case files, even from the paths `harness_cases` names",
    )
    parser.addini(
        "harness_cases",
        type="paths",
        default=[],
        help="folders (or files) whose YAML case files (declaring `schema: harness-case/1`) are "
        "collected as tests, relative to the ini file; none by default",
    )
    parser.addini(
        "harness_cases_output",
        default="reports/cases",
        help="where case tests write their traces, relative to the rootdir (default reports/cases)",
    )
    parser.addini(
        "harness_cuda_marker",
        default="harness_cuda",
        help="name of the marker that runs a test on CUDA or the emulated accelerator (default "
        "harness_cuda; this repository uses cuda)",
    )
    parser.addini(
        "harness_hypothesis_profile",
        default="",
        help="hypothesis profile to load: harness-ci, harness-dev, harness-nightly, or auto "
        "(harness-ci where the CI variable is set, else harness-dev); unset: hypothesis's own choice",
    )
