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


def cmd_demo(args) -> int:
    """Synthesize a tiny TheBloke-style model (per-expert layout, F16 router) and summarize it.

    The full demo (clean run and candle-1815 fault, HTML report) arrives with the tracer."""
    import torch

    from harness.gguf_file import open_gguf
    from harness.quant.qmatmul import QMatMul
    from harness.synth import synthesize

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = synthesize(
        out_dir / "demo-tiny.gguf", "tiny", file_type="Q4_K_M", layout="per-expert", router="f16"
    )
    _print_summary(describe(str(path)), with_table=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with open_gguf(path) as mf:
        router = QMatMul(mf.tensor("blk.0.ffn_gate_inp.weight").to(device))
        expert = QMatMul(mf.experts(0, "gate")[0].to(device))
    print(
        f"  on {device}: router {router.gguf_name} ({router.qtype.name}) dequantized to {router.weight.device}"
    )
    print(
        f"  on {device}: expert {expert.gguf_name} ({expert.qtype.name}) kept quantized on {expert.qweight.device}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from harness.gguf_file import PRESETS

    p = _Parser(prog="harness", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("demo", help="synthesize a tiny model and show the harness at work")
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
