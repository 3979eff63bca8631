"""`harness synth` and `harness inspect`: writing and reading GGUF model files."""

from __future__ import annotations

import json
from collections import Counter

from harness.cli import options
from harness.cli.loading import add_model_argument
from harness.paths import check_output_file
from harness.trace.events import format_bytes


def file_type_name(value) -> str | None:
    """`general.file_type` as llama.cpp names it (15 -> "Q4_K_M"); None when absent or unknown."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(value).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_")


def describe(path: str) -> dict:
    """A JSON-able description of a GGUF model file: every metadata key, the file type, the
    config, the layout and the tensor table."""
    from harness.gguf_file import open_gguf

    with open_gguf(path) as mf:
        tensors = [
            {
                "name": name,
                "type": mf.qtype(name).name,
                "dims": list(reversed(mf.shape(name))),  # ggml order (ne0 first), as gguf-dump prints it
                "bytes": mf.nbytes(name),
            }
            for name in mf.tensor_names
        ]
        file_type = mf.metadata.get("general.file_type")
        return {
            "path": path,
            "gguf_version": mf.version,
            "file_bytes": mf.file_bytes,
            "architecture": mf.architecture,
            "file_type": {"id": file_type, "name": file_type_name(file_type)}
            if file_type is not None
            else None,
            "layout": mf.layout,
            "config": {k: getattr(mf.config, k) for k in mf.config.__dataclass_fields__},
            "router_type": mf.qtype("blk.0.ffn_gate_inp.weight").name if mf.layout != "dense" else None,
            "metadata": dict(mf.metadata),
            "tensors": tensors,
        }


def _type_name(value) -> str:
    if isinstance(value, list):
        inner = sorted({_type_name(v) for v in value})
        return f"[{inner[0] if len(inner) == 1 else 'mixed'} x {len(value)}]" if value else "[]"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value), type(value).__name__)


def _shown(value, width: int = 60) -> str:
    """A metadata value on one line: strings quoted (repr, so a newline cannot split the line),
    long ones cut; arrays by their first items."""
    if isinstance(value, list):
        items, total = [], 0
        for v in value:
            text = _shown(v, 24)
            if total + len(text) > width:
                break
            items.append(text)
            total += len(text) + 2
        more = len(value) - len(items)
        return ", ".join(items) + (f", ... ({more} more)" if more else "")
    text = repr(value)
    return text if len(text) <= width else text[: width - 4] + "...'"


def _print_model(info: dict) -> None:
    c = info["config"]
    ft = info["file_type"]
    ft_text = f", file type {ft['name'] or 'unknown'} ({ft['id']})" if ft else ", file type not given"
    print(
        f"{info['path']}: GGUF v{info['gguf_version']}, {format_bytes(info['file_bytes'])}, "
        f"{info['architecture']}{ft_text}"
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


def _print_metadata(meta: dict) -> None:
    print(f"\n  {len(meta)} metadata keys:")
    key_width = max((len(k) for k in meta), default=0)
    type_width = max((len(_type_name(v)) for v in meta.values()), default=0)
    for i, (key, value) in enumerate(meta.items(), start=1):
        print(f"  {i:4d}: {key:<{key_width}}  {_type_name(value):<{type_width}}  {_shown(value)}")


def _print_tensors(tensors: list[dict]) -> None:
    width = max((len(t["name"]) for t in tensors), default=4)
    print(f"\n  {'name':<{width}}  {'type':<7} {'dims (ne0, ne1, ...)':<24} {'bytes':>12}")
    for t in tensors:
        print(f"  {t['name']:<{width}}  {t['type']:<7} {str(t['dims']):<24} {t['bytes']:>12}")


def cmd_inspect(args) -> int:
    """As gguf-dump: the model's summary, every metadata key and value, the tensor table. A
    GGUF that is readable but is no model the harness runs (another architecture, a vocabulary
    only) still gets its metadata printed, before the one-line error that says why (exit 2)."""
    from harness.errors import GGUFMetadataError, GGUFTensorError
    from harness.gguf_file import read_metadata

    try:
        info = describe(args.model)
    except (GGUFMetadataError, GGUFTensorError):
        metadata = read_metadata(args.model)  # a file gguf cannot read at all raises here instead
        if args.json:
            print(json.dumps({"path": args.model, "model": None, "metadata": metadata}, indent=1))
        else:
            ft = metadata.get("general.file_type")
            ft_text = (
                "file type not given" if ft is None else f"file type {file_type_name(ft) or 'unknown'} ({ft})"
            )
            print(f"{args.model}: {metadata.get('general.architecture', 'no architecture')}, {ft_text}")
            _print_metadata(metadata)
        raise
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    _print_model(info)
    _print_metadata(info["metadata"])
    _print_tensors(info["tensors"])
    return 0


def cmd_synth(args) -> int:
    from harness.synth import synthesize

    out = check_output_file(args.out, overwrite=args.force)  # "x.gguf: already exists ..."
    written = synthesize(
        out,
        args.preset,
        file_type=args.type,
        layout=args.layout,
        router=args.router,
        seed=args.seed,
        progress=not args.quiet,
    )
    size = written.stat().st_size
    if args.json:
        print(json.dumps({"out": str(written), "bytes": size}))
    else:
        print(f"wrote {written} ({format_bytes(size)})")
    return 0


def add_commands(sub) -> None:
    from harness.gguf_file import PRESETS

    s = sub.add_parser("synth", help="write a synthetic Mixtral GGUF with random weights")
    s.add_argument("out", type=options.text, metavar="OUT.gguf", help="the file to write")
    s.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    s.add_argument(
        "--type",
        type=options.text,
        default="Q4_K_M",
        help="file type: a GGML type (Q8_0, Q4_K, ...) or a mix (Q4_K_M, ...)",
    )
    s.add_argument("--layout", default="merged", choices=["merged", "per-expert"])
    s.add_argument("--router", default="f32", choices=["f32", "f16"])
    s.add_argument("-s", "--seed", type=options.seed, default=0, help="in [0, 2^64)")
    s.add_argument("-f", "--force", action="store_true", help="replace OUT.gguf if it exists")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print what was written as JSON")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser(
        "inspect", help="every metadata key and value, the file type, config, layout and tensor table"
    )
    add_model_argument(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_inspect)
