"""The SentencePiece tokenizer: llama.cpp's ids on hand-made vocabularies (merge order, ties,
byte fallback, special and user-defined tokens), decoding, bad input, and, where
llama-cpp-python is installed, exact agreement with llama.cpp on random text."""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import GGUFFormatError, GGUFMetadataError, UsageError
from harness.model.tokenizer import SPACE, TokenAttr, Tokenizer
from harness.synth import build_vocab, synthesize

TT = gguf.TokenType
VT = gguf.GGUFValueType
S = SPACE  # ▁
BASE = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
BASE_TYPES = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL] + [TT.BYTE] * 256


def write_gguf(path: Path, keys: dict[str, tuple[Any, VT, VT | None]]) -> Path:
    """A GGUF with only these keys (and general.architecture) and no tensors."""
    w = gguf.GGUFWriter(path, "llama")
    for key, (value, vtype, sub) in keys.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def vocab_keys(
    tokens: list[str | bytes], scores: list[float] | None = None, types: list[int] | None = None, **flags
) -> dict[str, tuple[Any, VT, VT | None]]:
    keys: dict[str, tuple[Any, VT, VT | None]] = {
        "tokenizer.ggml.model": ("llama", VT.STRING, None),
        "tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.bos_token_id": (1, VT.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, VT.UINT32, None),
        "tokenizer.ggml.unknown_token_id": (0, VT.UINT32, None),
    }
    if scores is not None:
        keys["tokenizer.ggml.scores"] = ([float(s) for s in scores], VT.ARRAY, VT.FLOAT32)
    if types is not None:
        keys["tokenizer.ggml.token_type"] = ([int(t) for t in types], VT.ARRAY, VT.INT32)
    for name, value in flags.items():
        keys[f"tokenizer.ggml.{name}"] = (value, VT.BOOL, None)
    return keys


def spm_file(
    path: Path, pieces: dict[str | bytes, float], special: dict[str, int] | None = None, **flags
) -> Path:
    """A vocab-only GGUF: <unk> <s> </s>, the 256 byte tokens, `pieces` (normal, with these
    scores), then `special` (text: token type, score 0)."""
    special = special or {}
    tokens = BASE + list(pieces) + list(special)
    scores = [0.0] * len(BASE) + list(pieces.values()) + [0.0] * len(special)
    types = BASE_TYPES + [TT.NORMAL] * len(pieces) + list(special.values())
    return write_gguf(path, vocab_keys(tokens, scores, types, **flags))


def pieces_of(tok: Tokenizer, text: str, **kw) -> list[str]:
    return [tok.id_to_piece(i) for i in tok.encode(text, **kw)]


CHARS = {c: -100.0 for c in S + "abcdehlorw"}


@pytest.fixture
def make(tmp_path):
    """make(pieces, special=None, **flags) -> Tokenizer over a fresh vocab-only file."""
    n = iter(range(1000))

    def _make(pieces: dict, special: dict | None = None, **flags) -> Tokenizer:
        return Tokenizer.from_gguf(spm_file(tmp_path / f"v{next(n)}.gguf", pieces, special, **flags))

    return _make


# -- merges ------------------------------------------------------------------------------------


def test_the_best_scoring_pair_merges_first(make):
    assert pieces_of(make(CHARS | {"ab": -2, "bc": -1}), "abc", add_bos=False) == [S, "a", "bc"]
    assert pieces_of(make(CHARS | {"ab": -1, "bc": -2}), "abc", add_bos=False) == [S, "ab", "c"]


def test_equal_scores_merge_the_leftmost_pair_first(make):
    assert pieces_of(make(CHARS | {"aa": -1}), "aaa", add_bos=False) == [S, "aa", "a"]
    assert pieces_of(make(CHARS | {"ab": -1, "bc": -1}), "abc", add_bos=False) == [S, "ab", "c"]


def test_merges_chain_through_pieces_of_the_vocabulary(make):
    tok = make(CHARS | {S + "h": -1, S + "he": -2, "ll": -3, S + "hell": -4, S + "hello": -5})
    assert pieces_of(tok, "hello", add_bos=False) == [S + "hello"]
    assert pieces_of(tok, "hell", add_bos=False) == [S + "hell"]
    assert pieces_of(tok, "helo", add_bos=False) == [S + "he", "l", "o"]


def test_a_piece_is_reached_only_through_a_pair_of_pieces(make):
    # "abc" is in the vocabulary, but neither "ab" nor "bc" is: SPM never reaches it
    assert pieces_of(make(CHARS | {"abc": 0}), "abc", add_bos=False) == [S, "a", "b", "c"]


def test_a_merge_can_produce_a_control_token(make):
    # llama.cpp looks merged text up among all tokens: "<s" + ">" becomes BOS, even from plain text
    tok = make(CHARS | {"<": -100, "s": -100, ">": -100, "<s": -1})
    assert tok.encode("<s>", add_bos=False) == [tok.piece_to_id(S), tok.bos_id]


# -- spaces, bytes, special text ------------------------------------------------------------------


def test_spaces_are_escaped_and_the_text_gets_a_space_prefix(make):
    tok = make(CHARS | {S + S: -1, S + "a": -2})
    assert pieces_of(tok, "a", add_bos=False) == [S + "a"]
    assert pieces_of(tok, " a", add_bos=False) == [S + S, "a"]
    assert pieces_of(tok, "a  b", add_bos=False) == [S + "a", S + S, "b"]
    assert pieces_of(tok, "a ", add_bos=False) == [S + "a", S]
    assert pieces_of(tok, "   ", add_bos=False) == [S + S, S + S]


def test_without_a_space_prefix(make):
    tok = make(CHARS | {S + "a": -2}, add_space_prefix=False)
    assert pieces_of(tok, "a a", add_bos=False) == ["a", S + "a"]
    assert tok.decode(tok.encode("a a")) == "a a"


def test_a_literal_escape_character_is_a_space(make):
    tok = make(CHARS | {S + "a": -2})
    assert tok.encode(S + "a", add_bos=False) == tok.encode(" a", add_bos=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("é", [S, "<0xC3>", "<0xA9>"]),
        ("\n", [S, "<0x0A>"]),
        ("a\nb", [S, "a", "<0x0A>", "b"]),
        ("\U0001f642", [S, "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]),
        ("你", [S, "<0xE4>", "<0xBD>", "<0xA0>"]),
        ("\x00", [S, "<0x00>"]),
    ],
)
def test_characters_outside_the_vocabulary_fall_back_to_bytes(make, text, expected):
    assert pieces_of(make(CHARS), text, add_bos=False) == expected


def test_a_character_in_the_vocabulary_is_not_split_into_bytes(make):
    tok = make(CHARS | {"é": -100, S + "é": -1})
    assert pieces_of(tok, "é é", add_bos=False) == [S + "é", S + "é"]


def test_byte_fallback_uses_the_bare_byte_when_there_is_no_hex_token(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", S, b"\xc3", b"\xa9"]
    path = write_gguf(tmp_path / "v.gguf", vocab_keys(tokens, [0.0] * 6, [2, 3, 3, 1, 1, 1]))
    assert Tokenizer.from_gguf(path).encode("é", add_bos=False) == [3, 4, 5]


def test_byte_fallback_without_a_byte_token_names_the_byte(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", vocab_keys(["<unk>", "<s>", "</s>", S, "a"]))
    tok = Tokenizer.from_gguf(path)
    assert tok.encode("a a", add_bos=False) == [3, 4, 3, 4]
    with pytest.raises(GGUFMetadataError, match=r"tokenizer\.ggml\.tokens.*<0xC3>.*'é'"):
        tok.encode("é")


def test_empty_text(make):
    tok = make(CHARS)
    assert tok.encode("") == [tok.bos_id]
    assert tok.encode("", add_bos=False) == []
    assert tok.decode([]) == ""


def test_bos_and_eos_follow_the_file_unless_asked(make):
    tok = make(CHARS, add_bos_token=False, add_eos_token=True)
    assert tok.encode("a") == [tok.piece_to_id(S), tok.piece_to_id("a"), tok.eos_id]
    assert tok.encode("a", add_bos=True, add_eos=False)[0] == tok.bos_id


def test_control_token_text_is_plain_text_unless_parse_special(make):
    tok = make(CHARS | {"<": -100, "s": -100, ">": -100, "/": -100})
    assert tok.encode("<s>", add_bos=False) == [tok.piece_to_id(p) for p in (S, "<", "s", ">")]
    assert tok.bos_id not in tok.encode("a<s></s><unk>", add_bos=False)
    assert tok.encode("<s>a</s>", add_bos=False, parse_special=True) == [
        tok.bos_id,
        tok.piece_to_id(S),  # text after a token gets the space prefix again
        tok.piece_to_id("a"),
        tok.eos_id,
    ]


def test_user_defined_tokens_are_split_out_before_merging(make):
    tok = make(CHARS | {S + "a": -1, "<": -100, ">": -100}, special={"<tool>": TT.USER_DEFINED})
    tool = tok.piece_to_id("<tool>")
    assert tok.encode("a<tool>a", add_bos=False) == [tok.piece_to_id(S + "a"), tool, tok.piece_to_id(S + "a")]
    assert tok.encode("<tool><tool>", add_bos=False) == [tool, tool]
    assert tok.decode(tok.encode("a<tool>b")) == "a<tool> b"  # the prefix space after the token stays


def test_longer_split_tokens_match_first(make):
    tok = make(CHARS, special={"<t>": TT.USER_DEFINED, "<t>>": TT.USER_DEFINED})
    assert pieces_of(tok, "<t>>", add_bos=False) == ["<t>>"]


# -- decoding ------------------------------------------------------------------------------------


def test_decode_joins_pieces_and_drops_the_prefix_space(make):
    tok = make(CHARS | {S + "a": -1, S + S: -2})
    ids = tok.encode("  a b")
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == "  a b"
    assert tok.decode(ids[1:]) == "  a b"
    assert tok.decode([tok.piece_to_id("a"), tok.piece_to_id(S + "a")]) == "a a"


def test_decode_reassembles_bytes_and_replaces_invalid_ones(make):
    tok = make(CHARS)
    byte = [tok.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    assert tok.decode([byte[0xC3], byte[0xA9]]) == "é"
    assert tok.decode([byte[0xC3], tok.piece_to_id("a")]) == "\ufffda"
    assert tok.decode([byte[0xFF]]) == "\ufffd"


def test_decode_hides_control_and_unknown_tokens_unless_special(make):
    tok = make(CHARS | {S + "a": -1}, special={"<tool>": TT.USER_DEFINED, "<x>": TT.UNUSED, "<y>": 0})
    a = tok.piece_to_id(S + "a")
    assert tok.decode([tok.bos_id, a, tok.eos_id, tok.unk_id]) == "a"
    assert tok.decode([tok.bos_id, a, tok.eos_id], special=True) == "<s> a</s>"
    assert tok.decode([a, tok.piece_to_id("<tool>")]) == "a<tool>"
    assert tok.decode([a, tok.piece_to_id("<x>"), tok.piece_to_id("<y>")], special=True) == "a"


def test_end_of_generation_texts_are_control_tokens(make):
    tok = make(CHARS, special={"<|im_end|>": TT.NORMAL, "<|eot_id|>": TT.USER_DEFINED})
    for text in ("<|im_end|>", "<|eot_id|>"):
        i = tok.piece_to_id(text)
        assert tok.token_attr(i) & TokenAttr.CONTROL
        assert tok.decode([i]) == ""
        assert i not in tok.encode(text) and tok.encode(text, parse_special=True) == [tok.bos_id, i]


def test_id_to_piece_and_vocab(make):
    tok = make(CHARS | {S + "a": -1})
    assert tok.vocab_size == len(BASE) + len(CHARS) + 1
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 3 + 0x0A)] == ["<unk>", "<s>", "</s>", "<0x0A>"]
    assert tok.piece_to_id(S + "a") == tok.vocab_size - 1
    assert tok.piece_to_id("zz") is None


@pytest.mark.parametrize("bad", [-1, 10**6, "1", 1.5])
def test_decode_rejects_ids_outside_the_vocabulary(make, bad):
    tok = make(CHARS)
    with pytest.raises(UsageError, match="token id"):
        tok.decode([1, bad])
    with pytest.raises(UsageError, match="token id"):
        tok.id_to_piece(bad)


# -- reading the vocabulary --------------------------------------------------------------------


def test_reads_the_vocabulary_of_a_synthetic_model(tmp_path):
    path = synthesize(tmp_path / "tiny.gguf", "tiny")
    tok = Tokenizer.from_gguf(path)
    tokens, _scores, _types = build_vocab(tok.vocab_size)
    assert [tok.id_to_piece(i) for i in range(tok.vocab_size)] == tokens
    assert tok.decode(tok.encode("The quick brown fox, 42!")) == "The quick brown fox, 42!"


def test_defaults_without_scores_types_or_ids(tmp_path):
    keys = vocab_keys(["<unk>", "<s>", "</s>", S, "a", "aa"])
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id"):
        del keys[f"tokenizer.ggml.{key}"]
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "v.gguf", keys))
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.add_bos, tok.add_space_prefix) == (1, 2, 0, True, True)
    assert tok.encode("aaa") == [1, 3, 5, 4]  # every score 0: leftmost first
    assert tok.decode([1, 3, 5, 4]) == "aaa"  # without types every token is normal text


def test_integer_scores_are_read(tmp_path):
    keys = vocab_keys(["<unk>", "<s>", "</s>", S, "a", "b", "c", "ab", "bc"])
    keys["tokenizer.ggml.scores"] = ([0, 0, 0, 0, 0, 0, 0, -2, -1], VT.ARRAY, VT.INT32)
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "v.gguf", keys))
    assert pieces_of(tok, "abc", add_bos=False) == [S, "a", "bc"]


def test_a_special_id_outside_the_vocabulary_keeps_the_default(tmp_path):
    keys = vocab_keys(["<unk>", "<s>", "</s>", S])
    keys["tokenizer.ggml.bos_token_id"] = (99, VT.UINT32, None)
    with pytest.warns(UserWarning, match=r"bos_token_id: 99 is outside"):
        tok = Tokenizer.from_gguf(write_gguf(tmp_path / "v.gguf", keys))
    assert tok.bos_id == 1


def test_loads_a_32000_token_vocabulary(vocab_files):
    tok = Tokenizer.from_gguf(vocab_files["synth-32k"])
    assert tok.vocab_size == 32000
    text = "The harness loads a model from a file and runs it on the devices it was given. " * 50
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (lambda k: k.pop("tokenizer.ggml.model"), "tokenizer.ggml.model", "missing"),
        (
            lambda k: k.update({"tokenizer.ggml.model": ("gpt2", VT.STRING, None)}),
            "tokenizer.ggml.model",
            "gpt2",
        ),
        (lambda k: k.pop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens", "missing"),
        (
            lambda k: k.update(
                {"tokenizer.ggml.tokens": (["<unk>", "<s>", "</s>", "a", "a"], VT.ARRAY, VT.STRING)}
            ),
            "tokenizer.ggml.tokens",
            "duplicate token b'a' at ids 3 and 4",
        ),
        (
            lambda k: k.update({"tokenizer.ggml.scores": ([0.0], VT.ARRAY, VT.FLOAT32)}),
            "tokenizer.ggml.scores",
            "1 entries",
        ),
        (
            lambda k: k.update({"tokenizer.ggml.token_type": (["x"] * 5, VT.ARRAY, VT.STRING)}),
            "tokenizer.ggml.token_type",
            "array of numbers",
        ),
        (
            lambda k: k.update({"tokenizer.ggml.add_bos_token": (1, VT.UINT8, None)}),
            "tokenizer.ggml.add_bos_token",
            "bool",
        ),
    ],
)
def test_bad_tokenizer_metadata_names_the_file_and_key(tmp_path, change, key, problem):
    keys = vocab_keys(["<unk>", "<s>", "</s>", S, "a"], [0.0] * 5, [2, 3, 3, 1, 1])
    change(keys)
    path = write_gguf(tmp_path / "v.gguf", keys)
    with pytest.raises(GGUFMetadataError) as e:
        Tokenizer.from_gguf(path)
    assert str(path) in str(e.value) and key in str(e.value) and problem in str(e.value)


def test_not_a_gguf_or_truncated(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all, just text")
    with pytest.raises(GGUFFormatError, match="magic"):
        Tokenizer.from_gguf(bad)
    with pytest.raises(GGUFFormatError, match="no such file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    good = spm_file(tmp_path / "v.gguf", CHARS).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(
        GGUFFormatError, match=r"cut.gguf: tokenizer.ggml.tokens: .* needs \d+ bytes .* left \(truncated\?\)"
    ):
        Tokenizer.from_gguf(cut)


def test_from_metadata_of_an_open_model(tmp_path):
    from harness.gguf_file import open_gguf

    path = synthesize(tmp_path / "tiny.gguf", "tiny")
    with open_gguf(path) as mf:
        a = Tokenizer.from_metadata(mf.metadata, mf.path)
    b = Tokenizer.from_gguf(path)
    text = "Once upon a time there was a quick brown fox."
    assert a.encode(text) == b.encode(text)


# -- properties without llama.cpp ----------------------------------------------------------------

WORDS = ["the", "and", "harness", "model", "device", "quick", "brown", "fox", "42", ",", ".", "!"]
SPECIAL_TEXT = ["<s>", "</s>", "<unk>", "<tool>", "[INST]", "<|im_end|>", "<0x41>", "<s"]
TEXT_PIECES = (
    WORDS + SPECIAL_TEXT + [" ", "  ", "\n", "\t", "é", "ü", "你好", "\U0001f642", "\x00", "a", "ab"]
)
texts = st.lists(st.sampled_from(TEXT_PIECES) | st.text(max_size=3), max_size=25).map("".join)


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory) -> dict[str, Path]:
    """Vocabularies for the property tests: hand-made with ties, chains, user-defined tokens and
    a mergeable control token; the tiny synthetic model; a 32000-token synthetic vocabulary."""
    d = tmp_path_factory.mktemp("vocab")
    hand = CHARS | {c: -100.0 for c in "<>/s[]INST|_imn"} | {"é": -100.0, "你": -100.0, "\t": -100.0}
    hand |= {S + S: -1, S + S + S + S: -3, S + "a": -2, "ab": -2, "bc": -2, "he": -2, "ll": -3, S + "he": -4}
    hand |= {S + "hell": -5, "<s": -6, "ar": -3, "ne": -3, S + "the": -7, "th": -4, S + "th": -6, "es": -3}
    special = {
        "<tool>": TT.USER_DEFINED,
        "[INST]": TT.USER_DEFINED,
        "<|im_end|>": TT.NORMAL,
        "<z>": TT.UNUSED,
    }
    tokens, scores, types = build_vocab(32000)
    return {
        "hand": spm_file(d / "hand.gguf", hand, special),
        "hand-no-prefix": spm_file(d / "hand-np.gguf", hand, special, add_space_prefix=False),
        "synth-tiny": synthesize(d / "tiny.gguf", "tiny"),
        "synth-32k": write_gguf(d / "v32k.gguf", vocab_keys(tokens, scores, types)),
    }


@pytest.fixture(scope="module")
def tokenizers(vocab_files) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_gguf(path) for name, path in vocab_files.items()}


def _representable(tok: Tokenizer, text: str) -> bool:
    """Round trips exactly: no literal ▁, no text of a control or user-defined token inside."""
    if SPACE in text:
        return False
    ids = tok.encode(text, add_bos=False)
    return not any(tok.token_attr(i) & (TokenAttr.CONTROL | TokenAttr.USER_DEFINED) for i in ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, name=st.sampled_from(["hand", "synth-tiny", "synth-32k"]))
def test_decode_inverts_encode(tokenizers, text, name):
    tok = tokenizers[name]
    if _representable(tok, text):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_bos=False)) == text


# -- llama.cpp -----------------------------------------------------------------------------------


class LlamaCpp:
    """llama.cpp's vocabulary of one file, through llama-cpp-python's low-level API."""

    def __init__(self, llama_cpp, path: Path):
        self.L = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        params.use_extra_bufts = False  # the AMX repack buffers crash on these CPUs
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model) if self.model else None

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n = len(data) + 8
        out = (self.L.llama_token * n)()
        k = self.L.llama_tokenize(self.vocab, data, len(data), out, n, add_special, parse_special)
        assert k >= 0
        return list(out[:k])

    def piece(self, token: int, special: bool, lstrip: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        k = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), lstrip, special)
        assert k >= 0
        return buf.raw[:k]

    def detokenize(self, ids: list[int]) -> str:
        tokens = (self.L.llama_token * max(1, len(ids)))(*ids)
        buf = ctypes.create_string_buffer(64 * len(ids) + 64)
        k = self.L.llama_detokenize(self.vocab, tokens, len(ids), buf, len(buf), False, False)
        assert k >= 0
        return buf.raw[:k].decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.model:
            self.L.llama_model_free(self.model)
            self.model = None


_LOG_CALLBACK: list = []  # llama.cpp keeps calling it: it must live as long as the process


@pytest.fixture(scope="module")
def llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp")
    if not _LOG_CALLBACK:  # keep llama.cpp's load logs out of the test output
        _LOG_CALLBACK.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
        llama_cpp.llama_log_set(_LOG_CALLBACK[0], ctypes.c_void_p())
    llama_cpp.llama_backend_init()
    return llama_cpp


@pytest.fixture(scope="module")
def reference(llama_cpp, vocab_files):
    refs = {name: LlamaCpp(llama_cpp, path) for name, path in vocab_files.items()}
    assert all(r.model for r in refs.values())
    yield refs
    for r in refs.values():
        r.close()


KNOWN_TEXTS = [
    "",
    " ",
    "   ",
    "\n",
    "hello world",
    "  leading and trailing  ",
    "the  the\n\nthe\tthe",
    "abc ab bc abbc",
    "<s>",
    "a<s>b</s>c<unk>",
    "<tool>a<tool>",
    "[INST] hello [/INST]",
    "<|im_end|>",
    "<s",
    "é 你好 \U0001f642 ü",
    "\x00\x01",
]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["hand", "hand-no-prefix", "synth-tiny", "synth-32k"])
def test_known_texts_match_llama_cpp(tokenizers, reference, name):
    tok, ref = tokenizers[name], reference[name]
    for text, add, parse in itertools.product(KNOWN_TEXTS, (False, True), (False, True)):
        got = tok.encode(text, add_bos=add, add_eos=add and None, parse_special=parse)
        assert got == ref.tokenize(text, add, parse), (text, add, parse)


@pytest.mark.llamacpp
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=texts,
    name=st.sampled_from(["hand", "hand-no-prefix", "synth-tiny", "synth-32k"]),
    add_special=st.booleans(),
    parse_special=st.booleans(),
)
def test_random_text_matches_llama_cpp(tokenizers, reference, text, name, add_special, parse_special):
    tok, ref = tokenizers[name], reference[name]
    ids = tok.encode(text, add_bos=add_special, add_eos=add_special and None, parse_special=parse_special)
    assert ids == ref.tokenize(text, add_special, parse_special)
    # llama.cpp's detokenize keeps the prefix space after a leading BOS; ours drops it there too
    body = ids[1:] if ids[:1] == [tok.bos_id] else ids
    if body[:1] != [tok.bos_id]:
        assert tok.decode(ids) == tok.decode(body) == ref.detokenize(body)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["hand", "hand-no-prefix", "synth-tiny"])
def test_every_token_decodes_as_in_llama_cpp(tokenizers, reference, name):
    tok, ref = tokenizers[name], reference[name]
    lstrip = 1 if tok.add_space_prefix else 0
    for special in (False, True):
        for i in range(tok.vocab_size):
            want = ref.piece(i, special, lstrip).decode("utf-8", errors="replace")
            assert tok.decode([i], special=special) == want, (i, tok.id_to_piece(i), special)


_LOAD_SCRIPT = """
import sys, llama_cpp
p = llama_cpp.llama_model_default_params()
p.vocab_only, p.use_extra_bufts = True, False
print("loaded" if llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), p) else "refused")
"""


@pytest.mark.llamacpp
def test_llama_cpp_also_refuses_duplicate_tokens(llama_cpp, tmp_path):
    path = write_gguf(tmp_path / "dup.gguf", vocab_keys(["<unk>", "<s>", "</s>", "a", "a"]))
    with pytest.raises(GGUFMetadataError, match="duplicate"):
        Tokenizer.from_gguf(path)
    # depending on its version llama.cpp fails the load or aborts the process: run it apart
    env = os.environ | {"GGML_NO_BACKTRACE": "1"}  # no gdb on abort
    cmd = [sys.executable, "-c", _LOAD_SCRIPT, str(path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert "loaded" not in run.stdout.split()
