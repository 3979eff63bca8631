"""The copies one prefill makes, by the line of harness that makes them: every aten copy (copy_,
index_copy_, and a clone, contiguous, reshape or `to` that returned new memory) with its shape,
dtypes, strides and bytes, inside the fused ops too. Counts, not times: writes JSON, asserts
nothing.

    python benchmarks/prefill_copies.py --out copies.json             # a tiny synthetic Mixtral
    python benchmarks/prefill_copies.py --model m.gguf --tokens 512 --out copies.json

Without a GPU the fused ops run under Triton's interpreter (TRITON_INTERPRET=1 is set here before
harness is imported), so the CPU takes the CUDA path's torch ops; the interpreter's own copies
around a launch are left out. "strided" marks a copy that is not a plain contiguous, same-dtype
one (on CUDA: not a memcpy and not a vectorized copy kernel).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined (import)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from harness.gguf_file import MixtralConfig  # noqa: E402
from harness.model.mixtral import Mixtral  # noqa: E402
from harness.quant import fused  # noqa: E402
from harness.synth import synthesize  # noqa: E402

# Small, but with Mixtral's kinds of weights: Q4_K_M gives Q8_0 k and v, a Q6_K ffn_down (one
# layer is a "more bits" layer), rows that the kernels repack; GQA of 4 heads on one KV head.
TINY = MixtralConfig(
    block_count=1,
    embedding_length=512,
    feed_forward_length=2048,
    head_count=4,
    head_count_kv=1,
    vocab_size=300,
    context_length=256,
)
COPIES = {
    "copy_",
    "index_copy_",
    "clone",
    "_to_copy",
    "to",
    "float",
    "half",
    "contiguous",
    "reshape",
    "flatten",
}
HARNESS = f"{os.sep}harness{os.sep}"


def _site() -> str | None:
    """The innermost line of harness on the stack (None inside a Triton launch: the
    interpreter's copies of its arguments)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "triton" in frame.filename:
            return None
        if HARNESS in frame.filename:
            name = frame.filename.split(HARNESS)[-1]
            return f"{name}:{frame.lineno} {frame.line.strip()[:100]}"
    return "?"


class CopyCensus(TorchDispatchMode):
    """Records copies; runs the body of each harness custom op under itself, so the torch ops
    inside the fused ops are seen too."""

    def __init__(self):
        super().__init__()
        self.copies: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "harness":
            body = getattr(getattr(fused, name), "_init_fn", None)  # the op's Python body
            if body is not None:
                with self:
                    return body(*args, **kwargs)
        out = func(*args, **kwargs)
        if name in COPIES:
            src, dst = (args[1], args[0]) if name.endswith("copy_") else (args[0], out)
            if name == "index_copy_":
                src = args[3]
            new = (
                name.endswith("copy_") or src.untyped_storage().data_ptr() != dst.untyped_storage().data_ptr()
            )
            site = _site()
            if new and site is not None and dst.numel():
                self.copies.append(
                    {
                        "op": name,
                        "where": site,
                        "shape": list(src.shape),
                        "dtypes": [str(src.dtype)[6:], str(dst.dtype)[6:]],
                        "strides": [list(src.stride()), list(dst.stride())],
                        "bytes": src.numel() * dst.element_size(),
                        "strided": not (
                            src.is_contiguous() and dst.is_contiguous() and src.dtype == dst.dtype
                        )
                        or name == "index_copy_",
                    }
                )
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a GGUF file (default: a tiny synthetic Mixtral Q4_K_M)")
    p.add_argument("--tokens", type=int, default=17, help="prefill length (> 8: the prefill path)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not fused.runs_on(device):
        print("the fused ops do not run here (no GPU and no Triton interpreter)", file=sys.stderr)
        return 2
    census = CopyCensus()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = args.model or synthesize(Path(tmp) / "tiny.gguf", TINY, "Q4_K_M")
        model = Mixtral.from_gguf(path, device=device, max_seq_len=max(64, args.tokens))
        tokens = torch.arange(args.tokens, device=device) % model.config.vocab_size
        model(tokens[:2], 0)  # every kernel compiled or interpreted once before the census
        model.reset()
        with census:
            model(tokens, 0)
    sites: dict[tuple[str, str], dict] = collections.defaultdict(lambda: {"calls": 0, "bytes": 0})
    for c in census.copies:
        row = sites[(c["where"], c["op"])]
        row.update({k: c[k] for k in ("shape", "dtypes", "strides", "strided")}, where=c["where"], op=c["op"])
        row["calls"] += 1
        row["bytes"] += c["bytes"]
    strided = [c for c in census.copies if c["strided"]]
    result = {
        "device": str(device),
        "model": os.fspath(args.model) if args.model else "tiny synthetic Mixtral Q4_K_M",
        "layers": model.config.block_count,
        "tokens": args.tokens,
        "calls": len(census.copies),
        "bytes": sum(c["bytes"] for c in census.copies),
        "strided_calls": len(strided),
        "strided_bytes": sum(c["bytes"] for c in strided),
        "sites": sorted(sites.values(), key=lambda r: -r["bytes"]),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "sites"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
