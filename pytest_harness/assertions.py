"""Assertions people read: a failed comparison of verdicts explains the first offence, and each
trace's verdict and first offence are JUnit XML properties that CI systems show.

A verdict (`summary.verdict`) is a `str` subclass named `Verdict` whose `explanation` is the
first offence in one paragraph. It is recognized by its type's name and that attribute, so this
module imports nothing of `harness` (nor torch) to do it.
"""

from __future__ import annotations

import os
from typing import Any


def _is_verdict(value: Any) -> bool:
    return isinstance(value, str) and type(value).__name__ == "Verdict"


def explain_verdict(verdict: Any) -> str:
    """The verdict's explanation (the first offence), or "" where it has none."""
    return str(getattr(verdict, "explanation", "") or "")


def pytest_assertrepr_compare(config, op: str, left: Any, right: Any) -> list[str] | None:
    """`assert t.summary.verdict == "clean"` failing: say what made it dirty, not only the words."""
    if op not in ("==", "!=") or not (_is_verdict(left) or _is_verdict(right)):
        return None
    verdict = left if _is_verdict(left) else right
    lines = [f"{str(left)!r} {op} {str(right)!r}"]
    explanation = explain_verdict(verdict)
    if explanation:
        lines += ["", f"the run is {verdict}:", *explanation.splitlines()]
    else:
        lines += ["", f"the run is {verdict} (the verdict carries no explanation)"]
    return lines


def first_offence_line(first: dict | None) -> str:
    """A summary's first offence (the dict of `Summary.first_offence`) as one line, or ""."""
    if not first:
        return ""
    module = first.get("module")
    where = "outside the model" if module is None else f"in {module or '<model>'}"
    tensor = f" (tensor {first['tensor']})" if first.get("tensor") else ""
    devices = ", ".join(first.get("devices") or ())
    expected = f" (expected {first['expected']})" if first.get("expected") else ""
    source = f" at {first['source']}" if first.get("source") else ""
    return f"{first.get('class')} {where}{tensor}: {first.get('op')} on {devices}{expected}{source}"


def record_verdicts(record_property, tracers: list[tuple[str | None, Any]]) -> None:
    """JUnit XML properties for each tracer a test made and entered: `harness_verdict`, and
    `harness_first_offence` for a dirty run or `harness_explanation` for one that was not judged
    (it raised, or ran nothing); suffixed with the tracer's name, or its number, beyond the first."""
    for i, (name, tracer) in enumerate(tracers):
        path = getattr(tracer, "path", None)
        if path is None or not os.path.isfile(path):
            continue  # made but never entered (the trace file is written on entry): nothing to say
        summary = tracer.summary
        suffix = "" if i == 0 else f"[{name or i}]"
        record_property(f"harness_verdict{suffix}", str(summary.verdict))
        if summary.first_offence:
            text = explain_verdict(summary.verdict) or first_offence_line(summary.first_offence)
            record_property(f"harness_first_offence{suffix}", " ".join(text.split()))
        elif summary.verdict != "clean" and explain_verdict(summary.verdict):
            record_property(
                f"harness_explanation{suffix}", " ".join(explain_verdict(summary.verdict).split())
            )
