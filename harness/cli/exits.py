"""The exit statuses of every `harness` command, in one place.

0 clean (or done); 1 the harness found a problem (a dirty trace, a failed case); 2 bad input (a
bad argument or file: one line on stderr, nothing run); 3 undecided: a traced run raised an
error that is not a device error, or traced no op at all, so it was not judged (a run that did
not finish is never clean), or the harness itself failed.
"""

from __future__ import annotations

CLEAN, FOUND, BAD_INPUT, UNDECIDED = 0, 1, 2, 3


def for_verdict(verdict: str | None) -> int:
    """A trace verdict's exit status: clean 0, dirty 1, anything else (error, inconclusive, a
    trace without a summary) 3."""
    if verdict == "clean":
        return CLEAN
    return FOUND if verdict == "dirty" else UNDECIDED
