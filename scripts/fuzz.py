"""A long fuzzing campaign of the harness's own readers; writes one JSON table.

    python scripts/fuzz.py --n 10000 --n-yaml 300 --n-cli 200 --seed 0 --out scripts/results/fuzz.json

Mutated GGUF files (opened, every tensor dequantized, tokenized, one CPU forward), mutated YAML
cases (loaded) and CLI argument sets (run as `python -m harness ...`), each in its own process
under a memory cap and a timeout, each outcome classified (see `harness.fuzzing`). Seeded: the
same `--seed` gives the same inputs (case i of a surface depends only on the seed and i). Exit 1 when any
traceback, hang, out-of-memory kill, silent wrong result or unclear error was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import fuzzing  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="mutated GGUF files (default 10000)")
    p.add_argument("--n-yaml", type=int, default=300, help="mutated YAML cases (default 300)")
    p.add_argument("--n-cli", type=int, default=200, help="CLI argument sets (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per GGUF or YAML case")
    p.add_argument("--memory-gb", type=float, default=2.0, help="memory cap per case, GiB")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default="scripts/results/fuzz.json")
    args = p.parse_args()
    command = "python scripts/fuzz.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    work = Path(args.work or tempfile.mkdtemp(prefix="harness-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    memory = int(args.memory_gb * 2**30)
    started = time.time()

    def progress(i: int) -> None:
        if (i + 1) % 500 == 0:
            print(f"gguf {i + 1}/{args.n} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    campaigns = []
    if args.n:
        campaigns.append(
            fuzzing.run_gguf_campaign(
                args.n, args.seed, work / "gguf", args.timeout, memory, f"{command}  # --n part", progress
            )
        )
        print(json.dumps(campaigns[-1].to_dict()["outcomes"]), file=sys.stderr, flush=True)
        write(args, command, started, campaigns)
    if args.n_yaml:
        campaigns.append(
            fuzzing.run_yaml_campaign(
                args.n_yaml, args.seed, work / "yaml", args.timeout, memory, f"{command}  # --n-yaml part"
            )
        )
        print(json.dumps(campaigns[-1].to_dict()["outcomes"]), file=sys.stderr, flush=True)
        write(args, command, started, campaigns)
    if args.n_cli:
        model = work / "cli-model.gguf"
        if not model.exists():
            from harness.synth import synthesize

            synthesize(model, "tiny", file_type="Q8_0", layout="per-expert", router="f16", seed=1)
        campaigns.append(
            fuzzing.run_cli_campaign(
                args.n_cli,
                args.seed,
                work / "cli",
                model,
                4 * args.timeout,
                3 * memory,
                f"{command}  # --n-cli part",
            )
        )
        print(json.dumps(campaigns[-1].to_dict()["outcomes"]), file=sys.stderr, flush=True)
        write(args, command, started, campaigns)

    write(args, command, started, campaigns)
    tables = [c.to_dict() for c in campaigns]
    print(fuzzing.format_table(tables))
    bad = sum(t["outcomes"][o] for t in tables for o in fuzzing.FAILURES)
    return 1 if bad else 0


def write(args, command: str, started: float, campaigns: list) -> None:
    """The JSON table of the campaigns run so far (written after each, so none is lost)."""
    tables = [c.to_dict() for c in campaigns]
    result = {
        "command": command,
        "seed": args.seed,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "seconds": round(time.time() - started, 1),
        "outcomes": fuzzing.OUTCOMES,
        "campaigns": tables,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
