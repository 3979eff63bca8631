"""Reading case files: YAML composed with the line of every key, case files found and loaded.

`parse_case(text)` / `load_case(path)` give a `Case` (see `harness.cases.schema`);
`find_case_files(paths)` the case files under files and directories; `load_cases(paths)` them all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from harness.cases.schema import CASE_SUFFIXES, SCHEMA, Case, CaseError, build_case
from harness.errors import UsageError

# ---- YAML with lines -------------------------------------------------------------------------------


class LineMap(dict):
    """A YAML mapping: `line` where it starts, `key_lines`/`value_lines` per key, `duplicates`."""

    line: int = 1

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}
        self.value_lines: dict[Any, int] = {}
        self.duplicates: list[tuple[Any, int]] = []


class LineSeq(list):
    """A YAML sequence: `line` where it starts, `item_lines` per item."""

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


def read_text(path: Path, shown: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CaseError(shown, None, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CaseError(shown, None, None, f"cannot read: {exc.strerror or exc}") from None


def compose(text: str, shown: str) -> Any:
    """The document as plain values (LineMap, LineSeq, scalars) carrying their lines.

    Composed with PyYAML's SafeLoader (what `yaml.safe_load` uses): scalars are constructed by its
    safe constructors, mappings and sequences here, so that every value keeps its line."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None

        built: dict[int, Any] = {}  # aliases share one value, as yaml.safe_load makes them

        def build(n: yaml.Node, seen: tuple[int, ...]) -> Any:
            if id(n) in built:
                return built[id(n)]
            if id(n) in seen:
                raise CaseError(shown, n.start_mark.line + 1, None, "a recursive alias")
            seen = (*seen, id(n))
            line = n.start_mark.line + 1
            if isinstance(n, yaml.MappingNode):
                own = sum(1 for k, _ in n.value if k.tag != "tag:yaml.org,2002:merge")
                loader.flatten_mapping(n)  # `<<` merge keys: merged pairs first, then the node's own
                first_own = len(n.value) - own
                m = LineMap(line)
                own_keys: set = set()
                for i, (key_node, value_node) in enumerate(n.value):
                    key = build(key_node, seen)
                    if isinstance(key, (LineMap, LineSeq)):
                        raise CaseError(
                            shown, key_node.start_mark.line + 1, None, "a key must be a plain value"
                        )
                    if (
                        i >= first_own
                    ):  # a key given twice in this mapping (an override of a merged one is fine)
                        if key in own_keys:
                            m.duplicates.append((key, key_node.start_mark.line + 1))
                        own_keys.add(key)
                    m[key] = build(value_node, seen)
                    m.key_lines[key] = key_node.start_mark.line + 1
                    m.value_lines[key] = value_node.start_mark.line + 1
                built[id(n)] = m
                return m
            if isinstance(n, yaml.SequenceNode):
                s = LineSeq(line)
                for item in n.value:
                    s.append(build(item, seen))
                    s.item_lines.append(item.start_mark.line + 1)
                built[id(n)] = s
                return s
            return loader.construct_object(n, deep=True)

        return build(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "malformed"
        raise CaseError(shown, line, None, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise CaseError(shown, None, None, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def parse_case(text: str, file: str | os.PathLike = "<case>", shown_as: str | None = None) -> Case:
    """A case from YAML text; `file` is where it came from (relative model paths start there)."""
    shown = shown_as or os.fspath(file)
    return build_case(compose(text, shown), Path(file), shown)


def load_case(path: str | os.PathLike, shown_as: str | None = None) -> Case:
    """A case from a file; CaseError naming `shown_as` (default: `path` as given) for bad input."""
    shown = shown_as or os.fspath(path)
    return parse_case(read_text(Path(path), shown), path, shown)


def declares_schema(path: str | os.PathLike) -> bool:
    """Whether a file is a case file: *.yaml / *.yml with a top-level `schema: harness-case/...`.

    Only the text is searched (the YAML is not parsed), so other YAML costs a read and nothing
    else; a declared file that is broken is then refused by `load_case` with its line."""
    path = Path(path)
    if path.suffix not in CASE_SUFFIXES or not path.is_file():
        return False
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
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
        elif p.is_file():
            out.append(p)
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
