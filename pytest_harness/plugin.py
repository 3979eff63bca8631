"""The module pytest loads (entry point `pytest11: harness`; `-p no:harness` turns it off).

It gathers the hooks and fixtures of the modules of `pytest_harness` (see there). Importing it
imports pytest and the standard library only.
"""

import pytest

from pytest_harness import devices, merge, profiles
from pytest_harness.assertions import pytest_assertrepr_compare
from pytest_harness.cases import pytest_collect_file
from pytest_harness.devices import (
    pytest_collection_modifyitems,
    pytest_runtest_call,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)
from pytest_harness.fixtures import (
    _harness_tiny_files,
    harness_device,
    harness_mixtral_gguf,
    harness_tiny_mixtral,
    harness_tracer,
)
from pytest_harness.options import pytest_addoption

__all__ = [
    "_harness_tiny_files",
    "harness_device",
    "harness_mixtral_gguf",
    "harness_tiny_mixtral",
    "harness_tracer",
    "pytest_addoption",
    "pytest_assertrepr_compare",
    "pytest_collect_file",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_runtest_call",
    "pytest_runtest_setup",
    "pytest_runtest_teardown",
    "pytest_unconfigure",
]


@pytest.hookimpl(tryfirst=True)  # before hypothesis's plugin loads `--hypothesis-profile`
def pytest_configure(config: pytest.Config) -> None:
    profiles.configure(config)
    devices.configure(config)
    merge.configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    merge.unconfigure(config)
