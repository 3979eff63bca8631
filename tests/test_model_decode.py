"""The static-shape decode step (a [1] device position), greedy decoding, and the model with and
without the fused kernels (Triton's interpreter on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.errors import UsageError
from harness.model.generate import generate, graph_decoding_possible, greedy_decode
from harness.model.mixtral import Mixtral
from harness.synth import synthesize
from harness.trace.tracer import Tracer, is_tracing

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("decode") / "tiny.gguf", "tiny", file_type="Q4_K_M", seed=5)


@pytest.fixture(scope="module")
def model(tiny_path):
    return Mixtral.from_gguf(tiny_path, max_seq_len=32)


def test_tensor_position_step_equals_the_int_position_step(model):
    prompt = torch.tensor([3, 17, 99, 250, 7])
    with torch.inference_mode():
        model.reset()
        model(prompt, 0)
        by_int = model(torch.tensor([42]), 5)
        model.reset()
        model(prompt, 0)
        by_tensor = model(torch.tensor([42]), torch.tensor([5]))
        # the cache slot was written at position 5 in both runs
        k_int = [layer.attn.cache.k[:, 5].clone() for layer in model.layers]
    assert by_tensor.shape == by_int.shape == (1, model.config.vocab_size)
    torch.testing.assert_close(by_tensor, by_int, rtol=1e-5, atol=1e-5)
    assert all(torch.count_nonzero(k) > 0 for k in k_int)
    with pytest.raises(UsageError, match="exactly one token"):
        model(prompt, torch.tensor([0]))


def test_greedy_decode_matches_generate(model):
    prompt = [5, 6, 7, 8]
    expected = generate(model, prompt, 6).tokens  # first from the prefill, then 5 decode steps
    with torch.inference_mode():
        model.reset()
        first = model(torch.tensor(prompt), 0)[-1].argmax().view(1)
        ids = greedy_decode(model, first, len(prompt), 5)
    assert [int(first)] + ids.tolist() == expected
    with pytest.raises(UsageError, match="exceed the context"):
        greedy_decode(model, first, 30, 5)


def test_no_graph_decoding_on_the_cpu_or_under_a_tracer(model):
    assert not graph_decoding_possible(model)  # a CPU model
    assert not is_tracing()
    with Tracer(model) as tracer:
        assert is_tracing() and not graph_decoding_possible(model)
    assert not is_tracing()
    assert tracer.summary is not None


def test_trace_header_says_the_run_is_eager(model, tmp_path):
    path = tmp_path / "t.jsonl"
    with Tracer(model, path=path), torch.inference_mode():
        model(torch.tensor([1, 2]), 0)
    header = json.loads(path.read_text().splitlines()[0])
    assert header["eager"] is True


_INTERPRETED_LOGITS = """
import sys, torch
from harness.model.mixtral import Mixtral
from harness.quant import fused
model = Mixtral.from_gguf(sys.argv[1], max_seq_len=16)
assert model.layers[0].moe.experts.fused() and fused.supports(model.head.qtype, torch.device("cpu"), 256)
tokens = torch.tensor([3, 9, 27, 81, 243])
with torch.inference_mode():
    with_kernels = model(tokens, 0)
    step = model(torch.tensor([5]), torch.tensor([5]))
    model.reset()
    with fused.disabled():
        assert not model.layers[0].moe.experts.fused()
        without = model(tokens, 0)
        step_without = model(torch.tensor([5]), 5)
d = lambda a, b: float(((a - b) ** 2).sum() / (b ** 2).sum())
print(d(with_kernels, without), d(step, step_without))
"""


@pytest.mark.slow
def test_logits_with_and_without_fused_kernels_agree(tiny_path):
    """Prefill (5 tokens: 10 token-expert pairs take the prefill path) and a decode step (the
    matrix-vector kernel) through the interpreter, against the same model on the torch path."""
    prefill_nmse, step_nmse = map(float, _interpreted(_INTERPRETED_LOGITS, tiny_path).split())
    assert prefill_nmse < 1e-6 and step_nmse < 1e-6, (prefill_nmse, step_nmse)


_INTERPRETED_TRACE = """
import json, sys, torch
from harness.model.mixtral import Mixtral
from harness.quant import fused
from harness.trace.tracer import Tracer
model = Mixtral.from_gguf(sys.argv[1], max_seq_len=16)
seen = {}
for path in fused.PREFILL_PATHS:
    fused.prefill_path = path
    model.reset()
    with Tracer(model, keep_events=True) as tracer, torch.inference_mode():
        model(torch.arange(1, 10), 0)  # 9 tokens: every product has more than 8 rows
    # the ops that computed something (QMatMul's reshapes around its op are views)
    seen[path] = [[e.module, e.op, list(e.tensors or ())] for e in tracer.events if e.module and not e.alias]
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_a_trace_sees_each_fused_product_as_one_op_with_its_gguf_names(tiny_path):
    """Under a Tracer, every prefill path (float16 scratch + tensor cores, and the tiled kernel in
    float32 or float16)
    show each weight's product as one harness op naming its GGUF tensors, and nothing of
    what runs inside (no dequantization, no matmul, no sort). Views around the ops are left out."""
    seen = json.loads(_interpreted(_INTERPRETED_TRACE, tiny_path))
    assert set(seen) == {"dequant", "tiled", "tiled16"}
    for events in seen.values():
        experts = [e for e in events if e[0] == "layers.1.moe.experts"]
        assert [e[1] for e in experts] == ["harness.moe_ffn.default"]
        assert sorted(experts[0][2]) == sorted(
            f"blk.1.ffn_{kind}_exps.weight[{i}]" for kind in ("gate", "up", "down") for i in range(4)
        )
        attn = [e for e in events if e[0] == "layers.0.attn" or e[0].startswith("layers.0.attn.")]
        names = [f"blk.0.attn_{p}.weight" for p in ("q", "k", "v")]
        assert attn == [
            ["layers.0.attn", "harness.qkv.default", names],
            ["layers.0.attn", "harness.attention.default", []],
            ["layers.0.attn.wo", "harness.qmatmul.default", ["blk.0.attn_output.weight"]],
        ]
        assert [e[1:] for e in events if e[0] == "head"] == [["harness.qmatmul.default", ["output.weight"]]]


_INTERPRETED_STEP = """
import json, sys, torch
from harness.model.mixtral import Mixtral
from harness.trace.tracer import Tracer
model = Mixtral.from_gguf(sys.argv[1], max_seq_len=16)
steps = []
with torch.inference_mode():
    model(torch.arange(1, 5), 0)
    token = torch.tensor([7])
    for pos in (4, torch.tensor([5])):  # a decode step at an int position, then at a device one
        with Tracer(model, keep_events=True) as tracer:
            model(token, pos)
        steps.append({"verdict": tracer.summary.verdict,
                      "events": [[e.module, e.op, list(e.tensors or ())] for e in tracer.events]})
print(json.dumps(steps))
"""


@pytest.mark.slow
def test_a_fused_decode_step_is_six_ops_a_layer(tiny_path):
    """On the fused path a decode step is, per layer: the first norm, q/k/v as one product naming
    its three tensors, attention with its cache write, the output product, the residual add with
    the second norm and the routing (NORM_CONFIG "router": one op naming the norm's weight and
    the F32 router), and the experts with the second residual add in their op; then the
    embedding, the final norm and the head: no view, no position or mask bookkeeping, at either
    kind of position."""
    steps = json.loads(_interpreted(_INTERPRETED_STEP, tiny_path))
    for step in steps:
        assert step["verdict"] == "clean"
        events = step["events"]
        layer = [e[:2] for e in events if e[0] == "layers.1" or e[0].startswith("layers.1.")]
        assert layer == [
            ["layers.1.attn_norm", "harness.rms_norm.default"],
            ["layers.1.attn", "harness.qkv.default"],
            ["layers.1.attn", "harness.attention.default"],
            ["layers.1.attn.wo", "harness.qmatmul.default"],
            ["layers.1.ffn_norm", "harness.add_rms_norm_route.default"],
            ["layers.1.moe.experts", "harness.moe_ffn.default"],
        ]
        assert len(events) == 3 + 2 * len(layer), events
        assert events[0] == ["embed", "harness.embed_rows.default", ["token_embd.weight"]]
        assert [e[2] for e in events if e[1] == "harness.qkv.default"][1] == [
            f"blk.1.attn_{p}.weight" for p in ("q", "k", "v")
        ]
        assert [e[2] for e in events if e[1] == "harness.add_rms_norm_route.default"][1] == [
            "blk.1.ffn_norm.weight",
            "blk.1.ffn_gate_inp.weight",
        ]


_INTERPRETED_INT_FORMS = """
import json, sys, torch
from harness.model.mixtral import Mixtral
from harness.quant import fused
from harness.quant.launch import unbound
from harness.trace.tracer import Tracer
model = Mixtral.from_gguf(sys.argv[1], max_seq_len=16)
fused.int_x_path = "launch"  # x quantized by a launch of its own, as in the decode graph
fused.NORM_CONFIG["router"] = False  # (the norm and the router apart: its own test below)
original = fused.launch

def switched(attention, norms):  # ATTENTION_CONFIG's and NORM_CONFIG's "int_out"
    fused.ATTENTION_CONFIG["int_out"], fused.NORM_CONFIG["int_out"] = attention, norms

def run(attention, norms):
    launched = []
    def counted(kernel, *args, **kwargs):
        fn, keywords = unbound(kernel, kwargs)  # (`_matvec` launches a `launch.Bound`)
        launched.append(fn.__name__ + (" INT_OUT" if keywords.get("INT_OUT") else ""))
        return original(kernel, *args, **kwargs)
    fused.launch = counted
    switched(attention, norms)
    try:
        model.reset()
        with torch.inference_mode():  # a prefill of 3 tokens (6 pairs: decode-sized), two steps
            logits = [model(torch.tensor([3, 9, 27]), 0), model(torch.tensor([5]), torch.tensor([3])),
                      model(torch.tensor([7]), 4)]
    finally:
        fused.launch = original
        switched(False, False)
    return [l.view(torch.int32).tolist() for l in logits], launched

def traced(attention, norms):  # layer 1's ops in a step
    switched(attention, norms)
    with torch.inference_mode(), Tracer(model, keep_events=True) as tracer:
        model(torch.tensor([11]), 5)
    switched(False, False)
    ops = [[e.module, e.op, [t.dtype for t in e.inputs], [t.dtype for t in e.outputs]]
           for e in tracer.events if e.module and e.module.startswith("layers.1")]
    return {"verdict": tracer.summary.verdict, "ops": ops}

runs = {f"{a} {n}": run(a, n) for a in (False, True) for n in (False, True)}
print(json.dumps({"runs": runs, "layers": len(model.layers), "norms": traced(False, True),
                  "attention": traced(True, False)}))
"""


@pytest.fixture(scope="module")
def int_forms_run(tiny_path) -> dict:
    """`_INTERPRETED_INT_FORMS`' results (under Triton's interpreter: run once for the tests of
    NORM_CONFIG's and ATTENTION_CONFIG's "int_out"): logits and launches of 3 calls with each
    switch off and on ("attention norms"), and layer 1's traced ops with each alone on."""
    return json.loads(_interpreted(_INTERPRETED_INT_FORMS, tiny_path))


def _after_norms(launches: list[str]) -> list[str]:
    """The launch after each norm's (the router's between skipped): what reads the norm's output."""
    after = []
    for i, name in enumerate(launches):
        if name.startswith("_rms_norm_kernel"):
            rest = [n for n in launches[i + 1 :] if n != "_router_topk_kernel"]
            after.append(rest[0] if rest else "")
    return after


@pytest.mark.slow
def test_norms_int_form_leaves_the_logits_and_drops_the_int_x_launches_on_norm_outputs(int_forms_run):
    """NORM_CONFIG "int_out" on the tiny Q4_K_M model under Triton's interpreter, x quantized by a
    launch (`int_x_path` "launch", as in the decode graph): a prefill of 3 tokens and two steps
    give the logits they give without it, bit for bit; every norm but the last (the head's) makes
    x's int form (INT_OUT), the ops after them take it, so that no `_int_x` launch reads a norm's
    output (without it each layer's two norms are each followed by one) and two a layer a call
    are gone; a tracer sees the int form as the norms' outputs and the ops' inputs, clean."""
    got = int_forms_run
    (off_logits, off_launches), (on_logits, on_launches) = (
        got["runs"]["False False"],
        got["runs"]["False True"],
    )
    assert on_logits == off_logits
    layers, calls = got["layers"], 3
    norms = 2 * layers * calls  # (the head's norm aside)
    assert off_launches.count("_int_x_kernel") - on_launches.count("_int_x_kernel") == norms
    assert on_launches.count("_rms_norm_kernel INT_OUT") == norms
    assert "_rms_norm_kernel INT_OUT" not in off_launches
    assert _after_norms(off_launches).count("_int_x_kernel") == norms
    assert "_int_x_kernel" not in _after_norms(on_launches)
    assert got["norms"]["verdict"] == "clean"
    form = ["int16", "float32", "float32"]
    assert got["norms"]["ops"] == [
        ["layers.1.attn_norm", "harness.rms_norm_int.default", ["float32"] * 2, ["float32", *form]],
        ["layers.1.attn", "harness.qkv.default", ["float32", "uint8", "uint8", "uint8", *form], ["float32"]],
        ["layers.1.attn", "harness.attention.default", ["float32"] * 5, ["float32"]],
        ["layers.1.attn.wo", "harness.qmatmul.default", ["float32", "uint8"], ["float32"]],
        ["layers.1.ffn_norm", "harness.add_rms_norm_int.default", ["float32"] * 3, ["float32"] * 2 + form],
        ["layers.1.moe.router", "harness.router_topk.default", ["float32"] * 2, ["float32", "int64"]],
        [
            "layers.1.moe.experts",
            "harness.moe_ffn.default",
            ["float32", "uint8", "uint8", "uint8", "float32", "int64", "float32", *form],
            ["float32"],
        ],
    ]


def _after_attention(launches: list[str]) -> list[str]:
    """The launch after each attention op's launches (`_attention_kernel`, its merge launch): what
    reads attention's output."""
    return [
        after
        for name, after in zip(launches, [*launches[1:], ""], strict=True)
        if name.startswith("_attention") and not after.startswith("_attention")
    ]


@pytest.mark.slow
def test_attention_int_form_leaves_the_logits_and_drops_the_int_x_launch_after_attention(int_forms_run):
    """ATTENTION_CONFIG "int_out" on the tiny Q4_K_M model (head dim 64, a Q4_K output projection)
    under Triton's interpreter, x quantized by a launch (as in the decode graph), with the norms'
    int form off and on: a prefill of 3 tokens and two steps give the logits they give without
    it, bit for bit; the attention launch stores its output's int form (INT_OUT), so that no
    `_int_x` launch follows an attention op (without it one follows each) and one a layer a call
    is gone; a tracer sees the form as `harness::attention_int`'s outputs and the output
    projection's inputs, clean."""
    got = int_forms_run
    runs, attentions = got["runs"], got["layers"] * 3
    for norms in ("False", "True"):
        (off_logits, off_launches), (on_logits, on_launches) = runs[f"False {norms}"], runs[f"True {norms}"]
        assert on_logits == off_logits, norms
        assert off_launches.count("_int_x_kernel") - on_launches.count("_int_x_kernel") == attentions
        assert on_launches.count("_attention_kernel INT_OUT") == attentions
        assert not any(n.endswith("INT_OUT") and n.startswith("_attention") for n in off_launches)
        assert _after_attention(off_launches) == ["_int_x_kernel"] * attentions
        assert _after_attention(on_launches) == ["_matvec_kernel"] * attentions
    assert runs["False False"][0] == runs["True True"][0]
    assert got["attention"]["verdict"] == "clean"
    form = ["int16", "float32", "float32"]
    assert got["attention"]["ops"] == [
        ["layers.1.attn_norm", "harness.rms_norm.default", ["float32"] * 2, ["float32"]],
        ["layers.1.attn", "harness.qkv.default", ["float32", "uint8", "uint8", "uint8"], ["float32"]],
        ["layers.1.attn", "harness.attention_int.default", ["float32"] * 5, ["float32", *form]],
        ["layers.1.attn.wo", "harness.qmatmul.default", ["float32", "uint8", *form], ["float32"]],
        ["layers.1.ffn_norm", "harness.add_rms_norm.default", ["float32"] * 3, ["float32"] * 2],
        ["layers.1.moe.router", "harness.router_topk.default", ["float32"] * 2, ["float32", "int64"]],
        [
            "layers.1.moe.experts",
            "harness.moe_ffn.default",
            ["float32", "uint8", "uint8", "uint8", "float32", "int64", "float32"],
            ["float32"],
        ],
    ]


@pytest.fixture(scope="module")
def tiny8_path(tmp_path_factory):
    """The tiny model with 8 experts: llama.cpp's Q4_K_M then gives attn_k and attn_v Q8_0 (q
    Q4_K), as Mixtral-8x7B's file has them; at 256 columns Q8_0 is packed (an "int" read)."""
    import dataclasses

    from harness.gguf_file import PRESETS

    config = dataclasses.replace(PRESETS["tiny"], expert_count=8)
    return synthesize(tmp_path_factory.mktemp("decode8") / "tiny8.gguf", config, file_type="Q4_K_M", seed=5)


_INTERPRETED_QKV_ONE_LAUNCH = """
import json, sys, torch
from harness.model.mixtral import Mixtral
from harness.quant import fused
from harness.quant.launch import unbound
model = Mixtral.from_gguf(sys.argv[1], max_seq_len=16)
fused.int_x_path = "launch"  # x quantized by a launch of its own, as in the decode graph
original = fused.launch

def run(one_launch, norms):  # QKV_CONFIG's "one_launch", NORM_CONFIG's "int_out"
    launched = []
    def counted(kernel, *args, **kwargs):
        launched.append(unbound(kernel, kwargs)[0].__name__)  # (`_matvec` launches a `launch.Bound`)
        return original(kernel, *args, **kwargs)
    saved = dict(fused.QKV_CONFIG)
    fused.QKV_CONFIG.update(one_launch=one_launch, one_launch_rows=fused.MATVEC_MAX_ROWS)
    fused.launch, fused.NORM_CONFIG["int_out"] = counted, norms
    try:
        model.reset()
        with torch.inference_mode():  # a prefill of 3 tokens (decode-sized), two steps
            logits = [model(torch.tensor([3, 9, 27]), 0), model(torch.tensor([5]), torch.tensor([3])),
                      model(torch.tensor([7]), 4)]
    finally:
        fused.QKV_CONFIG.update(saved)
        fused.launch, fused.NORM_CONFIG["int_out"] = original, False
    return [l.view(torch.int32).tolist() for l in logits], launched

types = [[int(m.kernel_qtype) & 0xFF for m in (a.wq, a.wk, a.wv)] for a in (l.attn for l in model.layers)]
print(json.dumps({"runs": {f"{o} {n}": run(o, n) for o, n in ((False, False), (True, False), (True, True))},
                  "layers": len(model.layers), "types": types}))
"""


@pytest.mark.slow
def test_qkv_in_one_launch_leaves_the_logits_and_makes_one_launch_of_two(tiny8_path):
    """QKV_CONFIG "one_launch" on the tiny 8-expert Q4_K_M model (q Q4_K, k and v packed Q8_0)
    under Triton's interpreter, x quantized by a launch as in the decode graph, with NORM_CONFIG
    "int_out" off and on: a prefill of 3 tokens and two steps give the logits they give without
    it, bit for bit; each layer's qkv makes one `_matvec_two_runs_kernel` launch where it made two
    `_matvec_kernel` ones, right after x's `_int_x` launch (after the norm with its int form)."""
    got = json.loads(_interpreted(_INTERPRETED_QKV_ONE_LAUNCH, tiny8_path))
    assert got["types"] == [[12, 8, 8]] * got["layers"]
    qkv_calls = 3 * got["layers"]
    (off_logits, off), (on_logits, on), (normed_logits, normed) = (
        got["runs"][k] for k in ("False False", "True False", "True True")
    )
    assert on_logits == off_logits and normed_logits == off_logits
    assert "_matvec_two_runs_kernel" not in off
    for launches, before in ((on, "_int_x_kernel"), (normed, "_rms_norm_kernel")):
        assert launches.count("_matvec_two_runs_kernel") == qkv_calls
        assert off.count("_matvec_kernel") - launches.count("_matvec_kernel") == 2 * qkv_calls
        after = [launches[i - 1] for i, name in enumerate(launches) if name == "_matvec_two_runs_kernel"]
        assert after == [before] * qkv_calls, after


_INTERPRETED_NORM_ROUTE = """
import json, sys, torch
from harness.model.mixtral import Mixtral
from harness.quant import fused
from harness.quant.launch import unbound
from harness.trace.tracer import Tracer
model = Mixtral.from_gguf(sys.argv[1], max_seq_len=16)
fused.int_x_path = "launch"  # x quantized by a launch of its own, as in the decode graph
fused.ATTENTION_CONFIG["int_out"] = False  # (attention's int form: its own test above)
original = fused.launch

def run(router, norms):  # NORM_CONFIG's "router" and "int_out"
    launched = []
    def counted(kernel, *args, **kwargs):
        launched.append(unbound(kernel, kwargs)[0].__name__)
        return original(kernel, *args, **kwargs)
    fused.launch = counted
    fused.NORM_CONFIG.update(router=router, int_out=norms)
    try:
        model.reset()
        with torch.inference_mode():  # a prefill of 3 tokens (decode-sized), two steps
            logits = [model(torch.tensor([3, 9, 27]), 0), model(torch.tensor([5]), torch.tensor([3])),
                      model(torch.tensor([7]), 4)]
    finally:
        fused.launch = original
        fused.NORM_CONFIG.update(router=False, int_out=False)
    return [l.view(torch.int32).tolist() for l in logits], launched

def traced(norms):  # layer 1's ops in a step with "router" on
    fused.NORM_CONFIG.update(router=True, int_out=norms)
    with torch.inference_mode(), Tracer(model, keep_events=True) as tracer:
        model(torch.tensor([11]), 5)
    fused.NORM_CONFIG.update(router=False, int_out=False)
    ops = [[e.module, e.op, list(e.tensors or ())] for e in tracer.events if (e.module or "").startswith("layers.1")]
    return {"verdict": tracer.summary.verdict, "ops": ops}

runs = {f"{r} {n}": run(r, n) for r in (False, True) for n in (False, True)}
print(json.dumps({"runs": runs, "layers": len(model.layers), "traced": [traced(False), traced(True)]}))
"""


def _norm_and_router_folded(launches: list[str]) -> list[str]:
    """`launches` with each norm launch followed by a router launch as one `_norm_route_kernel`."""
    folded = []
    for name in launches:
        if name == "_router_topk_kernel" and folded and folded[-1] == "_rms_norm_kernel":
            folded[-1] = "_norm_route_kernel"
        else:
            folded.append(name)
    return folded


@pytest.mark.slow
def test_norm_with_router_leaves_the_logits_and_drops_a_launch_a_layer(tiny_path):
    """NORM_CONFIG "router" on the tiny Q4_K_M model under Triton's interpreter, with the norms'
    int form off and on: a prefill of 3 tokens and two steps give the logits they give without
    it, bit for bit; each layer's post-attention norm and router are one launch
    (`_norm_route_kernel`): one launch a layer a call fewer, no router launch, nothing else
    changed; a tracer sees one op in the norm's module with the norm's and the router's GGUF
    tensors as inputs, then the experts' op, clean."""
    got = json.loads(_interpreted(_INTERPRETED_NORM_ROUTE, tiny_path))
    runs, fused_norms = got["runs"], got["layers"] * 3
    for norms in ("False", "True"):
        (off_logits, off_launches), (on_logits, on_launches) = runs[f"False {norms}"], runs[f"True {norms}"]
        assert on_logits == off_logits == runs["False False"][0], norms
        assert len(off_launches) - len(on_launches) == fused_norms
        assert off_launches.count("_router_topk_kernel") == fused_norms
        assert "_router_topk_kernel" not in on_launches
        assert on_launches.count("_norm_route_kernel") == fused_norms
        assert on_launches == _norm_and_router_folded(off_launches)
    for traced, op in zip(got["traced"], ("add_rms_norm_route", "add_rms_norm_int_route"), strict=True):
        assert traced["verdict"] == "clean"
        ops = traced["ops"]
        assert [o[:2] for o in ops] == [
            [
                "layers.1.attn_norm",
                "harness.rms_norm_int.default" if op.endswith("int_route") else "harness.rms_norm.default",
            ],
            ["layers.1.attn", "harness.qkv.default"],
            ["layers.1.attn", "harness.attention.default"],
            ["layers.1.attn.wo", "harness.qmatmul.default"],
            ["layers.1.ffn_norm", f"harness.{op}.default"],
            ["layers.1.moe.experts", "harness.moe_ffn.default"],
        ], ops
        assert ops[4][2] == ["blk.1.ffn_norm.weight", "blk.1.ffn_gate_inp.weight"]


_INTERPRETED_REPLACED_FORWARDS = """
import json, sys, torch
from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN, Attention, Mixtral, MoE, Router
from harness.quant import fused
from harness.trace.tracer import Tracer
model = Mixtral.from_gguf(sys.argv[1], max_seq_len=16)
fused.NORM_CONFIG.update(router=True, int_out=True)
fused.ATTENTION_CONFIG["int_out"] = True

def logits():
    model.reset()
    with torch.inference_mode():
        out = [model(torch.tensor([3, 9, 27]), 0), model(torch.tensor([5]), 3)]
    return [o.view(torch.int32).tolist() for o in out]

def moe_forward(self, x, residual=None):  # the plain signature, routing in torch
    probs = self.router(x).float().softmax(-1)
    weights, chosen = probs.topk(self.n_used, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=ROUTER_WEIGHT_SUM_MIN)
    return self.experts(x, weights, chosen, residual)

def router_forward(self, x):  # the plain signature: logits only
    return Router.__mro__[1].forward(self, x)

own = logits()
got = {}
for name, cls, fn in (("moe", MoE, moe_forward), ("router", Router, router_forward)):
    saved = cls.forward
    cls.forward = fn
    try:
        with Tracer(model, keep_events=True) as tracer:
            got[name] = logits()
        ops = sorted({e.op for e in tracer.events if (e.module or "").startswith("layers.0.")})
        got[name + " ops"] = ops
        got[name + " verdict"] = tracer.summary.verdict
    finally:
        cls.forward = saved
attn = model.layers[0].attn  # an instance's forward replaced: the plain signature
attn.forward = lambda x, start_pos: Attention.forward(attn, x, start_pos)
got["attention"] = logits()
print(json.dumps({"own": own, **got}))
"""


@pytest.mark.slow
def test_replaced_forwards_get_the_plain_calls_under_the_fused_decode(tiny_path):
    """Under the fused decode (the norms' int form and router, attention's int form; Triton's
    interpreter), a MoE or Router forward replaced on its class and an Attention forward replaced
    on its instance, each with the plain signature (a fault, a test's monkeypatch): the model
    runs and gives the logits of its own forwards to float rounding, the replaced code runs
    (a router on its own: no `harness::router_topk`, no norm that routes, the routing in aten
    ops), and a tracer calls the run clean."""
    got = json.loads(_interpreted(_INTERPRETED_REPLACED_FORWARDS, tiny_path))
    own = torch.tensor(got["own"][1], dtype=torch.int32).view(torch.float32)
    for name in ("moe", "router", "attention"):
        step = torch.tensor(got[name][1], dtype=torch.int32).view(torch.float32)
        torch.testing.assert_close(step, own, rtol=1e-4, atol=1e-4, msg=name)
    for name in ("moe", "router"):
        ops = got[name + " ops"]
        assert got[name + " verdict"] == "clean", name
        assert "harness.router_topk.default" not in ops, (name, ops)
        assert not any("route" in op for op in ops), (name, ops)
        assert "aten.topk.default" in ops and "harness.moe_ffn.default" in ops, (name, ops)


def test_runs_own_forward_sees_a_forward_replaced_on_the_class_or_the_instance(monkeypatch, tiny_path):
    from harness.model.mixtral import MoE, Router, runs_own_forward

    model = Mixtral.from_gguf(tiny_path, max_seq_len=8)
    moe, router, norm = model.layers[0].moe, model.layers[0].moe.router, model.layers[0].ffn_norm
    assert runs_own_forward(moe) and runs_own_forward(router) and runs_own_forward(norm)

    class Kept(MoE):  # a subclass that keeps MoE's forward
        pass

    moe.__class__ = Kept
    assert runs_own_forward(moe)
    moe.__class__ = MoE
    monkeypatch.setattr(MoE, "forward", lambda self, x, residual=None: x)
    assert not runs_own_forward(moe) and runs_own_forward(router)
    monkeypatch.undo()
    router.forward = lambda x: x
    assert not runs_own_forward(router) and runs_own_forward(moe)
    del router.forward
    monkeypatch.setattr(Router.__mro__[1], "forward", lambda self, x: x)  # QMatMul's: Router keeps its own
    assert runs_own_forward(router)


def _interpreted(script: str, model_path) -> str:
    """stdout of `script` run with `model_path` in a subprocess under Triton's interpreter."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(model_path)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.cuda(real=True)
def test_cuda_fused_decode_at_device_positions_and_in_a_graph(tiny_path):
    """On a GPU (the fused path: harness::qkv, attention, ...): a step at a device position
    equals the step at the int position, and a CUDA graph of the step decodes what eager steps do."""
    model = Mixtral.from_gguf(tiny_path, device="cuda", max_seq_len=32)
    assert model.layers[0].attn.fused()
    prompt = torch.tensor([3, 17, 99, 250, 7], device="cuda")
    with torch.inference_mode():
        model.reset()
        first = model(prompt, 0)[-1].argmax().view(1)
        by_int = model(first, 5)
        model.reset()
        model(prompt, 0)
        by_tensor = model(first, torch.tensor([5], device="cuda"))
        torch.testing.assert_close(by_tensor, by_int, rtol=1e-4, atol=1e-4)
        model.reset()
        model(prompt, 0)
        eager = greedy_decode(model, first, 5, 8, fast=False)
        model.reset()
        model(prompt, 0)
        graphed = greedy_decode(model, first, 5, 8, fast=True)
    assert model.decode_graph is not None
    assert graphed.tolist() == eager.tolist()


@pytest.mark.cuda(real=True)
def test_cuda_decode_with_programmatic_dependent_launch_is_bit_identical(tiny_path, monkeypatch):
    """Programmatic dependent launch (`fused.pdl`, on by default from sm_90) changes when the
    decode kernels start, never what they compute: eager steps give the same logits, bit for
    bit, with it and without it, and a CUDA graph captured with it decodes what eager steps do."""
    from harness.quant import fused

    if not fused.pdl_options(torch.device("cuda")):
        pytest.skip("no programmatic dependent launch on this GPU or Triton (it needs sm_90 or later)")
    prompt = torch.tensor([3, 17, 99, 250, 7], device="cuda")
    logits, tokens = {}, {}
    for on in (False, True):
        monkeypatch.setattr(fused, "pdl", on)
        model = Mixtral.from_gguf(tiny_path, device="cuda", max_seq_len=32)
        with torch.inference_mode():
            steps = [model(prompt, 0)[-1]]
            for pos in range(5, 11):
                steps.append(model(steps[-1].argmax().view(1), pos)[-1])
            logits[on] = torch.stack(steps)
            model.reset()
            model(prompt, 0)
            tokens[on] = greedy_decode(model, logits[on][0].argmax().view(1), 5, 6, fast=True)
        assert model.decode_graph is not None
    assert torch.equal(logits[True], logits[False])
    assert tokens[True].tolist() == tokens[False].tolist() == logits[True][1:].argmax(-1).tolist()


def _eager_steps(model: Mixtral, prompt: torch.Tensor) -> torch.Tensor:
    """The last logits of the prompt (a prefill at 0) and of 6 greedy eager steps after it, stacked."""
    with torch.inference_mode():
        model.reset()
        steps = [model(prompt, 0)[-1]]
        for pos in range(len(prompt), len(prompt) + 6):
            steps.append(model(steps[-1].argmax().view(1), pos)[-1])
    return torch.stack(steps)


@pytest.mark.cuda(real=True)
def test_cuda_norms_int_form_decodes_the_same_logits_eager_and_in_a_graph(tiny_path, monkeypatch):
    """NORM_CONFIG "int_out" on the GPU: eager steps with x quantized by a launch (`int_x_path`
    "launch") give the logits they give without it, bit for bit, and a CUDA graph captured with
    it (PDL as the device allows) decodes the tokens eager steps without it decode."""
    from harness.quant import fused

    prompt = torch.tensor([3, 17, 99, 250, 7], device="cuda")
    model = Mixtral.from_gguf(tiny_path, device="cuda", max_seq_len=32)
    logits = {}
    monkeypatch.setattr(fused, "int_x_path", "launch")
    for on in (False, True):
        monkeypatch.setitem(fused.NORM_CONFIG, "int_out", on)
        logits[on] = _eager_steps(model, prompt)
    assert torch.equal(logits[True].view(torch.int32), logits[False].view(torch.int32))
    monkeypatch.setattr(fused, "int_x_path", "auto")  # ("launch" in the graph's step)
    monkeypatch.setitem(fused.NORM_CONFIG, "int_out", True)
    with torch.inference_mode():
        model.reset()
        model(prompt, 0)
        graphed = greedy_decode(model, logits[False][0].argmax().view(1), 5, 6, fast=True)
    assert model.decode_graph is not None
    assert graphed.tolist() == logits[False][1:].argmax(-1).tolist()


def _check_graph_decodes(model: Mixtral, prompt: torch.Tensor, eager: torch.Tensor) -> None:
    """After a prefill of `prompt`, a CUDA graph of the step decodes the tokens of `eager`
    (`_eager_steps`' logits, as int32 bits) from its first."""
    with torch.inference_mode():
        model.reset()
        model(prompt, 0)
        first = eager[0].view(torch.float32).argmax().view(1)
        graphed = greedy_decode(model, first, 5, 6, fast=True)
    assert model.decode_graph is not None
    assert graphed.tolist() == eager[1:].view(torch.float32).argmax(-1).tolist()


@pytest.mark.cuda(real=True)
def test_cuda_norm_with_router_decodes_the_same_logits_eager_and_in_a_graph(tiny_path, monkeypatch):
    """NORM_CONFIG "router" on the GPU, with "int_out" off and on: eager steps (each layer's
    post-attention norm and router one `_norm_route_kernel` launch) give the logits they give
    without it, bit for bit, and a CUDA graph captured with both on (PDL as the device allows)
    decodes the tokens eager steps without them decode."""
    from harness.quant import fused
    from harness.quant.launch import unbound

    prompt = torch.tensor([3, 17, 99, 250, 7], device="cuda")
    model = Mixtral.from_gguf(tiny_path, device="cuda", max_seq_len=32)
    logits, launched, original = {}, [], fused.launch

    def counted(kernel, *args, **kwargs):
        launched.append(unbound(kernel, kwargs)[0].__name__)
        return original(kernel, *args, **kwargs)

    monkeypatch.setattr(fused, "launch", counted)
    monkeypatch.setattr(fused, "int_x_path", "launch")
    for router in (False, True):
        for norms in (False, True):
            monkeypatch.setitem(fused.NORM_CONFIG, "router", router)
            monkeypatch.setitem(fused.NORM_CONFIG, "int_out", norms)
            launched.clear()
            logits[router, norms] = _eager_steps(model, prompt).view(torch.int32)
            assert ("_router_topk_kernel" in launched) != router, (router, norms)
            assert launched.count("_norm_route_kernel") == (7 * len(model.layers) if router else 0)
    for norms in (False, True):
        assert torch.equal(logits[True, norms], logits[False, norms]), norms
    monkeypatch.setattr(fused, "launch", original)
    monkeypatch.setattr(fused, "int_x_path", "auto")  # ("launch" in the graph's step)
    monkeypatch.setitem(fused.NORM_CONFIG, "router", True)
    monkeypatch.setitem(fused.NORM_CONFIG, "int_out", True)
    _check_graph_decodes(model, prompt, logits[False, False])


@pytest.mark.cuda(real=True)
def test_cuda_attention_int_form_decodes_the_same_logits_eager_and_in_a_graph(tiny_path, monkeypatch):
    """ATTENTION_CONFIG "int_out" on the GPU, with NORM_CONFIG "int_out" off and on: eager steps
    with x quantized by a launch (`int_x_path` "launch") give the logits they give without it, bit
    for bit, and a CUDA graph captured with both on (PDL as the device allows) decodes the tokens
    eager steps without them decode."""
    from harness.quant import fused

    prompt = torch.tensor([3, 17, 99, 250, 7], device="cuda")
    model = Mixtral.from_gguf(tiny_path, device="cuda", max_seq_len=32)
    logits = {}
    monkeypatch.setattr(fused, "int_x_path", "launch")
    for attention in (False, True):
        for norms in (False, True):
            monkeypatch.setitem(fused.ATTENTION_CONFIG, "int_out", attention)
            monkeypatch.setitem(fused.NORM_CONFIG, "int_out", norms)
            logits[attention, norms] = _eager_steps(model, prompt).view(torch.int32)
    for norms in (False, True):
        assert torch.equal(logits[True, norms], logits[False, norms]), norms
    monkeypatch.setattr(fused, "int_x_path", "auto")  # ("launch" in the graph's step)
    monkeypatch.setitem(fused.ATTENTION_CONFIG, "int_out", True)
    monkeypatch.setitem(fused.NORM_CONFIG, "int_out", True)
    _check_graph_decodes(model, prompt, logits[False, False])


@pytest.mark.cuda(real=True)
def test_cuda_qkv_in_one_launch_decodes_the_same_logits_eager_and_in_a_graph(tiny8_path, monkeypatch):
    """QKV_CONFIG "one_launch" on the GPU (the tiny 8-expert model: q Q4_K, k and v packed Q8_0),
    with NORM_CONFIG "int_out" off and on: eager steps with x quantized by a launch (`int_x_path`
    "launch") and in the kernel ("kernel") give the logits they give without it, bit for bit, and
    a CUDA graph captured with it (PDL as the device allows) decodes the tokens eager steps
    without it decode."""
    from harness.quant import fused

    prompt = torch.tensor([3, 17, 99, 250, 7], device="cuda")
    model = Mixtral.from_gguf(tiny8_path, device="cuda", max_seq_len=32)
    monkeypatch.setitem(fused.QKV_CONFIG, "one_launch_rows", fused.MATVEC_MAX_ROWS)  # (the prompt too)
    for int_x in ("launch", "kernel"):
        monkeypatch.setattr(fused, "int_x_path", int_x)
        for norms in (False, True):
            monkeypatch.setitem(fused.NORM_CONFIG, "int_out", norms)
            logits = {}
            for on in (False, True):
                monkeypatch.setitem(fused.QKV_CONFIG, "one_launch", on)
                logits[on] = _eager_steps(model, prompt).view(torch.int32)
            assert torch.equal(logits[True], logits[False]), (int_x, norms)
    monkeypatch.setattr(fused, "int_x_path", "auto")  # ("launch" in the graph's step)
    monkeypatch.setitem(fused.QKV_CONFIG, "one_launch", True)
    _check_graph_decodes(model, prompt, logits[False])
