"""Expert routing of a run: tokens per expert per layer.

Forward hooks on the model's `Experts` modules (whose forward receives x, the routing weights and
the chosen experts' indices) keep a reference to each index tensor; nothing is computed or read
from the device during the run (no op for a tracer to see, no host sync). The counts are made
when the collection ends, outside every dispatch mode.

    with collect_routing(model) as routing:
        generate(model, prompt, n)
    routing.counts  # [layers, experts] int64

`Tracer(model, routing=True)` does the same and writes the counts into the trace's summary
(`Summary.routing`, {"layers": [...], "counts": [[...]]}), where the HTML report finds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import _disable_current_modes

from harness.trace.emulated import cpu_data

__all__ = ["RoutingCounts", "collect_routing"]


class RoutingCounts:
    """Tokens per expert per layer, gathered by `collect_routing`.

    `counts` is a [layers, experts] `torch.Tensor` (int64) once the block has ended; `layers`
    the module paths of the rows (`layers.0.moe.experts`, ...); each token adds one to each of
    the experts it is routed to (`expert_used_count` per token per layer)."""

    def __init__(self, layers: list[str], n_experts: int):
        self.layers = layers
        self.n_experts = n_experts
        self.counts = None
        self._seen: dict[int, list] = {i: [] for i in range(len(layers))}
        self.unknown = False  # indices on a device without values (meta)

    def tolist(self) -> list[list[int]]:
        if self.counts is None:
            raise RuntimeError("routing counts are ready when the collect_routing block has ended")
        return self.counts.tolist()

    def record(self) -> dict | None:
        """{"layers": module paths, "counts": [layers][experts]}: what a trace's summary keeps
        (None when the indices had no values: a run on the meta device)."""
        if self.unknown:
            return None
        return {"layers": list(self.layers), "counts": self.tolist()}

    def _finish(self) -> None:
        rows = []
        # Outside every dispatch mode (a tracer may still be active): these ops are the
        # report's, not the model's. Emulated tensors give their CPU values directly.
        with _disable_current_modes(), torch.no_grad():
            for i in range(len(self.layers)):
                row = torch.zeros(self.n_experts, dtype=torch.int64)
                for t in self._seen[i]:
                    t = cpu_data(t)
                    if t.device.type == "meta":
                        self.unknown = True
                        continue
                    flat = t.detach().reshape(-1).to("cpu", torch.int64)
                    flat = flat[(flat >= 0) & (flat < self.n_experts)]
                    row += torch.bincount(flat, minlength=self.n_experts)[: self.n_experts]
                rows.append(row)
            self.counts = torch.stack(rows) if rows else torch.zeros((0, self.n_experts), dtype=torch.int64)
        self._seen = {}

    def __repr__(self) -> str:
        shape = "pending" if self.counts is None else list(self.counts.shape)
        return f"RoutingCounts({shape})"


@contextlib.contextmanager
def collect_routing(model) -> Iterator[RoutingCounts]:
    """Record which experts each token is routed to, per layer, while the block runs.

        with collect_routing(model) as routing, Tracer(model, path=...):
            generate(model, prompt, n)
        build_report([path], out, routing=[routing])

    Forward hooks on the model's `Experts` modules (whose forward receives x, the routing
    weights and the chosen experts' indices) keep a reference to each index tensor; nothing is
    computed or read from the device during the run (no op for a tracer to see, no host sync),
    the counts are made when the block ends: `routing.counts`, a [layers, experts] tensor."""
    from harness.model.mixtral import Experts

    found = [(path, m) for path, m in model.named_modules() if isinstance(m, Experts)]
    n_experts = max((m.n_experts for _, m in found), default=0)
    routing = RoutingCounts([path for path, _ in found], n_experts)
    handles = []

    def hook_for(i: int):
        def hook(module, args, output):
            if len(args) >= 3 and hasattr(args[2], "reshape"):
                routing._seen[i].append(args[2])

        return hook

    try:
        for i, (_, m) in enumerate(found):
            handles.append(m.register_forward_hook(hook_for(i)))
        yield routing
    finally:
        for h in handles:
            h.remove()
        routing._finish()
