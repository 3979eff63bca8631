"""Reading YAML that other people wrote (case files) without trusting it.

`load(path)` gives the document as plain values (`Mapping`, `Sequence`, str, int, float, bool,
None) where every mapping and sequence carries the lines of its items, so a schema can name the
line of a bad value. Whatever the bytes, it either returns or raises `YAMLInputError` (a
`HarnessError`) naming the file and, where there is one, the line:

- the file must be a regular file of at most `MAX_BYTES`, UTF-8, without NUL or other control
  characters (the line of the first bad byte is named);
- nesting is bounded (`MAX_DEPTH`) before the document is composed, so no input reaches
  Python's recursion limit; aliases may not make the document expand past `MAX_VALUES`;
- only plain YAML is accepted: strings, integers (at most `MAX_INT_DIGITS` digits), floats,
  booleans, null, sequences, mappings and `<<` merge keys; any other tag (`!!set`, `!!binary`,
  a date, `!custom`) is refused;
- mapping keys must be plain values; a key given twice is recorded in `Mapping.duplicates` for
  the schema to report.

Scalars are built by PyYAML's SafeLoader (what `yaml.safe_load` uses), so values are the ones
`yaml.safe_load` would give.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from harness.errors import HarnessError, shown

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_VALUES = 100_000
MAX_INT_DIGITS = 64

_TAG = "tag:yaml.org,2002:"
PLAIN_TAGS = {f"{_TAG}{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge")}


class YAMLInputError(HarnessError):
    """A YAML file that cannot be read as plain YAML. The message is `file:line: problem`."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        file = os.fspath(path)
        super().__init__(f"{file}:{line}" if line else file, None, problem)
        self.path = file
        self.line = line


class Mapping(dict):
    """A YAML mapping: `line` where it starts, `key_lines`/`value_lines` per key, `duplicates`
    ((key, line) of each key given again in the same mapping)."""

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}
        self.value_lines: dict[Any, int] = {}
        self.duplicates: list[tuple[Any, int]] = []


class Sequence(list):
    """A YAML sequence: `line` where it starts, `item_lines` per item."""

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


def read_text(path: str | os.PathLike, shown_as: str | None = None) -> str:
    """The text of a YAML file: a regular file of at most MAX_BYTES, UTF-8, no control characters."""
    name = shown_as or os.fspath(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise YAMLInputError(name, None, "not a regular file (a folder, FIFO or device)")
        if st.st_size > MAX_BYTES:
            raise YAMLInputError(
                name, None, f"{st.st_size} bytes, more than the {MAX_BYTES} a YAML file may have"
            )
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YAMLInputError(name, None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise YAMLInputError(name, None, f"more than the {MAX_BYTES} bytes a YAML file may have")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise YAMLInputError(name, line, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load(path: str | os.PathLike, shown_as: str | None = None) -> Any:
    """The document of a YAML file as plain values carrying their lines (None when empty)."""
    name = shown_as or os.fspath(path)
    return loads(read_text(path, name), name)


def loads(text: str, name: str = "<string>") -> Any:
    """The document in `text` as plain values carrying their lines; `name` is shown in errors."""
    if len(text) > MAX_BYTES:
        raise YAMLInputError(name, None, f"more than the {MAX_BYTES} characters a YAML document may have")
    _check_depth(text, name)
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters here
        node = loader.get_single_node()
        return None if node is None else _Builder(loader, name).build(node, 0)
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        char = shown(chr(exc.character)) if isinstance(exc.character, int) else "a byte"
        raise YAMLInputError(
            name, line, f"invalid YAML: the control character {char} is not allowed"
        ) from None
    except yaml.MarkedYAMLError as exc:
        raise _marked(name, exc) from None
    except yaml.YAMLError as exc:
        raise YAMLInputError(name, None, f"invalid YAML: {exc}") from None
    except RecursionError:  # a guard: _check_depth bounds nesting first
        raise YAMLInputError(name, None, f"invalid YAML: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()


def _marked(name: str, exc: yaml.MarkedYAMLError) -> YAMLInputError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    problem = " ".join(p for p in (exc.context, exc.problem) if p) or "malformed"
    return YAMLInputError(name, line, f"invalid YAML: {problem}")


def _check_depth(text: str, name: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the event stream (PyYAML's parser keeps a
    stack of its own; its composer recurses, so depth is checked before composing)."""
    depth = 0
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    line = event.start_mark.line + 1
                    raise YAMLInputError(name, line, f"invalid YAML: nested deeper than {MAX_DEPTH} levels")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
    except yaml.YAMLError:
        return  # reported, with its line, when the document is composed
    finally:
        if loader is not None:
            loader.dispose()


class _Builder:
    """Builds the values of a composed node tree: mappings and sequences here (with lines),
    scalars by the SafeLoader, after the tag and size checks."""

    def __init__(self, loader: yaml.SafeLoader, name: str):
        self.loader = loader
        self.name = name
        self.built: dict[int, Any] = {}  # aliases share one value, as yaml.safe_load makes them
        self.sizes: dict[int, int] = {}  # values a node expands to, aliases counted each time
        self.active: set[int] = set()

    def error(self, node: yaml.Node, problem: str) -> YAMLInputError:
        return YAMLInputError(self.name, node.start_mark.line + 1, problem)

    def build(self, n: yaml.Node, depth: int) -> Any:
        if id(n) in self.built:
            return self.built[id(n)]
        if id(n) in self.active:
            raise self.error(n, "a recursive alias")
        if n.tag not in PLAIN_TAGS:
            tag = n.tag.replace(_TAG, "!!")
            raise self.error(
                n,
                f"the tag {shown(tag)} is not allowed: plain YAML only (strings, numbers, booleans, "
                "null, lists, mappings); quote a value meant as a string",
            )
        self.active.add(id(n))
        try:
            value = self._build(n, depth)
        finally:
            self.active.discard(id(n))
        self.built[id(n)] = value
        return value

    def _size(self, n: yaml.Node) -> int:
        if id(n) not in self.sizes:
            self.sizes[id(n)] = -1  # being counted: met again below means a cycle
            if isinstance(n, yaml.MappingNode):
                self.sizes[id(n)] = 1 + sum(self._size(k) + self._size(v) for k, v in n.value)
            elif isinstance(n, yaml.SequenceNode):
                self.sizes[id(n)] = 1 + sum(self._size(v) for v in n.value)
            else:
                self.sizes[id(n)] = 1
        if self.sizes[id(n)] < 0:
            raise self.error(n, "a recursive alias")
        return self.sizes[id(n)]

    def _build(self, n: yaml.Node, depth: int) -> Any:
        line = n.start_mark.line + 1
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)) and depth >= MAX_DEPTH:
            raise self.error(n, f"invalid YAML: nested deeper than {MAX_DEPTH} levels")
        if isinstance(n, yaml.MappingNode):
            own = sum(1 for k, _ in n.value if k.tag != f"{_TAG}merge")
            try:
                self.loader.flatten_mapping(n)  # `<<` merge keys: merged pairs first, then the node's own
            except yaml.MarkedYAMLError as exc:
                raise _marked(self.name, exc) from None
            if self._size(n) > MAX_VALUES:
                raise self.error(
                    n, f"the document expands to more than {MAX_VALUES} values (through aliases)"
                )
            first_own = len(n.value) - own
            m = Mapping(line)
            own_keys: set = set()
            for i, (key_node, value_node) in enumerate(n.value):
                key = self.build(key_node, depth + 1)
                if isinstance(key, (Mapping, Sequence)):
                    raise self.error(key_node, "a key must be a plain value")
                if i >= first_own:  # a key given twice here (an override of a merged one is fine)
                    if key in own_keys:
                        m.duplicates.append((key, key_node.start_mark.line + 1))
                    own_keys.add(key)
                m[key] = self.build(value_node, depth + 1)
                m.key_lines[key] = key_node.start_mark.line + 1
                m.value_lines[key] = value_node.start_mark.line + 1
            return m
        if isinstance(n, yaml.SequenceNode):
            if self._size(n) > MAX_VALUES:
                raise self.error(
                    n, f"the document expands to more than {MAX_VALUES} values (through aliases)"
                )
            s = Sequence(line)
            for item in n.value:
                s.append(self.build(item, depth + 1))
                s.item_lines.append(item.start_mark.line + 1)
            return s
        if n.tag == f"{_TAG}int":
            digits = sum(c.isdigit() for c in n.value)
            if digits > MAX_INT_DIGITS:
                raise self.error(n, f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
        try:
            return self.loader.construct_object(n, deep=True)
        except (ValueError, OverflowError) as exc:
            raise self.error(n, f"invalid YAML value {shown(n.value)} ({exc})") from None
