"""Running a case: synthesize or find its model, load it on its placement under the chosen
accelerator, inject the fault, trace it, and compare the verdict and first offence with `expect`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cases.schema import DEFAULT_OUT_DIR, MIN_EMULATED_DEVICES, Case, SynthSpec
from harness.errors import (
    GGUFFormatError,
    GGUFMetadataError,
    GGUFTensorError,
    HarnessError,
    NonFiniteLogitsError,
    UnsupportedTypeError,
    UsageError,
)
from harness.run_checks import LogitsWatch

# ---- models ---------------------------------------------------------------------------------------

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


def _command_line() -> str:
    """The command this process runs, as typed (`harness cases cases/`, `pytest -n 2 ...`)."""
    argv = sys.argv or [""]
    prog = Path(argv[0]).name
    if prog == "__main__.py":  # python -m pytest / python -m harness
        prog = f"python -m {Path(argv[0]).parent.name}"
    return " ".join([prog or "python", *map(shlex.quote, argv[1:])])


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

    Writes the trace to `<out_dir>/<name>.jsonl` (no trace file when `out_dir` is None); a
    synthetic model goes to `cache_dir`, by default `<out_dir>/models` (so that the path the
    trace names exists after the run), or a temporary folder when there is no `out_dir`.
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
    result.skip_reason = case.model.missing_variable()
    if result.skip_reason:
        return result
    accelerator, n_emulated, skip = _choose_accelerator(case)
    result.accelerator = accelerator
    if skip:
        result.skip_reason = skip
        result.seconds = time.perf_counter() - start
        return result

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
        if cache_dir is None:  # the synthesized model stays beside its trace, which names it
            cache_dir = out / "models"
    path = _model_path(case, cache_dir)
    tokens = list(case.tokens) if case.tokens is not None else _tokenize(case, path)
    header = {
        "command": _command_line(),
        "expected_verdict": case.expect.verdict,
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
        try:
            tracer = Tracer(
                model,
                path=trace_path,
                header=header,
                routing=True,
                allow_transfers=case.allow_transfers or None,
            )
        except UsageError as exc:
            raise case.error("allow_transfers", exc.problem) from None
        try:
            with LogitsWatch(model) as watch, tracer:
                generate(model, tokens, case.decode + 1)
            watch.check(str(path))  # NaN or inf logits: the run gave no result, never clean
        except NonFiniteLogitsError as exc:
            result.raised = f"{type(exc).__name__}: {exc.problem}"
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
