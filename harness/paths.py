"""Checks on the paths a user names, made before anything is opened or run.

Only regular files are read or written: a FIFO blocks its reader (and its writer) until someone
opens the other end, and a device such as `/dev/zero` never ends. An output goes into a folder
that exists already: a mistyped folder is an error, never created behind the user's back.
An empty name is refused. Each check raises `UsageError` naming the path (and the flag or field
that gave it, when the caller says which), as one line; a reader of one kind of file (GGUF,
YAML, traces) passes its own `HarnessError` subclass as `error`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from harness.errors import HarnessError, UsageError


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _error(
    path: str | os.PathLike, field: str | None, problem: str, error: Callable[..., HarnessError] = UsageError
) -> HarnessError:
    if field is None:
        return error(path, None, problem)
    return error(None, field, f"{os.fspath(path)}: {problem}")


def _nonempty(path: str | os.PathLike | None, field: str | None) -> None:
    if path is None or os.fspath(path) == "":
        raise UsageError(None, field, "the path is empty")


def check_input_file(
    path: str | os.PathLike,
    field: str | None = None,
    *,
    max_bytes: int | None = None,
    what: str = "file",
    error: Callable[[str | os.PathLike | None, str | None, str], HarnessError] = UsageError,
) -> Path:
    """`path` as a Path if it is a regular file (symlinks followed) of at most `max_bytes`;
    `error` (naming the path, and `field` where given) otherwise. `what` names the file in
    "no such ..."."""
    _nonempty(path, field)
    try:
        st = os.stat(path)  # stat never opens, so a FIFO cannot block here
    except FileNotFoundError:
        raise _error(path, field, f"no such {what}", error) from None
    except OSError as exc:
        raise _error(path, field, f"cannot read it ({exc.strerror or exc})", error) from None
    kind = _kind(st.st_mode)
    if kind is not None:
        raise _error(path, field, f"is {kind}, not a regular file", error)
    if max_bytes is not None and st.st_size > max_bytes:
        raise _error(
            path, field, f"is {st.st_size} bytes, more than the {max_bytes} this reader takes", error
        )
    return Path(path)


def open_input_file(path: str | os.PathLike, field: str | None = None) -> BinaryIO:
    """`path` opened for binary reading, refused unless the opened file is a regular file.

    Opening with O_NONBLOCK means a FIFO swapped in after a `check_input_file` cannot block
    the open; the check is then made on what was opened (fstat), not on the name."""
    check_input_file(path, field)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _error(path, field, f"cannot read it ({exc.strerror or exc})") from None
    kind = _kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise _error(path, field, f"is {kind}, not a regular file")
    return os.fdopen(fd, "rb")


def check_output_file(
    path: str | os.PathLike,
    field: str | None = None,
    *,
    overwrite: bool = True,
    force_flag: str = "--force",
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """`path` as a Path if a regular file can be written there: its folder exists and is
    writable, whatever is there already is a regular file (replaced only if `overwrite`), and
    it is none of `inputs` (files the same command reads or writes, which it would destroy)."""
    _nonempty(path, field)
    out = Path(path)
    same = [os.fspath(i) for i in inputs if i is not None and os.path.realpath(i) == os.path.realpath(out)]
    if same:
        raise _error(
            path, field, f"is also {same[0]!r}, which this command reads or writes; give another path"
        )
    try:
        st = os.stat(out)
    except (FileNotFoundError, NotADirectoryError):
        st = None  # the folder's check below says what is wrong
    except OSError as exc:
        raise _error(path, field, f"cannot write it ({exc.strerror or exc})") from None
    if st is not None:
        kind = _kind(st.st_mode)
        if kind is not None:
            raise _error(path, field, f"is {kind}; give the path of a regular file to write")
        if not overwrite:
            raise _error(path, field, f"already exists (pass {force_flag} to replace it)")
        if not os.access(out, os.W_OK):
            raise _error(path, field, "no permission to replace it")
    folder = out.parent
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise _error(path, field, f"the folder {os.fspath(folder)} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _error(path, field, f"no permission to write in {os.fspath(folder)}")
    return out


def check_output_dir(path: str | os.PathLike, field: str | None = None) -> Path:
    """`path` as a Path to a folder that exists (made, with its parents, if missing) and is writable."""
    _nonempty(path, field)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise _error(path, field, "is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _error(path, field, f"cannot make the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise _error(path, field, "no permission to write in it")
    return out
