"""llama's SentencePiece tokenizer over a GGUF vocabulary, giving the ids llama.cpp gives.

`Tokenizer.from_gguf(path)` reads the `tokenizer.ggml.*` keys of a model (or vocab-only) file;
`encode` and `decode` follow llama.cpp's SPM path (`llm_tokenizer_spm` and
`llama_vocab::impl::tokenize` / `token_to_piece` in src/llama-vocab.cpp):

- The text is split around user-defined tokens (control and unknown tokens too when
  `parse_special`); longer token texts are matched first.
- Each remaining piece of text gets a leading space when `add_space_prefix` and it is the first
  piece or follows a token, has its spaces escaped to U+2581, and is cut into UTF-8 characters.
- Adjacent symbols whose concatenation is a token are merged, best score first (ties: the
  leftmost), until no pair is a token.
- A final symbol that is not a token becomes the `<0xXX>` tokens of its bytes.

Everything works on the UTF-8 bytes, as llama.cpp does, so token texts that are not valid UTF-8
behave the same too.
"""

from __future__ import annotations

import enum
import heapq
import operator
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from harness.errors import GGUFMetadataError, UsageError
from harness.gguf_file import read_metadata

SPACE = "\u2581"  # ▁, SentencePiece's escaped space
_SPACE_BYTES = SPACE.encode()

KEY_MODEL = "tokenizer.ggml.model"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_SCORES = "tokenizer.ggml.scores"
KEY_TYPES = "tokenizer.ggml.token_type"
KEY_BOS = "tokenizer.ggml.bos_token_id"
KEY_EOS = "tokenizer.ggml.eos_token_id"
KEY_UNK = "tokenizer.ggml.unknown_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"
KEY_ADD_PREFIX = "tokenizer.ggml.add_space_prefix"


class TokenAttr(enum.IntFlag):
    """llama.cpp's `llama_token_attr` bits (the ones this tokenizer uses)."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# GGUF token_type -> attribute (gguf.TokenType values); any other value is UNDEFINED.
_TYPE_ATTR = {
    1: TokenAttr.NORMAL,
    2: TokenAttr.UNKNOWN,
    3: TokenAttr.CONTROL,
    4: TokenAttr.USER_DEFINED,
    5: TokenAttr.UNUSED,
    6: TokenAttr.BYTE,
}

# Texts llama.cpp treats as end-of-generation and forces to CONTROL whatever their type says.
_EOG_TEXTS = frozenset(
    s.encode()
    for s in (
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    )
)  # fmt: skip

# Length of a UTF-8 sequence from its first byte, as llama.cpp's unicode_len_utf8 (stray
# continuation bytes count as one).
_UTF8_LEN = bytes(1 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4 for b in range(256))


class Tokenizer:
    """A llama (SentencePiece) vocabulary: `encode` text to ids, `decode` ids to text."""

    def __init__(
        self,
        tokens: Sequence[str | bytes],
        scores: Sequence[float] | None = None,
        token_types: Sequence[int] | None = None,
        *,
        bos_id: int | None = 1,
        eos_id: int | None = 2,
        unk_id: int | None = 0,
        add_bos: bool = True,
        add_eos: bool = False,
        add_space_prefix: bool = True,
        path: str | os.PathLike | None = None,
    ):
        self.path = None if path is None else os.fspath(path)
        n = len(tokens)
        if n == 0:
            raise GGUFMetadataError(self.path, KEY_TOKENS, "the vocabulary is empty")
        pieces = [t.encode("utf-8", "surrogateescape") if isinstance(t, str) else bytes(t) for t in tokens]
        # llama.cpp names empty tokens so they never match text
        pieces = [p or f"[EMPTY_{i}]".encode() for i, p in enumerate(pieces)]
        self._pieces = pieces
        self._scores = [0.0] * n if scores is None else [float(s) for s in scores[:n]]
        types = [1] * n if token_types is None else [int(t) for t in token_types[:n]]
        for key, values in ((KEY_SCORES, self._scores), (KEY_TYPES, types)):
            if len(values) < n:
                raise GGUFMetadataError(self.path, key, f"has {len(values)} entries for {n} tokens")
        self._ids: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            j = self._ids.setdefault(p, i)
            if j != i:
                raise GGUFMetadataError(self.path, KEY_TOKENS, f"duplicate token {p!r} at ids {j} and {i}")
        attrs = [_TYPE_ATTR.get(t, TokenAttr.UNDEFINED) for t in types]
        for i, p in enumerate(pieces):
            if p in _EOG_TEXTS:
                attrs[i] |= TokenAttr.CONTROL
        self._attrs = attrs

        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id)):
            if value is not None and not 0 <= value < n:
                raise UsageError(self.path, name, f"{value} is outside the vocabulary of {n} tokens")
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.add_space_prefix = bool(add_space_prefix)
        if add_bos and bos_id is None:
            raise GGUFMetadataError(self.path, KEY_ADD_BOS, f"is true, but {KEY_BOS} is not set")
        if add_eos and eos_id is None:
            raise GGUFMetadataError(self.path, KEY_ADD_EOS, f"is true, but {KEY_EOS} is not set")

        # Tokens split out of the text before SPM, longest text first (llama.cpp's sort is not
        # stable: equal-length texts that overlap in the input may split differently there).
        by_length = sorted(range(n), key=lambda i: -len(pieces[i]))
        special = TokenAttr.CONTROL | TokenAttr.UNKNOWN
        self._split_all = [i for i in by_length if attrs[i] & (special | TokenAttr.USER_DEFINED)]
        self._split_user = [i for i in self._split_all if not attrs[i] & special]

        # Byte fallback: <0xXX>, else the byte itself as a token (never for 0: llama.cpp builds
        # that one as a C string).
        hex_ids = [self._ids.get(f"<0x{b:02X}>".encode()) for b in range(256)]
        self._byte_ids = [
            h if h is not None or b == 0 else self._ids.get(bytes([b])) for b, h in enumerate(hex_ids)
        ]

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a GGUF model or vocab-only file (its `tokenizer.ggml.*` keys)."""
        return cls.from_metadata(read_metadata(path), path)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], path: str | os.PathLike | None = None) -> Tokenizer:
        """The tokenizer from GGUF metadata as Python values (e.g. `open_gguf(p).metadata`).

        Missing special ids and flags take llama.cpp's SPM defaults (BOS 1, EOS 2, UNK 0, add BOS
        and a space prefix, no EOS); an id outside the vocabulary keeps the default, with a warning.
        """
        path = None if path is None else os.fspath(path)

        def bad(key: str, problem: str) -> GGUFMetadataError:
            return GGUFMetadataError(path, key, problem)

        model = metadata.get(KEY_MODEL)
        if model is None:
            raise bad(KEY_MODEL, "missing: the file has no tokenizer")
        if model != "llama":
            raise bad(KEY_MODEL, f"is {model!r}; only the 'llama' (SentencePiece) tokenizer is supported")
        tokens = metadata.get(KEY_TOKENS)
        if tokens is None:
            raise bad(KEY_TOKENS, "missing: the file has no vocabulary")
        if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, (str, bytes)) for t in tokens):
            raise bad(KEY_TOKENS, "must be an array of strings")
        n = len(tokens)

        def numbers(key: str, kind: tuple[type, ...]) -> list | None:
            values = metadata.get(key)
            if values is None:
                return None
            if isinstance(values, np.ndarray):
                values = values.tolist()
            if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, kind) and not isinstance(v, bool) for v in values
            ):
                raise bad(key, "must be an array of numbers")
            if len(values) < n:
                raise bad(key, f"has {len(values)} entries for {n} tokens")
            return list(values)

        def flag(key: str, default: bool) -> bool:
            value = metadata.get(key, default)
            if not isinstance(value, bool):
                raise bad(key, f"must be a bool, got {value!r}")
            return value

        def special_id(key: str, default: int) -> int | None:
            tid = default if default < n else None
            value = metadata.get(key)
            if value is None:
                return tid
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(key, f"must be an integer, got {value!r}")
            if not 0 <= value < n:
                warnings.warn(
                    f"{path}: {key}: {value} is outside the vocabulary of {n} tokens; using {tid}",
                    stacklevel=3,
                )
                return tid
            return value

        return cls(
            tokens,
            numbers(KEY_SCORES, (int, float)),
            numbers(KEY_TYPES, (int,)),
            bos_id=special_id(KEY_BOS, 1),
            eos_id=special_id(KEY_EOS, 2),
            unk_id=special_id(KEY_UNK, 0),
            add_bos=flag(KEY_ADD_BOS, True),
            add_eos=flag(KEY_ADD_EOS, False),
            add_space_prefix=flag(KEY_ADD_PREFIX, True),
            path=path,
        )

    # -- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def _check_id(self, i: Any) -> int:
        try:
            tid = operator.index(i)
        except TypeError:
            raise UsageError(self.path, "token id", f"{i!r} is not an integer") from None
        if not 0 <= tid < len(self._pieces):
            last = len(self._pieces) - 1
            raise UsageError(self.path, "token id", f"{tid} is outside the vocabulary (0..{last})")
        return tid

    def id_to_piece(self, i: int) -> str:
        """The token's text as the vocabulary spells it (`▁the`, `<0x0A>`, `<s>`)."""
        return self._pieces[self._check_id(i)].decode("utf-8", errors="replace")

    def piece_to_id(self, piece: str | bytes) -> int | None:
        """The id of the token spelled `piece`, or None."""
        return self._ids.get(piece.encode() if isinstance(piece, str) else piece)

    def token_attr(self, i: int) -> TokenAttr:
        return TokenAttr(self._attrs[self._check_id(i)])

    # -- encoding -----------------------------------------------------------------------------

    def encode(
        self,
        text: str | bytes,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        parse_special: bool = False,
    ) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize`.

        `add_bos`/`add_eos` default to the file's flags (llama.cpp's `add_special=True`);
        with `parse_special`, control token texts such as `<s>` become those tokens, otherwise
        they are plain text (user-defined tokens are matched either way).
        """
        data = text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else bytes(text)
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        out: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise UsageError(self.path, KEY_BOS, "add_bos asked for, but the vocabulary has no BOS token")
            out.append(self.bos_id)
        after_token = True  # the first piece of text gets the space prefix, like one after a token
        for frag in self._partition(data, self._split_all if parse_special else self._split_user):
            if isinstance(frag, int):
                out.append(frag)
                after_token = True
                continue
            if self.add_space_prefix and after_token:
                frag = b" " + frag
            self._spm(frag.replace(b" ", _SPACE_BYTES), out)
            after_token = False
        if add_eos:
            if self.eos_id is None:
                raise UsageError(self.path, KEY_EOS, "add_eos asked for, but the vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    def _partition(self, data: bytes, split_ids: list[int]) -> list[bytes | int]:
        """`data` cut into text pieces and the ids of the split tokens found in it."""
        frags: list[bytes | int] = [data] if data else []
        for tid in split_ids:
            piece = self._pieces[tid]
            new: list[bytes | int] = []
            for frag in frags:
                if isinstance(frag, int) or piece not in frag:
                    new.append(frag)
                    continue
                start = 0
                while (hit := frag.find(piece, start)) >= 0:
                    if hit > start:
                        new.append(frag[start:hit])
                    new.append(tid)
                    start = hit + len(piece)
                if start < len(frag):
                    new.append(frag[start:])
            frags = new
        return frags

    def _spm(self, text: bytes, out: list[int]) -> None:
        """llama.cpp's SPM session on escaped text: merge best-scoring pairs, then byte fallback."""
        ids, scores = self._ids, self._scores
        starts: list[int] = []
        pos, n = 0, len(text)
        while pos < n:
            starts.append(pos)
            pos += _UTF8_LEN[text[pos]]
        if not starts:
            return
        size = [b - a for a, b in zip(starts, starts[1:] + [n], strict=True)]  # 0 once merged into the left
        prev = list(range(-1, len(starts) - 1))
        nxt = list(range(1, len(starts) + 1))
        nxt[-1] = -1

        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged size)

        def bigram(left: int, right: int) -> tuple[float, int, int, int] | None:
            if left < 0 or right < 0:
                return None
            merged = size[left] + size[right]
            tid = ids.get(text[starts[left] : starts[left] + merged])
            return None if tid is None else (-scores[tid], left, right, merged)

        heap = [b for i in range(1, len(starts)) if (b := bigram(i - 1, i)) is not None]
        heapq.heapify(heap)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            # stale: one side has been merged away or has grown since this pair was queued
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != merged:
                continue
            size[left], size[right] = merged, 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            for b in (bigram(prev[left], left), bigram(left, nxt[left])):
                if b is not None:
                    heapq.heappush(heap, b)

        # A merged symbol is always a token; only a single character can be missing from the
        # vocabulary, so llama.cpp's resegment-by-merge-history never applies and such a
        # character becomes byte tokens.
        i = 0
        while i != -1:
            piece = text[starts[i] : starts[i] + size[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_token(b, piece) for b in piece)
            i = nxt[i]

    def _byte_token(self, b: int, piece: bytes) -> int:
        tid = self._byte_ids[b]
        if tid is None:
            raise GGUFMetadataError(
                self.path,
                KEY_TOKENS,
                f"no token <0x{b:02X}> for the byte fallback of {piece.decode('utf-8', 'replace')!r}",
            )
        return tid

    # -- decoding -----------------------------------------------------------------------------

    def _piece_bytes(self, tid: int, special: bool) -> bytes:
        """llama.cpp's token_to_piece: what the token adds to the text."""
        attr, text = self._attrs[tid], self._pieces[tid]
        if attr & (TokenAttr.UNKNOWN | TokenAttr.CONTROL):
            return text if special else b""
        if attr & TokenAttr.USER_DEFINED:
            return text
        if attr & TokenAttr.NORMAL:
            return text.replace(_SPACE_BYTES, b" ")
        if attr & TokenAttr.BYTE:
            return bytes([_hex_byte(text)])
        return b""  # unused and undefined tokens show nothing

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """The text of `ids`: pieces joined, `▁` as spaces, byte tokens reassembled as UTF-8
        (invalid sequences replaced). Control and unknown tokens (BOS, EOS, `<unk>`) show
        nothing unless `special`. With a space prefix, the space in front of the first token
        after a leading BOS (or of the first token) is dropped, so decode(encode(t)) == t.
        """
        tids = [self._check_id(i) for i in ids]
        first = 1 if tids and not special and tids[0] == self.bos_id else 0
        parts = [self._piece_bytes(t, special) for t in tids[first:]]
        if self.add_space_prefix and parts and parts[0].startswith(b" "):
            parts[0] = parts[0][1:]
        return b"".join(parts).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def _hex_byte(text: bytes) -> int:
    """The byte of a `<0xXX>` token, read as strtol reads text[3:5] (0 when not hex)."""
    digits = b""
    for c in text[3:5]:
        if chr(c) not in "0123456789abcdefABCDEF":
            break
        digits += bytes([c])
    return int(digits, 16) if digits else 0
