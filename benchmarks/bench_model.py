"""Full-model speed: load time, peak device memory, prefill and decode tokens/s, written to JSON.

    python benchmarks/bench_model.py --preset mixtral-8x7b --type Q4_K_M --device cuda \\
        --out benchmarks/results/model.json

Synthesizes the model file first unless --model names one (the full-size preset is ~26 GB;
--workdir says where it goes). Prefill and decode are each timed --repeats times; medians are
reported. A measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from harness.gguf_file import open_gguf
from harness.model.mixtral import Mixtral
from harness.synth import synthesize


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an existing GGUF; otherwise one is synthesized")
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--layout", default="merged")
    p.add_argument("--workdir", default="/tmp", help="where a synthesized model is written")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens (pp)")
    p.add_argument("--decode", type=int, default=128, help="generated tokens (tg)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/model.json")
    args = p.parse_args(argv)

    result: dict = {
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor(),
        "torch": torch.__version__,
        "preset": args.preset,
        "file_type": args.type,
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode,
        "repeats": args.repeats,
    }
    path = Path(args.model) if args.model else Path(args.workdir) / f"bench-{args.preset}-{args.type}.gguf"
    if not args.model:
        start = time.perf_counter()
        synthesize(path, args.preset, file_type=args.type, layout=args.layout, progress=sys.stderr.isatty())
        result["synth_seconds"] = time.perf_counter() - start
    result["file_bytes"] = path.stat().st_size
    config = open_gguf(path).config
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    start = time.perf_counter()
    model = Mixtral.from_gguf(path, device=args.device, max_seq_len=args.prefill + args.decode)
    _sync(model.placement.head)
    result["load_seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        result["gpu_memory_after_load_bytes"] = torch.cuda.memory_allocated(device)

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (args.prefill,), generator=gen)
    prefill, decode = [], []
    with torch.inference_mode():
        model(prompt[:8], 0)  # warm-up: kernels compiled, caches built
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            logits = model(prompt, 0)
            _sync(device)
            prefill.append(time.perf_counter() - start)

            token = logits[-1].argmax().view(1)
            start = time.perf_counter()
            for pos in range(args.prefill, args.prefill + args.decode):
                token = model(token, pos)[-1].argmax().view(1)  # greedy, stays on the device
            _sync(device)
            decode.append(time.perf_counter() - start)

    result["prefill_seconds"] = prefill
    result["decode_seconds"] = decode
    result["prefill_tokens_per_second_median"] = args.prefill / statistics.median(prefill)
    result["decode_tokens_per_second_median"] = args.decode / statistics.median(decode)
    if device.type == "cuda":
        result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        result["kv_cache_bytes"] = sum(
            layer.attn.cache.k.nbytes + layer.attn.cache.v.nbytes for layer in model.layers
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
