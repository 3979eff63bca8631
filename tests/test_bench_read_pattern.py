"""benchmarks/probe_read_pattern.py: its kernel reads every byte of every layout it times once
(the sums of each row's words equal torch's), under Triton's interpreter (a subprocess: the
interpreter is chosen before the kernels are compiled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_probe_sums_every_layout_and_read():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "probe_read_pattern.py"), "--check"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {(r["layout"], r["read"]) for r in results} == {
        (layout, read) for layout in ("gguf", "tiled", "interleaved") for read in ("thread_row", "warp_row")
    }
    assert len(results) == 12
    assert [r for r in results if not r["match"]] == []


def test_q6_k_probe_sums_both_layouts():
    """`--q6k`: the packed Q6_K int read's loads, in the row-major packed and the interleaved
    layouts, sum each row's words as torch does (each d word once a super-block)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "probe_read_pattern.py"), "--check", "--q6k"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(r["layout"] for r in results) == ["interleaved"] * 2 + ["packed"] * 2
    assert [r for r in results if not r["match"]] == []
