"""Full-model speed beside llama.cpp: prefill and decode tok/s, load time, peak GPU memory and
decode bandwidth as a fraction of a device copy, written to JSON (via `harness.bench`).

    python benchmarks/bench_model.py --preset mixtral-8x7b --type Q4_K_M --device cuda \\
        --compare-llamacpp /path/to/llama-bench --out benchmarks/results/model.json

Synthesizes the model file first unless --model names one (the full-size preset is ~28 GB;
--workdir says where it goes). The tests are llama-bench's pp512 and tg128 (`harness.bench`);
with --compare-llamacpp, llama-bench runs on the same file in the same run (`-ngl 99 -fa 1`) and
the ratios harness / llama.cpp are written beside. A measurement, not a test: nothing asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import bench  # noqa: E402
from harness.quant import fused  # noqa: E402
from harness.synth import synthesize  # noqa: E402


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
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eager", action="store_true", help="decode with eager calls, not a CUDA graph")
    p.add_argument("--compare-llamacpp", metavar="LLAMA_BENCH", help="path to llama.cpp's llama-bench")
    p.add_argument("--out", default="benchmarks/results/model.json")
    args = p.parse_args(argv)

    path = Path(args.model) if args.model else Path(args.workdir) / f"bench-{args.preset}-{args.type}.gguf"
    synth_seconds = None
    if not args.model:
        start = time.perf_counter()
        synthesize(path, args.preset, file_type=args.type, layout=args.layout, progress=sys.stderr.isatty())
        synth_seconds = time.perf_counter() - start

    r = bench.measure(
        path,
        args.device,
        n_prompt=args.prefill,
        n_gen=args.decode,
        repetitions=args.repeats,
        warmup=args.warmup,
        fast_decode=not args.eager,
    )
    result = {
        "device_name": r.device_name,
        "torch": torch.__version__,
        "preset": None if args.model else args.preset,
        "file_type": None if args.model else args.type,
        "file_bytes": r.file_bytes,
        "prefill_tokens": r.n_prompt,
        "decode_tokens": r.n_gen,
        "repeats": args.repeats,
        "decode": "eager" if args.eager else "CUDA graph where possible",
        # which fused kernels ran and how they were launched (HARNESS_MATVEC, HARNESS_PREFILL,
        # HARNESS_INT_X, HARNESS_PDL; see harness.quant.fused)
        "kernels": {
            "matvec": fused.matvec_path,
            "int_x": fused.int_x_path,
            "prefill": fused.prefill_path,
            "pdl": fused.pdl,
        },  # fmt: skip
        "synth_seconds": synth_seconds,
        "load_seconds": r.load_seconds,
        "prefill_tokens_per_second": r.prefill_tokens_per_second,
        "decode_tokens_per_second": r.decode_tokens_per_second,
        "prefill_tokens_per_second_median": r.prefill_stats["median"],
        "decode_tokens_per_second_median": r.decode_stats["median"],
        "peak_gpu_memory_bytes": r.peak_gpu_memory_bytes,
        "kv_cache_bytes": r.kv_cache_bytes,
        "peak_gpu_memory_over_file_plus_kv": (
            r.peak_gpu_memory_bytes / (r.file_bytes + r.kv_cache_bytes) if r.peak_gpu_memory_bytes else None
        ),
        "decode_bytes_per_token": r.decode_bytes_per_token,
        "copy_bytes_per_second": r.copy_bytes_per_second,
        "decode_bandwidth_fraction_of_copy": r.decode_bandwidth_fraction,
    }
    results: list = [r]
    if args.compare_llamacpp:
        llama = bench.run_llama_bench(
            args.compare_llamacpp, path, n_prompt=args.prefill, n_gen=args.decode, repetitions=args.repeats
        )
        pp, tg = llama[f"pp{args.prefill}"], llama[f"tg{args.decode}"]
        result["llamacpp"] = {"pp512" if args.prefill == 512 else f"pp{args.prefill}": pp}
        result["llamacpp"]["tg128" if args.decode == 128 else f"tg{args.decode}"] = tg
        result["llamacpp"]["command"] = llama["command"]
        result["llamacpp"]["tests"] = llama["tests"]
        result["ratio_prefill"] = result["prefill_tokens_per_second_median"] / pp
        result["ratio_decode"] = result["decode_tokens_per_second_median"] / tg
        results.append(llama)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(bench.format_results(results, "md"))
    print(json.dumps({k: v for k, v in result.items() if k != "llamacpp"}, indent=1))
    if "llamacpp" in result:
        print(f"ratio prefill {result['ratio_prefill']:.3f}  ratio decode {result['ratio_decode']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
