# The harness plugin is loaded through its pytest11 entry point once the package is
# installed; this makes a bare checkout (not installed, or installed from an older layout and
# run with `-p no:harness`) work as well.
import importlib.metadata

import pytest

if not any(
    ep.name == "harness" and ep.value == "pytest_harness.plugin"
    for ep in importlib.metadata.entry_points(group="pytest11")
):
    pytest_plugins = ["pytest_harness.plugin"]


# This repository's tests use the plugin's fixtures under short names (the plugin itself names
# them harness_* so that they never shadow a fixture of another project).
@pytest.fixture
def device(harness_device):
    return harness_device


@pytest.fixture
def tracer(harness_tracer):
    return harness_tracer


@pytest.fixture
def tiny_mixtral(harness_tiny_mixtral):
    return harness_tiny_mixtral


@pytest.fixture
def mixtral_gguf(harness_mixtral_gguf):
    return harness_mixtral_gguf
