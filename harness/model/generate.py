"""Generation: prefill the prompt, then decode one token at a time with the KV cache.

Greedy when temperature is 0, else temperature and top-p (nucleus) sampling from a seeded
generator on the head's device. The only host read per step is the chosen token id, at the
edge of the run, where the caller needs it anyway (to stop at EOS and to print it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from harness.errors import UsageError
from harness.model.mixtral import Mixtral


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS included if reached
    stopped_at_eos: bool = False
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first generated token comes from the prefill; the rest from decode steps.
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """[V] logits -> a 0-dim int64 token id on the same device."""
    if temperature <= 0:
        return logits.argmax()
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs >= top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order[choice].squeeze(0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    model: Mixtral,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Prefill `prompt`, then decode up to `max_new_tokens`, stopping after `eos_id`."""
    if max_new_tokens < 0:
        raise UsageError(None, "max_new_tokens", f"must not be negative, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise UsageError(None, "top_p", f"must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise UsageError(None, "temperature", f"must not be negative, got {temperature}")
    model.check_tokens(prompt)
    if len(prompt) + max_new_tokens > model.max_seq_len:
        raise UsageError(
            None,
            "max_new_tokens",
            f"{len(prompt)} prompt tokens + {max_new_tokens} new exceed the context of {model.max_seq_len}",
        )
    head = model.placement.head
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=head)
        generator.manual_seed(0 if seed is None else seed)

    result = Generation(prompt=list(prompt))
    if max_new_tokens == 0:
        return result
    model.reset()
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(torch.tensor(prompt, dtype=torch.long), 0)  # [T, V]
        token = sample(logits[-1], temperature, top_p, generator)
        next_id = int(token)  # the edge of the run: the caller needs the id on the host
        _sync(head)
        result.prefill_seconds = time.perf_counter() - start

        start = time.perf_counter()
        pos = len(prompt)
        while True:
            result.tokens.append(next_id)
            if on_token is not None:
                on_token(next_id)
            if next_id == eos_id:
                result.stopped_at_eos = True
                break
            if len(result.tokens) >= max_new_tokens:
                break
            logits = model(token.view(1), pos)  # the token stays on the device
            token = sample(logits[-1], temperature, top_p, generator)
            next_id = int(token)
            pos += 1
        _sync(head)
        result.decode_seconds = time.perf_counter() - start
    return result


def greedy_decode(
    model: Mixtral, token: torch.Tensor, start_pos: int, n: int, *, fast: bool = True
) -> torch.Tensor:
    """Decode `n` tokens greedily after `token` ([1] int64 on the embedding's device) at
    `start_pos`, with no host read between steps: the [n] generated ids, on the head's device."""
    out = []
    for pos in range(start_pos, start_pos + n):
        token = model(token, pos)[-1].argmax().view(1)
        out.append(token)
    return torch.cat(out)
