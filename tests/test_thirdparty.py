"""Third-party models under the harness: traced clean, and every generic fault found where it went in.

Models (`tests/thirdparty.py`, tiny random configs, nothing downloaded): transformers' Mixtral,
Llama and Qwen2-MoE, `torch.nn.TransformerEncoder`, a hand-written MoE. Placements: one GPU
(`.to("cuda:0")`), split over two GPUs by accelerate's `dispatch_model`, and half of the model
offloaded to the CPU by `dispatch_model` (its weights wait on the host and come in for each call).
Every test is a `cuda` test: real CUDA where there is a GPU (`pytest -m cuda`), else the emulated
accelerator with two devices.

(a) Every model on every placement, in every grad mode (inference_mode, no_grad, grad enabled),
    traces clean: nothing raised, no offending event.
(b) Every generic fault of the catalog, injected at a module in the middle of each model (its
    middle site), is found: the first offence has the fault's class and is in that module. On one
    GPU under inference_mode for every model; on every placement and grad mode for the Llama
    (the model under `dispatch_model` with CPU offload among them).

`scripts/detection_matrix.py` runs the whole product (faults x models x placements x grad modes,
and hypothesis-drawn clean runs) and writes the tables.

GAPS: cases that fail today because the emulation or the tracer lacks a capability that issue 9
asks for (other parts of it). Each is a strict xfail naming the capability: when it lands, the
case passes, the strict xfail fails, and its entry here must go.
"""

from __future__ import annotations

import pytest
import torch

from harness import faults
from harness.trace import OFFENDING
from tests.thirdparty import GRAD_MODES, MODELS, PLACEMENTS, trace_run

pytestmark = pytest.mark.cuda

HF = ("hf-mixtral", "hf-llama", "hf-qwen2-moe")
TRANSFERS_OFFEND = "transfer" in OFFENDING


def gap(model: str, placement: str, mode: str, fault: str | None = None) -> str | None:
    """The missing capability that makes this case fail today, or None."""
    if model in ("hf-mixtral", "hf-qwen2-moe"):
        return "emulation: torch.histc of an int tensor (CUDA has the kernel, the CPU does not)"
    if model == "torch-encoder":
        return "emulation: nn.MultiheadAttention (functions entered through handle_torch_function)"
    if mode == "grad":
        return "emulation: autograd (a forward with parameters that require grad)"
    if placement == "offload" and fault != "tensor-on-wrong-device":  # that one raises before
        return "emulation: accelerate's offload rebuilds parameters as type(param)(data, requires_grad=)"
    if model == "hand-moe" and placement == "cuda":
        return "tracer: a placement for a model whose children are named layers.N (IndexError)"
    if fault is not None and not TRANSFERS_OFFEND:
        f = faults.get(fault)
        if f.expected_class == "transfer":
            return "tracer: an undeclared transfer inside the forward is offending"
    if fault == "new-tensor-without-device" and placement == "split":  # a stray needs a placement
        return "tracer: default placement of any module, from where its parameters are"
    return None


def _param(*values, fault=None):
    model, placement, mode = values[:3]
    reason = gap(model, placement, mode, fault)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(*values, marks=marks, id="-".join(v for v in values if v))


CLEAN = [_param(m, p, g) for m in MODELS for p in PLACEMENTS for g in GRAD_MODES]
FAULTS = [_param(m, "cuda", "inference_mode", f, fault=f) for m in MODELS for f in faults.GENERIC] + [
    _param("hf-llama", p, g, f, fault=f)
    for p in PLACEMENTS
    for g in GRAD_MODES
    for f in faults.GENERIC
    if (p, g) != ("cuda", "inference_mode")
]


def _needs_devices(placement: str) -> None:
    if placement == "split" and torch.cuda.device_count() < 2:
        pytest.skip("the split placement needs two CUDA devices")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model, placement, mode", CLEAN)
def test_clean_model_traces_clean(model, placement, mode):
    _needs_devices(placement)
    result = trace_run(model, placement, mode)
    assert result.clean, result.describe()
    assert result.counts.get("ok", 0) > 0  # it saw the model's ops


@pytest.mark.parametrize("model, placement, mode, fault", FAULTS)
def test_generic_fault_is_found_at_its_module(model, placement, mode, fault):
    _needs_devices(placement)
    result = trace_run(model, placement, mode, fault)
    assert not result.crashed, result.describe()
    assert result.fired, f"the fault never acted: {result.describe()}"
    assert result.first is not None, result.describe()
    assert (result.first[0], result.first[1]) == (result.expected_class, result.at), result.describe()
