"""Models that are not the project's own, for the third-party suite and `scripts/detection_matrix.py`.

Each builder makes a tiny model from a random config (no weights are downloaded), seeded, in
eval mode, on the CPU, with a `run(model)` that makes its input on the device of the model's
first module and calls it once. Placements put a built model somewhere: on one device, split
over two GPUs by accelerate's `dispatch_model`, or with part of it offloaded to the CPU by
`dispatch_model` (its weights wait on the host and are brought in for each call).

transformers and accelerate are the `thirdparty` test extra; builders that need them raise
ImportError without them (tests skip on it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

VOCAB = 64
D = 32


@dataclass(frozen=True)
class ThirdParty:
    """A model builder: `build(seed)` -> module on the CPU; `inputs(tokens, device)` -> (args,
    kwargs) for a sequence of token ids (a model without an embedding gets one vector a token);
    `blocks`: the module paths a device map splits it by (in forward order); `first`: the module
    that gets the input."""

    name: str
    build: Callable[[int], nn.Module]
    inputs: Callable[[list[int], torch.device], tuple[tuple, dict]]
    blocks: tuple[str, ...]
    first: str


TOKENS = [1, 5, 9, 33, 42]


def _ids(tokens, device) -> tuple[tuple, dict]:
    ids = torch.tensor([tokens], device=device)
    mask = torch.ones_like(ids)  # as a tokenizer gives it
    return (), {"input_ids": ids, "attention_mask": mask, "use_cache": False}


def hf_common() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )


def hf_mixtral(seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(**hf_common(), num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(config).eval()


def hf_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**hf_common())).eval()


def hf_qwen2_moe(seed: int = 0) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        **hf_common(),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    )
    return Qwen2MoeForCausalLM(config).eval()


def transformer_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=D, nhead=4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


def _x(tokens, device) -> tuple[tuple, dict]:
    # one vector a token: a fixed function of its id
    ids = torch.tensor(tokens, dtype=torch.float32)[:, None]
    x = torch.sin(ids * torch.arange(1, D + 1, dtype=torch.float32) / D)[None]  # [1, T, D]
    return (x.to(device),), {}


class Expert(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.up = nn.Linear(d, f)
        self.down = nn.Linear(f, d)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


class HandMoE(nn.Module):
    """A user's MoE layer: a router, top-k, experts combined by dense routing weights (every
    expert runs, no host reads)."""

    def __init__(self, d: int = D, n_experts: int = 4, k: int = 2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, 2 * d) for _ in range(n_experts))

    def forward(self, x):  # [T, D]
        probs = self.router(x).softmax(-1)  # [T, E]
        top, chosen = probs.topk(self.k, dim=-1)  # [T, k]
        gates = torch.zeros(x.shape[0], len(self.experts), device=x.device, dtype=x.dtype)
        gates = gates.scatter(1, chosen, top / top.sum(-1, keepdim=True))  # [T, E]
        return sum(gates[:, e, None] * expert(x) for e, expert in enumerate(self.experts))


class HandBlock(nn.Module):
    """Pre-norm MoE block with its residual."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.moe = HandMoE()

    def forward(self, x):
        return x + self.moe(self.norm(x))


class HandMoEModel(nn.Module):
    """Embedding, two MoE blocks, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(HandBlock() for _ in range(2))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens):  # [T] -> [T, V]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def hand_moe(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return HandMoEModel().eval()


def _tokens(tokens, device) -> tuple[tuple, dict]:
    return (torch.tensor(tokens, device=device),), {}


_HF_BLOCKS = (
    "model.embed_tokens",
    "model.layers.0",
    "model.layers.1",
    "model.norm",
    "model.rotary_emb",
    "lm_head",
)

MODELS: dict[str, ThirdParty] = {
    m.name: m
    for m in (
        ThirdParty("hf-mixtral", hf_mixtral, _ids, _HF_BLOCKS, "model.embed_tokens"),
        ThirdParty("hf-llama", hf_llama, _ids, _HF_BLOCKS, "model.embed_tokens"),
        ThirdParty("hf-qwen2-moe", hf_qwen2_moe, _ids, _HF_BLOCKS, "model.embed_tokens"),
        ThirdParty("torch-encoder", transformer_encoder, _x, ("layers.0", "layers.1"), "layers.0"),
        ThirdParty(
            "hand-moe",
            hand_moe,
            _tokens,
            ("embed", "layers.0", "layers.1", "head"),
            "embed",
        ),
    )
}

# Placements: where each block goes ("cpu" under a GPU main device: offloaded by accelerate).
PLACEMENTS = ("cuda", "split", "offload")


def device_map(model: ThirdParty, placement: str) -> dict[str, object] | None:
    """accelerate's device map for `placement` (None: the whole model on cuda:0 with `.to()`)."""
    if placement == "cuda":
        return None
    blocks = model.blocks
    half = len(blocks) // 2
    if placement == "split":  # first half on GPU 0, the rest on GPU 1
        return {b: "cuda:0" if i < half else "cuda:1" for i, b in enumerate(blocks)}
    if placement == "offload":  # the second half's weights on the host, run on GPU 0
        return {b: "cuda:0" if i < half else "cpu" for i, b in enumerate(blocks)}
    raise ValueError(f"unknown placement {placement!r} (known: {', '.join(PLACEMENTS)})")


def place(model: nn.Module, spec: ThirdParty, placement: str) -> nn.Module:
    """Put a built model on `placement` (inside the emulated accelerator, or on real CUDA)."""
    dmap = device_map(spec, placement)
    if dmap is None:
        return model.to("cuda:0")
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=dmap, main_device="cuda:0")


def run(model: nn.Module, spec: ThirdParty, device, tokens: list[int] = TOKENS) -> object:
    args, kwargs = spec.inputs(list(tokens), torch.device(device))
    return model(*args, **kwargs)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models run faster so, and xdist workers share cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- one traced run --------------------------------------------------------------------------

GRAD_MODES = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "grad": torch.enable_grad,
}


@dataclass(frozen=True)
class KnownFinding:
    """An offence the tracer rightly reports in a third-party library's own code, at a version
    this suite may meet: the runs judge the offences other than these."""

    cls: str
    source: str  # a part of the offending op's source path
    op: str  # a part of the op's name
    why: str

    def matches(self, offence: dict) -> bool:
        return (
            offence["class"] == self.cls
            and self.source in (offence["source"] or "")
            and self.op in offence["op"]
        )


KNOWN_FINDINGS = (
    KnownFinding(
        "transfer",
        "transformers/masking_utils.py",
        "lift_fresh",
        "transformers before 5.2x builds the eager mask's zero with torch.tensor(0.0, device=...): a "
        "host-to-device upload of Python data on every forward (seen with 5.17 on the H100; later "
        "versions write torch.zeros((), device=...))",
    ),
)


def judge_offences(events) -> tuple[dict | None, list[str]]:
    """(the first offence that is not a KNOWN_FINDING, or None; the known ones, described) of a
    traced run's events (the Tracer's `keep_events=True`)."""
    from harness.trace.events import first_offence

    offences = [first_offence(ev) for ev in events if ev.offending]
    known = [o for o in offences if any(k.matches(o) for k in KNOWN_FINDINGS)]
    first = next((o for o in offences if o not in known), None)
    return first, [f"{o['class']} {o['op']} at {o['source']}" for o in known]


@dataclass
class Result:
    """One traced run of a third-party model, clean or with a generic fault at module `at`.

    `crashed`: something other than a device error was raised (building, placing, injecting or
    running), `error` says what; a device error that CUDA's rules raise is part of a fault's
    outcome, not a crash."""

    model: str
    placement: str
    mode: str
    fault: str | None = None
    at: str | None = None
    expected_class: str | None = None
    verdict: str | None = None
    first: tuple | None = None  # (class, module, tensor) of the first offence not known
    known: list | None = None  # offences of KNOWN_FINDINGS, described
    counts: dict | None = None
    fired: int | None = None
    error: str | None = None
    crashed: bool = False
    seed: int = 0
    tokens: list[int] | None = None
    no_site: bool = False  # the fault has nowhere to go in this model (e.g. no module makes tensors)

    @property
    def clean(self) -> bool:
        clean_apart_from_known = self.verdict == "dirty" and self.first is None and bool(self.known)
        return not self.crashed and self.error is None and (self.verdict == "clean" or clean_apart_from_known)

    @property
    def detected(self) -> bool:
        return not self.crashed and not self.no_site and self.first is not None

    @property
    def class_right(self) -> bool:
        return self.detected and self.first[0] == self.expected_class

    @property
    def located(self) -> bool:
        """In the module where the fault went in, or naming that module's own tensors (a fused
        op of a parent that reads them directly, as nn.TransformerEncoderLayer's fast path does)."""
        if not self.detected:
            return False
        names = (self.first[2] or "").split(", ")
        return self.first[1] == self.at or any(n.startswith(f"{self.at}.") for n in names)

    def describe(self) -> str:
        what = f"{self.fault} at {self.at}" if self.fault else "clean"
        got = f"crashed: {self.error}" if self.crashed else f"{self.verdict}, first {self.first}"
        return f"{self.model} / {self.placement} / {self.mode} / {what}: {got}"


def pick_site(sites: list[str], index: int | None) -> str:
    """The site a run uses: `index` into `sites` (wrapping), or the middle one."""
    return sites[len(sites) // 2 if index is None else index % len(sites)]


def trace_run(
    name: str,
    placement: str,
    mode: str,
    fault: str | None = None,
    site: int | None = None,
    seed: int = 0,
    tokens: list[int] = TOKENS,
) -> Result:
    """Build model `name` (weights from `seed`), place it, inject `fault` at its `site`-th site
    (None: the middle one), and trace one call on `tokens` under grad mode `mode`. Run it inside
    the emulated accelerator or on real CUDA (with two devices for the "split" placement)."""
    from harness import faults
    from harness.trace import Tracer, is_device_error

    spec = MODELS[name]
    result = Result(name, placement, mode, fault, seed=seed, tokens=list(tokens))
    injection = None
    try:
        model = place(spec.build(seed), spec, placement)
        if fault is not None:
            f = faults.get(fault)
            with GRAD_MODES[mode]():  # the modules that run depend on it (torch.nn's fast paths)
                sites = f.sites(model, run=lambda: run(model, spec, "cuda:0", tokens))
            if not sites:
                result.no_site = True
                result.error = f"{fault} has no site in {name} on {placement}"
                return result
            result.at = pick_site(sites, site)
            result.expected_class = f.expected(model, result.at)
            injection = f.inject(model, result.at)
        tracer = Tracer(model, placement="cuda:0" if placement == "cuda" else None, keep_events=True)
        with GRAD_MODES[mode](), tracer:
            try:
                run(model, spec, "cuda:0", tokens)
            except Exception as exc:  # a device error is recorded by the tracer; others crash
                result.error = f"{type(exc).__name__}: {str(exc)[:300]}"
                result.crashed = not is_device_error(str(exc))
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        result.crashed = True
        return result
    finally:
        if injection is not None:
            result.fired = injection.fired
            injection.remove()
    s = tracer.summary
    result.verdict, result.counts = s.verdict, {k: v for k, v in s.counts.items() if v}
    f0, result.known = judge_offences(tracer.events)
    if f0 is not None:
        result.first = (f0["class"], f0["module"], f0.get("tensor"))
    return result
