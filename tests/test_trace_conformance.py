"""The conformance table: every row's verdict on the emulation (everywhere) and on real CUDA
(`pytest -m cuda`) equals what real CUDA is known to do; accepted rows give the CPU's values."""

from __future__ import annotations

import pytest
import torch

from harness.trace import conformance, emulated
from harness.trace.conformance import (
    ACCEPTS,
    GRAD,
    GRAD_MODES,
    REFUSES,
    ROWS,
    UNSUPPORTED,
    grad_context,
    is_refusal,
    place_inputs,
    run_row,
)

IDS = [row.id for row in ROWS]


@pytest.fixture(scope="module")
def reference():
    """Every row with all its inputs on the CPU: the values an accepted row must give."""
    return {row.id: run_row(row, "cpu") for row in ROWS}


def _check_accepted(result, ref, atol=0.0, rtol=0.0):
    row = result.row
    if row.out is not None:
        assert result.devices and result.devices[0] == row.out, f"{result}: output on {result.devices}"
    assert len(result.values) == len(ref.values)
    for got, want in zip(result.values, ref.values, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.allclose(got, want, atol=atol, rtol=rtol), f"{result}: values differ from the CPU's"


def test_the_table():
    assert len(ROWS) >= 40
    assert len(set(IDS)) == len(IDS), "every row prints differently"
    assert {r.expect for r in ROWS} == {ACCEPTS, REFUSES}
    ops = {r.op for r in ROWS}
    for op in ("mm", "addmm", "linear", "bmm", "matmul", "einsum", "add", "mul", "where", "cat", "stack"):
        assert op in ops
    for op in ("index_select", "index_add_", "index_copy_", "gather", "scatter_add_", "index", "index_put_"):
        assert op in ops
    for op in ("embedding", "softmax", "topk", "argsort", "one_hot", "copy_", "to", "masked_fill"):
        assert op in ops
    assert any(r.gpus == 2 for r in ROWS) and all(r.why for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_row_runs_on_the_cpu(row, reference):
    # With every input on the CPU a row is a plain CPU op: a refusal elsewhere is about devices.
    result = reference[row.id]
    assert result.verdict == ACCEPTS, str(result)


def _runnable_in(row, grad_mode):
    """The row on the CPU in this grad mode; skips the test where it cannot run there either
    (out= arguments and resizes refuse inputs that require grad, whatever their device)."""
    ref = run_row(row, "cpu", grad_mode)
    if ref.verdict == conformance.ERROR:
        pytest.skip(f"not runnable with {grad_mode} on the CPU either: {ref.error}")
    return ref


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_emulated(row, grad_mode, reference):
    """The same verdict in every grad mode; with grad, an accepted row's backward runs too and
    fails only where the CPU's does, or for devices (which `test_cuda` checks against CUDA)."""
    cpu = _runnable_in(row, grad_mode)
    result = run_row(row, "emulated", grad_mode)
    assert result.verdict == row.expect, str(result)
    if result.verdict == ACCEPTS:
        _check_accepted(result, reference[row.id])  # the same CPU kernels: exact
        if cpu.backward == conformance.ERROR:
            assert result.backward == conformance.ERROR, str(result)
        else:
            assert result.backward in (None, ACCEPTS, REFUSES), str(result)


def test_backward_runs_for_most_rows_in_grad_mode():
    with emulated.EmulatedCuda(device_count=2):
        results = [run_row(row, "emulated", GRAD) for row in ROWS if row.expect == ACCEPTS]
    assert sum(r.backward == ACCEPTS for r in results) >= 20


@pytest.mark.cuda(real=True)
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_cuda(row, grad_mode, reference):
    """Real CUDA in each grad mode: the row's verdict, its values, and (with grad) whether the
    backward pass is refused, as the emulation says."""
    _runnable_in(row, grad_mode)
    result = run_row(row, "cuda", grad_mode)
    if result.verdict == UNSUPPORTED:
        pytest.skip(f"unsupported here: {result.error}")
    assert result.verdict == row.expect, str(result)
    if result.verdict == ACCEPTS:
        _check_accepted(result, reference[row.id], atol=1e-5, rtol=1e-4)
        emulated_result = run_row(row, "emulated", grad_mode)
        assert result.backward == emulated_result.backward, f"{result} / emulated: {emulated_result}"


def test_run_row_reports_unsupported_and_bad_backends():
    two_gpus = next(r for r in ROWS if r.gpus == 2)
    with conformance.emulated.EmulatedCuda(device_count=1):
        assert run_row(two_gpus, "emulated").verdict == UNSUPPORTED
    if not torch.cuda.is_available():
        assert run_row(ROWS[0], "cuda").verdict == UNSUPPORTED
    with pytest.raises(ValueError, match="backend must be one of"):
        run_row(ROWS[0], "tpu")


def test_a_non_device_error_is_not_a_refusal():
    row = conformance.Row(
        "mm",
        {"a": conformance.f32("gpu", 4, 3), "b": conformance.f32("gpu", 4, 3, seed=1)},
        torch.mm,
        REFUSES,
        "shapes do not fit: not a device refusal",
    )
    result = run_row(row, "emulated")
    assert result.verdict == conformance.ERROR and "cannot be multiplied" in result.error


def test_format_table_lists_every_row():
    results = conformance.run_table("emulated")
    text = conformance.format_table(results)
    assert len(text.splitlines()) == len(ROWS)
    assert "FAIL" not in text


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_tracer_classifies_each_row_as_cuda_does(row, grad_mode):
    """The tracer's own rule (`classify.refused`, which judges recorded devices without running
    anything) agrees with real CUDA on every row in every grad mode, and so does the mismatch
    class it records."""
    from torch import nn

    from harness.trace import MISMATCH, Tracer
    from harness.trace.classify import refused

    _runnable_in(row, grad_mode)
    gpu, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    devices = {"gpu": gpu, "gpu1": gpu1, "cpu": torch.device("cpu")}
    with emulated.EmulatedCuda(device_count=2), grad_context(grad_mode):
        inputs = place_inputs(row, devices, grad_mode)
        with Tracer(nn.Module(), keep_events=True) as tracer:
            try:
                row.call(*inputs.values())
            except Exception as exc:
                if not is_refusal(exc):
                    raise
    seen = [(e.op, e.inputs) for e in tracer.events]
    assert any(refused(e) for e in tracer.events) == (row.expect == REFUSES), seen
    assert any(e.cls == MISMATCH for e in tracer.events) == (row.expect == REFUSES), seen


# -- the sync table ---------------------------------------------------------------------------------

SYNC_IDS = [row.id for row in conformance.SYNC_ROWS]


def test_the_sync_table():
    rows = conformance.SYNC_ROWS
    assert len(set(SYNC_IDS)) == len(SYNC_IDS)
    assert sum(r.syncs for r in rows) >= 10 and sum(not r.syncs for r in rows) >= 10
    for op in (
        "item",
        "tolist",
        "nonzero",
        "masked_select",
        "unique",
        "repeat_interleave",
        "one_hot",
        "histc",
    ):
        assert op in {r.op for r in rows}
    assert all(r.why for r in rows)


def _run_in_a_module(row, device):
    """The row's op inside a submodule of a traced model, its inputs on `device`."""
    from torch import nn

    from harness.trace import Tracer

    class Op(nn.Module):
        def forward(self, *xs):
            return row.call(*xs)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.op = Op()

        def forward(self, *xs):
            return self.op(*xs)

    model = Model()
    inputs = [v.make().to(device) for v in row.inputs.values()]
    with Tracer(model, keep_events=True) as tracer:
        model(*inputs)
    return tracer


def _check_tracer_on_sync_row(row, tracer):
    from harness.trace import MISMATCH, SYNC

    seen = [(e.op, e.cls) for e in tracer.events]
    assert any(e.cls == SYNC for e in tracer.events) == row.syncs, seen
    assert tracer.summary.counts[MISMATCH] == 0, seen
    if row.syncs:
        first = tracer.summary.first_offence
        assert first["class"] == SYNC and first["module"] == "op", first
        assert first["source"].startswith("tests/test_trace_conformance.py:"), first  # Op.forward


@pytest.mark.parametrize("row", conformance.SYNC_ROWS, ids=SYNC_IDS)
def test_tracer_flags_the_syncs_of_the_sync_table(row):
    with emulated.EmulatedCuda(device_count=1):
        tracer = _run_in_a_module(row, torch.device("cuda", 0))
    _check_tracer_on_sync_row(row, tracer)


@pytest.mark.cuda(real=True)
@pytest.mark.parametrize("row", conformance.SYNC_ROWS, ids=SYNC_IDS)
def test_sync_table_on_cuda(row):
    """Real CUDA: the host waits for queued GPU work exactly on the rows that say it syncs, and the
    tracer, on real CUDA too, flags exactly those."""
    result = conformance.run_sync_row(row)
    assert result.waited == row.syncs, str(result)
    _check_tracer_on_sync_row(row, _run_in_a_module(row, torch.device("cuda", 0)))
