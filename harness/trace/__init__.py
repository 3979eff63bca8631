"""Device tracing: record every aten op of a run with its module, weights and devices, classify
it against the placement, stream it to JSON Lines, and compare two runs.

    with Tracer(model, path="run.jsonl") as tracer:
        model(tokens)
    tracer.summary.verdict  # "clean" or "dirty"; tracer.summary.first_offence
"""

from harness.trace.classify import Classifier, is_device_error
from harness.trace.diff import Difference, TraceDiff, diff
from harness.trace.events import (
    ALLOWED,
    CLASSES,
    CLEAN,
    DIRTY,
    MISMATCH,
    OFFENDING,
    OK,
    STRAY,
    SYNC,
    TRANSFER,
    Event,
    Summary,
    TensorSpec,
)
from harness.trace.routing import RoutingCounts, collect_routing
from harness.trace.store import Trace, TraceWriter, load_trace
from harness.trace.tracer import Tracer

__all__ = [
    "ALLOWED",
    "CLASSES",
    "CLEAN",
    "DIRTY",
    "MISMATCH",
    "OFFENDING",
    "OK",
    "STRAY",
    "SYNC",
    "TRANSFER",
    "Classifier",
    "Difference",
    "Event",
    "RoutingCounts",
    "Summary",
    "TensorSpec",
    "Trace",
    "TraceDiff",
    "TraceWriter",
    "Tracer",
    "collect_routing",
    "diff",
    "is_device_error",
    "load_trace",
]
