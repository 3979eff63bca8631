"""Hypothesis strategies for device-consistency properties: models, types, placements, inputs, faults.

Public, for your own suites as much as for the harness's:

    import torch
    from hypothesis import given, settings
    from harness import strategies as hs

    @settings(deadline=None)  # a model runs longer than hypothesis's 200 ms (harness-* profiles say so too)
    @given(case=hs.model_cases(n_devices=2))  # by name: given's positional ones go rightmost
    def test_my_property(tmp_path_factory, case):  # (tmp_path would be shared by the examples)
        path = case.synthesize(tmp_path_factory.mktemp("case") / "case.gguf")
        with case.accelerator(), torch.no_grad():
            model = case.load(path)
            for tokens, start_pos in case.calls():
                model(tokens, start_pos)

What each strategy gives:

- `configs()`: a `MixtralConfig` that synthesizes and loads: 1-3 layers, 2-8 experts (or 0, a
  dense llama, with `dense=True`), 1..min(3, experts) used experts, heads of 32 or 64 dims with KV
  heads dividing them (MHA, GQA and MQA), embedding and feed-forward lengths that are multiples of
  256 (every K-quant and IQ4_XS fits its blocks), a small vocabulary (at least `synth.MIN_VOCAB`,
  259) and a context of at least 64.
- `tensor_types()`: a file type of `harness.synth.FILE_TYPES`: a plain GGML type for every weight
  matrix (F32 ... IQ4_XS, the low-bit IQ1-IQ3, TQ, FP4 and Q1_0 types) or one of llama.cpp's
  K-quant mixes, which give the attention, expert, embedding and output groups different types
  (`group_types()` says which). `synth.synthesize`
  takes one file type, not a type per group, so the strategy draws file types; the mixes are where
  the groups differ.
- `layouts()`, `router_types()`: `synth.LAYOUTS` (merged, per-expert) and `synth.ROUTER_TYPES`
  (f32, f16; the router is never quantized).
- `token_sequences(vocab_size, max_len)`: lists of token ids.
- `device_maps(n_layers, devices)`: device maps over any number of devices (`{"embed": ...,
  "layers.A-B": ..., "head": ...}`): contiguous layer ranges covering every layer once, the
  embedding and the head anywhere; always accepted by `Placement.from_map` where the devices exist.
- `placements(n_layers, n_devices)`: keyword arguments of `Mixtral.from_gguf` / `Placement.resolve`:
  one device (`{"device": "cuda:1"}`), a device map (`{"device_map": {...}}`) or llama.cpp's partial
  offload (`{"n_gpu_layers": N, "device": "cuda:0"}`), over the CPU and `cuda:0..n_devices-1`.
- `faults(model=None)`: names of the Mixtral faults of `harness.faults.CATALOG`, only those that
  apply to `model` when one is given.
- `generic_faults(model, run=None)`: (fault, module path) pairs of the generic faults, which apply
  to any `nn.Module` (a transformers model, a hand-written MoE), at any module where they act.
- `model_cases()`: all of it as one `ModelCase` (config, file type, layout, router, seed, tokens,
  placement), which synthesizes, loads, runs on the emulated accelerator or real CUDA, and writes
  out the code and the command line that reproduce it (`snippet()`, `command_line()`).

Every strategy shrinks towards the smallest case: one layer, two experts, one used expert, the
narrowest sizes, F32 weights, the merged layout, the f32 router, seed 0, a single token, the CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st

from harness.gguf_file import MixtralConfig
from harness.synth import FILE_TYPES, LAYOUTS, MIN_VOCAB, ROUTER_TYPES, plan, synthesize

__all__ = [
    "MAX_SEQ_LEN",
    "ModelCase",
    "configs",
    "device_maps",
    "faults",
    "generic_faults",
    "group_types",
    "layouts",
    "model_cases",
    "placement_map",
    "placements",
    "router_types",
    "tensor_types",
    "token_sequences",
]

MAX_SEQ_LEN = 32  # the KV cache a ModelCase loads with: room for its tokens
_ROW_QUANTUM = 256  # the largest block (K-quants, IQ4_XS): row lengths are multiples of it
_CUDA = re.compile(r"^cuda:(\d+)$")


# ---- model -----------------------------------------------------------------------------------


@st.composite
def configs(
    draw,
    layers: tuple[int, int] = (1, 3),
    experts: tuple[int, int] = (2, 8),
    dense: bool = False,
    head_dims: Sequence[int] = (32, 64),
    embedding_lengths: Sequence[int] = (256, 512),
    feed_forward_lengths: Sequence[int] = (256, 512),
    vocab: tuple[int, int] = (MIN_VOCAB, 512),
    context: Sequence[int] = (64, 128, 512),
    partial_rope: bool = True,
) -> MixtralConfig:
    """A `MixtralConfig` that `synth.synthesize` writes and `Mixtral` loads.

    `layers`, `experts`, `vocab`: inclusive ranges; `dense`: also 0 experts (a dense llama);
    `embedding_lengths`, `feed_forward_lengths`: multiples of 256, so every block type fits a row;
    `head_dims`: the head sizes drawn (heads = embedding / head_dim, KV heads any divisor of heads);
    `partial_rope`: sometimes rotate only half of each head (`rope.dimension_count`)."""
    for n in (*embedding_lengths, *feed_forward_lengths):
        if n <= 0 or n % _ROW_QUANTUM:
            raise ValueError(f"configs: row lengths must be positive multiples of {_ROW_QUANTUM}, got {n}")
    if vocab[0] < MIN_VOCAB:
        raise ValueError(f"configs: the vocabulary needs at least {MIN_VOCAB} tokens, got {vocab[0]}")
    if not 1 <= experts[0] <= experts[1]:
        raise ValueError(f"configs: bad expert range {experts}")
    d = draw(st.sampled_from(sorted(embedding_lengths)))
    head_dim = draw(st.sampled_from([h for h in head_dims if d % h == 0]))
    heads = d // head_dim
    kv_heads = draw(st.sampled_from(_divisors(heads)))  # 1 (MQA) first: shrinks towards the fewest
    # dense (0) last: drawn as often as any one expert count, and shrinks towards the fewest experts
    e = draw(st.sampled_from([*range(experts[0], experts[1] + 1), *([0] if dense else [])]))
    used = draw(st.integers(1, min(3, e))) if e else 0
    rope_dim = draw(st.sampled_from([None, head_dim // 2])) if partial_rope else None
    return MixtralConfig(
        block_count=draw(st.integers(*layers)),
        embedding_length=d,
        feed_forward_length=draw(st.sampled_from(sorted(feed_forward_lengths))),
        head_count=heads,
        head_count_kv=kv_heads,
        vocab_size=draw(st.integers(*vocab)),
        expert_count=e,
        expert_used_count=used,
        rope_dimension_count=rope_dim,
        context_length=draw(st.sampled_from(sorted(context))),
    )


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def tensor_types(names: Sequence[str] | None = None) -> st.SearchStrategy[str]:
    """A file type of `synth.FILE_TYPES` (or of `names`): plain GGML types first, then the mixes.

    `synth.synthesize` takes one file type for the whole file; the K-quant mixes (Q4_K_M, ...)
    are what give the tensor groups different types, as llama.cpp does. `group_types()` says which
    type each group gets."""
    pool = list(FILE_TYPES) if names is None else [n.upper() for n in names]
    unknown = [n for n in pool if n not in FILE_TYPES]
    if unknown:
        raise ValueError(f"tensor_types: unknown file types {unknown} (known: {', '.join(FILE_TYPES)})")
    return st.sampled_from(pool)


def group_types(config: MixtralConfig, file_type: str, layout: str = "merged", router: str = "f32") -> dict:
    """The GGML type names each tensor group gets in a synthesized file:
    {"embedding": [...], "attention": [...], "experts" or "ffn": [...], "router": [...], "output": [...]}."""
    groups: dict[str, set[str]] = {}
    for t in plan(config, file_type, layout, router):
        if len(t.shape) == 1:
            continue  # norms: always F32
        name = t.name
        if name == "token_embd.weight":
            group = "embedding"
        elif name == "output.weight":
            group = "output"
        elif ".attn_" in name:
            group = "attention"
        elif "ffn_gate_inp" in name:
            group = "router"
        else:
            group = "experts" if config.is_moe else "ffn"
        groups.setdefault(group, set()).add(t.qtype.name)
    return {g: sorted(ts) for g, ts in groups.items()}


def layouts() -> st.SearchStrategy[str]:
    """A MoE expert layout: "merged" (one 3-D stack per projection) or "per-expert" (TheBloke's)."""
    return st.sampled_from(LAYOUTS)


def router_types() -> st.SearchStrategy[str]:
    """The router's (`ffn_gate_inp`) type: "f32" or "f16" (llama.cpp never quantizes it)."""
    return st.sampled_from(list(ROUTER_TYPES))


def token_sequences(vocab_size: int, max_len: int = 8, min_len: int = 1) -> st.SearchStrategy[list[int]]:
    """Token ids in [0, vocab_size), `min_len` to `max_len` of them."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"token_sequences: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    return st.lists(st.integers(0, vocab_size - 1), min_size=min_len, max_size=max_len)


# ---- placement -------------------------------------------------------------------------------


@st.composite
def device_maps(draw, n_layers: int, devices: Sequence[str] = ("cpu", "cuda:0", "cuda:1")) -> dict[str, str]:
    """A device map over `devices` (any number of them): the layers cut into contiguous ranges,
    each range, the embedding and the head on any of the devices. Keys are "embed", "layers.N" or
    "layers.A-B", and "head", in forward order; every layer is placed exactly once."""
    pool = list(dict.fromkeys(str(d) for d in devices))
    if n_layers < 1 or not pool:
        raise ValueError(f"device_maps: need at least one layer and one device, got {n_layers}, {pool}")
    device = st.sampled_from(pool)
    out = {"embed": draw(device)}
    start = 0
    while start < n_layers:
        left = n_layers - start
        length = left - draw(st.integers(0, left - 1))  # shrinks towards one range for the rest
        end = start + length - 1
        out[f"layers.{start}" if length == 1 else f"layers.{start}-{end}"] = draw(device)
        start = end + 1
    out["head"] = draw(device)
    return out


def placements(
    n_layers: int, n_devices: int = 2, accelerated: bool = False
) -> st.SearchStrategy[dict[str, object]]:
    """Keyword arguments of `Mixtral.from_gguf` placing a model of `n_layers` layers on the CPU and
    `cuda:0` .. `cuda:{n_devices-1}`: {"device": d}, {"device_map": {...}} or llama.cpp's
    {"n_gpu_layers": N, "device": gpu}. `accelerated`: only placements that put some part of the
    model on an accelerator (where the faults of the catalog apply)."""
    if n_devices < 0:
        raise ValueError(f"placements: n_devices must not be negative, got {n_devices}")
    gpus = [f"cuda:{i}" for i in range(n_devices)]
    if accelerated and not gpus:
        raise ValueError("placements: accelerated=True needs n_devices >= 1")
    single = st.sampled_from(gpus if accelerated else ["cpu", *gpus]).map(lambda d: {"device": d})
    maps = device_maps(n_layers, ["cpu", *gpus]).map(lambda m: {"device_map": m})
    if accelerated:
        maps = maps.filter(lambda p: any(d != "cpu" for d in p["device_map"].values()))
    options = [single, maps]
    if gpus:
        offload = st.tuples(st.integers(1 if accelerated else 0, n_layers + 1), st.sampled_from(gpus))
        options.append(offload.map(lambda t: {"n_gpu_layers": t[0], "device": t[1]}))
    return st.one_of(options)


def placement_map(placement: dict[str, object], n_layers: int) -> dict[str, str]:
    """The device map a `placements()` value comes to (as `Placement.describe()` writes it), worked
    out without asking whether the devices exist here."""
    if "device_map" in placement:
        layers: list[str | None] = [None] * n_layers
        for key, dev in placement["device_map"].items():
            m = re.match(r"^layers\.(\d+)(?:-(\d+))?$", key)
            if m:
                for i in range(int(m[1]), int(m[2] or m[1]) + 1):
                    layers[i] = str(dev)
        embed, head = str(placement["device_map"]["embed"]), str(placement["device_map"]["head"])
    elif placement.get("n_gpu_layers") is not None:
        n = int(placement["n_gpu_layers"])
        gpu = _full_name(str(placement.get("device") or "cuda")) if n > 0 else "cpu"
        layers = [gpu if i >= n_layers - n else "cpu" for i in range(n_layers)]
        embed, head = "cpu", gpu if n > n_layers else "cpu"
    else:
        d = _full_name(str(placement.get("device") or "cpu"))
        embed, layers, head = d, [d] * n_layers, d
    out = {"embed": embed}
    start = 0
    for i in range(1, n_layers + 1):
        if i == n_layers or layers[i] != layers[start]:
            out[f"layers.{start}" if i - 1 == start else f"layers.{start}-{i - 1}"] = layers[start]
            start = i
    out["head"] = head
    return out


def _full_name(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


# ---- faults ----------------------------------------------------------------------------------


def faults(model=None, names: Sequence[str] | None = None) -> st.SearchStrategy[str]:
    """A name of a Mixtral fault of `harness.faults.CATALOG` (or of `names`, generic ones too);
    with `model`, only the faults that apply to it (`Fault.applies_to`). Nothing at all when none
    applies: draw it with `data.draw()` after loading the model, from a placement that uses an
    accelerator. The generic faults need a module as well: `generic_faults`."""
    from harness import faults as catalog  # imports the model: only when faults are wanted

    if names is None:
        pool = [n for n, f in catalog.CATALOG.items() if not f.generic]
    else:
        pool = [catalog.get(n).name for n in names]
    if model is not None:
        pool = [n for n in pool if catalog.get(n).applies_to(model)]
    return st.sampled_from(pool) if pool else st.nothing()


def generic_faults(model, run=None, names: Sequence[str] | None = None) -> st.SearchStrategy[tuple[str, str]]:
    """(fault name, module path): a generic fault of `harness.faults.GENERIC` (or of `names`) and
    one of its sites in `model`, any `nn.Module` (`Fault.sites(model, run)`: `run`, a call that
    runs the model once, keeps only the modules where a fault that depends on the module's code
    acts). Shrinks towards the first fault and the first module. Nothing when no fault has a site."""
    from harness import faults as catalog

    pool = list(catalog.GENERIC) if names is None else [catalog.get(n).name for n in names]
    pairs = [(name, at) for name in pool for at in catalog.get(name).sites(model, run)]
    return st.sampled_from(pairs) if pairs else st.nothing()


# ---- the composite ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    """One model on one placement with one input: everything a property needs to run it.

    `placement`: `Mixtral.from_gguf` keyword arguments (see `placements()`); `n_devices`: the CUDA
    devices the case assumes (the emulated accelerator gets that many); `split`: the tokens before
    it are a first call (prefill) and the rest a second call at position `split` (a decode step when
    one token is left); 0 for a single call."""

    config: MixtralConfig
    file_type: str
    layout: str
    router: str
    seed: int
    tokens: tuple[int, ...]
    placement: dict = field(hash=False)
    n_devices: int = 2
    split: int = 0

    # -- what it is ------------------------------------------------------------------------

    @property
    def synth_key(self) -> tuple:
        """What the GGUF file depends on: a cache key for synthesized files."""
        return (self.config, self.file_type, self.layout, self.router, self.seed)

    @property
    def device_map(self) -> dict[str, str]:
        """The placement as a compact device map."""
        return placement_map(self.placement, self.config.block_count)

    @property
    def cuda_indices(self) -> list[int]:
        """The CUDA device indices the placement uses."""
        return sorted({int(m[1]) for d in self.device_map.values() if (m := _CUDA.match(d))})

    @property
    def uses_accelerator(self) -> bool:
        return bool(self.cuda_indices)

    def calls(self):
        """[(tokens tensor, start_pos)] of the forward calls, in order."""
        import torch

        parts = [(self.tokens[: self.split], 0), (self.tokens[self.split :], self.split)]
        return [(torch.tensor(t, dtype=torch.long), pos) for t, pos in parts if t]

    def group_types(self) -> dict:
        return group_types(self.config, self.file_type, self.layout, self.router)

    def describe(self) -> str:
        c = self.config
        moe = (
            f"{c.expert_count}x{c.expert_used_count} {self.layout}, router {self.router}"
            if c.is_moe
            else "dense"
        )
        return (
            f"{c.block_count} layers, D {c.embedding_length}, F {c.feed_forward_length}, "
            f"heads {c.head_count}/{c.head_count_kv}, V {c.vocab_size}, {moe}, {self.file_type}, "
            f"seed {self.seed}, tokens {list(self.tokens)} (split {self.split}), on {self.device_map}"
        )

    # -- running it ------------------------------------------------------------------------

    def synthesize(self, path: str | os.PathLike):
        """Write the case's GGUF file to `path`; returns its path."""
        return synthesize(path, self.config, self.file_type, self.layout, self.router, seed=self.seed)

    def load(self, path: str | os.PathLike, **kwargs):
        """The model of the file at `path` on the case's placement (inside `accelerator()` where
        the placement names CUDA devices)."""
        from harness.model.mixtral import Mixtral

        return Mixtral.from_gguf(path, max_seq_len=MAX_SEQ_LEN, **self.placement, **kwargs)

    def real_cuda(self) -> bool:
        """Whether this machine's CUDA has every device the placement names (then
        `accelerator()` runs on it rather than on the emulated accelerator)."""
        import torch

        return (
            self.uses_accelerator
            and torch.cuda.is_available()
            and max(self.cuda_indices) < torch.cuda.device_count()
        )

    def accelerator(self, emulate: bool | None = None):
        """A context manager for the run: nothing on real CUDA (when `emulate` is False, or None
        and `real_cuda()`), else the emulated accelerator with `n_devices` devices."""
        if emulate is None:
            emulate = not self.real_cuda()
        if not emulate:
            return contextlib.nullcontext()
        from harness.trace.emulated import EmulatedCuda

        return EmulatedCuda(device_count=max(1, self.n_devices, *[i + 1 for i in self.cuda_indices]))

    # -- reproducing it --------------------------------------------------------------------

    def snippet(self, fault: str | None = None, gguf: str = "case.gguf", trace: str = "case.jsonl") -> str:
        """Python that reproduces the case on the emulated accelerator: synthesize, load, run
        (with `fault` injected after a clean prefill, if given) under the tracer, print the outcome."""
        placement = ", ".join(f"{k}={v!r}" for k, v in self.placement.items())
        calls = [(list(t.tolist()), pos) for t, pos in self.calls()]
        lines = [
            "import torch",
            "from harness import faults",
            "from harness.gguf_file import MixtralConfig",
            "from harness.model.mixtral import Mixtral",
            "from harness.synth import synthesize",
            "from harness.trace import Tracer",
            "from harness.trace.emulated import EmulatedCuda",
            "",
            f"path = synthesize({gguf!r}, {self.config!r}, {self.file_type!r}, {self.layout!r}, "
            f"{self.router!r}, seed={self.seed})",
            f"with EmulatedCuda(device_count={max(1, self.n_devices)}), torch.no_grad():",
            f"    model = Mixtral.from_gguf(path, max_seq_len={MAX_SEQ_LEN}, {placement})",
        ]
        traced = calls
        if fault is not None and len(calls) > 1:
            (t, pos), traced = calls[0], calls[1:]
            lines.append(f"    model(torch.tensor({t}), {pos})  # clean prefill")
        if fault is not None:
            lines.append(f"    injection = faults.get({fault!r}).inject(model)")
        lines.append(f"    with Tracer(model, path={trace!r}) as tracer:")
        lines.append("        try:")
        lines += [f"            model(torch.tensor({t}), {pos})" for t, pos in traced]
        lines.append("        except RuntimeError as exc:  # CUDA refuses a mismatch; the trace has it")
        lines.append("            print(exc)")
        if fault is not None:
            lines.append("    injection.remove()")
            lines.append(f"    print('expected', faults.get({fault!r}).location(model))")
        lines.append("print(tracer.summary.verdict, tracer.summary.counts)")
        lines.append("print(tracer.summary.first_offence)")
        return "\n".join(lines)

    def command_line(self, fault: str | None = None, gguf: str = "case.gguf") -> str:
        """Shell commands that synthesize the case's file and trace it with `harness trace` on the
        emulated accelerator. `harness synth` knows presets only, so the file is written by a one-line
        Python call. The trace is one prefill of all the tokens (the `split` of the case is not
        expressed); `fault` adds `--fault NAME`."""
        synth = (
            "from harness.gguf_file import MixtralConfig; from harness.synth import synthesize; "
            f"synthesize({gguf!r}, {self.config!r}, {self.file_type!r}, {self.layout!r}, "
            f"{self.router!r}, seed={self.seed})"
        )
        trace = [
            "harness",
            "trace",
            gguf,
            "--device",
            "emulated",
            "--device-map",
            json.dumps(self.device_map, separators=(",", ":")),
            "--tokens",
            ",".join(str(t) for t in self.tokens),
        ]
        if fault is not None:
            trace += ["--fault", fault]
        return f"python -c {shlex.quote(synth)} && {shlex.join(trace)}"

    def reproduce(self, fault: str | None = None) -> str:
        """How to reproduce the case: the one-line description, the Python snippet, the command line."""
        return (
            f"case: {self.describe()}\n"
            f"tensor types: {self.group_types()}\n"
            f"--- reproduce (Python) ---\n{self.snippet(fault)}\n"
            f"--- or (shell; the whole token sequence as one prefill) ---\n{self.command_line(fault)}"
        )


@st.composite
def model_cases(
    draw,
    n_devices: int = 2,
    max_tokens: int = 8,
    accelerated: bool = False,
    dense: bool = False,
    config: st.SearchStrategy[MixtralConfig] | None = None,
    file_types: st.SearchStrategy[str] | None = None,
) -> ModelCase:
    """A whole `ModelCase`: config, file type, layout, router, seed, tokens, split and placement.

    `n_devices`: CUDA devices the placements may use; `accelerated`: only placements using one;
    `dense`: dense llama configs too; `config`, `file_types`: other strategies for those parts."""
    if not 1 <= max_tokens < MAX_SEQ_LEN:
        raise ValueError(f"model_cases: max_tokens must be in 1..{MAX_SEQ_LEN - 1}, got {max_tokens}")
    c = draw(config if config is not None else configs(dense=dense))
    file_type = draw(file_types if file_types is not None else tensor_types())
    if c.is_moe:
        layout, router = draw(layouts()), draw(router_types())
    else:
        layout, router = LAYOUTS[0], next(iter(ROUTER_TYPES))  # no experts, no router
    seed = draw(st.integers(0, 2**31 - 1))
    tokens = tuple(draw(token_sequences(c.vocab_size, max_tokens)))
    split = draw(st.sampled_from([0, len(tokens) - 1])) if len(tokens) > 1 else 0
    placement = draw(placements(c.block_count, n_devices, accelerated=accelerated))
    return ModelCase(c, file_type, layout, router, seed, tokens, placement, n_devices, split)
