"""`harness trace`, `report`, `cases`, `demo` and `faults`: device tracing and what it finds.

Exit statuses follow `harness.cli.exits`: a trace's verdict clean 0, dirty 1, error or
inconclusive 3; bad input 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from harness.cli import exits, loading, options
from harness.cli.loading import add_model_options, check_tokens, enter_device
from harness.errors import HarnessError, NonFiniteLogitsError, UsageError
from harness.paths import check_input_file, check_output_dir, check_output_file, open_input_file
from harness.run_checks import LogitsWatch


def _verdict_line(summary, verdict: str, error: BaseException | None, where: str) -> str:
    """One line for a trace's verdict, as `harness trace` prints it."""
    counts = ", ".join(f"{n} {c}" for c, n in summary.counts.items() if c != "ok")
    tail = f"{summary.events} events ({counts}){where}"
    if verdict == "clean":
        return f"trace: clean, {tail}"
    f = summary.first_offence
    if verdict == "dirty" and f:
        tensor = f" ({f['tensor']})" if f.get("tensor") else ""
        devices = ", ".join(f.get("devices") or [])
        return (
            f"trace: {f['class'].upper()} in {f['module'] or '<model>'}{tensor}: {f['op']} on "
            f"{devices} (expected {f['expected']}) at {f['source']}; {tail}"
        )
    explanation = getattr(summary.verdict, "explanation", "")
    if explanation and summary.verdict == verdict:
        return f"trace: {verdict.upper()}: {explanation.split(': ', 1)[-1]} {tail}"
    if verdict == "error" and isinstance(error, NonFiniteLogitsError):
        return f"trace: ERROR: {error.problem}; a run without a finite result is never clean; {tail}"
    if verdict == "error":
        raised = f"{type(error).__name__}: {error}" if error is not None else "an error"
        return f"trace: ERROR: the run raised {raised}; it is not a device error and was not judged; {tail}"
    return f"trace: {verdict.upper()}: no op was traced, so nothing was checked; {tail}"


def cmd_trace(args) -> int:
    """Trace a prefill and `--decode` steps; the verdict on stdout (`--json`: the summary record)."""
    from harness.model.generate import generate
    from harness.trace import Tracer

    out = check_output_file(args.out, "--out", inputs=[args.model]) if args.out else None
    report = check_output_file(args.report, "--report", inputs=[args.model, out]) if args.report else None
    perfetto = (
        check_output_file(args.perfetto, "--perfetto", inputs=[args.model, out, report])
        if args.perfetto
        else None
    )
    with contextlib.ExitStack() as stack:
        trace_path = out
        if (report or perfetto) and trace_path is None:  # both are made from a trace file
            fd, name = tempfile.mkstemp(prefix="harness-trace-", suffix=".jsonl")
            os.close(fd)
            stack.callback(os.unlink, name)
            trace_path = Path(name)
        enter_device(args, stack)
        model = loading.load_model(args)  # through the module: tests replace it
        if args.prompt is not None:
            from harness.model.tokenizer import Tokenizer

            prompt = Tokenizer.from_gguf(args.model).encode(args.prompt)
            check_tokens(model, prompt, "--prompt")
        else:
            prompt = args.tokens if args.tokens is not None else [1]
            check_tokens(model, prompt, "--tokens")
        if args.fault:
            from harness import faults

            stack.enter_context(faults.get(args.fault).inject(model))  # removed when the run ends
        header = {
            "prompt_tokens": prompt,
            "decode": args.decode,
            "command": getattr(args, "command_line", "harness trace"),
            "fault": args.fault,
        }
        tracer = Tracer(model, path=trace_path, sample_every=args.sample_every, header=header, routing=True)
        bar = None
        if args.decode >= 8:
            from tqdm import tqdm

            bar = stack.enter_context(
                tqdm(total=args.decode + 1, desc="trace", unit="tok", file=sys.stderr, disable=None)
            )
        error = None
        try:
            with LogitsWatch(model) as watch, tracer:
                generate(model, prompt, args.decode + 1, on_token=(lambda _: bar.update()) if bar else None)
            watch.check(args.model)  # outside the trace: the check's own ops are not the model's
        except NonFiniteLogitsError as exc:  # the devices were traced, but the run gave no result
            error = exc
        except HarnessError:
            raise
        except Exception as exc:  # CUDA refusing a mismatch (dirty), or another error (not judged)
            error = exc
        if report:
            _trace_report(args, trace_path, report)
        if perfetto:
            from harness.trace.perfetto import write_perfetto

            print(f"perfetto -> {write_perfetto(trace_path, perfetto)}", file=sys.stderr)
    summary = tracer.summary
    verdict = str(summary.verdict)
    if verdict == "clean" and error is not None:
        verdict = "error"  # a run that raised is never clean
    elif verdict == "clean" and summary.events == 0:
        verdict = "inconclusive"  # nothing was checked
    line = _verdict_line(summary, verdict, error, f" -> {out}" if out else "")
    if args.json:
        print(json.dumps({**summary.to_dict(), "verdict": verdict}, separators=(",", ":"), default=str))
        print(line, file=sys.stderr)
    else:
        print(line)
    return exits.for_verdict(verdict)


def _trace_report(args, trace_path: Path, report: Path) -> None:
    """`harness trace --report OUT.html`: the run's report (with the expert routing in the trace)."""
    from harness.report import build_report

    name = Path(args.out).name if args.out else Path(args.model).name
    out = build_report([trace_path], report, title=f"harness trace {Path(args.model).name}", names=[name])
    print(f"report -> {out}", file=sys.stderr)


def check_trace_input(path: str) -> Path:
    """A trace path for `harness report`: a regular file that is not a GGUF model."""
    checked = check_input_file(path)
    with open_input_file(checked) as f:
        magic = f.read(4)
    if magic == b"GGUF":
        raise UsageError(
            path, None, "is a GGUF model, not a trace (write one with: harness trace MODEL -o T.jsonl)"
        )
    return checked


def cmd_report(args) -> int:
    """One HTML report from saved traces (two: with their diff), and/or one trace as Perfetto
    JSON. `--fail-on-dirty`: the exit status says the worst verdict among them (dirty 1; error,
    inconclusive or unfinished 3); with nothing to write it only checks (`harness report
    *.jsonl --fail-on-dirty` gates CI on saved traces), as `--json` alone only prints verdicts."""
    from harness.report import build_report
    from harness.trace import load_trace

    if args.out is None and args.perfetto is None and not (args.json or args.fail_on_dirty):
        raise UsageError(
            None, None, "nothing to do: give -o OUT.html, --perfetto OUT.json, --json or --fail-on-dirty"
        )
    if args.perfetto is not None and len(args.traces) != 1:
        raise UsageError(None, "--perfetto", f"converts one trace, got {len(args.traces)}")
    traces = [check_trace_input(t) for t in args.traces]
    out = check_output_file(args.out, "--out", inputs=traces) if args.out is not None else None
    perfetto = (
        check_output_file(args.perfetto, "--perfetto", inputs=[*traces, out]) if args.perfetto else None
    )
    written = {}
    if out is not None:
        written["report"] = str(build_report(traces, out, title=args.title))
    if perfetto is not None:
        from harness.trace.perfetto import write_perfetto

        written["perfetto"] = str(write_perfetto(traces[0], perfetto))
    verdicts = []
    for t in traces:
        summary = load_trace(t).summary
        verdicts.append(str(summary.verdict) if summary is not None else "unfinished")
    if args.json:
        rows = [{"trace": str(t), "verdict": v} for t, v in zip(traces, verdicts, strict=True)]
        print(json.dumps({**written, "traces": rows}))
    elif written:
        for path in written.values():
            print(f"wrote {path}")
    else:  # only the verdicts were asked for (--fail-on-dirty)
        for t, v in zip(traces, verdicts, strict=True):
            print(f"{t}: {v}")
    if not args.fail_on_dirty:
        return exits.CLEAN
    code = max((exits.for_verdict(v) for v in verdicts), default=exits.CLEAN, key=_severity)
    if code != exits.CLEAN:
        bad = [f"{t.name} {v}" for t, v in zip(traces, verdicts, strict=True) if v != "clean"]
        print(f"report: not clean: {', '.join(bad)}", file=sys.stderr)
    return code


def _severity(code: int) -> int:
    """Undecided (3) outranks dirty (1): a run that was not judged must not pass for one that was."""
    return {exits.CLEAN: 0, exits.FOUND: 1, exits.UNDECIDED: 2}[code]


def cmd_cases(args) -> int:
    """Run YAML cases: one line each, then `N passed, M failed`. Exit 0 all passed (or skipped),
    1 any failed, 2 bad input (a malformed case file before anything runs, or a case whose model,
    placement, fault or tokens turn out unusable)."""
    from harness.cases import load_cases, run_case

    if not args.paths and not os.path.exists("cases"):
        raise UsageError(
            None, None, "no case files given, and there is no cases/ folder here to run by default"
        )
    cases = load_cases(args.paths or ["cases"])  # a malformed file: CaseError, one line, exit 2
    # Output folders are made only once there is something to run: a refused command leaves nothing.
    out_dir = check_output_dir(args.out_dir, "--out-dir")
    cache_dir = check_output_dir(args.cache_dir, "--cache-dir") if args.cache_dir else None
    results, errors = [], []
    for case in cases:
        try:
            result = run_case(case, out_dir=out_dir, cache_dir=cache_dir)
        except HarnessError as exc:
            errors.append({"name": case.name, "file": case.shown_as, "status": "error", "error": str(exc)})
            if not args.json:
                print(f"ERROR {case.name}: {exc}", flush=True)
            continue
        results.append(result)
        if not args.json:
            print(result.line(), flush=True)
    counts = Counter(r.status for r in results)
    if args.json:
        doc = {
            "cases": [r.to_dict() for r in results] + errors,
            "passed": counts["passed"],
            "failed": counts["failed"],
            "skipped": counts["skipped"],
            "errors": len(errors),
        }
        print(json.dumps(doc, indent=1, default=str))
    else:
        tail = [f"{counts['skipped']} skipped"] if counts["skipped"] else []
        tail += [f"{len(errors)} errors"] if errors else []
        print(", ".join([f"{counts['passed']} passed", f"{counts['failed']} failed", *tail]))
    if errors:
        return exits.BAD_INPUT
    return exits.FOUND if counts["failed"] else exits.CLEAN


DEMO_CASE = """
description: candle#1815 on a TheBloke-style Mixtral (per-expert experts, F16 router, Q4_K_M)
model: {{synth: tiny, type: Q4_K_M, layout: per-expert, router: f16, seed: 0}}
device: cuda
accelerator: auto
fault: {fault}
tokens: [1, 260, 301, 42, 17, 99]
decode: 4
expect: {expect}
"""


def cmd_demo(args) -> int:
    """The seed bug end to end: a tiny TheBloke-style model (per-expert layout, F16 router) on
    CUDA, or on the emulated accelerator without a GPU, traced clean and with `candle-1815`;
    one HTML report; where the bug was caught. Exit 0 when both runs came out as expected."""
    from harness.cases import parse_case, run_case
    from harness.report import build_report

    out_dir = check_output_dir(args.out_dir, "--out-dir")
    results = []
    for name, fault, expect in (
        ("demo-clean", "null", "{verdict: clean}"),
        (
            "demo-candle-1815",
            "candle-1815",
            "{verdict: dirty, class: mismatch, module: layers.0.moe.router, tensor: blk.0.ffn_gate_inp.weight}",
        ),
    ):
        text = f"name: {name}\n" + DEMO_CASE.format(fault=fault, expect=expect)
        results.append(run_case(parse_case(text, f"<demo {name}>"), out_dir=out_dir / "demo"))
    clean, faulty = results
    print(f"model: tiny Mixtral, per-expert experts, F16 router, Q4_K_M; on {clean.accelerator} (cuda:0)")
    for r in results:
        print(f"  {r.line()}")
    first = faulty.summary["first_offence"] if faulty.summary else None
    if first:
        print(
            f"caught: {first['class']} in {first['module']} ({first['tensor']}), "
            f"op {first['op']} on {' and '.join(first['devices'])}, at {first['source']}"
        )
    report = build_report(
        [r.trace_path for r in results],
        out_dir / "demo.html",
        title="harness demo: candle#1815",
        diff_pairs=[(0, 1)],
    )
    print(f"report: {report}")
    return exits.CLEAN if all(r.passed for r in results) else exits.FOUND


def cmd_faults(args) -> int:
    from harness.faults import CATALOG

    if args.json:
        rows = [
            {
                "name": f.name,
                "class": f.expected_class,
                "summary": f.summary,
                "requires": f.requires,
                "doc": f.doc,
            }
            for f in CATALOG.values()
        ]
        print(json.dumps(rows, indent=1))
        return exits.CLEAN
    width = max(len(name) for name in CATALOG)
    for f in CATALOG.values():
        print(f"{f.name:<{width}}  {f.expected_class:<8}  {f.summary}")
    return exits.CLEAN


def add_commands(sub) -> None:
    s = sub.add_parser("demo", help="the seed bug (candle#1815) caught and reported, clean run beside it")
    s.add_argument(
        "--out-dir", type=options.text, default="reports", help="where files are written (default: reports)"
    )
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "trace",
        help="trace the devices of every op of a prefill and decode; exit 1 dirty, 3 not judged",
        description="Trace the device of every op. Exit 0 clean; 1 dirty (a mismatch, sync, stray, ...); "
        "3 not judged: the run raised an error that is not a device error, or traced no op; 2 bad input.",
    )
    add_model_options(s)
    given = s.add_mutually_exclusive_group()
    given.add_argument("--tokens", type=options.tokens, default=None, help="comma-separated ids (default: 1)")
    given.add_argument("-p", "--prompt", type=options.text, default=None, help="text, tokenized by the model")
    s.add_argument(
        "--decode", type=options.integer(0), default=0, metavar="N", help="decode steps after the prefill"
    )
    s.add_argument(
        "--sample-every",
        type=options.integer(1),
        default=1,
        metavar="N",
        help="trace every Nth forward call fully, skip the others",
    )
    s.add_argument(
        "-o", "--out", type=options.text, default=None, metavar="OUT.jsonl", help="write the trace here"
    )
    s.add_argument("--json", action="store_true", help="print the summary record as JSON on stdout")
    s.add_argument(
        "--report",
        type=options.text,
        default=None,
        metavar="OUT.html",
        help="write the run's HTML report here",
    )
    s.add_argument(
        "--perfetto",
        type=options.text,
        default=None,
        metavar="OUT.json",
        help="write the run as Chrome/Perfetto trace-event JSON (ui.perfetto.dev, chrome://tracing)",
    )
    s.add_argument(
        "--fault",
        type=options.text,
        default=None,
        metavar="NAME",
        help="inject a fault from the catalog (`harness faults`)",
    )
    s.set_defaults(func=cmd_trace)

    s = sub.add_parser(
        "report", help="one HTML report from saved traces (two: with their diff); a trace as Perfetto JSON"
    )
    s.add_argument(
        "traces",
        nargs="+",
        type=options.text,
        metavar="TRACE.jsonl",
        help="traces written by `harness trace -o`",
    )
    s.add_argument(
        "-o", "--out", type=options.text, default=None, metavar="OUT.html", help="the report to write"
    )
    s.add_argument(
        "--perfetto",
        type=options.text,
        default=None,
        metavar="OUT.json",
        help="write the (one) trace as Chrome/Perfetto trace-event JSON",
    )
    s.add_argument("--title", default=None, help="the report's title")
    s.add_argument(
        "--fail-on-dirty",
        action="store_true",
        help="exit 1 if a trace is dirty, 3 if one was not judged (error, inconclusive, unfinished)",
    )
    s.add_argument(
        "--json", action="store_true", help="print the report's path and each trace's verdict as JSON"
    )
    s.set_defaults(func=cmd_report)

    s = sub.add_parser(
        "cases", help="run YAML regression cases (files or directories; default cases/); exit 1 if any fails"
    )
    s.add_argument(
        "paths",
        nargs="*",
        type=options.text,
        metavar="PATH",
        help="case files or directories (default: cases/ in the current folder)",
    )
    s.add_argument("--json", action="store_true", help="print the results as one JSON document")
    s.add_argument(
        "--out-dir",
        type=options.text,
        default="reports/cases",
        help="where each case's trace (NAME.jsonl) goes (default: reports/cases)",
    )
    s.add_argument(
        "--cache-dir",
        type=options.text,
        default=None,
        help="keep synthesized models here (default: OUT_DIR/models, beside the traces that name them)",
    )
    s.set_defaults(func=cmd_cases)

    s = sub.add_parser(
        "faults", help="list the fault catalog: name, the class the tracer reports, what it breaks"
    )
    s.add_argument(
        "--json", action="store_true", help="print JSON, with each fault's requirements and documentation"
    )
    s.set_defaults(func=cmd_faults)
