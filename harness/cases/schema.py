"""The case schema: what a YAML case may say, checked key by key into a `Case`.

`build_case(doc, file, shown)` reads a document composed by `harness.cases.loader` (mappings
and lists that carry the line of every key and item) and raises `CaseError` naming file, line
and key path for anything the schema refuses. The keys are listed in `harness.cases`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, UsageError
from harness.gguf_file import PRESETS, MixtralConfig

# A case file declares this as its `schema` (the pytest plugin collects only such files).
SCHEMA = "harness-case/1"
CASE_SUFFIXES = (".yaml", ".yml")
ACCELERATORS = ("auto", "emulated", "real")
VERDICTS = ("clean", "dirty")
OFFENCE_CLASSES = ("mismatch", "sync", "stray", "transfer")
OFFENCE_FIELDS = ("class", "module", "tensor")
STRATEGIES = ("quantized", "f32", "f16")
LAYOUTS = ("merged", "per-expert")
ROUTERS = ("f32", "f16")
DEFAULT_OUT_DIR = "reports/cases"
MIN_EMULATED_DEVICES = 2

TOP_KEYS = (
    "schema",
    "name",
    "description",
    "model",
    "device",
    "device_map",
    "n_gpu_layers",
    "accelerator",
    "strategy",
    "fault",
    "allow_transfers",
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


# ---- the parsed case ------------------------------------------------------------------------------------


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

    def missing_variable(self) -> str | None:
        """Why the case cannot run here when `path` names a variable that is not set (it is
        skipped, not failed: the file is somebody else's), else None."""
        missing = self.unset_variables()
        return f"model.path needs ${missing[0]}, which is not set" if missing else None

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
    allow_transfers: tuple[str, ...] = ()
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

    def mapping(self, value: Any, key: str, line: int, allowed: Iterable[str]) -> dict:
        """`value` must be a mapping with only `allowed` keys, none twice."""
        if not isinstance(value, dict):
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

    def required(self, m: dict, key: str, k: str, why: str = "") -> Any:
        if k not in m:
            raise self.error(m.line, _join(key, k), f"missing{why}")
        return m[k]

    def string(self, m: dict, key: str, k: str, default: Any = _UNSET, nullable: bool = False) -> Any:
        if k not in m:
            return default
        v = m[k]
        if v is None and nullable:
            return None
        if not isinstance(v, str):
            want = "a string or null" if nullable else "a string"
            raise self.error(m.value_lines[k], _join(key, k), f"expected {want}, got {_kind(v)}")
        return v

    def enum(self, m: dict, key: str, k: str, choices: Iterable[str], default: Any = _UNSET) -> Any:
        v = self.string(m, key, k, default)
        choices = tuple(choices)
        if k in m and v not in choices:
            raise self.error(m.value_lines[k], _join(key, k), f"{v!r} is not one of: {', '.join(choices)}")
        return v

    def integer(self, m: dict, key: str, k: str, default: Any = _UNSET, minimum: int = 0) -> Any:
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

    def model(self, doc: dict, base_dir: Path) -> ModelSpec:
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

    def synth(self, m: dict) -> SynthSpec:
        from harness.synth import FILE_TYPES, plan, resolve_config

        line = m.value_lines["synth"]
        raw = m["synth"]
        fields = {f.name: f for f in dataclasses.fields(MixtralConfig)}
        if isinstance(raw, str):  # `synth: tiny`, a preset
            raw_map: dict = {}
            preset = self.enum(m, "model", "synth", PRESETS)
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

    def expect(self, doc: dict) -> Expect:
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
        schema = doc.get("schema", SCHEMA)  # required of files found in folders (see the loader)
        if schema != SCHEMA:
            raise self.error(
                doc.value_lines["schema"], "schema", f"{schema!r} is not a case schema (expected {SCHEMA})"
            )
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
            if not isinstance(raw, dict):
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

        allow_transfers: tuple[str, ...] = ()
        if "allow_transfers" in doc:
            raw, line = doc["allow_transfers"], doc.value_lines["allow_transfers"]
            if not isinstance(raw, list):
                raise self.error(
                    line, "allow_transfers", f"expected a list of module paths, got {_kind(raw)}"
                )
            for i, (p, pline) in enumerate(zip(raw, raw.item_lines, strict=True)):
                if not isinstance(p, str):
                    raise self.error(
                        pline, f"allow_transfers[{i}]", f"expected a module path, got {_kind(p)}"
                    )
            allow_transfers = tuple(raw)
            self.lines["allow_transfers"] = line

        if "tokens" in doc and "prompt" in doc:
            raise self.error(doc.key_lines["prompt"], "prompt", "give tokens or prompt, not both")
        if "tokens" not in doc and "prompt" not in doc:
            raise self.error(doc.line, "tokens", "missing: give tokens (a list of ids) or prompt (text)")
        tokens = prompt = None
        if "tokens" in doc:
            raw, line = doc["tokens"], doc.value_lines["tokens"]
            if not isinstance(raw, list):
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
            allow_transfers=allow_transfers,
            tokens=tokens,
            prompt=prompt,
            decode=decode,
            shown_as=self.shown,
            lines=dict(self.lines),
        )


def _join(parent: str, key: Any) -> str:
    return f"{parent}.{key}" if parent else str(key)


def build_case(doc: Any, file: Path, shown: str) -> Case:
    """The `Case` a composed document describes (`doc`: see `harness.safe_yaml.loads`)."""
    return _Parser(shown).case(doc, file)
