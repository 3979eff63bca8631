"""Run a benchmark script with `harness.quant.fused`'s launch settings changed, from the JSON in
$HARNESS_CONFIG, so that one GPU run can time a setting against the default in separate processes:

    HARNESS_CONFIG='{"MOE_FFN_CONFIG": {"int_h": true, "residual": true}}' \\
        python benchmarks/with_config.py benchmarks/bench_model.py --model m.gguf --repeats 3

Each top-level key names a settings dict of fused (INT_MATVEC_CONFIG, ATTENTION_CONFIG,
MOE_FFN_CONFIG, ...); a nested dict is keyed by a GGML type's name (`{"Q4_K": {"unroll": 2}}`) and
updates that type's setting, a plain value sets the key itself (one the dict has: an unknown key
stops the run). Prints each changed dict."""

from __future__ import annotations

import json
import os
import runpy
import sys

from harness.quant import fused
from harness.quant.types import GGMLType


def apply(changes: dict) -> None:
    """`changes` ({settings dict name: {key or type name: value}}) made in fused's dicts."""
    for name, change in changes.items():
        table = getattr(fused, name, None)
        if not isinstance(table, dict):
            raise SystemExit(f"with_config: HARNESS_CONFIG: fused has no settings dict {name!r}")
        for key, value in change.items():
            if isinstance(value, dict):
                table[GGMLType[key]].update(value)  # (a type's setting keys: `fused._planned` checks them)
            elif key in table:
                table[key] = value
            else:  # a misspelt switch would time the default under another name
                raise SystemExit(
                    f"with_config: HARNESS_CONFIG: {name} has no key {key!r} (it has {sorted(table)})"
                )
        shown = {getattr(k, "name", k): v for k, v in table.items()}
        print(f"with_config: {name} = {shown}", flush=True)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: HARNESS_CONFIG=JSON python benchmarks/with_config.py SCRIPT [ARGS...]")
    try:
        apply(json.loads(os.environ.get("HARNESS_CONFIG", "{}")))
    except (json.JSONDecodeError, KeyError) as exc:
        raise SystemExit(f"with_config: HARNESS_CONFIG: {exc}") from None
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
