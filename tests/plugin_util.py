"""How tests start pytest sessions of their own (pytester) with this checkout's plugin loaded."""

from __future__ import annotations

import contextlib
import importlib.metadata

# pytester's in-process runs remove the modules a run imported when it ends. Two that a run may
# import cannot be imported twice in one process: triton's C extension aborts it (nanobind:
# "refusing to add duplicate key"), and torch._dynamo (imported by torch on first use) registers
# a TORCH_LIBRARY again. They are imported once here, before any such run.
import torch._dynamo  # noqa: E402, F401

with contextlib.suppress(ImportError):
    import triton  # noqa: F401

PLUGIN = "pytest_harness.plugin"


def plugin_installed() -> bool:
    """Whether pytest loads this plugin by itself: an installed `harness` entry point naming it
    (a stale install naming another module is turned off and the module loaded by name)."""
    return any(
        ep.name == "harness" and ep.value == PLUGIN
        for ep in importlib.metadata.entry_points(group="pytest11")
    )


def plugin_args() -> list[str]:
    """pytest arguments: the plugin, and no benchmark plugin (a system one may be visible)."""
    load = [] if plugin_installed() else ["-p", "no:harness", "-p", PLUGIN]
    return ["-p", "no:benchmark", *load]
