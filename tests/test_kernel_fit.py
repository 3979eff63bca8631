"""The fused kernels fit GPUs other than the H100: every launch the decode and prefill ops make at
Mixtral-8x7B's shapes compiles for a consumer card (sm_86: 99 KB of shared memory a block, against
the H100's 227 KB) within its shared memory, without a GPU (scripts/kernel_fit.py)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from harness.quant import fused

pytest.importorskip("triton.backends.nvidia")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel_fit():
    spec = importlib.util.spec_from_file_location("kernel_fit", REPO / "scripts" / "kernel_fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launches(kernel_fit):
    return kernel_fit.recorded(["decode", "prefill"])


@pytest.mark.slow
def test_every_decode_and_prefill_launch_fits_a_consumer_gpu(kernel_fit, launches):
    # the launches were found by running the ops, not listed: each path's kernels are among them
    kernels = {launch["kernel"] for launch in launches}
    assert {
        "_matvec_kernel",
        "_vec_x_kernel",
        "_grouped_kernel",
        "_attention_kernel",
        "_rms_norm_kernel",
    } <= kernels
    matvec_types = {launch["constexprs"]["QT"] for launch in launches if launch["kernel"] == "_matvec_kernel"}
    assert matvec_types == {int(qtype) for qtype in fused.FUSED_TYPES}
    result = kernel_fit.check(launches, [86])
    assert result["misfits"] == 0, [r for r in result["rows"] if not r["fits"]]


@pytest.mark.slow
def test_a_launch_over_the_limit_is_a_misfit(kernel_fit, launches):
    grouped = copy.deepcopy(next(launch for launch in launches if launch["kernel"] == "_grouped_kernel"))
    grouped["constexprs"] |= {"BN": 256, "BK": 128}
    grouped["options"] |= {"num_stages": 4, "num_warps": 8}
    result = kernel_fit.check([grouped], [86])
    (row,) = result["rows"]
    assert row["shared_bytes"] > kernel_fit.SHARED_LIMIT[86]
    assert not row["fits"] and result["misfits"] == 1
