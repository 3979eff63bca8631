"""The fused kernels fit GPUs other than the H100: every launch the decode and prefill ops make at
Mixtral-8x7B's shapes compiles for a consumer card (sm_86: 99 KB of shared memory a block, against
the H100's 227 KB) within its shared memory, as configured or through the launch's fallback to
smaller settings, without a GPU (scripts/kernel_fit.py)."""

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
        "_matvec_two_runs_kernel",
        "_vec_x_kernel",
        "_grouped_kernel",
        "_attention_kernel",
        "_rms_norm_kernel",
        "_norm_route_kernel",
    } <= kernels
    matvec_types = {launch["constexprs"]["QT"] for launch in launches if launch["kernel"] == "_matvec_kernel"}
    assert matvec_types == {int(qtype) for qtype in fused.FUSED_TYPES}
    result = kernel_fit.check(launches, [86])
    # as configured (for the H100), the float32 tiled prefill of some types does not fit (it is
    # what a weight with values beyond float16's range takes); each falls back to one that does
    misfits = [r for r in result["rows"] if not r["fits"]]
    assert {r["kernel"] for r in misfits} <= kernel_fit.FALLBACK_KERNELS
    assert result["unfitted"] == 0, [r for r in misfits if r["falls_back_to"] is None]


@pytest.mark.slow
def test_a_launch_over_the_limit_is_a_misfit(kernel_fit, launches, monkeypatch):
    grouped = copy.deepcopy(
        next(l for l in launches if l["kernel"] == "_grouped_kernel" and not l["constexprs"]["GATED"])
    )
    grouped["constexprs"] |= {"BN": 256, "BK": 128}
    grouped["options"] |= {"num_stages": 4, "num_warps": 8}
    result = kernel_fit.check([grouped], [86])
    (row,) = result["rows"]
    assert row["shared_bytes"] > kernel_fit.SHARED_LIMIT[86]
    assert not row["fits"] and result["misfits"] == 1
    # the grouped GEMM launches through fused._launch_fitted: one stage fits
    assert row["falls_back_to"] == {"BM": 64, "BN": 256, "num_stages": 1} and result["unfitted"] == 0
    monkeypatch.setattr(kernel_fit, "FALLBACK_KERNELS", set())  # a kernel without the fallback
    result = kernel_fit.check([grouped], [86])
    assert result["rows"][0]["falls_back_to"] is None and result["unfitted"] == 1


def test_a_launch_the_device_lacks_shared_memory_for_steps_down_once_per_variant(monkeypatch):
    monkeypatch.setattr(fused, "_FITTED", {})
    calls = []

    def launch(cfg):  # a device with room for one stage of a 32-column tile
        calls.append((cfg["num_stages"], cfg["BN"]))
        if cfg["num_stages"] > 1 or cfg["BN"] > 32:
            raise fused.OutOfResources(147456, 101376, "shared memory")

    cfg = {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2}
    fused._launch_fitted(launch, ("cuda:0", "variant"), cfg)
    assert calls == [(2, 64), (1, 64), (1, 32)]
    calls.clear()
    fused._launch_fitted(launch, ("cuda:0", "variant"), cfg)  # remembered: no failed launch again
    assert calls == [(1, 32)]

    def never(cfg):
        calls.append((cfg["num_stages"], cfg["BN"], cfg["BM"]))
        raise fused.OutOfResources(1 << 20, 101376, "shared memory")

    calls.clear()
    with pytest.raises(fused.OutOfResources):
        fused._launch_fitted(never, ("cuda:0", "other"), cfg)
    # one stage, then narrower output tiles, then fewer rows a block (tl.dot takes 16 at least)
    assert calls == [(2, 64, 64), (1, 64, 64), (1, 32, 64), (1, 16, 64), (1, 16, 32), (1, 16, 16)]
    assert ("cuda:0", "other") not in fused._FITTED
