"""YAML regression cases: the schema, a loader whose errors name the file, the key and the line,
and a runner that traces each case and compares the verdict and first offence with what it expects.

A case file (`cases/candle-1815-mixtral-router.yaml`):

    schema: harness-case/1        # required: declares the file a case (see SCHEMA)
    description: candle#1815, the MoE router left on the CPU
    model:
      synth: tiny                 # a preset, or {preset: tiny, block_count: 3, ...} (MixtralConfig fields)
      type: Q4_K_M                # a file type of harness.synth.FILE_TYPES       (default Q4_K_M)
      layout: per-expert          # merged | per-expert                            (default merged)
      router: f16                 # f16 | f32                                      (default f32)
      seed: 0                     # non-negative integer                           (default 0)
    device: cuda                  # cpu | cuda | cuda:N                            (default cuda)
    fault: candle-1815            # a name of harness.faults.CATALOG, or null      (default null)
    tokens: [1, 5, 9, 260, 42]    # or `prompt: some text` (tokenized with the model's vocabulary)
    expect:
      verdict: dirty              # clean | dirty
      class: mismatch             # of the first offence: mismatch | sync | stray | transfer (dirty)
      module: layers.0.moe.router # its module path (a string, or null for "none")  (only for dirty)
      tensor: blk.0.ffn_gate_inp.weight  # its GGUF tensor (a string, or null)     (only for dirty)

Keys, all but `schema`, `model`, `expect` and one of `tokens`/`prompt` optional:
- `name` (default: the file's stem), `description` (text);
- `model`: `synth` as above, or `path:` a GGUF file, relative to the case file or absolute, with
  `~` and environment variables (`${HARNESS_GGUF}`, `$HOME/m.gguf`) expanded when the case runs
  (a variable that is not set skips the case); `type`/`layout`/`router`/`seed` only with `synth`;
- the placement: `device`, or `device_map` (`{embed: cuda:0, layers.0-1: cuda:0, head: cuda:1}`),
  or `n_gpu_layers: N` (llama.cpp's partial offload; `device` then names the GPU); `device_map`
  excludes the other two;
- `accelerator`: `auto` (real CUDA when this machine has the CUDA devices the placement names,
  else the emulated accelerator of `harness.trace.emulated`), `emulated`, or `real` (skipped where
  there is no GPU). The emulated accelerator has as many devices as the placement names, at least 2;
- `strategy`: QMatMul strategy, quantized | f32 | f16 (default quantized);
- `fault`: injected after loading (`Fault.inject`), removed after the run;
- `allow_transfers`: module paths (prefixes) whose copies across devices are declared, not
  offences (`Tracer(allow_transfers=...)`);
- `decode`: greedy decode steps traced after the prefill (default 0);
- `expect`: `verdict` is required; `class`, `module` and `tensor` are compared exactly when given.

Bad input raises `CaseError` (a `HarnessError`) naming file, line and key path:
`cases/foo.yaml:12: expect.module: expected a string or null, got a list`. Unknown keys, wrong
types, bad enum values, duplicate keys, `device` with `device_map`, a missing `expect`, an unknown
fault, and malformed YAML (with the YAML parser's line) are found when the file is loaded; what
only the model can tell (a fault that does not apply to the placement, a token outside the
vocabulary, a missing GGUF file) when the case runs, still with the line of the key responsible.

`run_case(case)` synthesizes the model into a cache (`<out_dir>/models` unless `cache_dir` is
given, a temporary directory without an `out_dir`; cases sharing synth parameters share one
file), loads it under the accelerator, injects the fault, traces the prefill and decode steps to
`<out_dir>/<name>.jsonl` (default `reports/cases`) and compares. A forward that raises (a real
device mismatch) is still a traced, dirty run: the error is caught and kept in `raised`.

Modules: `schema` (the keys, their checks, `Case`), `loader` (YAML with lines, files found and
loaded), `runner` (`run_case`, `CaseResult`).
"""

from harness.cases.loader import declares_schema, find_case_files, load_case, load_cases, parse_case
from harness.cases.runner import CaseResult, model_file, run_case
from harness.cases.schema import (
    ACCELERATORS,
    CASE_SUFFIXES,
    DEFAULT_OUT_DIR,
    SCHEMA,
    Case,
    CaseError,
    Expect,
    ModelSpec,
    SynthSpec,
)

__all__ = [
    "ACCELERATORS",
    "CASE_SUFFIXES",
    "DEFAULT_OUT_DIR",
    "SCHEMA",
    "Case",
    "CaseError",
    "CaseResult",
    "Expect",
    "ModelSpec",
    "SynthSpec",
    "declares_schema",
    "find_case_files",
    "load_case",
    "load_cases",
    "model_file",
    "parse_case",
    "run_case",
]
