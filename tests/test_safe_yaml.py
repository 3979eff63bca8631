"""Reading YAML other people wrote: every bad input is a YAMLInputError naming the file and line."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.errors import HarnessError
from harness.safe_yaml import MAX_DEPTH, Mapping, Sequence, YAMLInputError, load, loads


def test_plain_yaml_keeps_lines():
    doc = loads("a: 1\nb:\n  - x\n  - 2.5\nc: {d: null, e: true}\n", "f.yaml")
    assert isinstance(doc, Mapping) and isinstance(doc["b"], Sequence)
    assert doc == {"a": 1, "b": ["x", 2.5], "c": {"d": None, "e": True}}
    assert doc.key_lines["b"] == 2 and doc["b"].item_lines == [3, 4]
    assert doc["c"].line == 5


def test_duplicates_and_merges():
    doc = loads("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\n  y: 4\n", "f.yaml")
    assert doc["m"] == {"x": 1, "y": 4}
    assert doc["m"].duplicates == [("y", 5)]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("a: 1\nb: \x00\n", 2, r"the control character '\\x00' is not allowed"),
        ("a: 1\n\nc: \x07\n", 3, r"the control character '\\x07' is not allowed"),
        ("a: " + "[" * 3000 + "]" * 3000, 1, f"nested deeper than {MAX_DEPTH} levels"),
        ("".join("  " * i + f"k{i}:\n" for i in range(100)), MAX_DEPTH + 1, "nested deeper"),
        ("n: " + "9" * 5000, 1, "an integer of 5000 digits"),
        ("tokens: !!set {1, 2}", 1, "the tag '!!set' is not allowed"),
        ("a: !!binary aGVsbG8=", 1, "the tag '!!binary' is not allowed"),
        ("a: !!python/object:os.system x", 1, "is not allowed"),
        ("when: 2024-01-01", 1, "the tag '!!timestamp' is not allowed"),
        ("a: !mine 3", 1, "the tag '!mine' is not allowed"),
        ("a: &a [*a]", 1, "a recursive alias"),
        ("? [1]\n: 2", 1, "a key must be a plain value"),
        ("a: 1\n b: 2", 2, "invalid YAML: mapping values are not allowed here"),
        ("a: *nowhere", 1, "found undefined alias"),
        ("a: 1\n---\nb: 2", 2, "expected a single document"),
    ],
)
def test_bad_yaml_names_file_and_line(text, line, message):
    with pytest.raises(YAMLInputError, match=f"^case.yaml:{line}: .*{message}") as err:
        loads(text, "case.yaml")
    assert err.value.line == line
    assert "\n" not in str(err.value)


def test_alias_expansion_is_bounded():
    text = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"a{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 10)}]\n" for i in range(8)
    )
    with pytest.raises(YAMLInputError, match="expands to more than 100000 values"):
        loads(text, "laughs.yaml")


def test_files_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"a: 1\nb: 2\nc: \xff\n")
    with pytest.raises(YAMLInputError, match=r"c.yaml:3: not UTF-8 text \(invalid start byte at byte 13\)"):
        load(path)


def test_only_regular_files_of_bounded_size(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", tmp_path):
        with pytest.raises(YAMLInputError, match="not a regular file"):
            load(path)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: 1\n" * 300_000)
    with pytest.raises(YAMLInputError, match="more than the 1048576 a YAML file may have"):
        load(big)
    with pytest.raises(YAMLInputError, match="cannot read"):
        load(tmp_path / "absent.yaml")


YAMLISH = st.lists(
    st.sampled_from(
        [*"ab1:-[]{},&*!?|>'\"#%@`\n \t\x00\x07\\.~", "\u2028", "é", "!!set ", "<<: ", "&x ", "*x"]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(YAMLISH)
def test_any_text_loads_or_is_refused_cleanly(text):
    try:
        loads(text, "h.yaml")
    except YAMLInputError as exc:
        message = str(exc)
        assert message.startswith("h.yaml")
        assert "\n" not in message
    except HarnessError as exc:  # pragma: no cover - a failure
        pytest.fail(f"not a YAMLInputError: {exc!r}")


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=20,
    )
)
def test_what_yaml_dump_writes_reads_back(value):
    import yaml

    assert loads(yaml.safe_dump(value), "v.yaml") == value
