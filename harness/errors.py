"""Errors for bad input. Each message names the file and the key, tensor or line at fault.

The CLI catches `HarnessError`, prints its message as one line and exits 2. A message is always
one printable line: a name or value that holds a newline or other control character is shown as
its `repr`, and long ones are cut, so a forged line inside a file can never pass for the
harness's own output.
"""

from __future__ import annotations

import os

MAX_NAME_CHARS = 120  # a path, key or tensor name longer than this is cut in messages
MAX_PROBLEM_CHARS = 400


def shown(value: object, limit: int = 60) -> str:
    """`value` for an error message: its repr (one line, whatever it holds), cut to `limit` chars."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _one_line(text: str, limit: int) -> str:
    if not text.isprintable():
        text = repr(text)[1:-1]  # newlines, tabs, NUL, bidi controls become visible escapes
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _name(text: str) -> str:
    """A path or field as is when it is a plain printable name, else its (cut) repr."""
    if text.isprintable() and len(text) <= MAX_NAME_CHARS:
        return text
    return shown(text, MAX_NAME_CHARS)


class HarnessError(Exception):
    """Bad input. `path` is the file (or None), `field` the key, tensor or line within it."""

    def __init__(self, path: str | os.PathLike | None, field: str | None, problem: str):
        self.path = None if path is None else os.fsdecode(os.fspath(path))
        self.field = field
        self.problem = problem
        where = ": ".join(_name(p) for p in (self.path, field) if p)
        problem = _one_line(str(problem), MAX_PROBLEM_CHARS)
        super().__init__(f"{where}: {problem}" if where else problem)


class GGUFFormatError(HarnessError):
    """The file is not a readable GGUF: truncated, wrong magic or version, broken header."""


class GGUFMetadataError(HarnessError):
    """A metadata key is missing, has the wrong type, or is inconsistent with another."""


class GGUFTensorError(HarnessError):
    """A tensor is missing, has an unknown or unsupported type, a bad shape, or data past the end."""


class UnsupportedTypeError(HarnessError):
    """A GGML type this harness does not dequantize."""


class NonFiniteLogitsError(HarnessError):
    """A model that loaded gave NaN or inf logits (its finite weights overflow the forward, or a
    computation failed): no result is reported. The CLI exits 3, as for a run that did not
    finish; `field` is "logits"."""


class DeviceError(HarnessError):
    """A device that does not exist or cannot be used here."""


class UsageError(HarnessError):
    """A bad command-line argument or API argument."""


class EmulationUnsupported(HarnessError):
    """Something the emulated CUDA accelerator cannot run; `field` names the op or feature.

    Raised instead of running it some other way: a run that meets one is never clean."""
