"""The `harness` command line. Bad input: one line on stderr, exit 2. A problem found: exit 1."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from harness.errors import HarnessError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str):
        raise UsageError(None, None, f"{self.prog}: {message}")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _ggml_dims(shape: tuple[int, ...]) -> list[int]:
    """numpy-order shape -> GGUF/ggml order (ne0 first), as gguf-dump and llama.cpp print it."""
    return list(reversed(shape))


def describe(path: str) -> dict:
    """A JSON-able description of a GGUF model file: config, layout and tensor table."""
    from harness.gguf_file import open_gguf

    with open_gguf(path) as mf:
        tensors = [
            {
                "name": name,
                "type": mf.qtype(name).name,
                "dims": _ggml_dims(mf.shape(name)),
                "bytes": mf.nbytes(name),
            }
            for name in mf.tensor_names
        ]
        return {
            "path": path,
            "gguf_version": mf.version,
            "file_bytes": mf.file_bytes,
            "architecture": mf.architecture,
            "layout": mf.layout,
            "config": {k: getattr(mf.config, k) for k in mf.config.__dataclass_fields__},
            "router_type": mf.qtype("blk.0.ffn_gate_inp.weight").name if mf.layout != "dense" else None,
            "tensors": tensors,
        }


def _print_summary(info: dict, with_table: bool) -> None:
    c = info["config"]
    print(
        f"{info['path']}: GGUF v{info['gguf_version']}, {_fmt_bytes(info['file_bytes'])}, {info['architecture']}"
    )
    print(
        f"  layers {c['block_count']}, embedding {c['embedding_length']}, feed-forward {c['feed_forward_length']}, "
        f"heads {c['head_count']} (kv {c['head_count_kv']}), vocab {c['vocab_size']}"
    )
    if c["expert_count"]:
        print(
            f"  experts {c['expert_count']} ({c['expert_used_count']} used), layout {info['layout']}, "
            f"router {info['router_type']}"
        )
    else:
        print("  dense (no experts)")
    print(f"  rms eps {c['rms_eps']:g}, rope base {c['rope_freq_base']:g}, context {c['context_length']}")
    counts = Counter(t["type"] for t in info["tensors"])
    print(f"  {len(info['tensors'])} tensors: " + ", ".join(f"{n} {t}" for t, n in counts.most_common()))
    if not with_table:
        return
    width = max(len(t["name"]) for t in info["tensors"])
    print(f"\n  {'name':<{width}}  {'type':<7} {'dims (ne0, ne1, ...)':<24} {'bytes':>12}")
    for t in info["tensors"]:
        print(f"  {t['name']:<{width}}  {t['type']:<7} {str(t['dims']):<24} {t['bytes']:>12}")


def cmd_inspect(args) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_summary(info, with_table=True)
    return 0


def cmd_synth(args) -> int:
    from harness.synth import synthesize

    out = synthesize(
        args.out,
        args.preset,
        file_type=args.type,
        layout=args.layout,
        router=args.router,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"wrote {out} ({_fmt_bytes(out.stat().st_size)})")
    return 0


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

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    return 0 if all(r.passed for r in results) else 1


def _parse_tokens(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(None, "--tokens", f"expected comma-separated integers, got {text!r}") from None


def _parse_device_map(text: str | None) -> dict | None:
    """`--device-map` as JSON (`{"embed": "cpu", "layers.0-15": "cuda:0", ...}`) or `k=v,k=v`."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(None, "--device-map", f"not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise UsageError(None, "--device-map", "must map names to device strings")
        return value
    pairs = [p.split("=", 1) for p in text.split(",") if p]
    if any(len(p) != 2 for p in pairs):
        raise UsageError(None, "--device-map", f"expected JSON or key=device pairs, got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def _load_model(args):
    from harness.model.mixtral import Mixtral

    device_map = _parse_device_map(args.device_map)
    device = args.device if (args.device or device_map is None) else None
    return Mixtral.from_gguf(
        args.model,
        device=device,
        device_map=device_map,
        n_gpu_layers=args.n_gpu_layers,
        strategy=args.strategy,
    )


def _add_model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="GGUF model file")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default cpu)")
    s.add_argument(
        "--device-map", default=None, help='JSON, e.g. \'{"embed": "cpu", "layers.0-15": "cuda:0", ...}\''
    )
    s.add_argument("--n-gpu-layers", type=int, default=None, help="llama.cpp-style partial offload")
    s.add_argument(
        "--strategy", default="quantized", choices=["quantized", "f32", "f16"], help="QMatMul strategy"
    )


def cmd_run(args) -> int:
    from harness.model.generate import generate
    from harness.model.tokenizer import Tokenizer

    if not args.prompt:
        raise UsageError(None, "--prompt", "the prompt is empty")
    tokenizer = Tokenizer.from_gguf(args.model)
    model = _load_model(args)
    prompt = tokenizer.encode(args.prompt)
    out = generate(
        model,
        prompt,
        args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=tokenizer.eos_id,
    )
    text = tokenizer.decode(out.tokens)
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_tokens": prompt,
                    "tokens": out.tokens,
                    "text": text,
                    "stopped_at_eos": out.stopped_at_eos,
                    "prefill_tokens_per_second": out.prefill_tokens_per_second,
                    "decode_tokens_per_second": out.decode_tokens_per_second,
                    "placement": model.placement.describe(),
                }
            )
        )
        return 0
    print(args.prompt + text)
    print(
        f"prefill: {len(prompt)} tokens, {out.prefill_tokens_per_second:.1f} tokens/s; "
        f"decode: {len(out.tokens)} tokens, {out.decode_tokens_per_second:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def cmd_logits(args) -> int:
    import numpy as np
    import torch

    tokens = _parse_tokens(args.tokens)
    model = _load_model(args)
    model.check_tokens(tokens)
    with torch.inference_mode():
        logits = model(torch.tensor(tokens, dtype=torch.long), 0)  # [T, V]
    array = logits.float().cpu().numpy()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(out)
    print(f"wrote {out}: float32 logits {list(array.shape)}")
    return 0


def _emulation_for(args):
    """`--device emulated`: the emulated accelerator with as many CUDA devices as the map names."""
    import re

    try:
        from harness.trace.emulated import EmulatedCuda
    except ImportError as exc:
        raise UsageError(
            None,
            "--device",
            f"emulated: the emulated accelerator (harness.trace.emulated) is not available ({exc})",
        ) from None
    device_map = _parse_device_map(args.device_map) or {}
    indices = [int(m[1]) for v in device_map.values() if (m := re.fullmatch(r"cuda:(\d+)", v.strip()))]
    return EmulatedCuda(device_count=max(indices, default=0) + 1)


def cmd_trace(args) -> int:
    """Trace a prefill and `--decode` steps; print the summary record; exit 1 if it is not clean."""
    import contextlib

    from harness.model.generate import generate
    from harness.trace import Tracer

    if args.decode < 0:
        raise UsageError(None, "--decode", f"must not be negative, got {args.decode}")
    if args.sample_every < 1:
        raise UsageError(None, "--sample-every", f"must be a positive integer, got {args.sample_every}")
    if args.report:
        from harness.report import check_report_path

        check_report_path(args.report)  # before the run, which would be lost otherwise
    with contextlib.ExitStack() as stack:
        trace_path = args.json
        if args.report and trace_path is None:  # the report is built from a trace file
            import os
            import tempfile

            fd, trace_path = tempfile.mkstemp(prefix="harness-trace-", suffix=".jsonl")
            os.close(fd)
            stack.callback(os.unlink, trace_path)
        if args.device == "emulated":
            stack.enter_context(_emulation_for(args))
            args.device = None if args.device_map else "cuda"
        model = _load_model(args)
        if args.prompt is not None:
            from harness.model.tokenizer import Tokenizer

            if not args.prompt:
                raise UsageError(None, "--prompt", "the prompt is empty")
            prompt = Tokenizer.from_gguf(args.model).encode(args.prompt)
        else:
            prompt = _parse_tokens(args.tokens if args.tokens is not None else "1")
        model.check_tokens(prompt)
        if args.fault:
            from harness import faults

            stack.enter_context(faults.get(args.fault).inject(model))  # removed when the run ends
        header = {
            "prompt_tokens": prompt,
            "decode": args.decode,
            "command": "harness trace",
            "fault": args.fault,
        }
        tracer = Tracer(model, path=trace_path, sample_every=args.sample_every, header=header, routing=True)
        bar = None
        if args.decode >= 8:
            from tqdm import tqdm

            bar = stack.enter_context(
                tqdm(total=args.decode + 1, desc="trace", unit="tok", file=sys.stderr, disable=None)
            )
        try:
            with tracer:
                generate(model, prompt, args.decode + 1, on_token=(lambda _: bar.update()) if bar else None)
        except HarnessError:
            raise
        except Exception:
            if tracer.summary.clean:
                raise  # not a fault the trace explains
            # The offending op raised (CUDA refuses a mismatch): the summary says where.
        if args.report:
            _trace_report(args, trace_path)
    summary = tracer.summary
    print(json.dumps(summary.to_dict(), separators=(",", ":")))
    counts = ", ".join(f"{n} {c}" for c, n in summary.counts.items() if c != "ok")
    where = f" -> {args.json}" if args.json else ""
    if summary.clean:
        print(f"trace: clean, {summary.events} events ({counts}){where}", file=sys.stderr)
        return 0
    f = summary.first_offence
    if f is None:  # an error (not a device error) or nothing traced: never clean
        print(f"trace: {summary.verdict.explanation}{where}", file=sys.stderr)
        return 1
    tensor = f" ({f['tensor']})" if f["tensor"] else ""
    print(
        f"trace: {f['class'].upper()} in {f['module'] or '<model>'}{tensor}: {f['op']} on "
        f"{', '.join(f['devices'])} (expected {f['expected']}) at {f['source']}; "
        f"{summary.events} events ({counts}){where}",
        file=sys.stderr,
    )
    return 1


def _trace_report(args, trace_path: str) -> None:
    """`harness trace --report OUT.html`: the run's report (with the expert routing in the trace)."""
    from harness.report import build_report

    name = Path(args.json).name if args.json else Path(args.model).name
    out = build_report(
        [trace_path],
        args.report,
        title=f"harness trace {Path(args.model).name}",
        names=[name],
    )
    print(f"report -> {out}", file=sys.stderr)


def cmd_report(args) -> int:
    """Build one HTML report from saved traces (two traces: with their diff). Exit 0, or 2 on bad input."""
    from harness.report import build_report

    out = build_report(args.traces, args.out, title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_tokenize(args) -> int:
    from harness.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(args.model)
    print(json.dumps(tokenizer.encode(args.text, add_bos=not args.no_bos)))
    return 0


def cmd_cases(args) -> int:
    """Run YAML cases: one line each, then `N passed, M failed`. Exit 0 all passed (or skipped),
    1 any failed, 2 bad input (a malformed case file before anything runs, or a case whose model,
    placement, fault or tokens turn out unusable)."""
    from harness.cases import load_cases, run_case

    cases = load_cases(args.paths or ["cases"])  # a malformed file: CaseError, one line, exit 2
    results, errors = [], []
    for case in cases:
        try:
            result = run_case(case, out_dir=args.out_dir, cache_dir=args.cache_dir)
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
        return 2
    return 1 if counts["failed"] else 0


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
        return 0
    width = max(len(name) for name in CATALOG)
    for f in CATALOG.values():
        print(f"{f.name:<{width}}  {f.expected_class:<8}  {f.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from harness.gguf_file import PRESETS

    p = _Parser(prog="harness", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("demo", help="the seed bug (candle#1815) caught and reported, clean run beside it")
    s.add_argument("--out-dir", default="reports", help="where files are written (default: reports)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", help="write a synthetic Mixtral GGUF with random weights")
    s.add_argument("out", help="output .gguf path")
    s.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    s.add_argument(
        "--type", default="Q4_K_M", help="file type: a GGML type (Q8_0, Q4_K, ...) or a mix (Q4_K_M, ...)"
    )
    s.add_argument("--layout", default="merged", choices=["merged", "per-expert"])
    s.add_argument("--router", default="f32", choices=["f32", "f16"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("inspect", help="config, layout and tensor table of a GGUF model")
    s.add_argument("model")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("run", help="generate text from a prompt; prints tokens/s for prefill and decode")
    _add_model_args(s)
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("logits", help="write float32 logits [T, vocab] of a token sequence to .npy")
    _add_model_args(s)
    s.add_argument("--tokens", required=True, help="comma-separated ids, e.g. 1,2,3")
    s.add_argument("--out", required=True, help="output .npy path")
    s.set_defaults(func=cmd_logits)

    s = sub.add_parser(
        "faults", help="list the fault catalog: name, the class the tracer reports, what it breaks"
    )
    s.add_argument(
        "--json", action="store_true", help="print JSON, with each fault's requirements and documentation"
    )
    s.set_defaults(func=cmd_faults)

    s = sub.add_parser("tokenize", help="print the ids of a text as a JSON list")
    s.add_argument("model")
    s.add_argument("text")
    s.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser(
        "trace",
        help="trace the devices of every op of a prefill and decode; exit 1 on a mismatch, stray or sync",
    )
    _add_model_args(s)
    s.epilog = "--device also takes 'emulated': CUDA devices emulated on the CPU (the model goes on cuda)"
    given = s.add_mutually_exclusive_group()
    given.add_argument("--tokens", default=None, help="comma-separated ids (default: 1)")
    given.add_argument("--prompt", default=None, help="text, tokenized with the model's vocabulary")
    s.add_argument("--decode", type=int, default=0, help="decode steps after the prefill (default 0)")
    s.add_argument(
        "--sample-every", type=int, default=1, help="trace every Nth forward call fully, skip the others"
    )
    s.add_argument("--json", default=None, metavar="OUT.jsonl", help="write the trace (JSON Lines) here")
    s.add_argument("--report", default=None, metavar="OUT.html", help="write the run's HTML report here")
    s.add_argument(
        "--fault", default=None, metavar="NAME", help="inject a fault from the catalog (`harness faults`)"
    )
    s.set_defaults(func=cmd_trace)

    s = sub.add_parser("report", help="build one HTML report from saved traces (two traces: with their diff)")
    s.add_argument(
        "traces", nargs="+", metavar="TRACE.jsonl", help="traces written by `harness trace --json`"
    )
    s.add_argument("-o", "--out", required=True, metavar="OUT.html", help="the report to write")
    s.add_argument("--title", default=None, help="the report's title")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser(
        "cases", help="run YAML regression cases (files or directories; default cases/); exit 1 if any fails"
    )
    s.add_argument("paths", nargs="*", metavar="PATH", help="case files or directories (default: cases/)")
    s.add_argument("--json", action="store_true", help="print the results as one JSON document")
    s.add_argument(
        "--out-dir",
        default="reports/cases",
        help="where each case's trace (NAME.jsonl) goes (default: reports/cases)",
    )
    s.add_argument(
        "--cache-dir", default=None, help="keep synthesized models here (default: a temporary directory)"
    )
    s.set_defaults(func=cmd_cases)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"harness: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
