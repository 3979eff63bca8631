"""Detection matrix on models that are not the project's own, and false positives on clean runs.

(a) Every generic fault of `harness.faults.GENERIC`, injected at `--sites` modules of each
    third-party model of `tests/thirdparty.py` (spread evenly over the modules where it can go
    in; 1: the middle one), on each placement (one GPU; split over two GPUs by accelerate's
    `dispatch_model`; half offloaded to the CPU by `dispatch_model`) and in each grad mode
    (inference_mode, no_grad, grad enabled), traced once. Each run is: detected (the trace has a
    first offence), class right (the fault's expected class), located right (in the module where
    it went in), or crashed (something other than a device error was raised: the run could not
    be judged); no_site: the fault has nowhere to go in that model (no module of it makes new
    tensors, say).
(b) `--clean N` clean runs that hypothesis draws over (model, placement, grad mode, weight seed,
    tokens): false positives (a run with an offending event), errors and crashes (a run that
    raised is never clean).

The result is JSON (every run, and the tables) and the tables as text on stdout.

    python scripts/detection_matrix.py --out scripts/results/detection_matrix.emulated.json
    python scripts/detection_matrix.py --backend cuda --out scripts/results/detection_matrix.h100.json

`--backend emulated` (the default without a GPU) runs each case in a fresh emulated accelerator
with two devices; `--backend cuda` runs on the real GPUs (the split placement needs two; with
one it is left out and said so). Needs the `thirdparty` extra (transformers, accelerate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from harness import faults  # noqa: E402
from tests.thirdparty import GRAD_MODES, MODELS, PLACEMENTS, VOCAB, Result, trace_run  # noqa: E402

COLUMNS = ("runs", "detected", "class_right", "located", "crashed", "no_site")


def _accelerator(backend: str):
    if backend == "cuda":
        return contextlib.nullcontext()
    from harness.trace.emulated import EmulatedCuda

    return EmulatedCuda(device_count=2)


def _site_indices(n_sites: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over `n_sites` (the middle one for 1)."""
    return sorted({(2 * i + 1) * n_sites // (2 * wanted) for i in range(min(wanted, n_sites))})


def _count_sites(name: str, placement: str, fault: str, backend: str) -> int:
    from tests.thirdparty import place, run

    spec = MODELS[name]
    try:
        with _accelerator(backend):
            model = place(spec.build(0), spec, placement)
            with torch.no_grad():
                return len(faults.get(fault).sites(model, run=lambda: run(model, spec, "cuda:0")))
    except Exception:
        return 1  # the run will crash the same way and say so


def _row(r: Result) -> dict:
    return {
        "model": r.model,
        "placement": r.placement,
        "mode": r.mode,
        "fault": r.fault,
        "at": r.at,
        "expected_class": r.expected_class,
        "first": list(r.first) if r.first else None,
        "verdict": r.verdict,
        "fired": r.fired,
        "detected": r.detected,
        "class_right": r.class_right,
        "located": r.located,
        "crashed": r.crashed,
        "no_site": r.no_site,
        "error": r.error,
    }


def _tally(rows: list[dict], key: str) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for row in rows:
        c = out.setdefault(row[key], Counter())
        c["runs"] += 1
        for col in COLUMNS[1:]:
            c[col] += bool(row[col])
    return {k: {col: c[col] for col in COLUMNS} for k, c in out.items()}


def fault_matrix(
    backend: str, sites: int, models: list[str], placements: list[str], modes: list[str]
) -> dict:
    rows = []
    for fault in faults.GENERIC:
        for name in models:
            for placement in placements:
                n_sites = _count_sites(name, placement, fault, backend) if sites > 1 else 1
                for index in _site_indices(n_sites, sites) if sites > 1 else [None]:
                    for mode in modes:
                        with _accelerator(backend):
                            r = trace_run(name, placement, mode, fault, site=index)
                        rows.append(_row(r))
                        print(f"  {r.describe()[:200]}", file=sys.stderr)
    total = _tally([dict(row, all="all") for row in rows], "all")["all"] if rows else {}
    return {
        "rows": rows,
        "by_fault": _tally(rows, "fault"),
        "by_model": _tally(rows, "model"),
        "by_placement": _tally(rows, "placement"),
        "by_mode": _tally(rows, "mode"),
        "total": total,
    }


def clean_runs(backend: str, n: int, models: list[str], placements: list[str], modes: list[str]) -> dict:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    results: list[Result] = []

    @settings(
        max_examples=n,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        name=st.sampled_from(models),
        placement=st.sampled_from(placements),
        mode=st.sampled_from(modes),
        seed=st.integers(0, 2**16),
        tokens=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
    )
    def one(name, placement, mode, seed, tokens):
        with _accelerator(backend):
            results.append(trace_run(name, placement, mode, seed=seed, tokens=tokens))

    one()
    # A run whose only offences are KNOWN_FINDINGS (a library's own real upload) is clean here.
    false_positives = [r for r in results if not r.crashed and r.error is None and not r.clean]
    known = [r for r in results if r.clean and r.known]
    errors = [r for r in results if r.error is not None and not r.crashed]
    crashed = [r for r in results if r.crashed]
    by_model = {}
    for r in results:
        c = by_model.setdefault(r.model, Counter())
        c["runs"] += 1
        c["clean"] += r.clean
        c["false_positives"] += r in false_positives
        c["crashed"] += r.crashed
    return {
        "runs": len(results),
        "clean": sum(r.clean for r in results),
        "false_positives": len(false_positives),
        "clean_with_known_findings": len(known),
        "known_findings": dict(Counter(k for r in known for k in r.known)),
        "errors": len(errors),
        "crashed": len(crashed),
        "by_model": {k: dict(v) for k, v in by_model.items()},
        "false_positive_runs": [
            dict(_row(r), seed=r.seed, tokens=r.tokens, counts=r.counts) for r in false_positives
        ],
        "crashes": dict(Counter(f"{r.model}: {r.error}"[:240] for r in crashed + errors)),
    }


def table(title: str, tally: dict[str, dict[str, int]], columns: tuple[str, ...] = COLUMNS) -> str:
    """Counts as a text table: a row per key, a column per count."""
    width = max([len(title), *map(len, tally)])
    lines = [f"{title:<{width}}  " + "  ".join(f"{c:>12}" for c in columns)]
    for key, c in tally.items():
        lines.append(f"{key:<{width}}  " + "  ".join(f"{c[col]:>12}" for col in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backend", choices=("emulated", "cuda"), default=None, help="default: cuda if there is one"
    )
    p.add_argument("--sites", type=int, default=1, help="modules per (fault, model, placement)")
    p.add_argument("--clean", type=int, default=200, help="hypothesis-drawn clean runs")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--placements", default=",".join(PLACEMENTS))
    p.add_argument("--modes", default=",".join(GRAD_MODES))
    p.add_argument(
        "--out", default=None, help="JSON file (default: scripts/results/detection_matrix.BACKEND.json)"
    )
    args = p.parse_args(argv)
    backend = args.backend or ("cuda" if torch.cuda.is_available() else "emulated")
    models, modes = args.models.split(","), args.modes.split(",")
    placements = args.placements.split(",")
    left_out = []
    if backend == "cuda" and "split" in placements and torch.cuda.device_count() < 2:
        placements.remove("split")
        left_out.append("split: needs two GPUs")
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    matrix = fault_matrix(backend, args.sites, models, placements, modes)
    t1 = time.perf_counter()
    clean = clean_runs(backend, args.clean, models, placements, modes) if args.clean else None
    t2 = time.perf_counter()

    import accelerate
    import transformers

    device = torch.cuda.get_device_name(0) if backend == "cuda" else "emulated CUDA (2 devices) on the CPU"
    result = {
        "command": "python scripts/detection_matrix.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "backend": backend,
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "placements_left_out": left_out,
        "seconds": {"faults": round(t1 - t0, 1), "clean": round(t2 - t1, 1)},
        "faults": matrix,
        "clean": clean,
    }
    out = Path(args.out or ROOT / "scripts" / "results" / f"detection_matrix.{backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"generic faults x third-party models x placements x grad modes on {device}:")
    for key in ("fault", "model", "placement", "mode"):
        print(table(key, matrix[f"by_{key}"]))
    print(table("total", {"all": matrix["total"]}) if matrix["total"] else "no runs")
    if clean is not None:
        print(
            f"clean runs drawn by hypothesis: {clean['runs']}, clean {clean['clean']}, "
            f"false positives {clean['false_positives']}, errors {clean['errors']}, crashed {clean['crashed']}"
        )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
