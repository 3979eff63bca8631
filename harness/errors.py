"""Errors for bad input. Each message names the file and the key, tensor or line at fault.

The CLI catches `HarnessError`, prints its message as one line and exits 2.
"""

from __future__ import annotations

import os


class HarnessError(Exception):
    """Bad input. `path` is the file (or None), `field` the key, tensor or line within it."""

    def __init__(self, path: str | os.PathLike | None, field: str | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.problem = problem
        where = ": ".join(p for p in (self.path, field) if p)
        super().__init__(f"{where}: {problem}" if where else problem)


class GGUFFormatError(HarnessError):
    """The file is not a readable GGUF: truncated, wrong magic or version, broken header."""


class GGUFMetadataError(HarnessError):
    """A metadata key is missing, has the wrong type, or is inconsistent with another."""


class GGUFTensorError(HarnessError):
    """A tensor is missing, has an unknown or unsupported type, a bad shape, or data past the end."""


class UnsupportedTypeError(HarnessError):
    """A GGML type this harness does not dequantize."""


class DeviceError(HarnessError):
    """A device that does not exist or cannot be used here."""


class UsageError(HarnessError):
    """A bad command-line argument or API argument."""


class EmulationUnsupported(HarnessError):
    """Something the emulated CUDA accelerator cannot run; `field` names the op or feature.

    Raised instead of running it some other way: a run that meets one is never clean."""
