"""Fuzzing the harness's own readers: GGUF files, YAML cases and CLI arguments.

Each case is a mutated input with an expectation (`REFUSE`: a correct reader must refuse it;
`ACCEPT`: it is a valid input; `EITHER`: a clean refusal and a correct result are both right),
run in a forked child under a memory cap (`RLIMIT_AS`) and a timeout, and its outcome classified:

- `ok`: accepted, with a correct result (for a model: finite logits of shape [T, vocab]);
- `clean error`: a `HarnessError` of one line that names the file and the field;
- `unclear error`: a `HarnessError` that does not (no file, no field, or several lines);
- `traceback`: any other exception;
- `hang`: the timeout passed;
- `out of memory`: MemoryError, or the child died under the memory cap;
- `silent wrong`: a result where the input must be refused, or non-finite logits with no error.

A GGUF case opens the file (`open_gguf`), dequantizes every tensor, tokenizes a text when the
file has a vocabulary, and runs one CPU forward of `Mixtral.from_gguf`, as a user would. Mutations
are structural (truncation by region, byte flips by region, patches of header, key and tensor-info
fields with boundary values, inserted and deleted bytes) and semantic (files rewritten with the
`gguf` writer: config values out of range or non-finite, keys dropped or of the wrong type,
vocabularies of the wrong length, tensors missing, renamed, reshaped, of a type that cannot be
computed, of mixed types among the experts of a layer, NaN and inf in the weights).

`scripts/fuzz.py` runs a long campaign and writes a JSON table; `tests/test_fuzzing.py` runs a
short seeded one in CI.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OK = "ok"
CLEAN = "clean error"
UNCLEAR = "unclear error"
TRACEBACK = "traceback"
HANG = "hang"
OOM = "out of memory"
SILENT_WRONG = "silent wrong"
OUTCOMES = (OK, CLEAN, UNCLEAR, TRACEBACK, HANG, OOM, SILENT_WRONG)
FAILURES = (UNCLEAR, TRACEBACK, HANG, OOM, SILENT_WRONG)

REFUSE, ACCEPT, EITHER = "refuse", "accept", "either"


@dataclass
class Case:
    """One fuzz input: `kind` (the mutation), `detail` (what exactly), `expect`, and the file."""

    index: int
    kind: str
    detail: str
    expect: str
    path: str | None = None
    argv: list[str] | None = None


@dataclass
class Result:
    case: Case
    outcome: str
    message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.case.index,
            "kind": self.case.kind,
            "detail": self.case.detail,
            "expect": self.case.expect,
            "outcome": self.outcome,
            "message": self.message[:500],
            **({"argv": self.case.argv} if self.case.argv is not None else {}),
        }


# ---- running one case in a forked child -----------------------------------------------------------


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_isolated(fn: Callable[[], tuple[str, str]], timeout: float, memory_bytes: int) -> tuple[str, str]:
    """`fn()` -> (outcome, message) in a forked child whose address space may grow by at most
    `memory_bytes`; HANG after `timeout` seconds, OOM when the cap kills it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        code = 0
        try:
            limit = _vm_bytes() + memory_bytes
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(timeout) + 5)  # a backstop: the parent kills it first
            try:
                outcome = fn()
            except MemoryError:
                outcome = (OOM, "MemoryError")
            except BaseException as exc:  # noqa: BLE001 - every escape is a finding
                outcome = (
                    TRACEBACK,
                    "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:],
                )
            os.write(write_fd, json.dumps(outcome).encode()[:60000])
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    chunks = []
    import select

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return HANG, f"no answer within {timeout:g} s"
        ready, _, _ = select.select([read_fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if chunks:
        try:
            outcome, message = json.loads(b"".join(chunks))
            return outcome, message
        except ValueError:
            pass
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
            return OOM, f"child died of signal {sig} under the memory cap"
        return TRACEBACK, f"child died of signal {sig}"
    return TRACEBACK, f"child exited {os.WEXITSTATUS(status)} without an answer"


def classify_error(exc: BaseException, path: str | None) -> tuple[str, str]:
    """A raised exception as CLEAN (a one-line HarnessError naming the file and the field),
    UNCLEAR (a HarnessError that does not), TRACEBACK or OOM."""
    from harness.errors import HarnessError

    if isinstance(exc, MemoryError):
        return OOM, "MemoryError"
    text = str(exc)
    if not isinstance(exc, HarnessError):
        return TRACEBACK, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]
    if "\n" in text or "\r" in text:
        return UNCLEAR, f"several lines: {text!r}"
    if path is not None and (exc.path is None or path not in text):
        return UNCLEAR, f"does not name the file: {text}"
    if not exc.field:
        return UNCLEAR, f"does not name the field: {text}"
    return CLEAN, text


# ---- GGUF: seeds and their byte map ---------------------------------------------------------------


@dataclass
class Patchable:
    """A fixed-size integer field of a seed file: where it is, how big, what it holds."""

    offset: int
    size: int  # 4 or 8
    name: str  # e.g. "kv llama.block_count: value", "tensor blk.0.attn_q.weight: dim 1"
    value: int
    is_float: bool = False


@dataclass
class Seed:
    """A valid GGUF file to mutate, with its regions, patchable fields and reference logits."""

    path: Path
    data: bytes
    regions: dict[str, tuple[int, int]]  # header, kv, tensor_info, padding, data, tail
    fields: list[Patchable]
    tensors: list[tuple[str, int, int, int]]  # name, qtype, data start, nbytes
    tokens: list[int]
    vocab_size: int


def _byte_offset(reader, part) -> int:
    return part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]


def load_seed(path: Path) -> Seed:
    """Map a valid GGUF file (written by `harness synth`) with gguf-py's reader."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    data = path.read_bytes()
    fields: list[Patchable] = [
        Patchable(4, 4, "header: version", 3),
        Patchable(8, 8, "header: tensor count", len(reader.tensors)),
        Patchable(16, 8, "header: key count", len([f for f in reader.fields if not f.startswith("GGUF.")])),
    ]
    kv_end = 24
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        start = _byte_offset(reader, f.parts[0])
        kv_end = max(kv_end, start + sum(p.nbytes for p in f.parts))
        fields.append(Patchable(start, 8, f"kv {name}: key length", int(f.parts[0][0])))
        fields.append(
            Patchable(_byte_offset(reader, f.parts[2]), 4, f"kv {name}: value type", int(f.parts[2][0]))
        )
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            fields.append(
                Patchable(_byte_offset(reader, f.parts[3]), 4, f"kv {name}: item type", int(f.parts[3][0]))
            )
            fields.append(
                Patchable(_byte_offset(reader, f.parts[4]), 8, f"kv {name}: array length", int(f.parts[4][0]))
            )
        elif vtype == GGUFValueType.STRING:
            fields.append(
                Patchable(
                    _byte_offset(reader, f.parts[3]), 8, f"kv {name}: string length", int(f.parts[3][0])
                )
            )
        else:
            part = f.parts[3]
            is_float = vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
            value = int.from_bytes(part.tobytes(), "little")
            if part.nbytes in (4, 8):
                fields.append(
                    Patchable(_byte_offset(reader, part), part.nbytes, f"kv {name}: value", value, is_float)
                )
    ti_end = kv_end
    tensors = []
    for t in reader.tensors:
        name_len, _name, n_dims, dims, ttype, offset = t.field.parts
        base = f"tensor {t.name}"
        fields.append(Patchable(_byte_offset(reader, name_len), 8, f"{base}: name length", int(name_len[0])))
        fields.append(Patchable(_byte_offset(reader, n_dims), 4, f"{base}: dimension count", int(n_dims[0])))
        for j in range(len(dims)):
            fields.append(Patchable(_byte_offset(reader, dims) + 8 * j, 8, f"{base}: dim {j}", int(dims[j])))
        fields.append(Patchable(_byte_offset(reader, ttype), 4, f"{base}: type", int(ttype[0])))
        fields.append(Patchable(_byte_offset(reader, offset), 8, f"{base}: data offset", int(offset[0])))
        ti_end = max(ti_end, _byte_offset(reader, offset) + 8)
        start = int(reader.data_offset) + int(offset[0])
        tensors.append((t.name, int(t.tensor_type), start, int(t.n_bytes)))
    data_start = int(reader.data_offset)
    data_end = max(s + n for _, _, s, n in tensors)
    regions = {
        "header": (0, 24),
        "kv": (24, kv_end),
        "tensor_info": (kv_end, ti_end),
        "padding": (ti_end, data_start),
        "data": (data_start, data_end),
        "tail": (data_end, len(data)),
    }
    from harness.gguf_file import open_gguf

    vocab = open_gguf(path).config.vocab_size
    return Seed(path, data, regions, fields, tensors, [1, 5, 9, 260 % vocab, 42], vocab)


# ---- GGUF: mutations ------------------------------------------------------------------------------

U64_SPECIAL = [
    0,
    1,
    2,
    3,
    7,
    31,
    32,
    33,
    63,
    64,
    255,
    256,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
]
U32_SPECIAL = [0, 1, 2, 3, 7, 13, 30, 31, 39, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
F32_SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-45, 1e38, 3.4e38, 1.0]


def _interesting(rng: random.Random, f: Patchable) -> int:
    """A boundary value for a field, as its raw integer bits."""
    if f.is_float:
        x = rng.choice(F32_SPECIAL + [f.value * 2.0, -abs(rng.random() * 1e6)])
        if f.size == 4:
            return struct.unpack("<I", struct.pack("<f", x))[0]
        return struct.unpack("<Q", struct.pack("<d", x))[0]
    pool = U64_SPECIAL if f.size == 8 else U32_SPECIAL
    choice = rng.random()
    if choice < 0.5:
        v = rng.choice(pool)
    elif choice < 0.8:
        v = f.value + rng.choice([-2, -1, 1, 2, 8, 32, -32])
    else:
        v = rng.getrandbits(8 * f.size)
    return v % (1 << (8 * f.size))


def structural(seed: Seed, rng: random.Random) -> tuple[str, str, str, bytes]:
    """(kind, detail, expect, bytes) of one structural mutation of `seed`."""
    data = bytearray(seed.data)
    kind = rng.choice(["truncate", "flip", "flip", "patch", "patch", "patch", "data_flip", "shift", "name"])
    if kind == "truncate":
        region = rng.choice([r for r, (a, b) in seed.regions.items() if b > a])
        a, b = seed.regions[region]
        cut = rng.randrange(a, b)
        # Cutting the padding after the last tensor's data leaves a valid file.
        expect = EITHER if region == "tail" else REFUSE
        return f"truncate:{region}", f"cut at byte {cut} of {len(data)}", expect, bytes(data[:cut])
    if kind in ("flip", "data_flip"):
        region = "data" if kind == "data_flip" else rng.choice(["header", "kv", "tensor_info", "padding"])
        a, b = seed.regions[region]
        if b <= a:
            region, (a, b) = "kv", seed.regions["kv"]
        n = rng.choice([1, 1, 2, 4, 8])
        where = sorted(rng.randrange(a, b) for _ in range(n))
        for i in where:
            data[i] ^= rng.randrange(1, 256)
        return f"flip:{region}", f"{n} bytes at {where[:4]}", EITHER, bytes(data)
    if kind == "patch":
        f = rng.choice(seed.fields)
        v = _interesting(rng, f)
        data[f.offset : f.offset + f.size] = v.to_bytes(f.size, "little")
        group = f.name.split(":")[-1].strip().split(" ")[0]
        return f"patch:{group}", f"{f.name} {f.value} -> {v}", EITHER, bytes(data)
    if kind == "shift":
        a, b = seed.regions[rng.choice(["kv", "tensor_info"])]
        i = rng.randrange(a, b)
        n = rng.choice([1, 2, 4, 8])
        if rng.random() < 0.5:
            return (
                "shift:insert",
                f"{n} bytes at {i}",
                EITHER,
                bytes(data[:i] + bytes(rng.getrandbits(8) for _ in range(n)) + data[i:]),
            )
        return "shift:delete", f"{n} bytes at {i}", EITHER, bytes(data[:i] + data[i + n :])
    # a tensor name made to hold a newline, a NUL, non-UTF-8 or another tensor's name (same length)
    name_fields = [f for f in seed.fields if f.name.endswith("name length")]
    f = rng.choice(name_fields)
    start, length = f.offset + 8, f.value
    original = seed.data[start : start + length].decode()
    same = [t for t, *_ in seed.tensors if len(t) == length and t != original]
    choice = rng.choice(
        ["newline", "nul", "invalid utf-8", "duplicate"] if same else ["newline", "nul", "invalid utf-8"]
    )
    if choice == "duplicate":
        new = rng.choice(same).encode()
        expect = REFUSE
    else:
        pos = rng.randrange(length)
        byte = {"newline": b"\n", "nul": b"\x00", "invalid utf-8": b"\xff"}[choice]
        new = original.encode()[:pos] + byte + original.encode()[pos + 1 :]
        expect = REFUSE if original in _NEEDED_NAMES_CACHE.get(str(seed.path), ()) else EITHER
    data[start : start + length] = new
    return f"name:{choice.replace(' ', '_')}", f"{original!r} -> {new!r}", expect, bytes(data)


_NEEDED_NAMES_CACHE: dict[str, set[str]] = {}


def rewrite_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    set_keys: dict[str, tuple[Any, Any]] | None = None,
    drop_keys: tuple[str, ...] = (),
    drop_tensors: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
    retype: dict[str, tuple[int, np.ndarray]] | None = None,
    edit: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    alignment: int | None = None,
) -> Path:
    """Copy the GGUF file `src` to `dst` with gguf's writer, keys and tensors in file order:
    keys set ({key: (value, GGUFValueType)}; an array as ((items, item type), ARRAY)) or dropped;
    tensors dropped, renamed, retyped ({name: (GGML type id, raw bytes)}) or edited
    ({name: fn(raw bytes) -> raw bytes}); the data laid out to `alignment` when given."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    set_keys = set_keys or {}
    rename, retype, edit = rename or {}, retype or {}, edit or {}
    writer = GGUFWriter(dst, arch="llama")
    writer.kv_data[0].clear()  # the writer pre-adds general.architecture; copy keys in file order
    if alignment is not None:
        writer.data_alignment = alignment

    def add(name: str, value: Any, vtype: Any, sub: Any = None) -> None:
        if vtype == GGUFValueType.ARRAY and sub is None:
            value, sub = value
        writer.add_key_value(name, value, vtype, sub_type=sub)

    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in drop_keys:
            continue
        if name in set_keys:
            add(name, *set_keys[name])
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY and len(f.types) > 1 else None
        value = f.contents()
        if vtype == GGUFValueType.ARRAY and sub is None:  # an empty array of unknown item type
            sub = GGUFValueType.UINT8
        add(name, value, vtype, sub)
    for name, (value, vtype) in set_keys.items():
        if name not in reader.fields:
            add(name, value, vtype)
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        raw, qtype = np.asarray(t.data), int(t.tensor_type)
        if t.name in edit:
            raw = edit[t.name](raw.copy())
        if t.name in retype:
            qtype, raw = retype[t.name]
        writer.add_tensor(rename.get(t.name, t.name), raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def _rewrite(seed: Seed, dst: Path, **changes) -> None:
    rewrite_gguf(seed.path, dst, **changes)


CONFIG_KEYS = {
    "llama.block_count": "int",
    "llama.embedding_length": "int",
    "llama.feed_forward_length": "int",
    "llama.attention.head_count": "int",
    "llama.attention.head_count_kv": "int",
    "llama.expert_count": "int",
    "llama.expert_used_count": "int",
    "llama.rope.dimension_count": "int",
    "llama.context_length": "int",
    "llama.vocab_size": "int",
    "llama.attention.layer_norm_rms_epsilon": "float",
    "llama.rope.freq_base": "float",
}


def semantic(seed: Seed, rng: random.Random, dst: Path) -> tuple[str, str, str]:
    """Write one semantic mutation of `seed` to `dst`; (kind, detail, expect)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as VT

    from harness.gguf_file import open_gguf

    mf = open_gguf(seed.path)
    c = mf.config
    kind = rng.choice(
        [
            "config",
            "config",
            "config",
            "key_type",
            "drop_key",
            "vocab",
            "tensor",
            "tensor",
            "weights",
            "weights",
            "tokenizer",
            "arch",
            "alignment",
            "valid",
        ]
    )
    if kind == "config":
        key = rng.choice(list(CONFIG_KEYS))
        if CONFIG_KEYS[key] == "float":
            value = rng.choice([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-5, 1e-46])
            _rewrite(seed, dst, set_keys={key: (value, VT.FLOAT32)})
            return "config:float", f"{key} = {value}", REFUSE
        original = mf.metadata.get(key, {"llama.rope.dimension_count": c.rope_dim}.get(key, 0))
        value = rng.choice(
            [
                0,
                1,
                3,
                original + 1,
                original - 1,
                original * 2,
                2**31 - 1,
                2**31,
                2**32 - 1,
                2**40,
                2**63,
                -1,
                -(2**31),
            ]
        )
        if value == original:
            value += 1
        vtype = VT.INT64 if value < 0 or value >= 2**32 else VT.UINT32
        if value >= 2**63:
            vtype = VT.UINT64
        _rewrite(seed, dst, set_keys={key: (value, vtype)})
        # Valid changes: an expert_used_count in 1..expert_count, a rope dimension that stays even
        # and within head_dim, a context length that stays positive.
        valid = (
            (key == "llama.expert_used_count" and 1 <= value <= c.expert_count)
            or (key == "llama.rope.dimension_count" and 0 < value <= c.head_dim and value % 2 == 0)
            or (key == "llama.context_length" and 0 < value < 2**63)
        )
        return "config:int", f"{key} {original} -> {value}", ACCEPT if valid else REFUSE
    if kind == "key_type":
        key = rng.choice(list(CONFIG_KEYS))
        value, vtype = rng.choice([("four", VT.STRING), (True, VT.BOOL), (([1, 2], VT.UINT32), VT.ARRAY)])
        if CONFIG_KEYS[key] == "int" and rng.random() < 0.3:
            value, vtype = 4.0, VT.FLOAT32
        _rewrite(seed, dst, set_keys={key: (value, vtype)})
        return "key_type", f"{key} as {vtype.name}", REFUSE
    if kind == "drop_key":
        required = [
            "general.architecture",
            "llama.block_count",
            "llama.embedding_length",
            "llama.attention.head_count",
            "llama.feed_forward_length",
            "llama.attention.layer_norm_rms_epsilon",
            "llama.expert_used_count",
        ]
        if not c.is_moe:
            required.remove("llama.expert_used_count")
        key = rng.choice(
            required
            + [
                "general.name",
                "llama.context_length",
                "llama.rope.freq_base",
                "llama.vocab_size",
                "tokenizer.ggml.scores",
            ]
        )
        _rewrite(seed, dst, drop_keys=(key,))
        return "drop_key", key, REFUSE if key in required else EITHER
    if kind == "vocab":
        tokens = mf.metadata["tokenizer.ggml.tokens"]
        which = rng.choice(["tokens_short", "tokens_long", "scores_short", "types_short", "scores_type"])
        if which == "tokens_short":
            new = {"tokenizer.ggml.tokens": ((tokens[: rng.randrange(1, len(tokens))], VT.STRING), VT.ARRAY)}
        elif which == "tokens_long":
            new = {
                "tokenizer.ggml.tokens": (
                    (tokens + [f"extra{i}" for i in range(rng.randrange(1, 50))], VT.STRING),
                    VT.ARRAY,
                )
            }
        elif which == "scores_short":
            new = {"tokenizer.ggml.scores": (([0.0] * rng.randrange(1, len(tokens)), VT.FLOAT32), VT.ARRAY)}
        elif which == "types_short":
            new = {"tokenizer.ggml.token_type": (([1] * rng.randrange(1, len(tokens)), VT.INT32), VT.ARRAY)}
        else:
            new = {"tokenizer.ggml.scores": ((["x"] * len(tokens), VT.STRING), VT.ARRAY)}
        _rewrite(seed, dst, set_keys=new)
        return f"vocab:{which}", which, REFUSE
    if kind == "tensor":
        names = [t for t, *_ in seed.tensors]
        name = rng.choice(names)
        which = rng.choice(
            ["drop", "rename_newline", "rename_long", "unsupported_type", "reshape", "extra", "expert_type"]
        )
        if which == "drop":
            _rewrite(seed, dst, drop_tensors=(name,))
            return "tensor:drop", name, EITHER if name == "output.weight" else REFUSE  # a tied head
        if which == "rename_newline":
            _rewrite(seed, dst, rename={name: name[:4] + "\nharness: OK " + name[4:20]})
            return "tensor:rename_newline", name, REFUSE
        if which == "rename_long":
            _rewrite(seed, dst, rename={name: name + "x" * rng.choice([40, 100, 300])})
            return "tensor:rename_long", name, REFUSE
        if which == "unsupported_type":
            # (the low-bit types are computed: zero blocks of one are a valid tensor, either
            # accepted or refused for its place, e.g. one expert's type among others)
            t = rng.choice([Q.IQ1_S, Q.IQ2_XXS, Q.IQ3_S, Q.TQ1_0, Q.Q8_1, Q.Q8_K, Q.I8, Q.F64, Q.IQ1_M])
            from gguf import GGML_QUANT_SIZES

            from harness.quant.types import SUPPORTED_TYPES

            shape = mf.shape(name)
            block, size = GGML_QUANT_SIZES[t]
            if shape[-1] % block:
                _rewrite(seed, dst, drop_tensors=(name,))
                return "tensor:drop", name, REFUSE
            n = math.prod(shape) // block * size
            raw = np.zeros((*shape[:-1], shape[-1] // block * size), dtype=np.uint8)
            assert raw.size == n
            _rewrite(seed, dst, retype={name: (int(t), raw)})
            if t in SUPPORTED_TYPES:
                return "tensor:retype", f"{name} as {t.name} (zeros)", EITHER
            return "tensor:unsupported_type", f"{name} as {t.name}", REFUSE
        if which == "reshape":
            shape = mf.shape(name)
            if len(shape) >= 2 and shape[0] % 2 == 0:
                new_shape = (shape[0] // 2, *shape[1:-1], shape[-1] * 2)
            else:
                new_shape = None
            if new_shape is None:
                _rewrite(seed, dst, drop_tensors=(name,))
                return "tensor:drop", name, REFUSE
            qtype = mf.qtype(name)

            def reshape(raw, ns=new_shape):
                return raw.reshape(*ns[:-1], -1)

            _rewrite(seed, dst, edit={name: reshape})
            return "tensor:reshape", f"{name} {shape} -> {new_shape} ({qtype.name})", REFUSE
        if which == "extra":
            _rewrite(seed, dst, set_keys={"general.note": ("an extra tensor", VT.STRING)})
            return "valid:extra_key", "general.note", ACCEPT
        # expert_type: one expert of a per-expert layer in another type (merged: the stack retyped)
        experts = [t for t in names if re.fullmatch(r"blk\.\d+\.ffn_up\.\d+\.weight", t)]
        if not experts:
            _rewrite(seed, dst, drop_tensors=("blk.0.ffn_up_exps.weight", "blk.0.ffn_up.weight"))
            return "tensor:drop", "blk.0.ffn_up", REFUSE
        name = rng.choice(experts)
        values = mf.tensor(name).dequantize().numpy()
        if mf.qtype(name) == Q.Q8_0:
            raw, t = values.astype(np.float16).view(np.uint8), Q.F16
        else:
            import gguf.quants

            raw, t = gguf.quants.quantize(values, Q.Q8_0), Q.Q8_0
        _rewrite(seed, dst, retype={name: (int(t), raw)})
        return "tensor:expert_type", f"{name} as {t.name}", REFUSE
    if kind == "weights":
        floats = [t for t, q, *_ in seed.tensors if q in (0, 1)]
        quants = [t for t, q, *_ in seed.tensors if q not in (0, 1, 30)]
        # NaN and inf must be refused; huge finite values give finite logits or a clean error
        which = rng.choice(["nan", "inf", "huge", "scale_inf", "scale_nan", "scale_max"])
        if which.startswith("scale") and quants:
            name = rng.choice(quants)
            qtype = mf.qtype(name)
            value = {"scale_inf": np.inf, "scale_nan": np.nan, "scale_max": 65504.0}[which]
            from harness.quant.types import F16_FIELDS, type_size

            def poison(raw, qtype=qtype, value=value):
                flat = raw.reshape(-1).copy()
                for _ in range(rng.choice([1, 1, 8, 1000])):
                    b = rng.randrange(flat.size // type_size(qtype))
                    o = b * type_size(qtype) + rng.choice(F16_FIELDS[qtype])
                    flat[o : o + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
                return flat.reshape(raw.shape)

            _rewrite(seed, dst, edit={name: poison})
            return f"weights:{which}", name, EITHER if which == "scale_max" else REFUSE
        name = rng.choice(floats)
        value = {"nan": np.nan, "inf": np.inf}.get(which, rng.choice([3.0e38, -3.0e38, 65504.0, 1e20]))

        def spoil(raw, value=value):
            dtype = np.float32 if raw.dtype == np.float32 else np.float16
            arr = raw.view(dtype).copy() if raw.dtype == np.uint8 else raw.copy()
            flat = arr.reshape(-1)
            for _ in range(rng.choice([1, 1, 8])):
                flat[rng.randrange(flat.size)] = value
            return arr

        _rewrite(seed, dst, edit={name: spoil})
        return (
            f"weights:{'huge' if which.startswith('scale') else which}",
            f"{name} = {value}",
            EITHER if which in ("huge", "scale_max") else REFUSE,
        )
    if kind == "tokenizer":
        tokens = mf.metadata["tokenizer.ggml.tokens"]
        which = rng.choice(["model", "bos", "add_bos", "duplicate", "token_text"])
        change = {
            "model": {"tokenizer.ggml.model": ("gpt2", VT.STRING)},
            "bos": {"tokenizer.ggml.bos_token_id": (rng.choice([len(tokens), 2**31, 2**32 - 1]), VT.UINT32)},
            "add_bos": {"tokenizer.ggml.add_bos_token": ("yes", VT.STRING)},
            "duplicate": {"tokenizer.ggml.tokens": (([tokens[5]] + tokens[1:], VT.STRING), VT.ARRAY)},
            "token_text": {
                "tokenizer.ggml.tokens": (
                    (tokens[:300] + ["\n\x00\u202e" + t for t in tokens[300:]], VT.STRING),
                    VT.ARRAY,
                )
            },
        }[which]
        _rewrite(seed, dst, set_keys=change)
        return f"tokenizer:{which}", which, EITHER
    if kind == "arch":
        value = rng.choice(["qwen2", "", "llama\n", "mixtral", "LLAMA"])
        _rewrite(seed, dst, set_keys={"general.architecture": (value, VT.STRING)})
        return "arch", repr(value), REFUSE
    if kind == "alignment":
        value = rng.choice([0, 3, 24, 64, 128])
        if value in (64, 128):  # laid out to it by the writer: a valid file
            _rewrite(seed, dst, set_keys={"general.alignment": (value, VT.UINT32)}, alignment=value)
            return "alignment:relaid", str(value), ACCEPT
        _rewrite(seed, dst, set_keys={"general.alignment": (value, VT.UINT32)})
        return "alignment:bad", str(value), REFUSE
    _rewrite(seed, dst, set_keys={"general.name": (rng.choice(["x", "ünïcode", "a" * 1000]), VT.STRING)})
    return "valid:rewrite", "general.name changed", ACCEPT


# ---- GGUF: running a file as a user would -------------------------------------------------------


def exercise_gguf(path: str, expect: str) -> tuple[str, str]:
    """Open, dequantize every tensor, tokenize, one CPU forward; the outcome and a message."""
    import torch

    from harness.gguf_file import open_gguf
    from harness.model.mixtral import Mixtral
    from harness.model.tokenizer import Tokenizer
    from harness.run_checks import check_logits

    warnings.simplefilter("ignore")  # llama.cpp's warnings (e.g. a special token id out of range)
    try:
        mf = open_gguf(path)
        for name in mf.tensor_names:
            values = mf.tensor(name).dequantize()
            if not torch.isfinite(values).all():
                return SILENT_WRONG, f"{name} dequantized to non-finite values without an error"
        if "tokenizer.ggml.tokens" in mf.metadata:
            Tokenizer.from_gguf(path).encode("Hello world, fuzz")
        v = mf.config.vocab_size
        tokens = [1 % v, 5 % v, 9 % v, 42 % v]
        model = Mixtral.from_gguf(path, device="cpu", max_seq_len=min(16, mf.config.context_length))
        with torch.no_grad():
            logits = model(torch.tensor(tokens[: model.max_seq_len]), 0)
        check_logits(logits, path)  # as `harness logits` and `run` do: NaN or inf is an error
    except BaseException as exc:  # noqa: BLE001
        return classify_error(exc, path)
    shape_ok = tuple(logits.shape) == (min(len(tokens), model.max_seq_len), v)
    if not shape_ok:
        return SILENT_WRONG, f"logits of shape {list(logits.shape)} for {len(tokens)} tokens, vocab {v}"
    if not torch.isfinite(logits).all():
        return SILENT_WRONG, "non-finite logits without an error"
    if expect == REFUSE:
        return SILENT_WRONG, "finite logits from a file that must be refused"
    return OK, ""


@dataclass
class Campaign:
    """Counts and the failing cases of one campaign."""

    surface: str
    command: str
    counts: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    n: int = 0

    def add(self, r: Result) -> None:
        self.n += 1
        self.counts[r.outcome] += 1
        self.by_kind.setdefault(r.case.kind, Counter())[r.outcome] += 1
        if r.outcome in FAILURES:
            self.failures.append(r.to_dict())
        elif r.outcome == CLEAN:
            ex = self.examples.setdefault(r.case.kind, [])
            if len(ex) < 2:
                ex.append(r.message[:300])

    def to_dict(self) -> dict[str, Any]:
        return {
            "surface": self.surface,
            "command": self.command,
            "cases": self.n,
            "seconds": round(self.seconds, 1),
            "outcomes": {o: self.counts.get(o, 0) for o in OUTCOMES},
            "by_kind": {k: {o: c[o] for o in OUTCOMES if c[o]} for k, c in sorted(self.by_kind.items())},
            "failures": self.failures[:200],
            "clean_error_examples": self.examples,
        }


def make_seeds(work: Path) -> list[Seed]:
    """Tiny seed models: merged Q4_K_M with an F32 router, per-expert with an F16 router (the
    TheBloke layout), a dense Q8_0 llama, and a dense IQ1_M one (the f16 scale spread over
    nibbles: byte flips reach it)."""
    from harness.gguf_file import PRESETS
    from harness.synth import synthesize

    work.mkdir(parents=True, exist_ok=True)
    tiny = PRESETS["tiny"]
    paths = [
        synthesize(work / "seed-merged.gguf", "tiny", file_type="Q4_K_M", layout="merged", seed=1),
        synthesize(
            work / "seed-per-expert.gguf",
            "tiny",
            file_type="Q4_K_S",
            layout="per-expert",
            router="f16",
            seed=2,
        ),
        synthesize(
            work / "seed-dense.gguf",
            tiny.replace(expert_count=0, expert_used_count=0, block_count=1),
            file_type="Q8_0",
            seed=3,
        ),
        synthesize(
            work / "seed-iq1_m.gguf",
            tiny.replace(expert_count=0, expert_used_count=0, block_count=1),
            file_type="IQ1_M",
            seed=4,
        ),
    ]
    seeds = [load_seed(p) for p in paths]
    from harness.gguf_file import open_gguf

    for s in seeds:
        _NEEDED_NAMES_CACHE[str(s.path)] = set(open_gguf(s.path).expected_tensors())
    return seeds


def gguf_cases(seeds: list[Seed], n: int, seed: int, work: Path, start: int = 0) -> Iterator[Case]:
    """Mutated GGUF files `start` to `start + n` (about a third semantic), each written to
    `work` when it is run; case i depends only on `seed` and i."""
    for i in range(start, start + n):
        rng = random.Random(f"gguf:{seed}:{i}")
        s = seeds[i % len(seeds)]
        dst = work / f"case-{i % 64}.gguf"
        data = None
        if rng.random() < 0.35:
            try:
                kind, detail, expect = semantic(s, rng, dst)
            except Exception:  # noqa: BLE001 - gguf's writer refused the mutation: a structural one instead
                data = None
                kind = None
        else:
            kind = None
        if kind is None:
            kind, detail, expect, data = structural(s, rng)
        if data is not None:
            dst.write_bytes(data)
        yield Case(i, kind, f"{s.path.name}: {detail}", expect, path=str(dst))


def run_gguf_campaign(
    n: int,
    seed: int,
    work: Path,
    timeout: float = 60.0,
    memory_bytes: int = 2 << 30,
    command: str = "",
    progress: Callable[[int], None] | None = None,
    start: int = 0,
) -> Campaign:
    """Run GGUF cases `start` to `start + n` of campaign `seed`, with `work` as scratch."""
    import torch

    # One thread, set before any parallel op: forked children never inherit a busy OpenMP pool,
    # and the campaign keeps to one core.
    torch.set_num_threads(1)
    seeds = make_seeds(work / "seeds")
    camp = Campaign("gguf", command)
    t0 = time.monotonic()
    for case in gguf_cases(seeds, n, seed, work, start):
        start = time.monotonic()
        outcome, message = run_isolated(lambda c=case: exercise_gguf(c.path, c.expect), timeout, memory_bytes)
        camp.add(Result(case, outcome, message, time.monotonic() - start))
        if progress:
            progress(case.index)
    camp.seconds = time.monotonic() - t0
    return camp


# ---- YAML cases -----------------------------------------------------------------------------------

MINIMAL_CASE = """description: a minimal case
model:
  synth: tiny
  type: Q4_K_M
  layout: per-expert
  router: f16
device: cuda
tokens: [1, 5, 9]
expect:
  verdict: clean
"""

# (text spliced in as a value, must the loader refuse it?)
YAML_VALUES = [
    ("!!set {1, 2}", True),
    ("!!binary aGVsbG8=", True),
    ("!!python/object:os.system x", True),
    ("!custom 3", True),
    ("2024-01-01", True),  # a date: not plain YAML
    ("9" * 5000, True),
    ("9" * 30, None),
    ("[" * 3000 + "]" * 3000, True),
    ("[" * 40 + "]" * 40, None),
    ("{a: {b: {c: {d: 1}}}}", None),
    (".nan", None),
    ("-.inf", None),
    ("null", None),
    ("''", None),
    ("'" + "x" * 100000 + "'", None),
    ("*undefined", True),
    ("&a [*a]", True),
    ("[1, 2, 3", True),
    ("{a: 1, a: 2}", None),
    ("-1", None),
    ("0x7fffffffffffffff", None),
    ("1e400", None),
    ("yes", None),
    ("'\\u0000'", None),
]
SYNTH_SIZES = [
    ("expert_count", 2**40),
    ("block_count", 2**63),
    ("block_count", 2**31),
    ("vocab_size", 2**32),
    ("embedding_length", 2**31),
    ("feed_forward_length", 2**40),
    ("head_count", 0),
    ("rms_eps", ".nan"),
    ("rope_freq_base", "-1.0"),
    ("rope_freq_base", ".inf"),
    ("expert_used_count", 2**40),
    ("context_length", 2**70),
]


def yaml_case(rng: random.Random, bases: list[str]) -> tuple[str, str, str, bytes]:
    """(kind, detail, expect, bytes) of one mutated YAML case file."""
    base = rng.choice(bases)
    lines = base.splitlines(keepends=True)
    kind = rng.choice(
        ["value", "value", "synth_size", "control", "utf8", "truncate", "flip", "lines", "laughs"]
    )
    if kind == "value":
        text, bad = rng.choice(YAML_VALUES)
        key = rng.choice(
            ["tokens", "description", "device", "decode", "seed", "fault", "expect", "model", "new_key"]
        )
        doc = re_set(base, key, text)
        return "yaml:value", f"{key}: {text[:40]}", REFUSE if bad else EITHER, doc.encode()
    if kind == "synth_size":
        key, value = rng.choice(SYNTH_SIZES)
        doc = base.replace("  synth: tiny\n", f"  synth: {{preset: tiny, {key}: {value}}}\n")
        if doc == base:
            doc = MINIMAL_CASE.replace("  synth: tiny\n", f"  synth: {{preset: tiny, {key}: {value}}}\n")
        return "yaml:synth_size", f"{key}: {value}", REFUSE, doc.encode()
    if kind == "control":
        char = rng.choice(["\x00", "\x01", "\x07", "\x1b", "\x7f", "\ufffe", "\x85", "\u2028"])
        i = rng.randrange(len(base))
        must = char in "\x00\x01\x07\x1b\x7f\ufffe"
        return (
            "yaml:control",
            f"{char!r} at {i}",
            REFUSE if must else EITHER,
            (base[:i] + char + base[i:]).encode(),
        )
    if kind == "utf8":
        data = base.encode()
        i = rng.randrange(len(data))
        bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        return "yaml:utf8", f"{bad!r} at byte {i}", REFUSE, data[:i] + bad + data[i:]
    if kind == "truncate":
        i = rng.randrange(len(base))
        return "yaml:truncate", f"at {i}", EITHER, base[:i].encode()
    if kind == "flip":
        data = bytearray(base.encode())
        for _ in range(rng.choice([1, 2, 4])):
            data[rng.randrange(len(data))] = rng.randrange(32, 127)
        return "yaml:flip", "printable bytes", EITHER, bytes(data)
    if kind == "lines":
        i = rng.randrange(len(lines))
        op = rng.choice(["dup", "del", "indent", "dedent"])
        if op == "dup":
            lines.insert(i, lines[i])
        elif op == "del":
            del lines[i]
        elif op == "indent":
            lines[i] = "  " + lines[i]
        else:
            lines[i] = lines[i].lstrip()
        return "yaml:lines", f"{op} line {i + 1}", EITHER, "".join(lines).encode()
    # aliases that expand exponentially
    laughs = "x: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"x{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 10)}]\n" for i in range(8)
    )
    return "yaml:laughs", "10^9 values through aliases", REFUSE, (base + laughs).encode()


def re_set(doc: str, key: str, text: str) -> str:
    """`doc` with the top-level `key` set to the YAML `text` (added when absent)."""
    out, skipping, done = [], False, False
    for line in doc.splitlines(keepends=True):
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        if line.startswith(f"{key}:") and not done:
            out.append(f"{key}: {text}\n")
            skipping, done = True, True
            continue
        out.append(line)
    if not done:
        out.append(f"{key}: {text}\n")
    return "".join(out)


def exercise_yaml(path: str, expect: str) -> tuple[str, str]:
    from harness.cases import load_case
    from harness.errors import HarnessError

    try:
        load_case(path)
    except BaseException as exc:  # noqa: BLE001
        outcome, message = classify_error(exc, None)
        if outcome == CLEAN or (outcome == UNCLEAR and isinstance(exc, HarnessError)):
            text = str(exc)
            named = path in text and "\n" not in text
            has_place = getattr(exc, "line", None) is not None or bool(getattr(exc, "key", None) or exc.field)
            return (CLEAN, text) if named and has_place else (UNCLEAR, text)
        return outcome, message
    if expect == REFUSE:
        return SILENT_WRONG, "accepted a case that must be refused"
    return OK, ""


def yaml_bases() -> list[str]:
    here = Path(__file__).resolve().parent.parent / "cases"
    bases = [p.read_text() for p in sorted(here.glob("*.yaml"))] if here.is_dir() else []
    return bases + [MINIMAL_CASE]


def run_yaml_campaign(
    n: int, seed: int, work: Path, timeout: float = 30.0, memory_bytes: int = 1 << 30, command: str = ""
) -> Campaign:
    work.mkdir(parents=True, exist_ok=True)
    bases = yaml_bases()
    camp = Campaign("yaml", command)
    t0 = time.monotonic()
    for i in range(n):
        rng = random.Random(f"yaml:{seed}:{i}")
        kind, detail, expect, data = yaml_case(rng, bases)
        path = work / f"case-{i % 64}.yaml"
        path.write_bytes(data)
        case = Case(i, kind, detail, expect, path=str(path))
        outcome, message = run_isolated(lambda c=case: exercise_yaml(c.path, c.expect), timeout, memory_bytes)
        camp.add(Result(case, outcome, message))
    camp.seconds = time.monotonic() - t0
    return camp


# ---- CLI arguments --------------------------------------------------------------------------------


@dataclass
class CliWorld:
    """Files a CLI campaign points at: a model, a trace, a FIFO, a folder, a text file."""

    root: Path
    model: Path
    trace: Path
    fifo: Path
    folder: Path
    text: Path

    @classmethod
    def make(cls, root: Path, model: Path) -> CliWorld:
        root.mkdir(parents=True, exist_ok=True)
        fifo = root / "fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        folder = root / "folder"
        folder.mkdir(exist_ok=True)
        text = root / "text.txt"
        text.write_text("not a model\n")
        trace = root / "trace.jsonl"
        if not trace.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "harness",
                    "trace",
                    str(model),
                    "--device",
                    "cpu",
                    "-o",
                    str(trace),
                ],
                check=False,
                capture_output=True,
                env={**os.environ, "PYTHONPATH": _package_root()},
                timeout=300,
            )
        return cls(root, model, trace, fifo, folder, text)

    def inputs(self) -> list[tuple[str, bool]]:
        """(an input path, must it be refused?)"""
        return [
            (str(self.model), False),
            ("", True),
            ("/dev/zero", True),
            ("/dev/null", True),
            (str(self.fifo), True),
            (str(self.folder), True),
            (str(self.root / "absent.gguf"), True),
            (str(self.text), True),
        ]

    def outputs(self, suffix: str) -> list[tuple[str, bool]]:
        return [
            (str(self.root / f"out{suffix}"), False),
            ("", True),
            (str(self.folder), True),
            (str(self.root / "absent" / f"out{suffix}"), True),
            (str(self.fifo), True),
            ("/dev/full", True),
        ]


INTS = [
    ("0", None),
    ("1", False),
    ("4", False),
    ("-1", True),
    (str(2**31), None),
    (str(2**64), True),
    ("", True),
    ("abc", True),
    ("1e3", True),
    ("nan", True),
    ("٣", None),
    ("+2", None),
]
FLOATS = [
    ("0", False),
    ("0.7", False),
    ("1", False),
    ("-1", True),
    ("nan", True),
    ("inf", True),
    ("-inf", True),
    ("1e309", True),
    ("", True),
    ("x", True),
    ("2", None),
]
DEVICES = [
    ("cpu", False),
    ("", True),
    ("meta", True),
    ("cuda:99", True),
    ("cuda:-1", True),
    ("CPU", None),
    ("xpu", True),
    ("cpu:0", None),
    ("emulated", None),
]
TOKENS = [
    ("1,2,3", False),
    ("", True),
    (",", True),
    ("1,,2", True),
    ("-1", True),
    ("99999999", True),
    (str(2**70), True),
    ("a", True),
    ("1 2", None),
    (" 1", None),
]
# (no NUL: exec cannot pass one in an argument, so no user can)
TEXTS = [("hello", False), ("", None), ("\x01\x1b[2J", None), ("é" * 2000, None), ("\u202e\n", None)]
FAULTS = [("candle-1815", False), ("", True), ("no-such-fault", True)]


def cli_argv(rng: random.Random, w: CliWorld) -> tuple[str, str, list[str], str]:
    """(kind, detail, argv, expect): one subcommand with one argument set to an edge value."""
    model = str(w.model)
    out = lambda s: str(w.root / f"out{s}")  # noqa: E731
    commands: dict[str, Callable[[], dict[str, Any]]] = {
        "inspect": lambda: {"model": w.inputs()},
        "tokenize": lambda: {"model": w.inputs(), "text": TEXTS},
        "logits": lambda: {
            "model": w.inputs(),
            "--tokens": TOKENS,
            "--out": w.outputs(".npy"),
            "--device": DEVICES,
        },
        "run": lambda: {
            "model": w.inputs(),
            "--prompt": TEXTS,
            "--max-tokens": [(v, bad) for v, bad in INTS if v != "-1"]
            + [("-2", True)],  # -1: to the context's end
            "--temperature": FLOATS,
            "--top-p": FLOATS + [("1.5", True), ("0", None)],
            "--seed": INTS,
            "--device": DEVICES,
        },
        "trace": lambda: {
            "model": w.inputs(),
            "--tokens": TOKENS,
            "--device": DEVICES,
            "--decode": INTS,
            "-o": w.outputs(".jsonl"),
            "--report": w.outputs(".html"),
            "--fault": FAULTS,
        },
        "report": lambda: {"traces": [(str(w.trace), False), *w.inputs()[1:]], "-o": w.outputs(".html")},
        "synth": lambda: {
            "out": w.outputs(".gguf"),
            "--seed": INTS,
            "--type": [("Q8_0", False), ("", True), ("IQ1_S", False), ("Q8_K", True)],
        },
        "cases": lambda: {
            "paths": [(str(w.folder), True), (str(w.fifo), True), ("/dev/zero", True), ("", True)],
            "--out-dir": w.outputs("-dir"),
        },
    }
    defaults = {
        "inspect": [model],
        "tokenize": [model, "hello"],
        "logits": [model, "--tokens", "1,2,3", "--out", out(".npy")],
        "run": [model, "--prompt", "hello", "--max-tokens", "2"],
        "trace": [model, "--device", "cpu", "--tokens", "1,2", "-o", out(".jsonl")],
        "report": [str(w.trace), "-o", out(".html")],
        "synth": [out(".gguf"), "--type", "Q8_0", "--force"],
        "cases": [str(w.folder / "none.yaml"), "--out-dir", out("-dir")],
    }
    name = rng.choice(list(commands))
    options = commands[name]()
    target = rng.choice(list(options))
    value, bad = rng.choice(options[target])
    argv = [name, *defaults[name]]
    positional = not target.startswith("-")
    if positional:
        pos = {"model": 0, "out": 0, "traces": 0, "paths": 0, "text": 1}[target]
        argv[1 + pos] = value
    elif target in argv:
        argv[argv.index(target) + 1] = value
    else:
        argv += [target, value]
    if name == "cases" and target == "--out-dir":
        argv[1] = str(w.folder / "none.yaml")
    expect = REFUSE if bad else ACCEPT if bad is False else EITHER
    if name == "cases" and target == "--out-dir" and not bad:
        expect = EITHER  # no case file: exit 2 naming the path is right
    return f"cli:{name} {target}", f"{target}={value[:40]!r}", argv, expect


def exercise_cli(
    argv: list[str], expect: str, timeout: float, memory_bytes: int, cwd: Path
) -> tuple[str, str]:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    # HARNESS_TRACEBACK: a bug of the harness shows as the traceback it is, not as exit 3.
    env = {**os.environ, "HARNESS_TRACEBACK": "1", "PYTHONPATH": _package_root()}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "harness", *argv],
            capture_output=True,
            timeout=timeout,
            preexec_fn=cap,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return HANG, f"no exit within {timeout:g} s"
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode < 0:
        sig = -proc.returncode
        killed = sig in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT)
        return (OOM if killed else TRACEBACK), f"killed by signal {sig}: {err[-300:]}"
    if "Traceback (most recent call last)" in err or "internal error" in err:
        return (OOM if "MemoryError" in err else TRACEBACK), err[-1500:]
    if "MemoryError" in err or "RecursionError" in err:
        return OOM, err[-500:]
    if proc.returncode == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if len(lines) != 1:
            return UNCLEAR, f"{len(lines)} lines on stderr: {err[-500:]!r}"
        return CLEAN, lines[0]
    if proc.returncode in (0, 1, 3):  # clean, found a problem, not judged
        if expect == REFUSE:
            return (
                SILENT_WRONG,
                f"exit {proc.returncode} for an argument that must be refused; stderr {err[-200:]!r}",
            )
        return OK, ""
    return UNCLEAR, f"exit {proc.returncode}: {err[-300:]!r}"


def _package_root() -> str:
    """The folder holding this `harness` package, so children import this copy of it."""
    return str(Path(__file__).resolve().parent.parent)


def run_cli_campaign(
    n: int,
    seed: int,
    work: Path,
    model: Path,
    timeout: float = 120.0,
    memory_bytes: int = 6 << 30,
    command: str = "",
) -> Campaign:
    w = CliWorld.make(work, model)
    camp = Campaign("cli", command)
    t0 = time.monotonic()
    for i in range(n):
        rng = random.Random(f"cli:{seed}:{i}")
        kind, detail, argv, expect = cli_argv(rng, w)
        case = Case(i, kind, detail, expect, argv=argv)
        outcome, message = exercise_cli(argv, expect, timeout, memory_bytes, work)
        camp.add(Result(case, outcome, message))
    camp.seconds = time.monotonic() - t0
    return camp


def format_table(tables: list[dict[str, Any]]) -> str:
    """The outcome counts of campaigns (their `to_dict()`s) as a Markdown table."""
    head = "| surface | cases | " + " | ".join(OUTCOMES) + " |"
    rows = [head, "|" + " --- |" * (len(OUTCOMES) + 2)]
    for t in tables:
        counts = " | ".join(str(t["outcomes"][o]) for o in OUTCOMES)
        rows.append(f"| {t['surface']} | {t['cases']} | {counts} |")
    return "\n".join(rows)
