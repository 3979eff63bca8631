"""`harness bench`: llama-bench's pp/tg tests on the harness's model (`harness.bench`), printed
as llama-bench prints them, beside llama-bench's own numbers with `--compare-llamacpp`.

As in llama-bench, `-o` names the output format (md, json, csv) printed on stdout; `--json`
is `-o json`.
"""

from __future__ import annotations

import shutil
import sys

from harness.cli import options
from harness.cli.loading import add_model_argument
from harness.errors import UsageError


def _llama_bench(given: str | None) -> str:
    """The llama-bench executable: the path given, else `llama-bench` on PATH."""
    found = shutil.which(given or "llama-bench")
    if found is None:
        where = f"{given!r} is not an executable" if given else "llama-bench is not on PATH"
        raise UsageError(
            None, "--compare-llamacpp", f"{where}; give its path: --compare-llamacpp /path/to/llama-bench"
        )
    return found


def cmd_bench(args) -> int:
    from harness.bench import format_results, measure, run_llama_bench

    if args.device == "emulated":
        raise UsageError(
            None,
            "--device",
            "emulated devices compute on the CPU, so their speed means nothing; bench cpu or a real cuda device",
        )
    from harness.model.placement import parse_device

    parse_device(args.device, "--device")  # a name torch knows, of a device that is here
    llama_bench = _llama_bench(args.compare_llamacpp) if args.compare_llamacpp is not None else None
    fmt = "json" if args.json else args.output
    print(
        f"bench: {args.model} on {args.device}: pp{args.n_prompt}, tg{args.n_gen}, "
        f"{args.repetitions} repetitions after {args.warmup} warm-up",
        file=sys.stderr,
    )
    results = [
        measure(
            args.model,
            args.device,
            n_prompt=args.n_prompt,
            n_gen=args.n_gen,
            repetitions=args.repetitions,
            warmup=args.warmup,
            strategy=args.strategy,
        )
    ]
    if llama_bench is not None:
        gpu = args.device.startswith("cuda")
        results.append(
            run_llama_bench(
                llama_bench,
                args.model,
                args.n_prompt,
                args.n_gen,
                args.repetitions,
                n_gpu_layers=99 if gpu else 0,
                flash_attn=gpu,
            )
        )
    sys.stdout.write(format_results(results, fmt))
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser(
        "bench",
        help="llama-bench's pp/tg tests: tokens/s mean and sd over repetitions after a warm-up",
        description="Times prompt processing (ppN: an N-token prompt in one forward call) and text "
        "generation (tgN: N tokens one at a time) of the model, as llama-bench does. "
        "-o is the output format, as in llama-bench.",
    )
    add_model_argument(s)
    s.add_argument(
        "--device",
        type=options.device,
        default="cpu",
        help="cpu, cuda or cuda:N (default cpu); emulated devices are refused: their speed means nothing",
    )
    s.add_argument(
        "-p", "--n-prompt", type=options.integer(1), default=512, metavar="N", help="ppN (default 512)"
    )
    s.add_argument(
        "-n", "--n-gen", type=options.integer(1), default=128, metavar="N", help="tgN (default 128)"
    )
    s.add_argument(
        "-r",
        "--repetitions",
        type=options.integer(1, 1000),
        default=5,
        metavar="N",
        help="timed runs (default 5)",
    )
    s.add_argument(
        "--warmup",
        type=options.integer(0, 1000),
        default=1,
        metavar="N",
        help="untimed runs first (default 1)",
    )
    s.add_argument(
        "--strategy", default="quantized", choices=["quantized", "f32", "f16"], help="QMatMul strategy"
    )
    s.add_argument(
        "-o", "--output", default="md", choices=["md", "json", "csv"], help="output format (default md)"
    )
    s.add_argument("--json", action="store_true", help="the same as -o json")
    s.add_argument(
        "--compare-llamacpp",
        nargs="?",
        const="",
        default=None,
        metavar="LLAMA_BENCH",
        help="also run llama.cpp's llama-bench (on PATH, or at the path given) on the same file",
    )
    s.set_defaults(func=cmd_bench)
