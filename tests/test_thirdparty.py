"""Third-party models under the harness: traced clean, and every generic fault found where it went in.

Models (`tests/thirdparty.py`, tiny random configs, nothing downloaded): transformers' Mixtral,
Llama and Qwen2-MoE, `torch.nn.TransformerEncoder`, a hand-written MoE. Placements: one GPU
(`.to("cuda:0")`), split over two GPUs by accelerate's `dispatch_model`, and half of the model
offloaded to the CPU by `dispatch_model` (its weights wait on the host and come in for each call).
Every test is a `cuda` test: real CUDA where there is a GPU (`pytest -m cuda`), else the emulated
accelerator with two devices.

(a) Every model on every placement, in every grad mode (inference_mode, no_grad, grad enabled),
    traces clean: nothing raised, no offending event; but for the real bugs of REAL_BUGS, which
    must be found where they are.
(b) Every generic fault of the catalog, injected at a module in the middle of each model (its
    middle site), is found: the first offence has the fault's class and is in that module. On one
    GPU under inference_mode for every model; on every placement and grad mode for the Llama
    (the model under `dispatch_model` with CPU offload among them).

`scripts/detection_matrix.py` runs the whole product (faults x models x placements x grad modes,
and hypothesis-drawn clean runs) and writes the tables.
"""

from __future__ import annotations

import pytest
import torch

from harness import faults
from tests.thirdparty import (  # noqa: F401
    GRAD_MODES,
    MODELS,
    PLACEMENTS,
    hf_common,
    judge_offences,
    one_thread,
    trace_run,
)

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]


EMULATED = not torch.cuda.is_available()  # a `cuda` test runs on the emulated accelerator


# Clean runs that are not clean on CUDA either: (model, placement) -> the first offence's
# (class, module). nn.MultiheadAttention reads out_proj's weight without calling out_proj, so
# accelerate's offload hook on out_proj never brings it in: CUDA refuses the product.
REAL_BUGS = {("torch-encoder", "offload"): ("mismatch", "layers.1.self_attn")}


def _param(*values, fault=None):
    return pytest.param(*values, id="-".join(v for v in values if v))


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


@pytest.mark.parametrize("model, placement, mode", CLEAN)
def test_clean_model_traces_clean(model, placement, mode):
    _needs_devices(placement)
    result = trace_run(model, placement, mode)
    assert result.counts.get("ok", 0) > 0, result.describe()  # it saw the model's ops
    if (model, placement) in REAL_BUGS:
        assert not result.crashed and result.first[:2] == REAL_BUGS[model, placement], result.describe()
    else:
        assert result.clean, result.describe()


@pytest.mark.parametrize("model, placement, mode, fault", FAULTS)
def test_generic_fault_is_found_at_its_module(model, placement, mode, fault):
    _needs_devices(placement)
    result = trace_run(model, placement, mode, fault)
    if result.no_site:
        pytest.skip(result.error)
    assert not result.crashed, result.describe()
    assert result.first is not None, result.describe()
    assert result.located, result.describe()
    if result.fired:
        assert result.first[0] == result.expected_class, result.describe()
    else:
        # The module's forward never ran (nn.TransformerEncoderLayer's fast path on real CUDA
        # reads its attention weights itself): what the fault left in place is found instead,
        # its weight parked on the CPU.
        assert fault == "weight-uploaded-per-call" and result.first[0] == "mismatch", result.describe()


def test_a_model_loaded_with_device_map_auto_and_offloaded_traces_clean(tmp_path):
    """transformers' from_pretrained(device_map="auto") as users call it: the weights go to the
    devices accelerate picks (numbers, not names), in a thread pool, and what does not fit waits
    on the CPU and comes in for each call: declared offload traffic, not a bug."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from harness.trace import Tracer

    tiny = dict(hf_common(), num_hidden_layers=4)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**tiny)).save_pretrained(tmp_path)
    gpus = min(torch.cuda.device_count(), 2)
    max_memory = {i: "60KB" for i in range(gpus)} | {"cpu": "1GB"}
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="auto", max_memory=max_memory, use_kernels=False
    ).eval()
    placed = set(model.hf_device_map.values())
    assert "cpu" in placed and 0 in placed, model.hf_device_map
    tracer = Tracer(model, keep_events=True)
    with torch.no_grad(), tracer:
        out = model.generate(torch.tensor([[3, 7, 11]], device="cuda:0"), max_new_tokens=3, do_sample=False)
    s = tracer.summary
    assert out.shape == (1, 6)
    # The offload's traffic is declared. transformers 5.17 (the GPU machine's) also reads
    # generate's padding mask on the host in every step (masking_utils._ignore_causal_mask_sdpa):
    # a real sync of the library's own, the held-out "mask-read" bug's pattern, set apart here.
    first, known = judge_offences(
        [e for e in tracer.events if not (e.cls == "sync" and "masking_utils.py" in (e.source or ""))]
    )
    assert first is None, (first, known, s.counts)
    assert s.counts["ok"] > 0 and s.counts["allowed"] > 0  # the offloaded weights came in, declared
