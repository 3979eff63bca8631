"""Device tracing: record every aten op of a run with its module, weights and devices, classify
it against the placement, stream it to JSON Lines, and compare two runs.

    with Tracer(model, path="run.jsonl") as tracer:
        model(tokens)
    tracer.summary.verdict  # "clean", "dirty", "error" or "inconclusive" (a `Verdict`)
    tracer.summary.first_offence, tracer.summary.assert_clean()
"""

from harness.trace.classify import Classifier, is_device_error
from harness.trace.diff import Difference, TraceDiff, diff
from harness.trace.events import (
    ALLOWED,
    CLASSES,
    CLEAN,
    DIRTY,
    ERROR,
    INCONCLUSIVE,
    MISMATCH,
    OFFENDING,
    OK,
    STRAY,
    SYNC,
    TRANSFER,
    VERDICTS,
    Event,
    Summary,
    TensorSpec,
    Verdict,
)
from harness.trace.placement import ModulePlacement
from harness.trace.routing import RoutingCounts, collect_routing
from harness.trace.store import Trace, TraceWriter, load_trace
from harness.trace.tracer import Tracer, is_tracing

__all__ = [
    "ALLOWED",
    "CLASSES",
    "CLEAN",
    "DIRTY",
    "ERROR",
    "INCONCLUSIVE",
    "MISMATCH",
    "OFFENDING",
    "OK",
    "STRAY",
    "SYNC",
    "TRANSFER",
    "VERDICTS",
    "Classifier",
    "Difference",
    "Event",
    "ModulePlacement",
    "RoutingCounts",
    "Summary",
    "TensorSpec",
    "Trace",
    "TraceDiff",
    "TraceWriter",
    "Tracer",
    "Verdict",
    "collect_routing",
    "diff",
    "is_device_error",
    "is_tracing",
    "load_trace",
]
