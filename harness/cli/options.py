"""Reading the command line: the parser, value types that check ranges, flag names as typed.

Every value is checked where it is parsed, so a command never starts on a bad one: numbers
are finite and in range, strings are not empty, `meta` is no device to run on. A check fails
with `UsageError`, which `harness.cli.main` prints as one line naming the flag as the user
typed it (`-n`, not `--max-tokens`, when `-n` was typed).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Sequence

from harness.errors import UsageError

U64 = 1 << 64
MAX_COUNT = (1 << 31) - 1  # tokens, steps, layers, repetitions: far above any real use, still an int32

# Field names the library uses for what the CLI takes as flags.
FLAG_OF_FIELD = {
    "max_new_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "seed": "--seed",
    "n_gpu_layers": "--n-gpu-layers",
    "device_map": "--device-map",
    "device": "--device",
    "fault": "--fault",
    "file type": "--type",  # harness.synth's name for it
}

# Short and alternative spellings: the flag in messages is the one the user typed.
ALIASES = {
    "--model": ("-m",),
    "--prompt": ("-p",),
    "--max-tokens": ("-n", "--n-predict"),
    "--n-gpu-layers": ("-ngl",),
    "--temperature": ("--temp",),
    "--seed": ("-s",),
    "--out": ("-o",),
    "--output": ("-o",),
    "--repetitions": ("-r",),
    "--n-prompt": ("-p",),
    "--n-gen": ("-n",),
}


class Parser(argparse.ArgumentParser):
    """argparse that raises `UsageError` (one line, exit 2) instead of printing and exiting."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--max` is not `--max-tokens`: flags are typed whole
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(None, None, message)


def typed_flag(names: Sequence[str], argv: Sequence[str]) -> str:
    """Of a flag's spellings, the one found in `argv` (else the longest)."""
    for arg in argv:
        for name in names:
            if arg == name or arg.startswith(name + "="):
                return name
    return max(names, key=len)


def as_typed(field: str | None, argv: Sequence[str]) -> str | None:
    """A UsageError's field (`max_new_tokens`, `--max-tokens`, `argument -n/--max-tokens`) as
    the user typed the flag; other fields unchanged."""
    if field is None:
        return None
    if field.startswith("device_map["):
        return "--device-map " + field[len("device_map") :]
    flag = FLAG_OF_FIELD.get(field, field)
    if not flag.startswith("-"):
        return field
    names = {flag, *ALIASES.get(flag, ())}
    return typed_flag(sorted(names, key=len, reverse=True), argv)


_ARGPARSE_PREFIX = re.compile(r"^argument ([^:]+): ")


def argparse_message(message: str, argv: Sequence[str]) -> str:
    """argparse's "argument -n/--max-tokens: ..." as "-n: ..." when `-n` was typed."""
    m = _ARGPARSE_PREFIX.match(message)
    if not m:
        return message
    names = m[1].split("/")
    return f"{typed_flag(names, argv) if names[0].startswith('-') else names[0]}: {message[m.end() :]}"


# -- value types (argparse `type=`): each raises ArgumentTypeError with the reason ----------------


def text(value: str) -> str:
    """A string that is not empty (nor only blanks)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def integer(lo: int = 0, hi: int = MAX_COUNT, *, note: str = "") -> Callable[[str], int]:
    """An integer in [lo, hi]; `note` explains a special value (e.g. "-1: until the context is full")."""

    def parse(value: str) -> int:
        try:
            n = int(value.strip(), 10)
        except ValueError:
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise argparse.ArgumentTypeError(f"expected an integer, got {shown!r}") from None
        if not lo <= n <= hi:
            extra = f" ({note})" if note else ""
            shown = str(n) if len(str(n)) <= 40 else f"a {len(str(n))}-digit number"
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}]{extra}, got {shown}")
        return n

    return parse


def real(lo: float, hi: float = math.inf, *, lo_open: bool = False) -> Callable[[str], float]:
    """A finite number in [lo, hi] (or (lo, hi] with `lo_open`)."""

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value[:40]!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
        if (x <= lo if lo_open else x < lo) or x > hi:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value}")
        return x

    return parse


seed = integer(0, U64 - 1)


def device(value: str) -> str:
    """`cpu`, `cuda`, `cuda:N` or `emulated`; `meta` holds no data, so nothing can run on it."""
    value = text(value).strip()
    if value.split(":")[0].lower() == "meta":
        raise argparse.ArgumentTypeError("'meta' holds no data; use cpu, cuda, cuda:N or emulated")
    return value


def tokens(value: str) -> list[int]:
    """Comma-separated token ids, e.g. `1,2,3`; an empty item (`1,,2`) is an error, not skipped."""
    items = [t.strip() for t in value.split(",")]
    if items == [""]:
        raise argparse.ArgumentTypeError("no token ids given")
    ids = []
    for i, item in enumerate(items, start=1):
        if not item:
            raise argparse.ArgumentTypeError(f"item {i} of {value!r} is empty")
        try:
            ids.append(integer(0, MAX_COUNT)(item))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"item {i}: {exc}") from None
    return ids


def device_map(value: str) -> dict[str, str]:
    """JSON (`{"embed": "cpu", "layers.0-15": "cuda:0", ...}`) or `key=device,key=device`."""
    value = text(value).strip()
    if value.startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg})") from None
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise argparse.ArgumentTypeError("must map names to device strings")
        pairs = list(parsed.items())
    else:
        pairs = [tuple(p.split("=", 1)) for p in value.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise argparse.ArgumentTypeError(f"expected JSON or key=device pairs, got {value!r}")
    result = {}
    for key, spec in pairs:
        try:
            result[key.strip()] = device(spec)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{key.strip()!r}: {exc}") from None
        if result[key.strip()] == "emulated":
            raise argparse.ArgumentTypeError("name cuda:N devices here; emulate them with --device emulated")
    return result
