"""The OpInfo sweep (`scripts/sweep_device_rules.py`) as a regression test on GPU runners: over
PyTorch's whole op database, real CUDA, the emulation and the tracer agree on every call where a
tensor argument is on the CPU, but for the differences the script lists as known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cuda(real=True), pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep_device_rules.py"


def test_opinfo_sweep_agrees_with_real_cuda(tmp_path):
    pytest.importorskip("expecttest", reason="PyTorch's OpInfo database imports expecttest")
    out = tmp_path / "sweep.json"
    workers = str(max(1, min(12, (os.cpu_count() or 2) - 2)))
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--backend",
        "both",
        "--workers",
        workers,
        "--deadline",
        "420",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, timeout=540, capture_output=True)
    result = json.loads(out.read_text())
    assert not result["timed_out"]
    assert result["ops"] > 500 and result["compared"] > 5000
    assert result["disagreements"] == [], json.dumps(result["disagreements"][:5], indent=1)
