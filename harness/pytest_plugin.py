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
