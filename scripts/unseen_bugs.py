"""A held-out check of the tracer: models and placement bugs that no other test contains.

Every case of `tests/unseen.py` (clean models with the traps that must not be flagged, and bugs
written the way users write them, not through `harness.faults`) is traced once per grad mode
(inference_mode, no_grad, grad enabled with a backward pass) and per placement (inferred from
where the weights are, and given explicitly). Each run is one of:

- for a bug: detected (a first offence), class right (the class the case expects), located
  right (that class, in the expected module, naming a line of the expected function), or
  crashed (an error other than a device error: the run could not be judged);
- for a clean case: clean, a false alarm (an offence), or crashed.

Cases marked `known` (a limit of the harness, such as nn.DataParallel) are run and listed apart.

    python scripts/unseen_bugs.py --out scripts/results/unseen_bugs.emulated.json
    python scripts/unseen_bugs.py --backend cuda --out scripts/results/unseen_bugs.h100.json

`--backend emulated` (the default without a GPU) runs each case in a fresh emulated accelerator
with two devices; `--backend cuda` on the real GPUs (cases that need two are left out with one,
and said so). Needs the `thirdparty` extra (transformers, accelerate).
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
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from detection_matrix import table  # noqa: E402

from tests.unseen import CASES, GRAD_MODES, PLACEMENTS, Unavailable, trace_case  # noqa: E402

BUG_COLUMNS = ("runs", "detected", "class_right", "located", "crashed")
CLEAN_COLUMNS = ("runs", "clean", "false_alarms", "crashed")


def _accelerator(backend: str):
    if backend == "cuda":
        return contextlib.nullcontext()
    from harness.trace.emulated import EmulatedCuda

    return EmulatedCuda(device_count=2)


def run_all(
    backend: str, names: list[str], modes: list[str], placements: list[str], unavailable: dict[str, str]
) -> list[dict]:
    """The rows of every run; a case this environment cannot build goes into `unavailable`
    (name: why) instead."""
    rows = []
    for name in names:
        case = CASES[name]
        for mode in modes:
            for placement in placements:
                if case.placements and placement not in case.placements or name in unavailable:
                    continue
                with _accelerator(backend):
                    try:
                        o = trace_case(name, mode, placement)
                    except Unavailable as exc:
                        unavailable[name] = str(exc)
                        print(f"  left out: {name}: {exc}", file=sys.stderr)
                        continue
                expect = case.expect_in(mode)
                row = {
                    "case": name,
                    "bug": expect is not None,
                    "known": (case.known_in(mode) or None)
                    if backend == "emulated" or not case.cuda_checked
                    else None,
                    "mode": mode,
                    "placement": placement,
                    "expect": list(expect) if expect else None,
                    "where": case.where,
                    "verdict": o.verdict,
                    "first": list(o.first) if o.first else None,
                    "known_findings": o.known or None,  # a library's own real offences, set apart
                    "counts": o.counts,
                    "error": o.error,
                    "crashed": o.crashed,
                }
                if expect is not None:
                    row |= {
                        "detected": o.detected,
                        "class_right": o.class_right,
                        "located": o.located(case.where),
                    }
                else:
                    row |= {"clean": o.verdict == "clean" and not o.crashed, "false_alarms": o.false_alarm}
                rows.append(row)
                ok = row.get("located", row.get("clean"))
                print(f"  {'ok ' if ok else 'BAD'} {o.describe()[:220]}", file=sys.stderr)
    return rows


def tally(rows: list[dict], columns: tuple[str, ...], key: str | None = None) -> dict:
    out: dict[str, Counter] = {}
    for row in rows:
        c = out.setdefault(row[key] if key else "all", Counter())
        c["runs"] += 1
        for col in columns[1:]:
            c[col] += bool(row[col])
    return {k: {col: c[col] for col in columns} for k, c in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backend", choices=("emulated", "cuda"), default=None, help="default: cuda if there is one"
    )
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--modes", default=",".join(GRAD_MODES))
    p.add_argument("--placements", default=",".join(PLACEMENTS))
    p.add_argument(
        "--out", default=None, help="JSON file (default: scripts/results/unseen_bugs.BACKEND.json)"
    )
    args = p.parse_args(argv)
    backend = args.backend or ("cuda" if torch.cuda.is_available() else "emulated")
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)} (known: {', '.join(CASES)})")
    left_out = []
    if backend == "cuda" and torch.cuda.device_count() < 2:
        left_out = [n for n in names if CASES[n].devices > 1]
        names = [n for n in names if CASES[n].devices <= 1]
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    unavailable: dict[str, str] = {}
    rows = run_all(backend, names, args.modes.split(","), args.placements.split(","), unavailable)
    seconds = round(time.perf_counter() - t0, 1)
    known = [r for r in rows if r["known"]]
    bugs = [r for r in rows if r["bug"] and not r["known"]]
    clean = [r for r in rows if not r["bug"] and not r["known"]]

    import transformers

    device = torch.cuda.get_device_name(0) if backend == "cuda" else "emulated CUDA (2 devices) on the CPU"
    result = {
        "command": "python scripts/unseen_bugs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "backend": backend,
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cases_left_out": left_out,
        "cases_unavailable": unavailable,  # this environment cannot build them (name: why)
        "seconds": seconds,
        "bugs": {
            "total": tally(bugs, BUG_COLUMNS).get("all", dict.fromkeys(BUG_COLUMNS, 0)),
            "by_case": tally(bugs, BUG_COLUMNS, "case"),
            "by_mode": tally(bugs, BUG_COLUMNS, "mode"),
            "by_placement": tally(bugs, BUG_COLUMNS, "placement"),
        },
        "clean": {
            "total": tally(clean, CLEAN_COLUMNS).get("all", dict.fromkeys(CLEAN_COLUMNS, 0)),
            "by_case": tally(clean, CLEAN_COLUMNS, "case"),
            "by_mode": tally(clean, CLEAN_COLUMNS, "mode"),
        },
        # Offences of tests/thirdparty.py's KNOWN_FINDINGS (a library version's own upload, say),
        # set apart from the judging: how many runs had them, and which.
        "runs_with_known_findings": sum(bool(r["known_findings"]) for r in rows),
        "known_findings": dict(Counter(k for r in rows for k in (r["known_findings"] or ()))),
        "known_limits": {r["case"]: r["known"] for r in known},
        "known_limit_runs": [
            {k: r[k] for k in ("case", "mode", "placement", "verdict", "error")} for r in known
        ],
        "misses": [r for r in bugs if not r["located"]],
        "false_alarms_and_crashes": [r for r in clean if not r["clean"]],
        "rows": rows,
    }
    out = Path(args.out or ROOT / "scripts" / "results" / f"unseen_bugs.{backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"held-out bugs and clean models x grad modes x placements on {device}:")
    print(table("bugs", result["bugs"]["by_case"], BUG_COLUMNS))
    print(table("bugs, total", {"all": result["bugs"]["total"]}, BUG_COLUMNS))
    print(table("clean models", result["clean"]["by_case"], CLEAN_COLUMNS))
    print(table("clean, total", {"all": result["clean"]["total"]}, CLEAN_COLUMNS))
    for name, why in result["known_limits"].items():
        judged = sum(r["case"] == name and (r["crashed"] or r["verdict"] != "clean") for r in known)
        runs = sum(r["case"] == name for r in known)
        print(f"known limit, counted apart: {name} ({judged}/{runs} runs not judged clean): {why}")
    if left_out:
        print(f"left out (need two GPUs): {', '.join(left_out)}")
    for name, why in unavailable.items():
        print(f"left out ({why}): {name}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
