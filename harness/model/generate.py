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
from harness.quant import fused
from harness.trace.tracer import is_tracing


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


class DecodeGraph:
    """One greedy decode step of `model` captured as a CUDA graph, replayed once per token.

    The step reads the token and its position from static device buffers, writes the chosen id
    into the output buffer and advances both: no host work, no host read, between steps. It runs
    at a device position over the whole static KV cache (masked), so one capture serves every
    position. `greedy_decode` makes one on a single-GPU placement and keeps it as `model.decode_graph`.
    """

    def __init__(self, model: Mixtral, max_tokens: int):
        device = model.placement.head
        self.model = model
        self.max_tokens = max_tokens
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(max_tokens, dtype=torch.long, device=device)
        # The warm-up step runs for real and writes the KV cache at its position: the last one,
        # which no query sees before its own step writes it (at 0 it once overwrote the prompt's
        # first entry, and the graph decoded other tokens than eager steps).
        self.pos.fill_(model.max_seq_len - 1)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with fused.graph_step():  # the kernels a replay is best served by, warm-up and capture alike
            with torch.cuda.stream(side):
                self._step()  # compiles the kernels and warms the allocator, off the capture
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()

    def _step(self) -> None:
        token = self.model(self.token, self.pos)[-1].argmax().view(1)
        self.out.index_copy_(0, self.step, token)
        self.token.copy_(token)
        self.pos.add_(1)
        self.step.add_(1)

    def run(self, token: torch.Tensor, start_pos: int, n: int) -> torch.Tensor:
        """The `n` ids greedily decoded after `token` at `start_pos` ([n], on the device)."""
        if n > self.max_tokens:
            raise UsageError(None, "n", f"this graph decodes at most {self.max_tokens} tokens, asked {n}")
        self.token.copy_(token.view(1))
        self.pos.fill_(start_pos)
        self.step.zero_()
        for _ in range(n):
            self.graph.replay()
        return self.out[:n].clone()


def graph_decoding_possible(model: Mixtral) -> bool:
    """A CUDA graph can replay the decode step: one GPU holds the whole model, and no Tracer is
    recording (a graph would hide the ops from it: under a Tracer the model runs eager)."""
    devices = model.placement.devices
    return len(devices) == 1 and devices[0].type == "cuda" and not is_tracing()


def greedy_decode(
    model: Mixtral, token: torch.Tensor, start_pos: int, n: int, *, fast: bool = True
) -> torch.Tensor:
    """Decode `n` tokens greedily after `token` ([1] int64 on the embedding's device) at
    `start_pos`, with no host read between steps: the [n] generated ids, on the head's device.

    `fast`: replay a CUDA graph of the step where `graph_decoding_possible`, else eager calls."""
    if start_pos + n > model.max_seq_len:
        raise UsageError(
            None, "n", f"positions up to {start_pos + n} exceed the context of {model.max_seq_len}"
        )
    if fast and graph_decoding_possible(model):
        graph = model.decode_graph
        if graph is None or graph.max_tokens < n:
            model.decode_graph = None  # the old graph's memory goes first
            graph = model.decode_graph = DecodeGraph(model, max(n, 128))
        return graph.run(token, start_pos, n)
    out = []
    for pos in range(start_pos, start_pos + n):
        token = model(token, pos)[-1].argmax().view(1)
        out.append(token)
    return torch.cat(out)
