"""HTML mismatch reports: one self-contained file from one or more traces.

from harness.report import build_report, collect_routing

with collect_routing(model) as routing, Tracer(model, path="cuda.jsonl"):
    model(tokens)
build_report(["cpu.jsonl", "cuda.jsonl"], "reports/run.html", routing=[None, routing])
"""

from harness.report.build import MAX_EVENTS, RoutingCounts, build_report, check_report_path, collect_routing

__all__ = ["MAX_EVENTS", "RoutingCounts", "build_report", "check_report_path", "collect_routing"]
