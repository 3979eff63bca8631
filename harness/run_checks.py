"""What a run gives back, checked before anyone reports it: logits that are NaN or inf are an
error (`NonFiniteLogitsError`), never a result.

`check_logits(logits, path)` checks one forward's logits; `LogitsWatch(model)` keeps the first
and the latest logits of a run (a forward hook that keeps references and runs no op, so a tracer
sees nothing of it) for `check` after the run. The CLI's `logits`, `run` and `trace`, the YAML
case runner and the fuzzing campaign use them.
"""

from __future__ import annotations

from harness.errors import NonFiniteLogitsError


def check_logits(logits, path: str) -> None:
    """NonFiniteLogitsError naming `path` when `logits` ([T, V], any device) hold a NaN or inf:
    a run that gives one never reports a result as if clean."""
    import torch

    bad = ~torch.isfinite(logits.detach())
    if not bool(bad.any()):
        return
    rows = bad.reshape(-1, logits.shape[-1]).any(dim=-1).nonzero()
    raise NonFiniteLogitsError(
        path,
        "logits",
        f"{int(bad.sum())} of {bad.numel()} are NaN or inf, first at position {int(rows[0])}: "
        "the forward overflowed (finite weights too large for float32?) or a computation failed",
    )


class LogitsWatch:
    """Keeps the first and the latest logits `model` returns while the block runs (references,
    no ops: a tracer sees nothing of it), for `check` after the run. A NaN or inf in the cache
    reaches every later position, so the two catch what any step would show."""

    def __init__(self, model):
        self.model = model
        self.first = self.last = None
        self._handle = None

    def _keep(self, module, args, output) -> None:
        if self.first is None:
            self.first = output
        else:
            self.last = output

    def __enter__(self) -> LogitsWatch:
        register = getattr(self.model, "register_forward_hook", None)  # a test's stand-in may lack it
        self._handle = register(self._keep) if register else None
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()

    def check(self, path: str) -> None:
        """NonFiniteLogitsError when the logits kept hold a NaN or inf."""
        for logits in (self.first, self.last):
            if logits is not None:
                check_logits(logits, path)
