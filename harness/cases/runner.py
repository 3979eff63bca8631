"""YAML regression cases: the schema, a loader whose errors name the file, the key and the line,
and a runner that traces each case and compares the verdict and first offence with what it expects.

A case file (`cases/candle-1815-mixtral-router.yaml`):

    description: candle#1815, the MoE router left on the CPU
    model:
      synth: tiny                 # a preset, or {preset: tiny, block_count: 3, ...} (MixtralConfig fields)
      type: Q4_K_M                # a file type of harness.synth.FILE_TYPES       (default Q4_K_M)
      layout: per-expert          # merged | per-expert                            (default merged)
      router: f16                 # f16 | f32                                      (default f32)
      seed: 0                     # non-negative integer                           (default 0)
    device: cuda                  # cpu | cuda | cuda:N                            (default cuda)
    fault: candle-1815            # a name of harness.faults.CATALOG, or null      (default null)
    tokens: [1, 5, 9, 260, 42]    # or `prompt: some text` (tokenized with the model's vocabulary)
    expect:
      verdict: dirty              # clean | dirty
      class: mismatch             # of the first offence: mismatch | sync | stray  (only for dirty)
      module: layers.0.moe.router # its module path (a string, or null for "none")  (only for dirty)
      tensor: blk.0.ffn_gate_inp.weight  # its GGUF tensor (a string, or null)     (only for dirty)

Keys, all but `model`, `expect` and one of `tokens`/`prompt` optional:
- `name` (default: the file's stem), `description` (text);
- `model`: `synth` as above, or `path:` a GGUF file, relative to the case file or absolute, with
  `~` and environment variables (`${HARNESS_GGUF}`, `$HOME/m.gguf`) expanded when the case runs
  (a variable that is not set skips the case); `type`/`layout`/`router`/`seed` only with `synth`;
- the placement: `device`, or `device_map` (`{embed: cuda:0, layers.0-1: cuda:0, head: cuda:1}`),
  or `n_gpu_layers: N` (llama.cpp's partial offload; `device` then names the GPU); `device_map`
  excludes the other two;
- `accelerator`: `auto` (real CUDA when this machine has the CUDA devices the placement names,
  else the emulated accelerator of `harness.trace.emulated`), `emulated`, or `real` (skipped where
  there is no GPU). The emulated accelerator has as many devices as the placement names, at least 2;
- `strategy`: QMatMul strategy, quantized | f32 | f16 (default quantized);
- `fault`: injected after loading (`Fault.inject`), removed after the run;
- `decode`: greedy decode steps traced after the prefill (default 0);
- `expect`: `verdict` is required; `class`, `module` and `tensor` are compared exactly when given.

Bad input raises `CaseError` (a `HarnessError`) naming file, line and key path:
`cases/foo.yaml:12: expect.module: expected a string or null, got a list`. Unknown keys, wrong
types, bad enum values, duplicate keys, `device` with `device_map`, a missing `expect`, an unknown
fault, and malformed YAML (with the YAML parser's line) are found when the file is loaded; what
only the model can tell (a fault that does not apply to the placement, a token outside the
vocabulary, a missing GGUF file) when the case runs, still with the line of the key responsible.

`run_case(case)` synthesizes the model into a cache (a temporary directory per process unless
`cache_dir` is given; cases sharing synth parameters share one file), loads it under the
accelerator, injects the fault, traces the prefill and decode steps to
`<out_dir>/<name>.jsonl` (default `reports/cases`) and compares. A forward that raises (a real
device mismatch) is still a traced, dirty run: the error is caught and kept in `raised`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import (
    GGUFFormatError,
    GGUFMetadataError,
    GGUFTensorError,
    HarnessError,
    UnsupportedTypeError,
    UsageError,
)
from harness.gguf_file import PRESETS, MixtralConfig

__all__ = [
    "ACCELERATORS",
    "CASE_SUFFIXES",
    "DEFAULT_OUT_DIR",
    "Case",
    "CaseError",
    "CaseResult",
    "Expect",
    "ModelSpec",
    "SynthSpec",
    "find_case_files",
    "load_case",
    "load_cases",
    "model_file",
    "parse_case",
    "run_case",
]

CASE_SUFFIXES = (".yaml", ".yml")
ACCELERATORS = ("auto", "emulated", "real")
VERDICTS = ("clean", "dirty")
OFFENCE_CLASSES = ("mismatch", "sync", "stray")
OFFENCE_FIELDS = ("class", "module", "tensor")
STRATEGIES = ("quantized", "f32", "f16")
LAYOUTS = ("merged", "per-expert")
ROUTERS = ("f32", "f16")
DEFAULT_OUT_DIR = "reports/cases"
MIN_EMULATED_DEVICES = 2

TOP_KEYS = (
    "name",
    "description",
    "model",
    "device",
    "device_map",
    "n_gpu_layers",
    "accelerator",
    "strategy",
    "fault",
    "tokens",
    "prompt",
    "decode",
    "expect",
)
MODEL_KEYS = ("synth", "path", "type", "layout", "router", "seed")
EXPECT_KEYS = ("verdict", *OFFENCE_FIELDS)
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_MAP_KEY = re.compile(r"^(embed|head|layers\.\d+(-\d+)?)$")
_ENV = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class CaseError(HarnessError):
    """A case file that is not a valid case. The message is `file:line: key.path: problem`.

    `path` is the file, `line` the 1-based line (None where there is none), `key` the key path."""

    def __init__(self, path: str | os.PathLike, line: int | None, key: str | None, problem: str):
        file = os.fspath(path)
        super().__init__(f"{file}:{line}" if line else file, key, problem)
        self.path = file
        self.line = line
        self.key = key


# ---- YAML with lines -------------------------------------------------------------------------------


class _Map(dict):
    """A YAML mapping: `line` where it starts, `key_lines`/`value_lines` per key, `duplicates`."""

    line: int = 1

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}
        self.value_lines: dict[Any, int] = {}
        self.duplicates: list[tuple[Any, int]] = []


class _Seq(list):
    """A YAML sequence: `line` where it starts, `item_lines` per item."""

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


def _yaml_text(path: Path, shown: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CaseError(shown, None, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CaseError(shown, None, None, f"cannot read: {exc.strerror or exc}") from None


def _compose(text: str, shown: str) -> Any:
    """The document as plain values (_Map, _Seq, scalars) carrying their lines.

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
                m = _Map(line)
                own_keys: set = set()
                for i, (key_node, value_node) in enumerate(n.value):
                    key = build(key_node, seen)
                    if isinstance(key, (_Map, _Seq)):
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
                s = _Seq(line)
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


# ---- the schema ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSpec:
    """A synthetic model: `harness.synth.synthesize(path, config, file_type, layout, router, seed)`."""

    config: MixtralConfig
    file_type: str = "Q4_K_M"
    layout: str = "merged"
    router: str = "f32"
    seed: int = 0
    preset: str = "tiny"

    def key(self) -> str:
        """A file name for the cache: readable parameters and a hash of the whole config."""
        blob = json.dumps(
            [dataclasses.asdict(self.config), self.file_type, self.layout, self.router, self.seed],
            sort_keys=True,
        )
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return f"{self.preset}-{self.file_type}-{self.layout}-{self.router}-s{self.seed}-{digest}"


@dataclass(frozen=True)
class ModelSpec:
    """`synth` (a SynthSpec) or `path` (as written in the case, resolved against `base_dir`)."""

    synth: SynthSpec | None = None
    path: str | None = None
    base_dir: Path = Path(".")

    def unset_variables(self) -> list[str]:
        """Environment variables `path` names that are not set."""
        if self.path is None:
            return []
        return [a or b for a, b in _ENV.findall(self.path) if (a or b) not in os.environ]

    def resolved_path(self) -> Path:
        """`path` with `~` and environment variables expanded, relative to the case file's
        directory. A variable that is not set: KeyError naming it (see `unset_variables`)."""
        if self.path is None:
            raise ValueError("a synth model has no path; see harness.cases.model_file")
        missing = self.unset_variables()
        if missing:
            raise KeyError(missing[0])
        text = _ENV.sub(lambda m: os.environ[m[1] or m[2]], self.path)
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.base_dir / p


_UNSET = object()


@dataclass(frozen=True)
class Expect:
    """`verdict`, and `first` the first-offence fields given (class, module, tensor) -> value."""

    verdict: str
    first: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One parsed case. `lines` maps key paths (`expect.module`, `device_map`) to their line."""

    name: str
    file: Path
    model: ModelSpec
    expect: Expect
    description: str = ""
    device: str | None = None
    device_map: dict[str, str] | None = None
    n_gpu_layers: int | None = None
    accelerator: str = "auto"
    strategy: str = "quantized"
    fault: str | None = None
    tokens: tuple[int, ...] | None = None
    prompt: str | None = None
    decode: int = 0
    shown_as: str = ""
    lines: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def line(self, key: str) -> int | None:
        """The line of a key path, or of its nearest parent that has one."""
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key.rpartition(".")[0]
        return self.lines.get("", 1)

    def error(self, key: str, problem: str) -> CaseError:
        return CaseError(self.shown_as or self.file, self.line(key), key, problem)

    @property
    def placement_key(self) -> str:
        """The key that gives the placement: device_map, n_gpu_layers or device."""
        if self.device_map is not None:
            return "device_map"
        return "n_gpu_layers" if self.n_gpu_layers is not None else "device"

    def cuda_indices(self) -> list[int]:
        """The CUDA device indices the placement names (empty: everything on the CPU)."""
        specs: list[str] = []
        if self.device_map is not None:
            specs = list(self.device_map.values())
        elif self.n_gpu_layers is not None:
            specs = [self.device or "cuda"] if self.n_gpu_layers > 0 else []
        else:
            specs = [self.device or "cuda"]
        return sorted({int(s.partition(":")[2] or 0) for s in specs if s.startswith("cuda")})


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


class _Parser:
    """Reads a composed document into a Case, recording the line of every key path."""

    def __init__(self, shown: str):
        self.shown = shown
        self.lines: dict[str, int] = {}

    def error(self, line: int | None, key: str | None, problem: str) -> CaseError:
        return CaseError(self.shown, line, key, problem)

    def mapping(self, value: Any, key: str, line: int, allowed: Iterable[str]) -> _Map:
        """`value` must be a mapping with only `allowed` keys, none twice."""
        if not isinstance(value, _Map):
            raise self.error(line, key or None, f"expected a mapping, got {_kind(value)}")
        allowed = tuple(allowed)
        for k, kline in value.duplicates:
            raise self.error(kline, _join(key, k), "duplicate key")
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(allowed)})"
                raise self.error(value.key_lines[k], _join(key, k), f"unknown key{hint}")
        for k in value:
            self.lines[_join(key, k)] = value.value_lines[k]
        return value

    def required(self, m: _Map, key: str, k: str, why: str = "") -> Any:
        if k not in m:
            raise self.error(m.line, _join(key, k), f"missing{why}")
        return m[k]

    def string(self, m: _Map, key: str, k: str, default: Any = _UNSET, nullable: bool = False) -> Any:
        if k not in m:
            return default
        v = m[k]
        if v is None and nullable:
            return None
        if not isinstance(v, str):
            want = "a string or null" if nullable else "a string"
            raise self.error(m.value_lines[k], _join(key, k), f"expected {want}, got {_kind(v)}")
        return v

    def enum(self, m: _Map, key: str, k: str, choices: Iterable[str], default: Any = _UNSET) -> Any:
        v = self.string(m, key, k, default)
        choices = tuple(choices)
        if k in m and v not in choices:
            raise self.error(m.value_lines[k], _join(key, k), f"{v!r} is not one of: {', '.join(choices)}")
        return v

    def integer(self, m: _Map, key: str, k: str, default: Any = _UNSET, minimum: int = 0) -> Any:
        if k not in m:
            return default
        v = m[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(m.value_lines[k], _join(key, k), f"expected an integer, got {_kind(v)}")
        if v < minimum:
            raise self.error(m.value_lines[k], _join(key, k), f"must be at least {minimum}, got {v}")
        return v

    def device(self, value: Any, key: str, line: int) -> str:
        if not isinstance(value, str):
            raise self.error(line, key, f"expected a device name (cpu, cuda, cuda:N), got {_kind(value)}")
        if not _DEVICE.match(value.strip()):
            raise self.error(line, key, f"{value!r} is not a device name (cpu, cuda, cuda:N)")
        return value.strip()

    # -- sections --------------------------------------------------------------------------------

    def model(self, doc: _Map, base_dir: Path) -> ModelSpec:
        m = self.mapping(self.required(doc, "", "model"), "model", doc.value_lines["model"], MODEL_KEYS)
        if ("synth" in m) == ("path" in m):
            raise self.error(
                m.line, "model", "give exactly one of 'synth' (a synthetic model) and 'path' (a GGUF file)"
            )
        if "path" in m:
            for k in ("type", "layout", "router", "seed"):
                if k in m:
                    raise self.error(
                        m.key_lines[k], f"model.{k}", "only with model.synth (a path gives a whole file)"
                    )
            path = self.string(m, "model", "path")
            if not path.strip():
                raise self.error(m.value_lines["path"], "model.path", "the path is empty")
            return ModelSpec(path=path, base_dir=base_dir)
        return ModelSpec(synth=self.synth(m))

    def synth(self, m: _Map) -> SynthSpec:
        from harness.synth import FILE_TYPES, plan, resolve_config

        line = m.value_lines["synth"]
        raw = m["synth"]
        fields = {f.name: f for f in dataclasses.fields(MixtralConfig)}
        if isinstance(raw, str):
            raw_map = _Map(line)
            raw_map["preset"] = raw
            raw_map.key_lines["preset"] = raw_map.value_lines["preset"] = line
        else:
            raw_map = self.mapping(raw, "model.synth", line, ("preset", *fields))
        preset = self.enum(raw_map, "model.synth", "preset", PRESETS, "tiny")
        overrides: dict[str, Any] = {}
        for k in raw_map:
            if k == "preset":
                continue
            v, vline, key = raw_map[k], raw_map.value_lines[k], f"model.synth.{k}"
            annotation = str(fields[k].type)
            if annotation == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                want = "a number"
            elif "None" in annotation:
                ok = v is None or (isinstance(v, int) and not isinstance(v, bool))
                want = "an integer or null"
            else:
                ok = isinstance(v, int) and not isinstance(v, bool)
                want = "an integer"
            if not ok:
                raise self.error(vline, key, f"expected {want}, got {_kind(v)}")
            overrides[k] = float(v) if annotation == "float" else v
        config = PRESETS[preset].replace(**overrides)
        spec = SynthSpec(
            config=config,
            file_type=self.enum(m, "model", "type", FILE_TYPES, "Q4_K_M"),
            layout=self.enum(m, "model", "layout", LAYOUTS, "merged"),
            router=self.enum(m, "model", "router", ROUTERS, "f32"),
            seed=self.integer(m, "model", "seed", 0),
            preset=preset,
        )
        try:
            resolve_config(config)
            plan(config, spec.file_type, spec.layout, spec.router)
        except UsageError as exc:
            where = (exc.field or "").removeprefix("config.")
            key = f"model.synth.{where}" if where in fields else "model.synth"
            raise self.error(self.lines.get(key, line), key, exc.problem) from None
        return spec

    def expect(self, doc: _Map) -> Expect:
        raw = self.required(
            doc, "", "expect", " (every case says what it expects, e.g. expect: {verdict: clean})"
        )
        m = self.mapping(raw, "expect", doc.value_lines["expect"], EXPECT_KEYS)
        verdict = self.enum(m, "expect", "verdict", VERDICTS)
        if verdict is _UNSET:
            raise self.error(m.line, "expect.verdict", "missing (clean or dirty)")
        first: dict[str, str | None] = {}
        for k in OFFENCE_FIELDS:
            if k not in m:
                continue
            if verdict == "clean":
                raise self.error(
                    m.key_lines[k], f"expect.{k}", "only with verdict: dirty (a clean run has no offence)"
                )
            if k == "class":
                first[k] = self.enum(m, "expect", k, OFFENCE_CLASSES)
            else:
                first[k] = self.string(m, "expect", k, nullable=True)
        return Expect(verdict, first)

    def case(self, doc: Any, file: Path) -> Case:
        if doc is None:
            raise self.error(1, None, "the file is empty (a case is a mapping with model, tokens and expect)")
        doc = self.mapping(doc, "", 1, TOP_KEYS)
        self.lines[""] = doc.line
        name = self.string(doc, "", "name", file.stem)
        if not name.strip():
            raise self.error(doc.value_lines["name"], "name", "the name is empty")
        description = self.string(doc, "", "description", "")
        model = self.model(doc, file.parent)

        if "device" in doc and "device_map" in doc:
            raise self.error(doc.key_lines["device_map"], "device_map", "give device or device_map, not both")
        if "device_map" in doc and "n_gpu_layers" in doc:
            raise self.error(
                doc.key_lines["n_gpu_layers"], "n_gpu_layers", "give device_map or n_gpu_layers, not both"
            )
        device = None
        if "device" in doc:
            device = self.device(doc["device"], "device", doc.value_lines["device"])
        device_map = None
        if "device_map" in doc:
            line = doc.value_lines["device_map"]
            raw = doc["device_map"]
            if not isinstance(raw, _Map):
                raise self.error(
                    line, "device_map", f"expected a mapping of parts to devices, got {_kind(raw)}"
                )
            for k, kline in raw.duplicates:
                raise self.error(kline, f"device_map.{k}", "duplicate key")
            device_map = {}
            for k, v in raw.items():
                key = f"device_map.{k}"
                if not isinstance(k, str) or not _MAP_KEY.match(k):
                    raise self.error(raw.key_lines[k], key, "keys are embed, head, layers.N or layers.A-B")
                self.lines[key] = raw.value_lines[k]
                device_map[k] = self.device(v, key, raw.value_lines[k])
            if not device_map:
                raise self.error(line, "device_map", "the device map is empty")
        n_gpu_layers = self.integer(doc, "", "n_gpu_layers", None)
        accelerator = self.enum(doc, "", "accelerator", ACCELERATORS, "auto")
        strategy = self.enum(doc, "", "strategy", STRATEGIES, "quantized")

        fault = self.string(doc, "", "fault", None, nullable=True)
        if fault is not None:
            from harness import faults

            if fault not in faults.CATALOG:
                close = difflib.get_close_matches(fault, list(faults.CATALOG), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise self.error(
                    doc.value_lines["fault"],
                    "fault",
                    f"unknown fault {fault!r} ({hint}known faults: {', '.join(faults.CATALOG)})",
                )

        if "tokens" in doc and "prompt" in doc:
            raise self.error(doc.key_lines["prompt"], "prompt", "give tokens or prompt, not both")
        if "tokens" not in doc and "prompt" not in doc:
            raise self.error(doc.line, "tokens", "missing: give tokens (a list of ids) or prompt (text)")
        tokens = prompt = None
        if "tokens" in doc:
            raw, line = doc["tokens"], doc.value_lines["tokens"]
            if not isinstance(raw, _Seq):
                raise self.error(line, "tokens", f"expected a list of token ids, got {_kind(raw)}")
            if not raw:
                raise self.error(line, "tokens", "the token list is empty")
            for i, (t, tline) in enumerate(zip(raw, raw.item_lines, strict=True)):
                if isinstance(t, bool) or not isinstance(t, int):
                    raise self.error(
                        tline, f"tokens[{i}]", f"expected a token id (an integer), got {_kind(t)}"
                    )
                if t < 0:
                    raise self.error(tline, f"tokens[{i}]", f"token ids are not negative, got {t}")
            tokens = tuple(raw)
        else:
            prompt = self.string(doc, "", "prompt")
            if not prompt:
                raise self.error(doc.value_lines["prompt"], "prompt", "the prompt is empty")
        decode = self.integer(doc, "", "decode", 0)
        expect = self.expect(doc)
        return Case(
            name=name,
            file=file,
            model=model,
            expect=expect,
            description=description,
            device=device,
            device_map=device_map,
            n_gpu_layers=n_gpu_layers,
            accelerator=accelerator,
            strategy=strategy,
            fault=fault,
            tokens=tokens,
            prompt=prompt,
            decode=decode,
            shown_as=self.shown,
            lines=dict(self.lines),
        )


def _join(parent: str, key: Any) -> str:
    return f"{parent}.{key}" if parent else str(key)


def parse_case(text: str, file: str | os.PathLike = "<case>", shown_as: str | None = None) -> Case:
    """A case from YAML text; `file` is where it came from (relative model paths start there)."""
    shown = shown_as or os.fspath(file)
    parser = _Parser(shown)
    return parser.case(_compose(text, shown), Path(file))


def load_case(path: str | os.PathLike, shown_as: str | None = None) -> Case:
    """A case from a file; CaseError naming `shown_as` (default: `path` as given) for bad input."""
    shown = shown_as or os.fspath(path)
    return parse_case(_yaml_text(Path(path), shown), path, shown)


def find_case_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Case files among `paths`: files as given, directories searched for *.yaml / *.yml."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in CASE_SUFFIXES and f.is_file())
            if not found:
                raise UsageError(p, None, "no case files (*.yaml, *.yml) here")
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


# ---- running ---------------------------------------------------------------------------------------

_cache_dir: Path | None = None


def _default_cache_dir() -> Path:
    """A temporary directory for this process's synthesized models, removed at exit."""
    global _cache_dir
    if _cache_dir is None or not _cache_dir.is_dir():
        _cache_dir = Path(tempfile.mkdtemp(prefix="harness-cases-"))
        atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    return _cache_dir


def model_file(spec: SynthSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """The synthesized GGUF for `spec` in the cache, written (atomically) the first time."""
    from harness.synth import synthesize

    d = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{spec.key()}.gguf"
    if not path.is_file():
        tmp = d / f"{spec.key()}.{os.getpid()}.tmp.gguf"
        synthesize(tmp, spec.config, spec.file_type, spec.layout, spec.router, spec.seed)
        os.replace(tmp, path)
    return path


@dataclass
class CaseResult:
    """The outcome of one case.

    `status` passed | failed | skipped; `summary` the trace's summary (a dict, None when skipped);
    `checks` (field, expected, got, ok) per compared field; `trace_path` the JSONL trace (or None);
    `accelerator` "cuda" (real), "emulated" or "cpu"; `seconds` wall time; `raised` the error the
    forward raised (kept: the trace explains it), `skip_reason` why it did not run."""

    case: Case
    status: str
    summary: dict | None = None
    checks: list[tuple[str, Any, Any, bool]] = field(default_factory=list)
    trace_path: Path | None = None
    accelerator: str | None = None
    seconds: float = 0.0
    raised: str | None = None
    skip_reason: str | None = None

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    @property
    def expected(self) -> dict[str, Any]:
        return {f: e for f, e, _, _ in self.checks}

    @property
    def got(self) -> dict[str, Any]:
        return {f: g for f, _, g, _ in self.checks}

    def failures(self) -> list[str]:
        """`expected module X, got Y` for each field that differs (and an unexplained raise)."""
        out = [f"expected {f} {_show(e)}, got {_show(g)}" for f, e, g, ok in self.checks if not ok]
        if self.raised and self.summary is not None and self.summary["verdict"] == "clean":
            out.append(f"the forward raised {self.raised}, which the trace does not explain")
        return out

    def verdict_text(self) -> str:
        """`clean`, or `dirty: mismatch at layers.0.moe.router (blk.0.ffn_gate_inp.weight)`."""
        if self.summary is None:
            return "not run"
        first = self.summary.get("first_offence")
        if self.summary["verdict"] == "clean" or not first:
            return self.summary["verdict"]
        tensor = f" ({first['tensor']})" if first.get("tensor") else ""
        module = first["module"] if first["module"] is not None else "<outside the model>"
        return f"dirty: {first['class']} at {module or '<model>'}{tensor}"

    def line(self) -> str:
        """One line for the console."""
        where = f"({self.accelerator}, {self.seconds:.2f} s)"
        if self.skipped:
            return f"SKIP {self.name}: {self.skip_reason}"
        if self.passed:
            return f"PASS {self.name}  {self.verdict_text()}  {where}"
        return f"FAIL {self.name}: {'; '.join(self.failures())}  {where}"

    def report(self) -> str:
        """A few lines for a failed case: what differed, the first offence, the trace."""
        lines = [f"case {self.name} ({self.case.shown_as or self.case.file}) on {self.accelerator}:"]
        lines += [f"  {f}" for f in self.failures()]
        first = (self.summary or {}).get("first_offence")
        if first:
            lines.append(
                f"  first offence: {first['class']} in {first['module']!r} (tensor {first['tensor']!r}): "
                f"{first['op']} on {', '.join(first['devices'])} (expected {first['expected']}) at {first['source']}"
            )
        elif self.summary is not None:
            counts = ", ".join(f"{n} {c}" for c, n in self.summary["counts"].items() if n)
            lines.append(f"  the run was clean ({counts})")
        if self.raised:
            lines.append(f"  the forward raised {self.raised}")
        if self.trace_path is not None:
            lines.append(f"  trace: {self.trace_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.case.shown_as or str(self.case.file),
            "status": self.status,
            "passed": self.passed,
            "accelerator": self.accelerator,
            "seconds": round(self.seconds, 3),
            "fault": self.case.fault,
            "expected": self.expected,
            "got": self.got,
            "failures": self.failures() if self.status == "failed" else [],
            "raised": self.raised,
            "skip_reason": self.skip_reason,
            "trace": None if self.trace_path is None else str(self.trace_path),
            "summary": self.summary,
        }


def _show(v: Any) -> str:
    return "none" if v is None else repr(v) if v == "" else str(v)


def _trace_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def _choose_accelerator(case: Case) -> tuple[str, int, str | None]:
    """(accelerator, emulated device count, skip reason): "cpu", "cuda" or "emulated"."""
    import torch

    from harness.trace import emulated

    indices = case.cuda_indices()
    if not indices:
        return "cpu", 0, None
    needed = indices[-1] + 1
    active = emulated.active()
    if active is not None:  # someone (a fixture, a caller) runs us under an emulation already
        if case.accelerator == "real":
            return "emulated", 0, "accelerator: real, but the emulated accelerator is active"
        if active.device_count < needed:
            return (
                "emulated",
                0,
                f"the active emulated accelerator has {active.device_count} devices, the case needs {needed}",
            )
        return "emulated", 0, None
    real = torch.cuda.is_available() and torch.cuda.device_count() >= needed
    if case.accelerator == "emulated" or (case.accelerator == "auto" and not real):
        return "emulated", max(needed, MIN_EMULATED_DEVICES), None
    if not real:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return "cuda", 0, f"accelerator: real needs {needed} CUDA device(s); this machine has {have}"
    return "cuda", 0, None


def _model_path(case: Case, cache_dir) -> Path:
    if case.model.synth is not None:
        return model_file(case.model.synth, cache_dir)
    path = case.model.resolved_path()
    if not path.is_file():
        raise case.error("model.path", f"no such file: {path}")
    return path


def run_case(
    case: Case,
    out_dir: str | os.PathLike | None = DEFAULT_OUT_DIR,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> CaseResult:
    """Run one case: synthesize or find the model, load it on its placement under the chosen
    accelerator, inject the fault, trace the prefill and `decode` steps, compare with `expect`.

    Writes the trace to `<out_dir>/<name>.jsonl` (no trace file when `out_dir` is None).
    `threads`: torch's intra-op threads during the run; None: 1 for a synthetic model (small by
    design: on a busy machine, threads waiting on each other make its tiny ops ~10x slower),
    torch's setting for a GGUF file. CaseError (naming the case's file, line and key) for what
    only the model can tell is wrong."""
    import torch

    if threads is None and case.model.synth is not None:
        threads = 1
    if threads is None or threads == torch.get_num_threads():
        return _run_case(case, out_dir, cache_dir)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_case(case, out_dir, cache_dir)
    finally:
        torch.set_num_threads(before)


def _run_case(case: Case, out_dir, cache_dir) -> CaseResult:
    from harness.model.generate import generate
    from harness.model.mixtral import Mixtral
    from harness.trace import Tracer

    start = time.perf_counter()
    result = CaseResult(case, "skipped")
    missing = case.model.unset_variables()
    if missing:
        result.skip_reason = f"model.path needs ${missing[0]}, which is not set"
        return result
    accelerator, n_emulated, skip = _choose_accelerator(case)
    result.accelerator = accelerator
    if skip:
        result.skip_reason = skip
        result.seconds = time.perf_counter() - start
        return result

    path = _model_path(case, cache_dir)
    tokens = list(case.tokens) if case.tokens is not None else _tokenize(case, path)
    trace_path = None
    if out_dir is not None:
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                out, None, f"cannot create the output directory: {exc.strerror or exc}"
            ) from None
        trace_path = out / f"{_trace_name(case.name)}.jsonl"
    header = {
        "command": "harness cases",
        "case": case.name,
        "case_file": case.shown_as or str(case.file),
        "fault": case.fault,
        "accelerator": accelerator,
        "prompt_tokens": tokens,
        "decode": case.decode,
    }
    tokens_key = "tokens" if case.tokens is not None else "prompt"
    with contextlib.ExitStack() as stack:
        if n_emulated:
            from harness.trace.emulated import EmulatedCuda

            stack.enter_context(EmulatedCuda(device_count=n_emulated))
        try:
            model = Mixtral.from_gguf(
                path,
                device=case.device if case.device_map is None else None,
                device_map=case.device_map,
                n_gpu_layers=case.n_gpu_layers,
                strategy=case.strategy,
                max_seq_len=len(tokens) + case.decode + 1,
            )
        except (GGUFFormatError, GGUFMetadataError, GGUFTensorError, UnsupportedTypeError) as exc:
            raise case.error("model", str(exc)) from None
        except HarnessError as exc:
            if exc.field == "max_seq_len":
                raise case.error(
                    "decode",
                    f"{len(tokens)} tokens and {case.decode} decode steps exceed the model's context",
                ) from None
            raise case.error(case.placement_key, exc.problem) from None
        try:
            model.check_tokens(tokens)
        except HarnessError as exc:
            raise case.error(tokens_key, exc.problem) from None
        if case.fault is not None:
            from harness import faults

            fault = faults.get(case.fault)
            if not fault.applies_to(model):
                raise case.error(
                    "fault",
                    f"{fault.name} does not apply to the placement {model.placement.describe()}: "
                    f"it needs {fault.requires}",
                )
            stack.enter_context(fault.inject(model))
        tracer = Tracer(model, path=trace_path, header=header, routing=True)
        try:
            with tracer:
                generate(model, tokens, case.decode + 1)
        except HarnessError:
            raise
        except Exception as exc:  # a device mismatch the backend refused: the trace has it
            result.raised = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        del model
    summary = tracer.summary
    result.summary = summary.to_dict()
    result.trace_path = trace_path
    first = summary.first_offence or {}
    result.checks.append(
        ("verdict", case.expect.verdict, summary.verdict, case.expect.verdict == summary.verdict)
    )
    for f, expected in case.expect.first.items():
        got = first.get(f)
        result.checks.append((f, expected, got, expected == got))
    ok = all(c[3] for c in result.checks) and not (result.raised and summary.clean)
    result.status = "passed" if ok else "failed"
    result.seconds = time.perf_counter() - start
    return result


def _tokenize(case: Case, path: Path) -> list[int]:
    from harness.model.tokenizer import Tokenizer

    try:
        return Tokenizer.from_gguf(path).encode(case.prompt)
    except (GGUFFormatError, GGUFMetadataError, GGUFTensorError) as exc:
        raise case.error("model", str(exc)) from None
