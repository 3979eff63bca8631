"""Reading case files: plain YAML composed with the line of every key (`harness.safe_yaml`),
case files found and loaded.

`parse_case(text)` / `load_case(path)` give a `Case` (see `harness.cases.schema`);
`find_case_files(paths)` the case files under files and directories; `load_cases(paths)` them all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from harness import safe_yaml
from harness.cases.schema import CASE_SUFFIXES, SCHEMA, Case, CaseError, build_case
from harness.errors import UsageError
from harness.paths import check_input_file
from harness.safe_yaml import YAMLInputError

# ---- YAML ----------------------------------------------------------------------------------------
# `harness.safe_yaml` reads the file (a regular file of bounded size, UTF-8, no control
# characters) and composes plain YAML with the line of every key; its errors become CaseErrors.


def _case_error(exc: YAMLInputError) -> CaseError:
    return CaseError(exc.path, exc.line, None, exc.problem)


def parse_case(text: str, file: str | os.PathLike = "<case>", shown_as: str | None = None) -> Case:
    """A case from YAML text; `file` is where it came from (relative model paths start there)."""
    shown = shown_as or os.fspath(file)
    try:
        doc = safe_yaml.loads(text, shown)
    except YAMLInputError as exc:
        raise _case_error(exc) from None
    return build_case(doc, Path(file), shown)


def load_case(path: str | os.PathLike, shown_as: str | None = None) -> Case:
    """A case from a file; CaseError naming `shown_as` (default: `path` as given) for bad input."""
    shown = shown_as or os.fspath(path)
    try:
        text = safe_yaml.read_text(path, shown)
    except YAMLInputError as exc:
        raise _case_error(exc) from None
    return parse_case(text, path, shown)


def declares_schema(path: str | os.PathLike) -> bool:
    """Whether a file is a case file: *.yaml / *.yml with a top-level `schema: harness-case/...`.

    Only the text is searched (the YAML is not parsed), so other YAML costs a read and nothing
    else; a declared file that is broken is then refused by `load_case` with its line."""
    path = Path(path)
    if path.suffix not in CASE_SUFFIXES or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            text = f.read(safe_yaml.MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return False
    return _DECLARATION.search(text) is not None


_DECLARATION = re.compile(r"^schema[ \t]*:[ \t]*[\"']?" + re.escape(SCHEMA.partition("/")[0]) + "/", re.M)


def find_case_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Case files among `paths`: files as given, in directories the *.yaml / *.yml files that
    declare the case schema (`declares_schema`): other YAML beside them is left alone."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if declares_schema(f))
            if not found:
                raise UsageError(p, None, f"no case files here (*.yaml, *.yml declaring `schema: {SCHEMA}`)")
            out += found
        elif p.exists():
            out.append(check_input_file(p))  # a FIFO or device is refused here, never opened
        else:
            raise UsageError(p, None, "no such file or directory")
    return list(dict.fromkeys(out))


def load_cases(paths: Iterable[str | os.PathLike]) -> list[Case]:
    """Every case under `paths` (see `find_case_files`); names must be unique across them."""
    cases: list[Case] = []
    seen: dict[str, Case] = {}
    for f in find_case_files(paths):
        case = load_case(f)
        if case.name in seen:
            other = seen[case.name]
            raise case.error("name", f"case name {case.name!r} is also used by {other.shown_as}")
        seen[case.name] = case
        cases.append(case)
    return cases
