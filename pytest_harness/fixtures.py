"""Fixtures, all named `harness_*` so that none shadows a project's own (`device`, `tracer`).

`harness_device`, `harness_tracer`, `harness_tiny_mixtral`, `harness_mixtral_gguf`: their
docstrings say more. A project that wants shorter names aliases them in its conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_harness import devices, merge


@pytest.fixture
def harness_device(request: pytest.FixtureRequest):
    """The `torch.device` tests run on: `--harness-device`, else cuda where there is a GPU, else cpu.

    In a cuda test run on the emulated accelerator the default is the emulated cuda. Under
    pytest-xdist, `cuda` (and `emulated`) is `cuda:{worker index % device count}`: with several
    GPUs each worker has its own. With `--harness-device emulated` the test runs inside the
    emulation."""
    from harness.trace import emulated

    config = request.config
    spec = config.getoption("harness_device")
    if spec is None and emulated.active() is not None and devices.cuda_mode(request.node) == "emulated":
        spec = "emulated"
    dev, emulate = devices.parse_device(
        spec,
        devices.real_gpus(config),
        config.getoption("harness_emulated_devices"),
        devices.worker_index(),
    )
    if not emulate:
        yield dev
        return
    with devices.emulation(config):
        yield dev


@pytest.fixture(scope="session")
def _harness_tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"dir": tmp_path_factory.mktemp("tiny-mixtral"), "files": {}}


@pytest.fixture
def harness_tiny_mixtral(harness_device, _harness_tiny_files):
    """A factory: `harness_tiny_mixtral(layout="per-expert", router="f16", ...)` -> a loaded `Mixtral`.

    Synthesizes a tiny GGUF (`harness.synth.synthesize`; each combination of `config`,
    `file_type`, `layout`, `router`, `seed` once per session) and loads it, fresh each call, on
    the `harness_device` fixture's device (or `on=`; other keyword arguments go to
    `Mixtral.from_gguf`). The defaults are the candle#1815 setting: TheBloke's per-expert layout
    with an F16 router."""
    from harness.model.mixtral import Mixtral
    from harness.synth import synthesize

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
        target = on if on is not None or placed else harness_device
        return Mixtral.from_gguf(files[key], device=target, max_seq_len=max_seq_len, **kwargs)

    return load


@pytest.fixture
def harness_tracer(request: pytest.FixtureRequest):
    """A factory: `with harness_tracer(model) as t: model(tokens)` -> a `harness.trace.Tracer`.

    Its JSON Lines trace goes to the session's trace folder (or `path=`), its header names the
    test, and `--harness-report` puts it in the report under the test id (`name=` adds a label,
    e.g. "clean" and "candle-1815"). Other keyword arguments go to `Tracer`. At teardown each
    trace's verdict and first offence become JUnit XML properties (`harness_verdict`, ...)."""
    from harness.trace import Tracer

    trace_session = merge.session(request.config)
    nodeid = request.node.nodeid
    made: list = []

    def make(model=None, placement=None, *, name: str | None = None, path=None, header=None, **kwargs):
        path = Path(path) if path is not None else trace_session.trace_path(nodeid)
        head = {"test": nodeid, **({"label": name} if name else {}), **(header or {})}
        t = Tracer(model, placement, path=path, header=head, **kwargs)
        trace_session.register(nodeid, name, path)
        made.append((name, t))
        return t

    yield make
    from pytest_harness.assertions import record_verdicts

    # What `record_property` does, without its warning under junit_family xunit2 (the default).
    record_verdicts(lambda name, value: request.node.user_properties.append((name, value)), made)


@pytest.fixture(scope="session")
def harness_mixtral_gguf() -> Path:
    """The real Mixtral GGUF named by `HARNESS_GGUF`: skipped when unset, failed when missing."""
    value = os.environ.get("HARNESS_GGUF", "").strip()
    if not value:
        pytest.skip("HARNESS_GGUF is not set (the path of a real Mixtral GGUF file)")
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        pytest.fail(f"HARNESS_GGUF={value}: {what}", pytrace=False)
    return path
