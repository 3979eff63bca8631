"""harness.Mixtral's float32 CPU logits against an independent float64 numpy reference.

The reference below is written from llama.cpp's graph for GGUF files of arch "llama" (its
`llm_build_llama` with `build_moe_ffn`), not from the harness: weights come from
`gguf.GGUFReader` and `gguf.quants.dequantize`, hyperparameters straight from the file's keys.

  embedding rows -> per layer:
    h = x + attn_output(attention(rope(attn_q n), rope(attn_k n), attn_v n)),  n = rmsnorm(x, attn_norm)
    x = h + moe(rmsnorm(h, ffn_norm))   (dense llama: ffn_down(silu(ffn_gate m) * ffn_up m))
  -> rmsnorm(x, output_norm) -> output (token_embd when output.weight is absent)

RoPE is GGML's "normal" mode (rope type 0, which llama.cpp uses for arch "llama"): adjacent
pairs (x[2i], x[2i+1]) rotate by pos * base^(-2i/rope_dim); dims past rope_dim are left alone.
The MoE takes a softmax over all experts, keeps the top k, renormalizes those k weights (their
sum clamped at 2^-14) and sums the chosen experts' w2(silu(w1 x) * w3 x).

Error measure (llama.cpp's test-backend-ops): NMSE = sum((a - b)^2) / sum(b^2), b the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.gguf_file import PRESETS, MixtralConfig
from harness.model.mixtral import Mixtral
from harness.synth import synthesize
from tests.gguf_edit import rewrite, split_experts

TINY = PRESETS["tiny"]
NMSE_MAX = 1e-6  # float32 model vs float64 reference, same dequantized weights
N_TOKENS = 16


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """sum((a-b)^2) / sum(b^2) over everything, b the reference."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b**2))


# --------------------------------------------------------------------------------------------
# The float64 reference
# --------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """What the reference saw on the way, to tell a meaningful test from a degenerate one."""

    router_logits: list[np.ndarray] = field(default_factory=list)  # per MoE layer: [T, E]
    experts: list[np.ndarray] = field(default_factory=list)  # per MoE layer: [T, k] chosen experts
    expert_outputs: list[np.ndarray] = field(default_factory=list)  # per MoE layer: [T, E, D]


class Reference:
    """llama.cpp's llama-arch forward in float64 numpy over a GGUF file's dequantized weights."""

    def __init__(self, path):
        reader = GGUFReader(str(path))
        meta = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
        assert meta["general.architecture"] == "llama"
        self.n_layer = int(meta["llama.block_count"])
        self.n_embd = int(meta["llama.embedding_length"])
        self.n_head = int(meta["llama.attention.head_count"])
        self.n_head_kv = int(meta.get("llama.attention.head_count_kv", self.n_head))
        self.head_dim = self.n_embd // self.n_head
        self.rope_dim = int(meta.get("llama.rope.dimension_count", self.head_dim))
        self.rope_base = float(meta.get("llama.rope.freq_base", 10000.0))
        self.eps = float(meta["llama.attention.layer_norm_rms_epsilon"])
        self.n_expert = int(meta.get("llama.expert_count", 0))
        self.n_used = int(meta.get("llama.expert_used_count", 0))
        self.w: dict[str, np.ndarray] = {}
        self.qtype: dict[str, gguf.GGMLQuantizationType] = {}
        for t in reader.tensors:
            self.qtype[t.name] = gguf.GGMLQuantizationType(t.tensor_type)
            values = gguf.quants.dequantize(np.asarray(t.data), self.qtype[t.name])
            self.w[t.name] = np.asarray(values, dtype=np.float64)
        if "output.weight" not in self.w:
            self.w["output.weight"] = self.w["token_embd.weight"]
            self.qtype["output.weight"] = self.qtype["token_embd.weight"]
        self.dense = self.n_expert == 0
        if not self.dense:
            for i in range(self.n_layer):  # per-expert files: stack the experts as merged ones
                for kind in ("gate", "up", "down"):
                    stack = f"blk.{i}.ffn_{kind}_exps.weight"
                    if stack not in self.w:
                        names = [f"blk.{i}.ffn_{kind}.{e}.weight" for e in range(self.n_expert)]
                        self.w[stack] = np.stack([self.w.pop(n) for n in names])
                        self.qtype[stack] = self.qtype[names[0]]

    @property
    def vocab_size(self) -> int:
        return self.w["token_embd.weight"].shape[0]

    # -- pieces ---------------------------------------------------------------------------

    def act(self, x: np.ndarray, weight: str) -> np.ndarray:
        """The activation as the product with `weight` sees it: exact here (a subclass may
        round it the way llama.cpp's CPU kernels do)."""
        return x

    def mm(self, x: np.ndarray, weight: str) -> np.ndarray:
        """x @ W^T for the weight named `weight`: [T, in] -> [T, out]."""
        return self.act(x, weight) @ self.w[weight].T

    def expert_mm(self, x: np.ndarray, weight: str) -> np.ndarray:
        """Every expert's x @ W_e^T for a stack [E, out, in]: [T, in] -> [T, E, out]; x may be
        [T, E, in] (each expert its own input)."""
        spec = "ted,eod->teo" if x.ndim == 3 else "td,eod->teo"
        return np.einsum(spec, self.act(x, weight), self.w[weight])

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x: np.ndarray, pos: np.ndarray, mode: str) -> np.ndarray:
        """x: [T, heads, head_dim]. "normal": adjacent pairs; "neox": halves; "none": identity."""
        if mode == "none":
            return x
        n = self.rope_dim
        inv = self.rope_base ** (-np.arange(0, n, 2, dtype=np.float64) / n)  # [n/2]
        ang = pos[:, None].astype(np.float64) * inv[None, :]  # [T, n/2]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        out = x.copy()
        if mode == "normal":
            a, b = x[..., 0:n:2], x[..., 1:n:2]
            out[..., 0:n:2] = a * cos - b * sin
            out[..., 1:n:2] = a * sin + b * cos
        elif mode == "neox":
            a, b = x[..., : n // 2], x[..., n // 2 : n]
            out[..., : n // 2] = a * cos - b * sin
            out[..., n // 2 : n] = a * sin + b * cos
        else:
            raise ValueError(mode)
        return out

    @staticmethod
    def silu(x: np.ndarray) -> np.ndarray:
        return x / (1.0 + np.exp(-x))

    def attention(self, i: int, x: np.ndarray, k_cache, v_cache, pos: np.ndarray, rope: str) -> np.ndarray:
        # x: [T, D]; k_cache, v_cache: lists of [t, KV, hd] arrays, earlier positions first
        T, H, KV, hd = x.shape[0], self.n_head, self.n_head_kv, self.head_dim
        q = self.mm(x, f"blk.{i}.attn_q.weight").reshape(T, H, hd)
        k = self.mm(x, f"blk.{i}.attn_k.weight").reshape(T, KV, hd)
        v = self.mm(x, f"blk.{i}.attn_v.weight").reshape(T, KV, hd)
        q, k = self.rope(q, pos, rope), self.rope(k, pos, rope)
        k_cache.append(k)
        v_cache.append(v)
        K, V = np.concatenate(k_cache), np.concatenate(v_cache)  # [S, KV, hd]
        S = K.shape[0]
        kv_of = np.arange(H) // (H // KV)  # head h reads KV head h // (H/KV)
        scores = np.einsum("thd,shd->hts", q, K[:, kv_of]) / math.sqrt(hd)  # [H, T, S]
        key_pos = np.arange(S)
        scores = np.where(key_pos[None, None, :] <= pos[None, :, None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.einsum("hts,shd->thd", p, V[:, kv_of]).reshape(T, H * hd)
        return self.mm(out, f"blk.{i}.attn_output.weight")

    def moe(self, i: int, x: np.ndarray, trace: Trace, renorm: bool, extra_experts: int) -> np.ndarray:
        logits = self.mm(x, f"blk.{i}.ffn_gate_inp.weight")  # [T, E]
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        k = min(self.n_used + extra_experts, self.n_expert)
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [T, k]
        weights = np.take_along_axis(probs, chosen, axis=-1)
        if renorm:
            weights = weights / np.maximum(weights.sum(axis=-1, keepdims=True), 6.103515625e-5)
        gate, up, down = (f"blk.{i}.ffn_{n}_exps.weight" for n in ("gate", "up", "down"))
        # every expert on every token (small shapes): [T, E, D]
        h = self.silu(self.expert_mm(x, gate)) * self.expert_mm(x, up)  # [T, E, F]
        y = self.expert_mm(h, down)  # [T, E, D]
        trace.router_logits.append(logits)
        trace.experts.append(chosen)
        trace.expert_outputs.append(y)
        return np.einsum("tk,tkd->td", weights, np.take_along_axis(y, chosen[:, :, None], axis=1))

    def ffn(self, i: int, x: np.ndarray) -> np.ndarray:
        h = self.silu(self.mm(x, f"blk.{i}.ffn_gate.weight")) * self.mm(x, f"blk.{i}.ffn_up.weight")
        return self.mm(h, f"blk.{i}.ffn_down.weight")

    # -- forward --------------------------------------------------------------------------

    def forward(
        self,
        tokens,
        start_pos: int,
        cache: list,
        rope: str = "normal",
        renorm: bool = True,
        extra_experts: int = 0,
        trace: Trace | None = None,
    ) -> np.ndarray:
        """[T, V] float64 logits of `tokens` at positions start_pos.., appending to `cache`
        (one (keys, values) pair of lists per layer, from `new_cache()`)."""
        trace = trace if trace is not None else Trace()
        tokens = np.asarray(tokens, dtype=np.int64)
        pos = start_pos + np.arange(len(tokens))
        x = self.w["token_embd.weight"][tokens]  # [T, D]
        for i in range(self.n_layer):
            n = self.rmsnorm(x, self.w[f"blk.{i}.attn_norm.weight"])
            x = x + self.attention(i, n, *cache[i], pos, rope)
            n = self.rmsnorm(x, self.w[f"blk.{i}.ffn_norm.weight"])
            x = x + (self.ffn(i, n) if self.dense else self.moe(i, n, trace, renorm, extra_experts))
        x = self.rmsnorm(x, self.w["output_norm.weight"])
        return self.mm(x, "output.weight")

    def new_cache(self) -> list:
        return [([], []) for _ in range(self.n_layer)]

    def logits(self, tokens, **options) -> np.ndarray:
        """[T, V] float64 logits of a whole sequence from position 0."""
        return self.forward(tokens, 0, self.new_cache(), **options)


# --------------------------------------------------------------------------------------------
# The model under test
# --------------------------------------------------------------------------------------------


def load_model(path, **kwargs):
    return Mixtral.from_gguf(path, device="cpu", **kwargs)


def run_model(model, tokens, start_pos: int = 0) -> np.ndarray:
    with torch.inference_mode():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), start_pos=start_pos)
    assert out.dtype == torch.float32
    assert out.device.type == "cpu"
    return out.numpy().astype(np.float64)


def tokens_for(vocab_size: int, seed: int, n: int = N_TOKENS) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=n)


def check_not_degenerate(ref: Reference, logits: np.ndarray, trace: Trace) -> None:
    """The comparison only means something if logits vary and routing depends on the token."""
    assert logits.std() > 0.1, f"logits are nearly constant (std {logits.std():.3g})"
    assert np.ptp(logits, axis=0).max() > 0.1, "every position gives the same logits"
    if ref.dense:
        return
    for layer, chosen in enumerate(trace.experts):
        distinct = {tuple(sorted(row)) for row in chosen.tolist()}
        if ref.n_used < ref.n_expert:
            assert len(distinct) > 1, f"layer {layer}: every token routed to {distinct}"
        y = trace.expert_outputs[layer]  # [T, E, D]: experts must disagree
        spread = np.std(y, axis=1).mean() / np.std(y)
        assert spread > 0.3, f"layer {layer}: expert outputs nearly identical (spread {spread:.3g})"


# --------------------------------------------------------------------------------------------
# Table of cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    config: MixtralConfig
    file_type: str
    layout: str = "merged"
    router: str = "f32"

    def __str__(self) -> str:
        c = self.config
        return (
            f"{self.name}: L{c.block_count} D{c.embedding_length} F{c.feed_forward_length} "
            f"H{c.head_count}/KV{c.head_count_kv} rope{c.rope_dim}/{c.head_dim} E{c.expert_count} "
            f"k{c.expert_used_count} {self.file_type} {self.layout} router={self.router}"
        )


CASES = [
    Case("tiny-gqa", TINY, "Q4_K_M"),
    Case("mha-e8k2", TINY.replace(head_count=4, head_count_kv=4, expert_count=8), "Q8_0", "per-expert"),
    Case(
        "mqa-e6k3",
        TINY.replace(head_count=8, head_count_kv=1, expert_count=6, expert_used_count=3),
        "F32",
    ),
    Case("k1-e5", TINY.replace(expert_count=5, expert_used_count=1), "Q4_K_M", "per-expert", "f16"),
    Case(
        "e8k3-gqa4",
        TINY.replace(block_count=3, head_count=8, head_count_kv=2, expert_count=8, expert_used_count=3),
        "Q4_K_M",
        router="f16",
    ),
    Case("partial-rope", TINY.replace(rope_dimension_count=32, rope_freq_base=10000.0), "F32"),
    Case("dense", TINY.replace(expert_count=0, expert_used_count=0), "Q8_0"),
    Case("dense-mqa", TINY.replace(expert_count=0, expert_used_count=0, head_count_kv=1), "Q4_K_M"),
]

NMSE_RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each case's synthetic file, written once."""
    root = tmp_path_factory.mktemp("ref")
    cache: dict[str, object] = {}

    def get(case: Case):
        if case.name not in cache:
            cache[case.name] = synthesize(
                root / f"{case.name}.gguf", case.config, case.file_type, case.layout, case.router, seed=7
            )
        return cache[case.name]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_logits_match_reference(case: Case, files):
    path = files(case)
    ref = Reference(path)
    tokens = tokens_for(ref.vocab_size, seed=1)
    trace = Trace()
    expected = ref.logits(tokens, trace=trace)
    check_not_degenerate(ref, expected, trace)
    got = run_model(load_model(path), tokens)
    assert got.shape == expected.shape == (len(tokens), case.config.vocab_size)
    err = nmse(got, expected)
    NMSE_RESULTS[case.name] = err
    print(f"{case}  NMSE {err:.3e}")
    assert err <= NMSE_MAX, f"{case}: NMSE {err:.3e} > {NMSE_MAX:g}"


@pytest.mark.parametrize("strategy", ["quantized", "f32"])
def test_strategies_match_reference(strategy: str, files):
    path = files(CASES[0])
    ref = Reference(path)
    tokens = tokens_for(ref.vocab_size, seed=2)
    err = nmse(run_model(load_model(path, strategy=strategy), tokens), ref.logits(tokens))
    print(f"strategy {strategy}: NMSE {err:.3e}")
    assert err <= NMSE_MAX


def test_f16_strategy_close_to_reference(files):
    """The float16 product loses precision by design; it still tracks the reference closely."""
    path = files(CASES[0])
    ref = Reference(path)
    tokens = tokens_for(ref.vocab_size, seed=2)
    err = nmse(run_model(load_model(path, strategy="f16"), tokens), ref.logits(tokens))
    print(f"strategy f16: NMSE {err:.3e}")
    assert err <= 1e-4


def test_tied_output_head(files, tmp_path):
    """Without output.weight the head reads token_embd (llama.cpp's tied embeddings)."""
    path = rewrite(files(CASES[0]), tmp_path / "tied.gguf", drop_tensors=("output.weight",))
    ref = Reference(path)
    tokens = tokens_for(ref.vocab_size, seed=3)
    expected = ref.logits(tokens)
    assert expected.std() > 0.01  # token_embd has std 0.02: smaller logits, still not constant
    err = nmse(run_model(load_model(path), tokens), expected)
    print(f"tied head: NMSE {err:.3e}")
    assert err <= NMSE_MAX


# --------------------------------------------------------------------------------------------
# Sweep over configurations
# --------------------------------------------------------------------------------------------

SWEEP_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K", "IQ4_XS"]


@st.composite
def sweep_cases(draw) -> Case:
    n_expert = draw(st.sampled_from([0, 4, 5, 6, 7, 8]))
    n_used = draw(st.integers(1, min(3, n_expert))) if n_expert else 0
    n_head = draw(st.sampled_from([2, 4, 8]))
    n_head_kv = draw(st.sampled_from([d for d in (1, 2, 4, 8) if n_head % d == 0]))
    head_dim = TINY.embedding_length // n_head
    rope_dim = draw(st.sampled_from([None, head_dim // 2, 16]))
    config = TINY.replace(
        block_count=draw(st.integers(1, 2)),
        feed_forward_length=draw(st.sampled_from([256, 512])),
        head_count=n_head,
        head_count_kv=n_head_kv,
        expert_count=n_expert,
        expert_used_count=n_used,
        rope_dimension_count=rope_dim,
        rope_freq_base=draw(st.sampled_from([10000.0, 1e6])),
    )
    return Case(
        "sweep",
        config,
        draw(st.sampled_from(SWEEP_TYPES)),
        draw(st.sampled_from(["merged", "per-expert"])),
        draw(st.sampled_from(["f32", "f16"])),
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=sweep_cases(), seed=st.integers(0, 2**16))
def test_sweep_matches_reference(case: Case, seed: int, tmp_path_factory):
    path = synthesize(
        tmp_path_factory.mktemp("sweep") / "m.gguf",
        case.config,
        case.file_type,
        case.layout,
        case.router,
        seed,
    )
    ref = Reference(path)
    tokens = tokens_for(ref.vocab_size, seed=seed, n=12)
    expected = ref.logits(tokens)
    err = nmse(run_model(load_model(path), tokens), expected)
    print(f"{case} seed={seed}  NMSE {err:.3e}")
    assert err <= NMSE_MAX, f"{case} seed={seed}: NMSE {err:.3e}"


# --------------------------------------------------------------------------------------------
# KV cache, layouts
# --------------------------------------------------------------------------------------------


def test_prefill_equals_decode_steps(files):
    """Prefill of all tokens == one token at a time (start_pos += 1) == two chunks; reset() restarts."""
    path = files(CASES[0])
    model = load_model(path)
    tokens = tokens_for(TINY.vocab_size, seed=4)
    T = len(tokens)
    prefill = run_model(model, tokens)
    model.reset()
    steps = np.concatenate([run_model(model, tokens[t : t + 1], start_pos=t) for t in range(T)])
    model.reset()
    half = T // 2
    chunks = np.concatenate(
        [run_model(model, tokens[:half]), run_model(model, tokens[half:], start_pos=half)]
    )
    model.reset()
    again = run_model(model, tokens)
    print(f"prefill vs steps NMSE {nmse(steps, prefill):.3e}, vs chunks {nmse(chunks, prefill):.3e}")
    np.testing.assert_allclose(steps, prefill, rtol=0, atol=1e-4)
    np.testing.assert_allclose(chunks, prefill, rtol=0, atol=1e-4)
    assert nmse(steps, prefill) <= 1e-10
    np.testing.assert_allclose(again, prefill, rtol=0, atol=1e-5)
    # and the steps agree with the reference too
    assert nmse(steps, Reference(path).logits(tokens)) <= NMSE_MAX


def test_per_expert_layout_equals_merged(files, tmp_path):
    """The same expert bytes as merged stacks or as TheBloke's per-expert tensors: same logits."""
    merged = files(CASES[0])
    split = split_experts(merged, tmp_path / "split.gguf")
    reader = GGUFReader(str(split))
    names = {t.name for t in reader.tensors}
    assert "blk.0.ffn_gate.0.weight" in names and "blk.0.ffn_gate_exps.weight" not in names
    tokens = tokens_for(TINY.vocab_size, seed=5)
    a = run_model(load_model(merged), tokens)
    b = run_model(load_model(split), tokens)
    assert np.array_equal(a, b), f"max |diff| {np.abs(a - b).max():.3e}, NMSE {nmse(b, a):.3e}"


# --------------------------------------------------------------------------------------------
# The reference's own sensitivity: the threshold tells the right math from near misses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        {"rope": "neox"},
        {"rope": "none"},
        {"renorm": False},
        {"extra_experts": 1},
    ],
    ids=["neox-rope", "no-rope", "no-renorm", "top-k-plus-1"],
)
def test_reference_sees_near_misses(variant, files):
    """Each plausible mistake moves the logits far past NMSE_MAX on these synthetic weights."""
    ref = Reference(files(CASES[0]))
    tokens = tokens_for(ref.vocab_size, seed=6)
    err = nmse(ref.logits(tokens, **variant), ref.logits(tokens))
    print(f"reference {variant}: NMSE {err:.3e} from the right math")
    assert err > 1e3 * NMSE_MAX


def test_reference_partial_rope_leaves_tail_alone(files):
    ref = Reference(files(CASES[5]))
    x = np.random.default_rng(0).standard_normal((5, ref.n_head, ref.head_dim))
    out = ref.rope(x, np.arange(5), "normal")
    assert ref.rope_dim < ref.head_dim
    np.testing.assert_array_equal(out[..., ref.rope_dim :], x[..., ref.rope_dim :])
    np.testing.assert_array_equal(out[0], x[0])  # position 0: no rotation
    assert not np.allclose(out[1:, :, : ref.rope_dim], x[1:, :, : ref.rope_dim])


def test_reference_incremental_equals_whole(files):
    """The reference's own cache: token by token equals the whole sequence at once."""
    ref = Reference(files(CASES[0]))
    tokens = tokens_for(ref.vocab_size, seed=8, n=6)
    cache = ref.new_cache()
    steps = np.concatenate([ref.forward(tokens[t : t + 1], t, cache) for t in range(len(tokens))])
    np.testing.assert_allclose(steps, ref.logits(tokens), rtol=0, atol=1e-12)
