"""Reading Mixtral (and dense llama) GGUF files through the `gguf` package.

`open_gguf(path)` returns a `ModelFile`: its `config` (a `MixtralConfig` from the `llama.*`
keys), its `layout` (merged or per-expert experts, or dense), and `tensor(name)` giving a
`QTensor` over the memory-mapped bytes. Everything the header claims is checked against the
file's length before any of it is used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class MixtralConfig:
    """A Mixtral (or, with expert_count 0, a dense llama) as GGUF's `llama.*` keys describe it."""

    block_count: int  # layers
    embedding_length: int  # D
    feed_forward_length: int  # F, per expert
    head_count: int  # H
    head_count_kv: int  # KV heads (GQA when < H, MQA when 1)
    vocab_size: int  # V
    expert_count: int = 8  # E (0: dense llama)
    expert_used_count: int = 2  # k
    rms_eps: float = 1e-5
    rope_freq_base: float = 1e6
    rope_dimension_count: int | None = None  # None: head_dim
    context_length: int = 32768

    @property
    def head_dim(self) -> int:
        return self.embedding_length // self.head_count

    @property
    def rope_dim(self) -> int:
        return self.rope_dimension_count or self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 0

    def replace(self, **changes) -> MixtralConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, MixtralConfig] = {
    # Small enough for tests; 256-wide rows so every K-quant and IQ4_XS fits its blocks.
    "tiny": MixtralConfig(
        block_count=2,
        embedding_length=256,
        feed_forward_length=512,
        head_count=4,
        head_count_kv=2,
        vocab_size=384,
        expert_count=4,
        expert_used_count=2,
        rms_eps=1e-5,
        rope_freq_base=1e6,
        context_length=512,
    ),
    # The real shapes of Mixtral-8x7B-v0.1.
    "mixtral-8x7b": MixtralConfig(
        block_count=32,
        embedding_length=4096,
        feed_forward_length=14336,
        head_count=32,
        head_count_kv=8,
        vocab_size=32000,
        expert_count=8,
        expert_used_count=2,
        rms_eps=1e-5,
        rope_freq_base=1e6,
        context_length=32768,
    ),
}
