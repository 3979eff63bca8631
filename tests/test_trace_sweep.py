"""The sweeps over PyTorch's databases as regression tests.

On GPU runners (`cuda(real=True)`, slow) each whole sweep runs as its script does: over the OpInfo
database (`scripts/sweep_device_rules.py`) and the module database (`scripts/sweep_modules.py`),
real CUDA, the emulation and the tracer agree on every call in every grad mode, but for the
differences the scripts list as known (`HARNESS_SWEEP_RESULTS=DIR` keeps each sweep's JSON). In CI a small subset of each runs on the emulation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    """A sweep script as a module (its shared part, sweep_common, beside it)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def _run(script: str, *args: str, out: Path) -> dict:
    workers = str(max(1, min(12, (os.cpu_count() or 2) - 2)))
    cmd = [
        sys.executable,
        str(SCRIPTS / script),
        "--backend",
        "both",
        "--workers",
        workers,
        *args,
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, timeout=540, capture_output=True)
    keep = os.environ.get("HARNESS_SWEEP_RESULTS")  # a folder to keep the sweep's JSON in
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / out.name).write_text(out.read_text())
    return json.loads(out.read_text())


def _check_agreement(result: dict) -> None:
    """A whole sweep finished, in the three grad modes, with nothing but known differences."""
    assert not result["timed_out"]
    assert set(result["by_grad_mode"]) == {"inference_mode", "no_grad", "grad"}
    assert result["disagreements"] == [], json.dumps(result["disagreements"][:5], indent=1)
    assert result["grad_mode_differences"] == [], json.dumps(result["grad_mode_differences"][:5], indent=1)


@pytest.mark.cuda(real=True)
@pytest.mark.slow
def test_opinfo_sweep_agrees_with_real_cuda(tmp_path):
    pytest.importorskip("expecttest", reason="PyTorch's OpInfo database imports expecttest")
    result = _run("sweep_device_rules.py", "--deadline", "420", out=tmp_path / "sweep_device_rules.json")
    assert result["ops"] > 500 and result["compared"] > 15000
    _check_agreement(result)


@pytest.mark.cuda(real=True)
@pytest.mark.slow
def test_module_sweep_agrees_with_real_cuda(tmp_path):
    pytest.importorskip("expecttest", reason="PyTorch's module database imports expecttest")
    result = _run("sweep_modules.py", "--deadline", "330", out=tmp_path / "sweep_modules.json")
    assert result["modules"] > 100 and result["compared"] > 2900  # 2,982 on torch 2.11
    _check_agreement(result)


def test_opinfo_subset_on_the_emulation():
    """A few ops in the three grad modes: the emulation and the tracer's rule agree, and neither
    depends on the grad mode."""
    pytest.importorskip("expecttest", reason="PyTorch's OpInfo database imports expecttest")
    sweep = _script("sweep_device_rules")
    common = _script("sweep_common")
    records = [
        sweep.sweep_op(op, dtype, "emulated") for op, dtype in sweep._ops(["add", "where", "index_put"])
    ]
    summary = common.summarize(records, {}, sweep._same("devices", "emulated"))
    assert summary["ops"] == 3 and set(summary["by_grad_mode"]) == {"inference_mode", "no_grad", "grad"}
    assert summary["compared"] > 100 and summary["agree"] == summary["compared"], summary["disagreements"][:3]
    assert summary["grad_mode_differences"] == []
    verdicts = {v["emulated"] for r in records for v in r["variants"]}
    assert verdicts == {"accepts", "refuses"}


def test_module_subset_on_the_emulation(monkeypatch):
    """A few modules: with everything on the device they run on the emulation (forward, and
    backward with grad) wherever they run on the CPU; with a tensor on the CPU the emulation and
    the tracer's rule agree; no verdict depends on the grad mode."""
    pytest.importorskip("expecttest", reason="PyTorch's module database imports expecttest")
    monkeypatch.setenv("SWEEP_SAMPLES", "1")
    sweep = _script("sweep_modules")
    common = _script("sweep_common")
    records = [
        sweep.sweep_module(info, "emulated") for info in sweep._modules(["nn.MultiheadAttention", "nn.LSTM"])
    ]
    summary = common.summarize(records, {}, sweep._same("emulated"))
    assert summary["ops"] == 2 and summary["compared"] > 30
    assert summary["agree"] == summary["compared"], summary["disagreements"][:3]
    assert summary["grad_mode_differences"] == []
    all_on_device = [v for r in records for v in r["variants"] if not v["on_cpu"]]
    assert all_on_device and all(v["emulated"] == "accepts" for v in all_on_device)
    assert any(v["backward"] for v in all_on_device)
    assert any(
        v["emulated"] == "refuses" and v["tracer"] == "refuses" for r in records for v in r["variants"]
    )
