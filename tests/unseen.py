"""A held-out evaluation: models and placement bugs that no other test of the harness contains.

The harness was built against its own Mixtral, `tests/thirdparty.py` and the generic faults of
`harness.faults`. These cases are written the way users write models and bugs, not through
`harness.faults`: a conv net with BatchNorm, GRU and LSTM models, a ViT-like model from
`nn.TransformerEncoderLayer(batch_first, norm_first)` and `nn.MultiheadAttention`, transformers'
GPT-2, BERT, T5, Phi and Gemma from tiny random configs, weight tying, non-persistent buffers; bugs
such as a causal mask built without `device=`, `.tolist()` in forward, a rotary cache kept for
the first device, a buffer registered after `.to()`. Traps that must NOT be flagged sit beside
them: 0-dim CPU tensors and Python scalars in arithmetic, `new_zeros`, `.to(same device)`,
zero-byte copies, channels_last, non-contiguous views, TorchScript, accelerate's offload.
Round three adds transformers' Qwen3-MoE, OLMoE, DeepSeek-V3 (MLA), Mistral with a sliding
window, GPT-OSS, Jamba, ViT, CLIP's vision tower, Whisper and Mamba (forward, generate, a
training loss), fft, complex64 and sparse tensors, distributions, side streams and events, pinned inputs, a user's
batch object, `torch.func`, `torch.device` as a context, expert parallelism over two GPUs; and
bugs in state kept on the host (a plain list's Parameter, a ParameterDict entry added late, a
lazily registered buffer, host boundaries, class weights, masks, indices, a functional_call
state dict), an LSTM's initial state, a host complex rotary table, hooks that move inputs or
gradients, CUDA-event timing, a boolean-mask select, legacy tensor types, a compiled module.

Each `Case` builds its model inside the accelerator (real CUDA or `EmulatedCuda(device_count=2)`),
places it, and says what the tracer must find: `expect` = (class, module) of the first offence,
and `where`, the function whose line the first offence must name; `expect=None`: the run must be
clean. What class a bug is, where that is open to argument, is decided in the case's `why`.

`scripts/unseen_bugs.py` runs every case in each grad mode with the placement inferred and given
(or the one it names), and tabulates; `tests/test_unseen.py` runs a fast subset in CI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

D = 16
T = 6  # sequence length
VOCAB = 50

MISMATCH, SYNC, STRAY, TRANSFER = "mismatch", "sync", "stray", "transfer"


@dataclass(frozen=True)
class Case:
    """`build(devices)` -> (model placed on `devices`, run(model) -> output, explicit placement);
    `expect`: (class, module) of the first offence, None for a clean run; `where`: the function
    (qualified name) whose line the first offence names; `devices`: how many it needs."""

    name: str
    build: Callable
    expect: tuple[str, str] | None
    where: str | None = None
    devices: int = 1
    why: str = ""
    known: str = ""  # why the emulation cannot judge this case (a known limit: never judged clean there)
    cuda_checked: bool = (
        True  # with a known limit: whether real CUDA meets `expect` (False: a limit there too)
    )
    modes: tuple[str, ...] = ()  # the grad modes the bug shows in (others: a clean run); () all
    # the placements it is judged with; () both. A deliberate round trip between devices in one
    # call is a transfer unless declared (README: "declare a deliberate round trip with placement=")
    placements: tuple[str, ...] = ()

    def expect_in(self, mode: str) -> tuple[str, str] | None:
        return self.expect if not self.modes or mode in self.modes else None

    def known_in(self, mode: str) -> str:
        return self.known if not self.modes or mode in self.modes else ""


class Unavailable(Exception):
    """A case needs what this environment lacks (a transformers class of a newer release): it is
    left out, and said so, not counted as a crash."""


def transformers_classes(*names: str) -> list:
    """transformers' classes `names`; Unavailable where the installed release has not one of them."""
    import transformers as tf

    missing = [n for n in names if not hasattr(tf, n)]
    if missing:
        raise Unavailable(f"transformers {tf.__version__} has no {', '.join(missing)}")
    return [getattr(tf, n) for n in names]


def transformers_has(module: str, name: str, mentioning: str = "") -> None:
    """Unavailable where the installed transformers' `module` has no `name` (dotted: a class's
    method) or its source does not mention `mentioning`: a case whose bug is transformers' own
    code of some releases."""
    import importlib
    import inspect

    import transformers as tf

    found = importlib.import_module(f"transformers.{module}")
    for part in name.split("."):
        found = getattr(found, part, None)
    if found is None or mentioning not in inspect.getsource(found):
        what = f"{module}.{name}" + (f" that mentions {mentioning}" if mentioning else "")
        raise Unavailable(f"transformers {tf.__version__} has no {what}")


def _tokens(device, n: int = T) -> torch.Tensor:
    return (torch.arange(n) * 7 % VOCAB).to(device)[None]  # [1, n]


def _vectors(device, n: int = T) -> torch.Tensor:
    x = torch.sin(torch.arange(n * D, dtype=torch.float32).reshape(1, n, D) / 7)
    return x.to(device)


def _pair(device) -> torch.Tensor:
    return torch.cat([_tokens(device), _tokens(device).flip(-1)])  # [2, T]


def _image(device) -> torch.Tensor:
    return torch.cos(torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) / 5).to(device)


# ---- clean models ---------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Conv, BatchNorm, ReLU, pooling, a linear head; channels_last input and a non-contiguous view."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = x.transpose(2, 3)  # a non-contiguous view
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class Recurrent(nn.Module):
    def __init__(self, cell: str):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(D, D, num_layers=2, batch_first=True)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


class TinyViT(nn.Module):
    """Patches, a class token, learned positions, pre-norm encoder layers, an attention-pooling head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, D, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.pos = nn.Parameter(torch.randn(1, 5, D) * 0.02)
        layer = nn.TransformerEncoderLayer(D, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.pool = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # [B, 4, D]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.encoder(x)
        pooled, _ = self.pool(x[:, :1], x, x, need_weights=False)
        return self.head(pooled[:, 0])


class TiedLM(nn.Module):
    """Weight tying (the head is the embedding), a non-persistent causal-mask buffer, 0-dim and
    Python scalars, `new_zeros`, `arange(device=)`, `.to(same device)`, a zero-byte copy."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("causal", torch.ones(32, 32, dtype=torch.bool).tril(), persistent=False)
        self.scale = 1 / math.sqrt(D)

    def forward(self, ids):
        n = ids.shape[1]
        pos = torch.arange(n, device=ids.device)
        x = self.embed(ids) + torch.sin(pos[:, None] / 10.0)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)) * torch.tensor(self.scale)  # a 0-dim CPU tensor: allowed
        scores = scores.masked_fill(~self.causal[:n, :n], float("-inf"))
        x = x + self.out(scores.softmax(-1) @ v)
        bias = x.new_zeros(x.shape[-1]) + torch.zeros_like(x[0, 0])
        x = (x + bias).to(x.device).to(self.head.weight.device)  # no-ops
        x = x + torch.empty(0).to(x.device).sum()  # a zero-byte copy
        return self.head(x) * 2.0


class Scripted(nn.Module):
    """A TorchScript submodule between plain ones."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.mlp = torch.jit.script(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.head(self.mlp(self.embed(ids)))


def _on(device: str, model: nn.Module, make_input) -> tuple:
    model = model.to(device)
    return model, lambda m: m(make_input(device)), device


def _clean_model(cls, make_input, *args):
    def build(devices):
        torch.manual_seed(0)
        return _on(devices[0], cls(*args).eval(), make_input)

    return build


# ---- transformers from tiny random configs ----------------------------------------------------------


# transformers' models: (model class, config class, tiny sizes)
_DECODER = dict(
    hidden_size=D,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=32,
)
_HF = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=D, n_layer=2, n_head=2, n_positions=32)),
    "bert": ("BertForMaskedLM", "BertConfig", _DECODER),
    "t5": (
        "T5ForConditionalGeneration",
        "T5Config",
        dict(d_model=D, d_kv=8, d_ff=32, num_layers=2, num_heads=2),
    ),
    "phi": ("PhiForCausalLM", "PhiConfig", _DECODER),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_DECODER, num_key_value_heads=1, head_dim=8)),
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(_DECODER, num_key_value_heads=1, head_dim=8, sliding_window=4),
    ),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_DECODER, num_key_value_heads=1)),
}


def _hf(kind: str, attn: str = "eager", mask: bool = True):
    def build(devices):
        torch.manual_seed(0)
        model_class, config_class, sizes = _HF[kind]
        model_type, config_type = transformers_classes(model_class, config_class)
        model = model_type(config_type(vocab_size=VOCAB, attn_implementation=attn, **sizes))
        model = model.eval().to(devices[0])

        def run(m):
            ids = _tokens(devices[0])
            kwargs = {"input_ids": ids}
            if mask:
                kwargs["attention_mask"] = torch.ones_like(ids)  # as a tokenizer gives it
            if kind == "t5":
                kwargs["decoder_input_ids"] = ids[:, :3]
            if kind != "bert":
                kwargs["use_cache"] = False
            return m(**kwargs)

        return model, run, devices[0]

    return build


# ---- CPU offload (accelerate) of a user's model: its traffic is declared ----------------------------


def _offloaded_convnet(devices):
    from accelerate import dispatch_model

    torch.manual_seed(0)
    model = ConvNet().eval()
    dmap = {"conv1": devices[0], "bn1": devices[0], "conv2": "cpu", "bn2": "cpu", "head": devices[0]}
    model = dispatch_model(model, device_map=dmap, main_device=devices[0])
    return model, lambda m: m(_image(devices[0])), None


# ---- bugs, as users write them ------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal self-attention; `bug` picks a way to get its mask or positions wrong."""

    def __init__(self, bug: str | None = None):
        super().__init__()
        self.bug = bug
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        # a plain attribute, not a buffer: `.to()` does not move it
        self.host_mask = torch.ones(32, 32, dtype=torch.bool).tril()
        self.host_bias = np.linspace(0, 1, D, dtype=np.float32)

    def forward(self, x):
        n = x.shape[1]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        if self.bug == "mask-without-device":
            mask = torch.ones(n, n, dtype=torch.bool).tril()  # no device=
        elif self.bug == "mask-uploaded-per-call":
            mask = self.host_mask[:n, :n].to(x.device)  # a host tensor uploaded on every call
        elif self.bug == "mask-from-list":
            mask = torch.tensor([[j <= i for j in range(n)] for i in range(n)], device=x.device)
        else:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        y = self.out(scores.softmax(-1) @ v)
        if self.bug == "from-numpy":
            y = y + torch.from_numpy(self.host_bias).to(y.device)  # host data uploaded each call
        return y


class Block(nn.Module):
    def __init__(self, bug: str | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = Attention(bug)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class LM(nn.Module):
    """Token and position embeddings, blocks, a head; `bug` is one of the LM-level bugs."""

    def __init__(self, bug: str | None = None, attn_bug: str | None = None, layers: int = 2):
        super().__init__()
        self.bug = bug
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(32, D)
        self.layers = nn.ModuleList(Block(attn_bug if i == layers - 1 else None) for i in range(layers))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        n = ids.shape[1]
        if self.bug == "positions-without-device":
            positions = torch.arange(n)  # no device=
        else:
            positions = torch.arange(n, device=ids.device)
        x = self.embed(ids) + self.pos(positions)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _lm(bug=None, attn_bug=None, *, prepare=None):
    def build(devices):
        torch.manual_seed(0)
        model = LM(bug, attn_bug).eval().to(devices[0])
        if prepare is not None:
            prepare(model, devices)
        return model, lambda m: m(_tokens(devices[0])), devices[0]

    return build


class HostRead(nn.Module):
    """An MLP that reads something back to the host in forward (`how`)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)

    def forward(self, x):
        h = F.gelu(self.up(x))
        if self.how == "numpy":
            stats = h.detach().cpu().numpy()  # e.g. for logging
            h = h * float(np.abs(stats).mean() > -1)
        elif self.how == "tolist":
            lengths = (h[0, :, 0] > -100).sum(-1).tolist()
            h = h * (lengths > 0)
        elif self.how == "item":
            h = h / (h.abs().max().item() + 1)
        return self.down(h)


class ReadLM(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.mlp = HostRead(how)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.head(self.mlp(self.embed(ids)))


class Gather(nn.Module):
    """Picks positions of its input: with a CPU index tensor (`bug`) or one on the device."""

    def __init__(self, bug: bool):
        super().__init__()
        self.bug = bug
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        # with the bug: built on the host, then used to index a device tensor
        keep = torch.tensor([0, 2, 4]) if self.bug else torch.arange(0, 5, 2, device=x.device)
        return self.proj(x[:, keep])


class GatherLM(nn.Module):
    def __init__(self, bug: bool):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pick = Gather(bug)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.head(self.pick(self.embed(ids)))


class StateDictLinear(nn.Module):
    """A linear layer that rebuilds its weight from a CPU state dict kept aside on every call."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.saved = {k: v.detach().clone() for k, v in self.proj.state_dict().items()}  # on the host

    def forward(self, x):
        w = self.saved["weight"].to(x.device)
        return F.linear(x, w, self.proj.bias)


class SavedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.proj = StateDictLinear()
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.head(self.proj(self.embed(ids)))


_ROPE_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class Rotary(nn.Module):
    """Rotary embedding whose tables are cached by length (`cache_by_device=False`: only by
    length, so the first device's tables are reused on the other one)."""

    def __init__(self, cache_by_device: bool):
        super().__init__()
        self.by_device = cache_by_device

    def tables(self, n: int, device):
        key = (n, device) if self.by_device else n
        if key not in _ROPE_CACHE:
            inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device).float() / D))
            angles = torch.arange(n, device=device).float()[:, None] * inv
            _ROPE_CACHE[key] = (angles.cos(), angles.sin())
        return _ROPE_CACHE[key]

    def forward(self, x):
        cos, sin = self.tables(x.shape[1], x.device)
        a, b = x[..., ::2], x[..., 1::2]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class RopeBlock(nn.Module):
    def __init__(self, cache_by_device: bool):
        super().__init__()
        self.rope = Rotary(cache_by_device)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return x + self.proj(self.rope(x))


class SplitLM(nn.Module):
    """Two blocks meant for two GPUs: an explicit hand-off in the model's own forward."""

    def __init__(self, block0: nn.Module, block1: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.block0 = block0
        self.block1 = block1
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.block0(self.embed(ids))
        x = self.block1(x.to(self.block1_device))  # the device-map boundary, declared by the placement
        return self.head(x.to(self.head.weight.device))


def _split(block0, block1, head_on: int = 1):
    def build(devices):
        _ROPE_CACHE.clear()
        torch.manual_seed(0)
        model = SplitLM(block0(), block1()).eval()
        d0, d1 = devices[0], devices[1]
        model.embed.to(d0)
        model.block0.to(d0)
        model.block1.to(d1)
        model.head.to(devices[head_on])
        model.block1_device = torch.device(d1)
        placement = {"": d0, "block1": d1, "head": devices[head_on]}
        return model, lambda m: m(_tokens(d0)), placement

    return build


class ToFirstGpu(nn.Module):
    """A block that hands its output to "cuda:0", wherever it is placed."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return self.proj(x).to("cuda:0")


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return self.proj(x) * self.gain  # `gain`: a buffer registered after the model was moved


def _late_buffer(model, devices):
    scaled = Scaled().to(devices[0])
    model.layers[1].mlp[0] = scaled
    scaled.register_buffer("gain", torch.ones(D))  # after .to(): stays on the CPU


def _rope_block(by_device):
    return lambda: RopeBlock(by_device)


# ---- more clean models: idioms that must not be flagged ------------------------------------------


class PackedGRU(nn.Module):
    """A GRU over padded sequences packed with their lengths, which PyTorch wants on the host."""

    def __init__(self, lengths_on_device: bool = False):
        super().__init__()
        self.lengths_on_device = lengths_on_device
        self.embed = nn.Embedding(VOCAB, D)
        self.rnn = nn.GRU(D, D, batch_first=True)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        lengths = torch.tensor([ids.shape[1], ids.shape[1] - 2])  # host lengths, as the API wants
        if self.lengths_on_device:
            lengths = (ids != -1).sum(-1)  # lengths computed on the device: torch reads them back
        x = self.embed(ids)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=True)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return self.head(out)


class Idioms(nn.Module):
    """LazyLinear, a weight-norm parametrization, one_hot with its class count, indexing with a
    0-dim CPU integer, torch.where with a 0-dim CPU tensor, interpolate, a Python-list-free MLP."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.lazy = nn.LazyLinear(D)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(D, D))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids) + F.one_hot(ids % D, D).to(self.embed.weight.dtype)
        x = self.lazy(x)
        x = torch.where(x > 0, x, torch.tensor(0.0))
        x = x + x[:, torch.tensor(0)][:, None]
        x = F.interpolate(x.transpose(1, 2), size=ids.shape[1], mode="linear").transpose(1, 2)
        return self.head(self.normed(x) * np.float32(0.5))


class Checkpointed(nn.Module):
    """Blocks under activation checkpointing (recomputed in the backward pass)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        from torch.utils.checkpoint import checkpoint

        x = self.embed(ids)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if torch.is_grad_enabled() else block(x)
        return self.head(x)


class Compiled(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.mlp = torch.compile(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.head(self.mlp(self.embed(ids)))


def _generate(kind: str = "gpt2", **options):
    """transformers' generate(): a prefill and decode steps with a KV cache, its host-side loop."""

    def build(devices):
        model, _, device = _hf(kind)(devices)

        def run(m):
            ids = _tokens(device)
            out = m.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, pad_token_id=0, **options
            )
            return out.float()

        return model, run, device

    return build


def _autocast(devices):
    torch.manual_seed(0)
    model = LM().eval().to(devices[0])

    def run(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(_tokens(devices[0])).float()

    return model, run, devices[0]


def _train_step(devices):
    """A training step: forward, loss, backward, AdamW, outside and inside a tracer alike."""
    torch.manual_seed(0)
    model = LM().to(devices[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def run(m):
        ids = _tokens(devices[0])
        logits = m(ids)
        if torch.is_grad_enabled():
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()
        return logits

    return model, run, devices[0]


# ---- more bugs --------------------------------------------------------------------------------------


class HardCoded(nn.Module):
    """`device="cuda"` written into the code: the current device (cuda:0), wherever the module is."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        noise = torch.zeros(x.shape, device="cuda")
        return self.proj(x + noise)


class Trimmed(nn.Module):
    """Cuts padding at the longest sequence, with the length read from the device."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        lengths = (x[..., 0] > -100).sum(-1)  # [B] on the device
        if self.how == "slice":
            x = x[:, : lengths.max()]  # a device tensor as a slice bound: read on the host
        elif self.how == "branch":
            if (lengths > 0).all():  # Python `if` on a device tensor: read on the host
                x = x * 1.0
        elif self.how == "one-hot":
            x = x + F.one_hot(lengths - 1)[:, None, : x.shape[-1]].to(x.dtype).sum()  # class count read
        elif self.how == "bucketize":
            edges = torch.linspace(-1, 1, 5)  # host boundaries with device values
            x = x + torch.bucketize(x, edges).to(x.dtype)
        elif self.how == "one-element":
            x = x + torch.tensor([1.0])  # a 1-element CPU tensor is no scalar to CUDA
        return self.proj(x)


class ListHolder(nn.Module):
    """Submodules kept in a plain Python list (not an nn.ModuleList): `.to()` never sees them."""

    def __init__(self):
        super().__init__()
        self.experts = [nn.Linear(D, D) for _ in range(2)]
        self.gate = nn.Linear(D, 2)

    def forward(self, x):
        w = self.gate(x).softmax(-1)
        return sum(w[..., i, None] * e(x) for i, e in enumerate(self.experts))


class Wrapper(nn.Module):
    """Embedding, one inner module, a head."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.inner = inner
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.head(self.inner(self.embed(ids)))


def _wrapped(make_inner, device_index: int = 0):
    def build(devices):
        torch.manual_seed(0)
        device = devices[device_index]
        model = Wrapper(make_inner()).eval().to(device)
        return model, lambda m: m(_tokens(device)), device

    return build


class ChildTraps(nn.Module):
    """What must not be flagged, inside a module (the model's own forward is the run's edge, so
    traps there prove less): 0-dim CPU tensors and Python and numpy scalars in arithmetic,
    `new_zeros`/`zeros_like`, `arange(device=)`, `.to(same device)`, a zero-byte upload,
    indexing with a 0-dim CPU integer, `torch.where` with a 0-dim CPU tensor, one_hot with its
    class count, a scalar computed on the host from 0-dim CPU tensors."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.temperature = 2.0

    def forward(self, x):
        n = x.shape[1]
        t = torch.tensor(self.temperature)  # a 0-dim CPU tensor: CUDA takes it as a scalar
        x = self.proj(x) / t + torch.tensor(0.5) * np.float32(0.1) - 1
        x = torch.where(x > 0, x, torch.tensor(0.0))
        x = x + x.new_zeros(x.shape[-1]) + torch.zeros_like(x) + torch.arange(n, device=x.device)[:, None]
        x = x.to(x.device).to(self.proj.weight.device).cuda(x.device)  # no-ops
        x = x + torch.empty(0, D).to(x.device).sum(0)  # a zero-byte upload
        x = x + x[:, torch.tensor(0)][:, None]  # a 0-dim CPU index is an integer
        x = x + F.one_hot(torch.arange(n, device=x.device) % D, D)
        scale = torch.tensor(3.0).sqrt() * torch.tensor(2.0)  # host scalars, computed on the host
        return x * scale


class RootRead(nn.Module):
    """The model's own forward reads an activation back mid-way (to log it) and goes on."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        self.last_norm = float(np.linalg.norm(x.detach().cpu().numpy()))  # for logging
        return self.head(x)


# ---- round two: placements by accelerate, decode steps, caches, mixed precision ----------------------


def _dispatched(attn_bug=None, offload: bool = False, make_inner=None):
    """The LM split by accelerate's dispatch_model: layer 0 on cuda:0, layer 1 and the head on
    cuda:1 (or, `offload`, their weights on the host, brought to cuda:0 for each call)."""

    def build(devices):
        from accelerate import dispatch_model

        torch.manual_seed(0)
        model = LM(None, attn_bug).eval()
        second = "cpu" if offload else devices[1]
        dmap = {
            "embed": devices[0],
            "pos": devices[0],
            "layers.0": devices[0],
            "layers.1": second,
            "head": second,
        }
        model = dispatch_model(model, device_map=dmap, main_device=devices[0])
        given = None if offload else {"": devices[0], "layers.1": devices[1], "head": devices[1]}
        return model, lambda m: m(_tokens(devices[0])), given

    return build


class CachedAttention(nn.Module):
    """Attention over a KV cache kept between calls; `bug`: the cache made without `device=`."""

    def __init__(self, bug: bool):
        super().__init__()
        self.bug = bug
        self.qkv = nn.Linear(D, 3 * D)
        self.cache: torch.Tensor | None = None
        self.pos = 0

    def forward(self, x):  # [1, 1, D]: one token a call
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.cache is None:
            device = None if self.bug else x.device
            self.cache = torch.zeros(2, 16, D, device=device)
        self.cache[0, self.pos].copy_(k[0, 0])  # with the bug: a device-to-host copy each step
        self.cache[1, self.pos].copy_(v[0, 0])
        self.pos += 1
        keys = self.cache[0, : self.pos].to(x.device)
        values = self.cache[1, : self.pos].to(x.device)
        return (q @ keys.T).softmax(-1) @ values


class Decoder(nn.Module):
    def __init__(self, bug: bool):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.attn = CachedAttention(bug)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):  # [1, 1]
        return self.head(self.attn(self.embed(ids)))


def _decoder(bug: bool):
    def build(devices):
        torch.manual_seed(0)
        model = Decoder(bug).eval().to(devices[0])

        def run(m):
            ids = _tokens(devices[0])
            out = None
            for i in range(3):  # a prefill token, then two decode steps
                out = m(ids[:, i : i + 1])
            return out

        return model, run, devices[0]

    return build


class Prefetch(nn.Module):
    """Reads its activations back with non_blocking=True (into pinned memory, as for prefetching)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        y = self.proj(x)
        self.kept = y.detach().to("cpu", non_blocking=True)
        return y


class SdpaMask(nn.Module):
    """scaled_dot_product_attention with a mask: `host_mask` made without device=."""

    def __init__(self, host_mask: bool):
        super().__init__()
        self.host_mask = host_mask
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, D // 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        n = x.shape[1]
        if self.host_mask:
            mask = torch.ones(n, n, dtype=torch.bool).tril()
            mask = mask[None, None]  # a view: the stray is the tril above
        else:
            mask = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return out.transpose(1, 2).flatten(2)


class Routed(nn.Module):
    """Top-k routing without host reads: topk, sort, cumsum, scatter_add, gather, an EmbeddingBag."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, 4)
        self.experts = nn.Parameter(torch.randn(4, D, D) * 0.1)
        self.bag = nn.EmbeddingBag(VOCAB, D, mode="mean")

    def forward(self, x):  # [1, T, D]
        t = x[0]
        weights, chosen = self.router(t).softmax(-1).topk(2, dim=-1)  # [T, 2]
        order = chosen.flatten().argsort()
        counts = torch.zeros(4, dtype=torch.long, device=x.device).scatter_add(
            0, chosen.flatten(), torch.ones_like(chosen.flatten())
        )
        offsets = counts.cumsum(0) - counts
        out = torch.einsum("td,tkde->tke", t, self.experts[chosen])  # [T, 2, D]
        out = (out * weights[..., None]).sum(1)
        ranked = chosen.flatten()[order]
        ids = (ranked * 7 + offsets[ranked]) % VOCAB
        bag = self.bag(ids[None])  # [1, D]
        return (out + bag)[None]


def _train_amp(devices):
    """A mixed-precision training step: autocast, GradScaler, clip_grad_norm_, AdamW."""
    torch.manual_seed(0)
    model = LM().to(devices[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")

    def run(m):
        ids = _tokens(devices[0])
        with torch.autocast("cuda", dtype=torch.float16):
            logits = m(ids)
        if not torch.is_grad_enabled():
            return logits.float()
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        return loss.detach()

    return model, run, devices[0]


def _hf_labels(devices):
    """transformers computes the loss inside forward when given labels."""
    model, _, device = _hf("gpt2")(devices)

    def run(m):
        ids = _tokens(device)
        return m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss

    return model, run, device


def _half(devices):
    torch.manual_seed(0)
    model = LM().eval().to(devices[0], torch.bfloat16)
    return model, lambda m: m(_tokens(devices[0])).float(), devices[0]


class Seq2Seq(nn.Module):
    """nn.Transformer with a causal target mask; `host_mask`: the mask made without device=."""

    def __init__(self, host_mask: bool):
        super().__init__()
        self.host_mask = host_mask
        self.embed = nn.Embedding(VOCAB, D)
        self.transformer = nn.Transformer(D, 2, 1, 1, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, src, tgt):
        n = tgt.shape[1]
        device = None if self.host_mask else tgt.device
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=device)
        # tgt_is_causal: without it nn.Transformer compares the mask with a causal one, on the
        # mask's device (on the GPU: `bool((mask == causal).all())`, a sync on every call)
        causal = None if self.host_mask else True
        out = self.transformer(self.embed(src), self.embed(tgt), tgt_mask=mask, tgt_is_causal=causal)
        return self.head(out)


def _seq2seq(host_mask: bool):
    def build(devices):
        torch.manual_seed(0)
        model = Seq2Seq(host_mask).eval().to(devices[0])
        return model, lambda m: m(_tokens(devices[0]), _tokens(devices[0], 4)), devices[0]

    return build


def _padded_encoder(devices):
    """nn.TransformerEncoder with a key padding mask, nested tensors allowed (its eval fast path)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval().to(devices[0])
    pad = torch.tensor([[False] * T, [False] * (T - 2) + [True] * 2], device=devices[0])
    x = torch.cat([_vectors(devices[0]), _vectors(devices[0]).flip(1)])
    return model, lambda m: m(x, src_key_padding_mask=pad), devices[0]


def _data_parallel(devices):
    """nn.DataParallel over both GPUs: it copies the model and the batch to each for every call."""
    torch.manual_seed(0)
    model = nn.DataParallel(LM().eval().to(devices[0]), device_ids=[0, 1])
    return model, lambda m: m(_pair(devices[0])), None


def _hf_mixtral_eager(devices):
    """transformers' Mixtral with its eager experts: `nonzero` and `torch.where` on the routing
    mask pick the tokens of each expert, on the host."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    model = tf.MixtralForCausalLM(config).eval().to(devices[0])
    ids = _tokens(devices[0])
    return model, lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False), devices[0]


class Noisy(nn.Module):
    """Adds noise from its own generator, seeded once: on the host (the bug) or on the device."""

    def __init__(self, host_generator: bool):
        super().__init__()
        self.host_generator = host_generator
        self.proj = nn.Linear(D, D)
        self.generator: torch.Generator | None = None

    def forward(self, x):
        if self.generator is None:
            device = "cpu" if self.host_generator else x.device
            self.generator = torch.Generator(device=device).manual_seed(0)
        noise = torch.randn(x.shape, device=x.device, generator=self.generator)
        return self.proj(x + 0.01 * noise)


def _cpu_offloaded(attn_bug=None):
    """accelerate's cpu_offload: every weight waits on the host and comes in for each call."""

    def build(devices):
        from accelerate import cpu_offload

        torch.manual_seed(0)
        model = cpu_offload(LM(None, attn_bug).eval(), execution_device=torch.device(devices[0]))
        return model, lambda m: m(_tokens(devices[0])), None

    return build


class ScaleGrad(torch.autograd.Function):
    """Identity forward; its backward scales the gradient by a tensor made without device=."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.full(grad.shape[-1:], 0.5)  # on the host: CUDA refuses the product


class GradScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return self.proj(ScaleGrad.apply(x))


class Timed(nn.Module):
    """Times itself with torch.cuda.synchronize(), left in from a benchmark."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        y = self.proj(x)
        torch.cuda.synchronize()  # the host waits for the device here
        return y


class HostInputs(nn.Module):
    """Takes its batch on the host, as a dict, and moves it to its device itself (as transformers'
    models and many training loops do)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, batch):
        batch = {k: v.to(self.embed.weight.device, non_blocking=True) for k, v in batch.items()}
        x = self.embed(batch["ids"]) * batch["mask"][..., None]
        return self.head(x)


def _host_inputs(devices):
    torch.manual_seed(0)
    model = HostInputs().eval().to(devices[0])
    ids = _tokens("cpu")
    return model, lambda m: m({"ids": ids, "mask": torch.ones(ids.shape)}), devices[0]


class StepCounter(nn.Module):
    """Decode steps after the first build their position from a Python int on the host."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(32, D)
        self.head = nn.Linear(D, VOCAB)
        self.step = 0

    def forward(self, ids):  # [1, 1]
        position = torch.tensor([[self.step]], device=ids.device)  # an upload on every step
        self.step += 1
        return self.head(self.embed(ids) + self.pos(position))


class Stepper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = StepCounter()

    def forward(self, ids):
        return self.inner(ids)


def _stepper(devices):
    torch.manual_seed(0)
    model = Stepper().eval().to(devices[0])

    def run(m):
        ids = _tokens(devices[0])
        return [m(ids[:, i : i + 1]) for i in range(3)][-1]

    return model, run, devices[0]


def _read(devices, how):
    torch.manual_seed(0)
    model = ReadLM(how).eval().to(devices[0])
    return model, lambda m: m(_tokens(devices[0])), devices[0]


def _gather(devices, bug):
    torch.manual_seed(0)
    model = GatherLM(bug).eval().to(devices[0])
    return model, lambda m: m(_tokens(devices[0])), devices[0]


def _saved(devices):
    torch.manual_seed(0)
    model = SavedLM().eval().to(devices[0])
    return model, lambda m: m(_tokens(devices[0])), devices[0]


# ---- round three: more transformers families, complex and sparse tensors, streams, bugs in hooks --

# (model class, config class, tiny sizes, the inputs' maker); `ids`: token ids (and an attention mask)
_HF3 = {
    "mistral-sliding": (
        "MistralForCausalLM",
        "MistralConfig",
        dict(_DECODER, num_key_value_heads=1, head_dim=8, sliding_window=4),
        "ids",
    ),
    "qwen3-moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(
            _DECODER,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
        ),
        "ids",
    ),
    "olmoe": (
        "OlmoeForCausalLM",
        "OlmoeConfig",
        dict(_DECODER, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2),
        "ids",
    ),
    "deepseek-v3": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            _DECODER,
            num_key_value_heads=2,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            q_lora_rank=8,
            kv_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
        "ids",
    ),
    "vit": (
        "ViTForImageClassification",
        "ViTConfig",
        dict(
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
            num_labels=3,
        ),
        "pixels",
    ),
    "clip-vision": (
        "CLIPVisionModel",
        "CLIPVisionConfig",
        dict(
            hidden_size=D,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
        "pixels",
    ),
    "whisper": (
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        dict(
            d_model=D,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=16,
            vocab_size=VOCAB,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
        "audio",
    ),
    "gpt-oss": (
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(
            _DECODER,
            num_key_value_heads=1,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "ids",
    ),
    "jamba": (
        "JambaForCausalLM",
        "JambaConfig",
        dict(
            _DECODER,
            num_key_value_heads=1,
            num_experts=2,
            num_experts_per_tok=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            use_mamba_kernels=False,
        ),
        "ids",
    ),
    "mamba": (
        "MambaForCausalLM",
        "MambaConfig",
        dict(hidden_size=D, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
        "ids-only",
    ),
}


def _hf3(kind: str):
    def build(devices):
        torch.manual_seed(0)
        model_class, config_class, sizes, inputs = _HF3[kind]
        sizes = {"vocab_size": VOCAB, **sizes} if inputs.startswith("ids") else sizes
        model_type, config_type = transformers_classes(model_class, config_class)
        model = model_type(config_type(attn_implementation="eager", **sizes)).eval().to(devices[0])
        device = devices[0]

        def run(m):
            if inputs == "pixels":
                out = m(pixel_values=_image(device))
                return out.logits if hasattr(out, "logits") else out.last_hidden_state
            if inputs == "audio":
                features = torch.sin(torch.arange(8 * 16, dtype=torch.float32).reshape(1, 8, 16) / 3)
                return m(input_features=features.to(device), decoder_input_ids=_tokens(device, 3)).logits
            ids = _tokens(device)
            if inputs == "ids-only":
                return m(input_ids=ids, use_cache=False).logits
            return m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

        return model, run, device

    return build


class Spectral(nn.Module):
    """FNet-style token mixing with torch.fft, a complex64 rotary from a device table, and a
    sparse COO matrix on the device: nothing of it is on the host."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
        angles = torch.arange(32).float()[:, None] * inv
        self.register_buffer("rotary", torch.polar(torch.ones_like(angles), angles), persistent=False)
        dense = torch.eye(T) + torch.diag(torch.ones(T - 1), 1)
        self.register_buffer("adjacency", dense.to_sparse(), persistent=False)

    def forward(self, x):  # [1, T, D]
        x = x + torch.fft.fft2(x).real  # complex64 on the device
        z = torch.view_as_complex(x.unflatten(-1, (D // 2, 2)).contiguous())
        x = torch.view_as_real(z * self.rotary[: x.shape[1]]).flatten(-2)
        x = torch.sparse.mm(self.adjacency, x[0])[None]
        return self.proj(x)


class Sampler(nn.Module):
    """Samples from distributions with device parameters (no argument validation: that reads on
    the host), multinomial with the device's generator, 0-dim CPU bounds in clamp's place."""

    def __init__(self, validate: bool = False):
        super().__init__()
        self.validate = validate
        self.proj = nn.Linear(D, D)
        self.log_scale = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        from torch.distributions import Categorical, Normal

        h = self.proj(x)
        torch.manual_seed(0)
        noise = Normal(h, self.log_scale.exp(), validate_args=self.validate).rsample()
        picks = Categorical(logits=h[0], validate_args=self.validate).sample()  # [T]
        drawn = torch.multinomial(h[0].softmax(-1), 1)  # the device's own generator
        h = h + noise * 0.01 + (picks + drawn[:, 0]).to(h.dtype)[None, :, None] * 0.001
        return torch.maximum(h, torch.tensor(-1.0)) * torch.tensor(0.5)  # 0-dim CPU: scalars


class Streams(nn.Module):
    """Work on a side stream, joined back with wait_stream and record_stream."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)

    def forward(self, x):
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            y = self.a(x)
        z = self.b(x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        y.record_stream(torch.cuda.current_stream(x.device))
        return y + z


def _pinned_inputs(devices):
    """The batch waits in pinned host memory and is uploaded with non_blocking=True, as a
    DataLoader(pin_memory=True) loop does: the run's inputs, declared."""
    torch.manual_seed(0)
    model = LM().eval().to(devices[0])
    ids = _tokens("cpu").pin_memory()
    return model, lambda m: m(ids.to(devices[0], non_blocking=True)), devices[0]


class HostState(nn.Module):
    """A block with a bug of state kept on the host (`bug`), or none."""

    def __init__(self, bug: str | None = None):
        super().__init__()
        self.bug = bug
        self.proj = nn.Linear(D, D)
        self.rnn = nn.LSTM(D, D, batch_first=True)
        self.gains = [nn.Parameter(torch.ones(D))]  # a plain list: `.to()` never sees it
        self.extra = nn.ParameterDict({"bias": nn.Parameter(torch.zeros(D))})
        self.edges = torch.linspace(-1, 1, 5)  # a plain attribute: stays on the host
        self.class_weight = torch.ones(D)  # a plain attribute: stays on the host
        self.host_weights = {k: v.detach().clone() for k, v in self.proj.state_dict().items()}
        self.special = torch.tensor([1, 3, 5])  # a plain attribute: stays on the host
        self.keep = torch.arange(D) % 2 == 0  # a plain attribute: stays on the host

    def forward(self, x):  # [1, T, D]
        bug = self.bug
        if bug == "lstm-h0-without-device":
            h0 = torch.zeros(1, x.shape[0], D)  # no device=
            x, _ = self.rnn(x, (h0, h0))
        else:
            x, _ = self.rnn(x)
        if bug == "polar-on-host":
            inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))  # rebuilt on the host each call
            table = torch.polar(
                torch.ones(x.shape[1], D // 2), torch.arange(x.shape[1]).float()[:, None] * inv
            )
            z = torch.view_as_complex(x.unflatten(-1, (D // 2, 2)).contiguous())
            x = torch.view_as_real(z * table.to(x.device)).flatten(-2)
        if bug == "searchsorted-host-edges":
            x = x + torch.searchsorted(self.edges, x.contiguous()).to(x.dtype)
        if bug == "plain-list-parameter":
            x = x * self.gains[0]
        if bug == "dict-entry-after-to":
            x = x + self.extra["late"]
        if bug == "lazy-buffer":
            if not hasattr(self, "running"):
                self.register_buffer("running", torch.ones(D))  # made in forward, on the host
            x = x * self.running
        if bug == "host-multinomial":
            generator = torch.Generator().manual_seed(0)
            picks = torch.multinomial(x[0].softmax(-1), 1, generator=generator)
            x = x + picks.to(x.dtype)[None]
        if bug == "loss-weight-on-host":
            target = x[0].argmax(-1)
            return F.cross_entropy(x[0], target, weight=self.class_weight)[None, None, None] + x
        if bug == "masked-fill-host-mask":
            x = x.masked_fill(self.keep, 0.0)
        if bug == "embedding-host-indices":
            x = x + F.embedding(self.special, self.proj.weight).sum(0)
        if bug == "functional-call-host-weights":
            return torch.func.functional_call(self.proj, self.host_weights, (x,))
        if bug == "new-tensor-per-call":
            x = x * x.new_tensor([0.5] * D)  # host data uploaded on every call
        if bug == "distribution-validated":
            from torch.distributions import Normal

            # validate_args (the default, until torch.compile's first use turns it off for the
            # process): the arguments are checked on the host
            x = x + Normal(x, torch.ones_like(x), validate_args=True).mean
        return self.proj(x)


def _host_state(bug=None, prepare=None):
    def build(devices):
        torch.manual_seed(0)
        model = Wrapper(HostState(bug)).eval().to(devices[0])
        if prepare is not None:
            prepare(model)
        return model, lambda m: m(_tokens(devices[0])), devices[0]

    return build


def _late_dict_entry(model):
    model.inner.extra["late"] = nn.Parameter(torch.zeros(D))  # after .to(): on the host


def _wrong_device_hook(devices):
    """Two blocks on two GPUs; a forward pre-hook meant to bring block1's inputs to its device
    sends them to "cuda:0" instead."""
    torch.manual_seed(0)
    model = SplitLM(_rope_block(True)(), _rope_block(True)()).eval()
    _ROPE_CACHE.clear()
    d0, d1 = devices
    model.embed.to(d0)
    model.block0.to(d0)
    model.block1.to(d1)
    model.head.to(d1)
    model.block1_device = torch.device(d1)
    model.block1.proj.register_forward_pre_hook(lambda mod, args: tuple(a.to("cuda:0") for a in args))
    placement = {"": d0, "block1": d1, "head": d1}
    return model, lambda m: m(_tokens(d0)), placement


class Annotated(nn.Module):
    """Profiler annotations (NVTX ranges, record_function), statistics under no_grad, a
    0-dim CPU fill value, repeat_interleave with its output size, nonzero_static: no host reads."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("mean", torch.zeros(D))

    def forward(self, x):
        with torch.cuda.nvtx.range("proj"), torch.autograd.profiler.record_function("proj"):
            y = self.proj(x)
        with torch.no_grad():
            self.mean.mul_(0.9).add_(y.detach().mean((0, 1)), alpha=0.1)
        y = y - self.mean
        y = y.masked_fill(y.abs() > 10, torch.tensor(0.0))  # a 0-dim CPU value: read as a scalar
        repeats = torch.ones(y.shape[1], dtype=torch.long, device=y.device)
        y = y.repeat_interleave(repeats, dim=1, output_size=y.shape[1])  # no host read: size given
        first = torch.nonzero_static(y[0, :, 0] > 0, size=2, fill_value=0)[:, 0]
        return y + y[:, first].sum(1, keepdim=True)


class OnCurrentDevice(nn.Module):
    """Makes its noise on device="cuda" inside `torch.cuda.device(x.device)`: the current device
    is the module's own, wherever that is."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        with torch.cuda.device(x.device):
            noise = torch.zeros(x.shape, device="cuda")
        return self.proj(x + noise)


class Probe(nn.Module):
    """A block with a host-side probe left in (`how`)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        how = self.how
        if how == "event-timing":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = self.proj(x)
            end.record()
            end.synchronize()  # the host waits for the device to time it
            self.ms = start.elapsed_time(end)
            return y
        if how == "boolean-mask-select":
            x = x + x[x > 0].mean()  # a data-dependent shape: CUDA reads the count on the host
        if how == "legacy-type-cast":
            x = x * (x > 0).type(torch.FloatTensor)  # the legacy CPU type: a download
        if how == "cat-host-zeros":
            x = torch.cat([x, torch.zeros(x.shape[0], 1, D)], 1)[:, 1:]  # no device=
        if how == "grad-hook-to-host" and x.requires_grad:
            x.register_hook(lambda grad: grad.cpu())  # a gradient sent to the host
        return self.proj(x)


class CompiledStray(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return self.proj(x) + torch.arange(D).float()  # no device=


def _compiled_inner():
    return torch.compile(CompiledStray())


def _on_second(make_inner):
    def build(devices):
        torch.manual_seed(0)
        model = Wrapper(make_inner()).eval().to(devices[1])
        return model, lambda m: m(_tokens(devices[1])), devices[1]

    return build


@dataclass
class Batch:
    """A user's batch object, as a collate function makes it: on the host until the model moves it."""

    ids: torch.Tensor
    extras: dict

    def to(self, device):
        return Batch(self.ids.to(device), {k: [t.to(device) for t in v] for k, v in self.extras.items()})


@dataclass
class Prediction:
    logits: torch.Tensor
    lengths: torch.Tensor  # on the host, for the caller's bookkeeping


class BatchModel(nn.Module):
    """Takes a batch object on the host and moves it itself; returns a dataclass whose lengths
    are downloaded for the caller (both the run's own edge: its inputs and outputs)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, batch: Batch):
        batch = batch.to(self.embed.weight.device)
        mask = batch.extras["mask"][0]
        x = self.embed(batch.ids) * mask[..., None]
        return Prediction(self.head(x), mask.sum(-1).cpu())


def _batch_inputs(devices):
    torch.manual_seed(0)
    model = BatchModel().eval().to(devices[0])
    ids = _tokens("cpu")
    batch = Batch(ids, {"mask": [torch.ones(ids.shape)]})

    def run(m):
        return m(batch).logits

    return model, run, devices[0]


class Masks(nn.Module):
    """Boolean-mask writes and random draws on the device (`bug`: a host read of a mask)."""

    def __init__(self, bug: str | None = None):
        super().__init__()
        self.bug = bug
        self.proj = nn.Linear(D, D)
        self.bag = nn.EmbeddingBag(VOCAB, D, mode="sum")
        self.host_offsets = torch.tensor([0, 2])  # a plain attribute: stays on the host

    def forward(self, x):
        x = self.proj(x).clone()
        x[x.abs() > 3] = 0.0  # a scalar through a device mask: masked_fill, no host read
        x = x + F.dropout(x, 0.1, training=True) * 0 + torch.bernoulli(torch.full_like(x, 0.5)) * 0
        order = torch.randperm(x.shape[1], device=x.device)
        picks = torch.randint(0, VOCAB, (4,), device=x.device)
        if self.bug == "bag-host-offsets":
            bag = self.bag(picks, self.host_offsets)
        else:
            offsets = torch.arange(0, 4, 2, device=x.device)
            bag = self.bag(picks, offsets, per_sample_weights=torch.ones(4, device=x.device))
        x = x[:, order.sort().values] + bag.sum(0)
        if self.bug == "where-one-argument":
            rows, cols = torch.where(x[0] > 0)  # nonzero: CUDA counts on the host
            x = x + x[0, rows, cols].sum()
        return x


class Ensemble(nn.Module):
    """Model ensembling with torch.func: stacked states, vmap over functional_call."""

    def __init__(self):
        super().__init__()
        self.members = nn.ModuleList(nn.Linear(D, D) for _ in range(3))

    def forward(self, x):
        from torch.func import functional_call, stack_module_state, vmap

        params, buffers = stack_module_state(list(self.members))
        base = self.members[0]

        def one(p, b, v):
            return functional_call(base, (p, b), (v,))

        return vmap(one, in_dims=(0, 0, None))(params, buffers, x).mean(0)


class ReentrantCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        if torch.is_grad_enabled():
            return checkpoint(self.block, x, use_reentrant=True, preserve_rng_state=True)
        return self.block(x)


def _built_under_device_context(devices):
    """The model built under `with torch.device(...)` (factories without device= land there),
    another built on meta and materialized with to_empty(); both run under the context too."""
    torch.manual_seed(0)
    with torch.device(devices[0]):
        model = LM("positions-without-device").eval()  # arange without device=: on the device here
    with torch.device("meta"):
        head = nn.Linear(VOCAB, VOCAB)
    head = head.to_empty(device=devices[0])
    head.reset_parameters()
    model.head2 = head

    def run(m):
        with torch.device(devices[0]):
            return m.head2(m(_tokens(devices[0])))

    return model, run, devices[0]


def _generate3(kind: str, needs: tuple[str, ...] | None = None, **options):
    """generate() of a round-three family: prefill and decode steps over its own cache (a
    sliding-window cache, MoE routing per step, Mamba's conv and SSM states). `needs`: the
    transformers code the case's finding lives in (`transformers_has`'s arguments)."""

    def build(devices):
        if needs:
            transformers_has(*needs)
        model, _, device = _hf3(kind)(devices)

        def run(m):
            ids = _tokens(device)
            mask = {} if kind == "mamba" else {"attention_mask": torch.ones_like(ids)}
            return m.generate(
                ids, max_new_tokens=3, pad_token_id=0, do_sample=False, **mask, **options
            ).float()

        return model, run, device

    return build


def _hf3_train(kind: str):
    """A training forward with labels: the loss and, for MoE, the router's load-balancing loss."""

    def build(devices):
        model, _, device = _hf3(kind)(devices)
        model.config.output_router_logits = True

        def run(m):
            ids = _tokens(device)
            out = m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
            return out.loss

        return model, run, device

    return build


def _host_positions(devices):
    """The caller passes position_ids made without device= to a model on the GPU."""
    model, _, device = _hf3("mistral-sliding")(devices)

    def run(m):
        ids = _tokens(device)
        positions = torch.arange(ids.shape[1])[None]  # no device=
        return m(input_ids=ids, position_ids=positions, use_cache=False).logits

    return model, run, device


class ExpertParallel(nn.Module):
    """Experts split over two GPUs; the router's module sends each expert its tokens and brings
    the results back (`bug`: one expert's result is not brought back)."""

    def __init__(self, bug: bool = False):
        super().__init__()
        self.bug = bug
        self.router = nn.Linear(D, 4)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D)) for _ in range(4)
        )

    def forward(self, x):  # [1, T, D]
        weights = self.router(x).softmax(-1)  # [1, T, 4], dense routing: no host reads
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            device = expert[0].weight.device
            y = expert(x.to(device)) * weights[..., i, None].to(device)
            out = out + (y if self.bug and i == 3 else y.to(x.device))
        return out


def _expert_parallel(bug: bool):
    def build(devices):
        torch.manual_seed(0)
        model = Wrapper(ExpertParallel(bug)).eval().to(devices[0])
        for i in (2, 3):
            model.inner.experts[i].to(devices[1])
        placement = {"": devices[0], "inner.experts.2": devices[1], "inner.experts.3": devices[1]}
        return model, lambda m: m(_tokens(devices[0])), placement

    return build


def _hooked(kind: str):
    """The LM with a user's hook on its second block: `item` logs its output's norm (a host read
    on every call); `backward` keeps the gradients' norms of a module (a full backward hook)."""

    def build(devices):
        torch.manual_seed(0)
        model = LM().eval().to(devices[0])
        norms: list = []
        if kind == "item":
            model.layers[1].register_forward_hook(lambda mod, args, out: norms.append(out.norm().item()))
        else:
            model.layers[1].register_full_backward_hook(lambda mod, gin, gout: norms.append(gout[0].norm()))
        return model, lambda m: m(_tokens(devices[0])), devices[0]

    return build


def _train_fused(devices):
    """A training step with the fused AdamW (CUDA's one kernel for every parameter), a LR
    schedule and clip_grad_norm_ over foreach kernels."""
    torch.manual_seed(0)
    model = LM().to(devices[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))

    def run(m):
        ids = _tokens(devices[0])
        logits = m(ids)
        if not torch.is_grad_enabled():
            return logits
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True)
        opt.step()
        schedule.step()
        opt.zero_grad()
        return loss.detach()

    return model, run, devices[0]


class Speech(nn.Module):
    """A spectrogram front end (`bug`: the window made without device=; or a CTC loss with
    lengths computed on the device)."""

    def __init__(self, bug: str | None = None):
        super().__init__()
        self.bug = bug
        self.register_buffer("window", torch.hann_window(8), persistent=False)
        self.proj = nn.Linear(5, VOCAB)

    def forward(self, wave):  # [2, 64]
        window = torch.hann_window(8) if self.bug == "stft-host-window" else self.window
        spec = torch.stft(wave, 8, hop_length=4, window=window, return_complex=True).abs()  # [2, 5, 17]
        log_probs = self.proj(spec.transpose(1, 2)).log_softmax(-1).transpose(0, 1)  # [17, 2, V]
        if self.bug == "ctc-device-lengths":
            # (no CTC loss is clean on CUDA: it uploads host targets itself, and PyTorch 2.13 copies
            # device targets to the host to ask whether MIOpen could run it)
            targets = torch.arange(1, 7, device=wave.device).reshape(2, 3)
            lengths = torch.full((2,), log_probs.shape[0], device=wave.device)  # read on the host
            return log_probs + F.ctc_loss(log_probs, targets, lengths, lengths.new_full((2,), 3))
        return log_probs


def _speech(bug=None):
    def build(devices):
        torch.manual_seed(0)
        model = Wrapper(Speech(bug)).to(devices[0]).eval()
        wave = torch.sin(torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64) / 3).to(devices[0])
        model.forward = lambda w: model.inner(w)  # the wrapper's embedding and head: not for audio
        return model, lambda m: m(wave), devices[0]

    return build


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        # clean models (traps included): the run must be clean
        Case("convnet", _clean_model(ConvNet, _image), None),
        Case("gru", _clean_model(Recurrent, _tokens, "gru"), None),
        Case("lstm", _clean_model(Recurrent, _tokens, "lstm"), None),
        Case("vit", _clean_model(TinyViT, _image), None),
        Case("tied-lm", _clean_model(TiedLM, _tokens), None),
        Case("scripted", _clean_model(Scripted, _tokens), None),
        Case("lm", _lm(), None),
        Case("hf-gpt2", _hf("gpt2"), None),
        Case("hf-bert", _hf("bert", mask=False), None),
        Case("hf-t5", _hf("t5", mask=False), None),
        Case("hf-phi", _hf("phi"), None),
        Case("hf-gemma", _hf("gemma"), None),
        Case("convnet-offload", _offloaded_convnet, None),
        Case(
            "split-rope-by-device",
            _split(_rope_block(True), _rope_block(True)),
            None,
            devices=2,
            why="a rotary cache keyed by (length, device): each GPU builds its own tables",
        ),
        Case("gather-on-device", lambda d: _gather(d, False), None),
        Case("packed-gru", _clean_model(PackedGRU, _pair), None, why="host lengths are what the API wants"),
        Case("idioms", _clean_model(Idioms, _tokens), None),
        Case("checkpointed", _clean_model(Checkpointed, _tokens), None),
        Case("compiled", _clean_model(Compiled, _tokens), None),
        Case("gpt2-generate", _generate(do_sample=False), None),
        Case("gpt2-sample", _generate(do_sample=True, top_k=5), None),
        Case("hf-gemma2", _hf("gemma2"), None),
        Case("hf-llama", _hf("llama"), None),
        Case("autocast", _autocast, None),
        Case("train-step", _train_step, None),
        Case(
            "packed-gru-device-lengths",
            _clean_model(PackedGRU, _pair, True),
            (MISMATCH, ""),
            "PackedGRU.forward",
            why="pack_padded_sequence wants its lengths on the host: CUDA refuses device lengths "
            "(\"'lengths' argument should be a 1D CPU int64 tensor\"), a device error of the model's "
            "own forward, at the line that packs",
        ),
        Case(
            "hard-coded-cuda",
            _wrapped(HardCoded, device_index=1),
            (STRAY, "inner"),
            "HardCoded.forward",
            devices=2,
            why="device='cuda' is cuda:0 in a model placed on cuda:1: a tensor made on another "
            "device than the module's (a stray), then CUDA refuses the sum",
        ),
        Case(
            "slice-by-device-length", _wrapped(lambda: Trimmed("slice")), (SYNC, "inner"), "Trimmed.forward"
        ),
        Case("branch-on-device", _wrapped(lambda: Trimmed("branch")), (SYNC, "inner"), "Trimmed.forward"),
        Case(
            "one-hot-without-count",
            _wrapped(lambda: Trimmed("one-hot")),
            (SYNC, "inner"),
            "Trimmed.forward",
            why="one_hot without num_classes reads the largest index on the host",
        ),
        Case(
            "bucketize-host-edges",
            _wrapped(lambda: Trimmed("bucketize")),
            (STRAY, "inner"),
            "Trimmed.forward",
            why="linspace without device= computes on the host in a device module (a stray, as "
            "torch.ones without device=), then CUDA refuses bucketize",
        ),
        Case(
            "one-element-cpu-tensor",
            _wrapped(lambda: Trimmed("one-element")),
            (MISMATCH, "inner"),
            "Trimmed.forward",
            why="torch.tensor([1.0]) is built on the host (no op computes there but the lift) and "
            "CUDA refuses it beside a device tensor: only 0-dim CPU tensors pass as scalars",
        ),
        Case(
            "modules-in-a-list",
            _wrapped(ListHolder),
            (MISMATCH, "inner"),
            "ListHolder.forward",
            why="the listed Linears stay on the host; they are no submodules, so their ops belong to "
            "`inner`, whose code calls them",
        ),
        # round two
        Case("dispatched-split", _dispatched(), None, devices=2),
        Case("dispatched-offload", _dispatched(offload=True), None),
        Case("decoder-cache", _decoder(False), None),
        Case("sdpa-causal", _wrapped(lambda: SdpaMask(False)), None),
        Case("routed", _wrapped(Routed), None),
        Case("train-amp", _train_amp, None),
        Case("hf-gpt2-labels", _hf_labels, None),
        Case("bf16", _half, None),
        Case(
            "dispatched-split-mask-upload",
            _dispatched("mask-uploaded-per-call"),
            (TRANSFER, "layers.1.attn"),
            "Attention.forward",
            devices=2,
            why="the module's own upload, not accelerate's hook moving inputs: still a transfer",
        ),
        Case(
            "dispatched-offload-mask-upload",
            _dispatched("mask-uploaded-per-call", offload=True),
            (TRANSFER, "layers.1.attn"),
            "Attention.forward",
            why="an offloaded module's own upload is not offload traffic",
        ),
        Case(
            "kv-cache-on-host",
            _decoder(True),
            (STRAY, "attn"),
            "CachedAttention.forward",
            why="a KV cache made without device=: the zeros are made on the host in a device module "
            "(a stray, as torch.ones without device=); then each step copies k and v to the host "
            "(syncs) and back (transfers)",
        ),
        Case(
            "hf-gpt2-no-mask",
            _hf("gpt2", mask=False),
            (SYNC, "transformer"),
            "find_packed_sequence_indices",
            why="transformers' own: without an attention_mask it asks on the host whether the "
            "position ids pack several sequences, on every call",
        ),
        Case(
            "non-blocking-download",
            _wrapped(Prefetch),
            (TRANSFER, "inner"),
            "Prefetch.forward",
            why="non_blocking: the host does not wait (no sync), but the bytes still move every call",
        ),
        Case(
            "sdpa-host-mask",
            _wrapped(lambda: SdpaMask(True)),
            (STRAY, "inner"),
            "SdpaMask.forward",
            why="the mask computed on the host (a stray), then CUDA refuses it in the attention",
        ),
        Case("seq2seq", _seq2seq(False), None),
        Case(
            "padded-encoder",
            _padded_encoder,
            (SYNC, ""),
            "_padded_encoder.<locals>.<lambda>",  # the caller's line: the fast path is torch's code
            modes=("inference_mode", "no_grad"),
            known="nested tensors are not emulated",
            why="PyTorch's own: in eval without grad, nn.TransformerEncoder with a padding mask takes "
            "its nested-tensor fast path, which asks on the host whether the mask is left-aligned "
            "(training, with grad, it takes the plain path: clean)",
        ),
        Case(
            "data-parallel",
            _data_parallel,
            None,
            devices=2,
            cuda_checked=False,
            known="nn.DataParallel: the emulation has no torch._C._scatter/_broadcast_coalesced/_gather "
            "(CUDA-only bindings), and its replicas run in worker threads, which the tracer does not "
            "watch (a dispatch mode is per thread)",
        ),
        Case(
            "seq2seq-host-mask",
            _seq2seq(True),
            (STRAY, "transformer.decoder"),
            "Seq2Seq.forward",
            why="generate_square_subsequent_mask without device= gives a host mask (made in the "
            "model's own forward, the run's edge: no stray there); the decoder then checks on the "
            "host whether it is causal (a stray in the decoder) and, finding it is, drops it: CUDA "
            "raises nothing, but the host computes for a module placed on the GPU",
        ),
        Case("device-generator", _wrapped(lambda: Noisy(False)), None),
        Case(
            "cpu-offload",
            _cpu_offloaded(),
            None,
            why="the hooks sit on the modules with weights; their parents (no hook, weights on meta) "
            "run where their submodules' hooks run them",
        ),
        Case(
            "cpu-offload-mask-upload",
            _cpu_offloaded("mask-uploaded-per-call"),
            (TRANSFER, "layers.1.attn"),
            "Attention.forward",
        ),
        Case(
            "hf-mixtral-eager-experts",
            _hf_mixtral_eager,
            (SYNC, "model.layers.0.mlp.experts"),
            "MixtralExperts.forward",
            why="transformers' own eager experts read the routing on the host (nonzero, where): a "
            "sync per layer and call, which the default grouped_mm path avoids",
        ),
        Case(
            "host-generator",
            _wrapped(lambda: Noisy(True)),
            (MISMATCH, "inner"),
            "Noisy.forward",
            why="CUDA refuses a CPU generator for a CUDA tensor ('Expected a 'cuda' device type "
            "for generator'): a device error",
        ),
        Case("host-inputs", _host_inputs, None, why="the run's own inputs, uploaded by the model: declared"),
        Case(
            "backward-host-tensor",
            _wrapped(GradScaled),
            (MISMATCH, None),
            "ScaleGrad.backward",
            modes=("grad",),
            why="a custom backward makes a tensor without device=: CUDA refuses it in the backward "
            "pass, which runs outside every module's forward (module None), at the backward's line; "
            "without grad there is no backward, and the run is clean",
        ),
        Case(
            "synchronize-in-forward",
            _wrapped(Timed),
            (SYNC, "inner"),
            "Timed.forward",
            why="torch.cuda.synchronize() makes the host wait for the device, though no tensor op does",
        ),
        Case(
            "upload-per-decode-step",
            _stepper,
            (TRANSFER, "inner"),
            "StepCounter.forward",
            why="torch.tensor([[step]], device=...) on every call: an upload from host data",
        ),
        # round three: clean
        Case("hf-mistral-sliding", _hf3("mistral-sliding"), None),
        Case("hf-qwen3-moe", _hf3("qwen3-moe"), None),
        Case("hf-olmoe", _hf3("olmoe"), None),
        Case("hf-deepseek-v3", _hf3("deepseek-v3"), None, why="MLA attention, grouped top-k routing"),
        Case("hf-vit", _hf3("vit"), None),
        Case("hf-clip-vision", _hf3("clip-vision"), None),
        Case("hf-whisper", _hf3("whisper"), None, why="a conv front end, an encoder-decoder"),
        Case("hf-mamba", _hf3("mamba"), None, why="the slow path (no mamba kernels): a conv and a scan"),
        Case("hf-gpt-oss", _hf3("gpt-oss"), None, why="MoE experts, attention sinks, sliding layers"),
        Case(
            "hf-jamba-mask-read",
            _hf3("jamba"),
            (SYNC, "model"),
            "create_recurrent_attention_mask",
            why="transformers' own: Jamba asks `torch.all(attention_mask == 1)` on the host on every "
            "call, to skip the recurrent layers' mask (as BERT's _ignore_bidirectional_mask_sdpa)",
        ),
        Case("spectral", _wrapped(Spectral), None, why="torch.fft, complex64, a sparse COO buffer"),
        Case("sampler", _wrapped(Sampler), None, why="distributions, multinomial, 0-dim CPU scalars"),
        Case("streams", _wrapped(Streams), None, why="a side stream, wait_stream, record_stream"),
        Case("pinned-inputs", _pinned_inputs, None, why="the run's inputs, uploaded from pinned memory"),
        Case("host-state-none", _host_state(), None, why="the same block as the bugs below, without one"),
        Case(
            "batch-object",
            _batch_inputs,
            None,
            why="a dataclass batch (a dict of lists inside) uploaded by the model: the run's inputs; "
            "a dataclass result with a download in it: the run's output",
        ),
        Case("masks", _wrapped(Masks), None, why="x[mask] = scalar, dropout, randperm, EmbeddingBag"),
        Case("ensemble-vmap", _wrapped(Ensemble), None, why="torch.func: stack_module_state, vmap"),
        Case("checkpoint-reentrant", _wrapped(ReentrantCheckpoint), None, why="the CUDA RNG state kept"),
        Case("device-context", _built_under_device_context, None, why="torch.device(...) as a context"),
        Case(
            "where-one-argument",
            _wrapped(lambda: Masks("where-one-argument")),
            (SYNC, "inner"),
            "Masks.forward",
            why="torch.where(cond) is nonzero: CUDA counts the matches on the host",
        ),
        Case(
            "bag-host-offsets",
            _wrapped(lambda: Masks("bag-host-offsets")),
            (MISMATCH, "inner.bag"),
            "Masks.forward",
            why="EmbeddingBag offsets kept on the host: CUDA refuses them beside device indices",
        ),
        Case("qwen3-moe-generate", _generate3("qwen3-moe"), None),
        Case(
            "mistral-sliding-generate",
            _generate3("mistral-sliding"),
            (TRANSFER, "model.layers.0.self_attn"),
            "DynamicSlidingWindowLayer.lazy_initialization",
            why="transformers' own: the sliding-window cache made in the first forward moves its "
            "window size, a host tensor, to the device then (once per layer: the lazy set-up "
            "inside a traced forward of llama-static-cache)",
        ),
        Case(
            "mamba-generate",
            _generate3(
                "mamba",
                needs=("cache_utils", "LinearAttentionLayer.lazy_initialization", "cumulative_length_linear"),
            ),
            (TRANSFER, "backbone.layers.0.mixer"),
            "LinearAttentionLayer.lazy_initialization",
            why="transformers' own: Mamba's cache moves its length counter from the host in the "
            "first forward (the same lazy set-up)",
        ),
        Case("qwen3-moe-train", _hf3_train("qwen3-moe"), None, why="the load-balancing loss"),
        Case("expert-parallel", _expert_parallel(False), None, devices=2, placements=("given",)),
        Case(
            "expert-parallel-not-returned",
            _expert_parallel(True),
            (MISMATCH, "inner"),
            "ExpertParallel.forward",
            devices=2,
            why="one expert's result stays on cuda:1: CUDA refuses the sum on cuda:0",
            placements=("given",),
        ),
        Case(
            "host-position-ids",
            _host_positions,
            (STRAY, "model"),
            "find_packed_sequence_indices",
            why="position_ids made without device= by the caller: transformers first computes on "
            "them on the host (whether they pack several sequences: a stray in a device module), "
            "then CUDA refuses the rotary embedding's product",
        ),
        Case("full-backward-hook", _hooked("backward"), None, why="a module's gradients kept by a hook"),
        Case("train-fused-adamw", _train_fused, None, why="fused AdamW, foreach clipping, a schedule"),
        Case("speech-stft", _speech(), None, why="stft with a device window (its C++ ends in transpose_)"),
        Case(
            "forward-hook-item",
            _hooked("item"),
            (SYNC, "layers.1"),
            "_hooked.<locals>.build.<locals>.<lambda>",
            why="a forward hook that logs `.item()`: the host reads the device inside the module's call",
        ),
        Case(
            "stft-host-window",
            _speech("stft-host-window"),
            (STRAY, "inner"),
            "Speech.forward",
            why="hann_window without device= computes on the host in a device module, then CUDA refuses stft",
        ),
        Case(
            "ctc-device-lengths",
            _speech("ctc-device-lengths"),
            (SYNC, "inner"),
            "Speech.forward",
            why="ctc_loss reads its lengths on the host: lengths on the device are copied back first "
            "(and PyTorch 2.13 copies the device targets back too, at the same line)",
        ),
        Case("probe-none", _wrapped(lambda: Probe("none")), None, why="the probe block without a probe"),
        # round three: bugs
        Case(
            "lstm-h0-without-device",
            _host_state("lstm-h0-without-device"),
            (STRAY, "inner"),
            "HostState.forward",
            why="torch.zeros without device= for the LSTM's initial state: made on the host in a "
            "device module (a stray, as the KV cache without device=), then CUDA refuses the LSTM",
        ),
        Case(
            "polar-on-host",
            _host_state("polar-on-host"),
            (STRAY, "inner"),
            "HostState.forward",
            why="the complex rotary table computed on the host on every call, then uploaded",
        ),
        Case(
            "searchsorted-host-edges",
            _host_state("searchsorted-host-edges"),
            (MISMATCH, "inner"),
            "HostState.forward",
            why="boundaries kept as a plain attribute stay on the host: CUDA refuses searchsorted",
        ),
        Case(
            "plain-list-parameter",
            _host_state("plain-list-parameter"),
            (MISMATCH, "inner"),
            "HostState.forward",
            why="a Parameter in a plain list is no registered parameter: `.to()` leaves it behind",
        ),
        Case(
            "dict-entry-after-to",
            _host_state("dict-entry-after-to", prepare=_late_dict_entry),
            (MISMATCH, "inner"),
            "HostState.forward",
            why="a ParameterDict entry added after `.to()` stays on the host",
        ),
        Case(
            "lazy-buffer",
            _host_state("lazy-buffer"),
            (STRAY, "inner"),
            "HostState.forward",
            why="a buffer registered inside forward, made without device=: a host tensor made in a "
            "device module, then CUDA refuses the product",
        ),
        Case(
            "host-multinomial",
            _host_state("host-multinomial"),
            (MISMATCH, "inner"),
            "HostState.forward",
            why="CUDA refuses a CPU generator for sampling a CUDA tensor",
        ),
        Case(
            "loss-weight-on-host",
            _host_state("loss-weight-on-host"),
            (MISMATCH, "inner"),
            "HostState.forward",
            why="cross_entropy's class weights on the host, the logits on the device: CUDA refuses",
        ),
        Case(
            "masked-fill-host-mask",
            _host_state("masked-fill-host-mask"),
            (MISMATCH, "inner"),
            "HostState.forward",
            why="masked_fill wants its mask on self's device",
        ),
        Case(
            "embedding-host-indices",
            _host_state("embedding-host-indices"),
            (MISMATCH, "inner"),
            "HostState.forward",
            why="F.embedding with host indices into a device table: CUDA refuses",
        ),
        Case(
            "functional-call-host-weights",
            _host_state("functional-call-host-weights"),
            (MISMATCH, "inner.proj"),
            "HostState.forward",
            why="torch.func.functional_call swaps in a host state dict: the Linear runs with host "
            "weights on device inputs",
        ),
        Case(
            "new-tensor-per-call",
            _host_state("new-tensor-per-call"),
            (TRANSFER, "inner"),
            "HostState.forward",
            why="x.new_tensor(python data): an upload from host data on every call",
        ),
        Case(
            "distribution-validated",
            _host_state("distribution-validated"),
            (SYNC, "inner"),
            "HostState.forward",
            why="torch.distributions validating its arguments (the default, but that torch.compile "
            "turns it off for the process when first used): `constraint.check(value).all()` read "
            "on the host, a sync on every call",
        ),
        Case(
            "pre-hook-wrong-device",
            _wrong_device_hook,
            (TRANSFER, "block1.proj"),
            "_wrong_device_hook.<locals>.<lambda>",
            devices=2,
            why="a forward pre-hook sends block1's inputs to cuda:0: an undeclared device-to-device "
            "copy, then CUDA refuses the Linear",
        ),
        Case("annotated", _wrapped(Annotated), None, why="nvtx, record_function, static sizes"),
        Case("current-device-context", _on_second(OnCurrentDevice), None, devices=2),
        Case(
            "event-timing",
            _wrapped(lambda: Probe("event-timing")),
            (SYNC, "inner"),
            "Probe.forward",
            why="timing with CUDA events: the host waits for the end event on every call",
        ),
        Case(
            "boolean-mask-select",
            _wrapped(lambda: Probe("boolean-mask-select")),
            (SYNC, "inner"),
            "Probe.forward",
            why="x[x > 0] has a data-dependent shape: CUDA counts the mask on the host (nonzero)",
        ),
        Case(
            "legacy-type-cast",
            _wrapped(lambda: Probe("legacy-type-cast")),
            (SYNC, "inner"),
            "Probe.forward",
            why="`.type(torch.FloatTensor)` is the CPU type: a download inside the model, then CUDA "
            "refuses the product",
        ),
        Case(
            "cat-host-zeros",
            _wrapped(lambda: Probe("cat-host-zeros")),
            (STRAY, "inner"),
            "Probe.forward",
            why="torch.zeros without device=: made on the host in a device module, then CUDA refuses the cat",
        ),
        Case(
            "grad-hook-to-host",
            _wrapped(lambda: Probe("grad-hook-to-host")),
            (MISMATCH, None),
            "trace_case",
            modes=("grad",),
            why="a tensor hook returns the gradient on the host: autograd refuses it after the hook "
            "returns (\"hook '<lambda>' has changed the type of value (was torch.cuda.FloatTensor "
            'got torch.FloatTensor)"), in the backward pass (module None), at the line that '
            "called backward(), as on CUDA",
        ),
        Case(
            "compiled-stray",
            _wrapped(_compiled_inner),
            (STRAY, "inner"),
            "CompiledStray.forward",
            why="torch.compile'd module whose code makes a tensor without device=",
        ),
        # bugs
        Case("child-traps", _wrapped(ChildTraps), None),
        Case(
            "root-cpu-numpy",
            _clean_model(RootRead, _tokens),
            (SYNC, ""),
            "RootRead.forward",
            why="a device-to-host copy in the model's own forward that is not what it returns: a "
            "sync (only the result handed back is the run's edge)",
        ),
        Case(
            "hf-bert-mask-read",
            _hf("bert"),
            (SYNC, "bert"),
            "_ignore_bidirectional_mask_sdpa",
            why="not our bug but transformers': given an attention_mask, BERT asks `mask.all()` on "
            "the host on every call (to skip the mask), a real device-to-host wait; reported where "
            "it happens",
        ),
        Case("hf-t5-mask-read", _hf("t5"), (SYNC, "encoder"), "_ignore_bidirectional_mask_sdpa"),
        Case(
            "llama-static-cache",
            _generate("llama", do_sample=False, cache_implementation="static"),
            (TRANSFER, "model.layers.0.self_attn"),
            "StaticLayer.lazy_initialization",
            why="transformers' own: the static cache is made in the first forward and moves its "
            "length counter from the host then (once; `early_initialization` avoids it), the "
            "same lazy set-up inside a traced forward that this project's own model must not do",
        ),
        Case(
            "mask-without-device",
            _lm(attn_bug="mask-without-device"),
            (STRAY, "layers.1.attn"),
            "Attention.forward",
            why="torch.ones without device= computes on the host in a module placed on the device: "
            "a stray at that line (the catalog's new-tensor-without-device), before CUDA refuses "
            "masked_fill with the host mask",
        ),
        Case(
            "positions-without-device",
            _lm(bug="positions-without-device"),
            (MISMATCH, "pos"),
            "LM.forward",
            why="CPU position ids into a CUDA embedding: CUDA refuses index_select; the op runs in "
            "the embedding `pos`, the line that named it is LM.forward's",
        ),
        Case(
            "mask-uploaded-per-call",
            _lm(attn_bug="mask-uploaded-per-call"),
            (TRANSFER, "layers.1.attn"),
            "Attention.forward",
            why="a host tensor moved to the device on every call: a silent upload per forward",
        ),
        Case(
            "mask-from-list",
            _lm(attn_bug="mask-from-list"),
            (TRANSFER, "layers.1.attn"),
            "Attention.forward",
            why="torch.tensor(python data, device=cuda) each call: an upload from host data",
        ),
        Case(
            "from-numpy",
            _lm(attn_bug="from-numpy"),
            (TRANSFER, "layers.1.attn"),
            "Attention.forward",
            why="torch.from_numpy(...).to(device) each call: an upload of host data",
        ),
        Case(
            "cpu-numpy-in-forward",
            lambda d: _read(d, "numpy"),
            (SYNC, "mlp"),
            "HostRead.forward",
            why="x.cpu() inside the model: a device-to-host copy the host waits for",
        ),
        Case("tolist-in-forward", lambda d: _read(d, "tolist"), (SYNC, "mlp"), "HostRead.forward"),
        Case("item-in-forward", lambda d: _read(d, "item"), (SYNC, "mlp"), "HostRead.forward"),
        Case(
            "cpu-index",
            lambda d: _gather(d, True),
            (TRANSFER, "pick"),
            "Gather.forward",
            why="CUDA accepts CPU indices and copies them to the device itself: a hidden upload",
        ),
        Case(
            "weight-from-state-dict",
            _saved,
            (TRANSFER, "proj"),
            "StateDictLinear.forward",
            why="a weight re-uploaded from a host copy on every call",
        ),
        Case(
            "buffer-after-to",
            _lm(prepare=_late_buffer),
            (MISMATCH, "layers.1.mlp.0"),
            "Scaled.forward",
            why="a buffer registered after .to() stays on the CPU; CUDA refuses the product",
        ),
        Case(
            "rope-cache-first-device",
            _split(_rope_block(False), _rope_block(False)),
            (MISMATCH, "block1.rope"),
            "Rotary.forward",
            devices=2,
            why="tables cached by length only: block1 on cuda:1 gets cuda:0's; CUDA refuses",
        ),
        Case(
            "output-to-cuda0",
            _split(lambda: RopeBlock(True), ToFirstGpu, head_on=1),
            (TRANSFER, "block1"),
            "ToFirstGpu.forward",
            devices=2,
            why="block1 on cuda:1 sends its output to cuda:0, which no device map declares",
        ),
    )
}


# ---- one traced run ------------------------------------------------------------------------------------

GRAD_MODES = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "grad": torch.enable_grad,
}
PLACEMENTS = ("inferred", "given")


@dataclass
class Outcome:
    case: str
    mode: str
    placement: str
    expect: tuple | None
    verdict: str | None = None
    first: tuple | None = None  # (class, module, source) of the first offence not known
    known: list | None = None  # offences of thirdparty.KNOWN_FINDINGS (a library's own), described
    counts: dict | None = None
    error: str | None = None  # an error other than a device error (the run could not be judged)

    @property
    def crashed(self) -> bool:
        return self.error is not None

    @property
    def detected(self) -> bool:
        return self.expect is not None and not self.crashed and self.first is not None

    @property
    def class_right(self) -> bool:
        return self.detected and self.first[0] == self.expect[0]

    def located(self, where: str | None) -> bool:
        return (
            self.class_right
            and self.first[1] == self.expect[1]
            and (where is None or f" in {where}" in (self.first[2] or ""))
        )

    @property
    def false_alarm(self) -> bool:
        return self.expect is None and not self.crashed and self.verdict != "clean"

    def describe(self) -> str:
        got = f"crashed: {self.error}" if self.crashed else f"{self.verdict}, first {self.first}"
        return f"{self.case} / {self.mode} / {self.placement}: expected {self.expect or 'clean'}, {got}"


def trace_case(name: str, mode: str, placement: str, devices=("cuda:0", "cuda:1")) -> Outcome:
    """Build case `name` on `devices`, trace one call under grad mode `mode` (with a backward
    pass of the output's sum when grad is enabled) with the placement inferred or given."""
    from harness.trace import Tracer, is_device_error
    from tests.thirdparty import judge_offences

    case = CASES[name]
    outcome = Outcome(name, mode, placement, case.expect_in(mode))
    try:
        model, run, given = case.build(list(devices))  # Unavailable goes to the caller
        if mode == "grad":
            model.train()
            for m in model.modules():  # keep dropout and batch statistics deterministic
                if isinstance(m, (nn.Dropout, nn.modules.batchnorm._BatchNorm)):
                    m.eval()
        if placement == "given" and given is None:
            placement = "inferred"  # (offloaded: only the hooks know where it runs)
        tracer = Tracer(model, placement=given if placement == "given" else None, keep_events=True)
        with GRAD_MODES[mode](), tracer:
            try:
                out = run(model)
                out = out if isinstance(out, torch.Tensor) else out.logits
                if out.requires_grad:  # (a training step returns its loss, detached)
                    out.float().sum().backward()
            except Exception as exc:
                if not is_device_error(str(exc)):
                    raise
    except Unavailable:
        raise
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        return outcome
    s = tracer.summary
    outcome.verdict = str(s.verdict)
    outcome.counts = {k: v for k, v in s.counts.items() if v}
    if s.verdict == "error":
        outcome.error = f"verdict error: {s.error}"
    f0, outcome.known = judge_offences(tracer.events)
    if f0 is not None:
        outcome.first = (f0["class"], f0["module"], f0.get("source"))
    elif s.verdict == "dirty" and outcome.known:
        outcome.verdict = "clean"  # but for a library's own known findings (outcome.known)
    return outcome
