"""What loading the pytest plugin costs a pytest session that does not use it.

    python benchmarks/bench_plugin_import.py [--out benchmarks/results/plugin_import.json] [--repeats 15]

Each repeat is a fresh interpreter running `python -X importtime -c "import pytest; import
pytest_harness.plugin"` (pytest is loaded first, as it is in a session, so only the plugin's own
cost is counted): the cumulative import time of `pytest_harness.plugin` as `-X importtime` reports
it, and the modules the import brought in that are heavy (torch, harness, hypothesis, numpy, yaml,
jinja2; none is expected). For scale, the same for `import harness` (what loading the plugin
used to cost: it imported the package and torch). Medians go to JSON and a line on stdout.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "harness", "hypothesis", "numpy", "yaml", "jinja2")


def import_cost(module: str) -> tuple[float, list[str]]:
    """(cumulative microseconds to import `module` after pytest, heavy modules it brought in)."""
    code = (
        "import sys, pytest; before = set(sys.modules); import " + module + "; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env, check=True
    )
    line = next(
        line for line in reversed(done.stderr.splitlines()) if re.search(rf"\|\s*{re.escape(module)}$", line)
    )
    cumulative = int(line.split("|")[1])
    brought = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    return cumulative, [m for m in brought if m in HEAVY]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/plugin_import.json"))
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)

    results = {}
    for module in ("pytest_harness.plugin", "harness"):
        times, heavy = [], set()
        for _ in range(args.repeats):
            us, brought = import_cost(module)
            times.append(us)
            heavy.update(brought)
        results[module] = {
            "median_ms": round(statistics.median(times) / 1000, 2),
            "min_ms": round(min(times) / 1000, 2),
            "max_ms": round(max(times) / 1000, 2),
            "heavy_modules_imported": sorted(heavy),
        }
    plugin, package = results["pytest_harness.plugin"], results["harness"]
    report = {
        "command": f"python -X importtime -c 'import pytest; import MODULE' ({args.repeats} fresh interpreters)",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "results": results,
        "ratio_package_to_plugin": round(package["median_ms"] / plugin["median_ms"], 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"import pytest_harness.plugin: median {plugin['median_ms']} ms (heavy: {plugin['heavy_modules_imported'] or 'none'}); "
        f"import harness: median {package['median_ms']} ms; ratio {report['ratio_package_to_plugin']}x -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
