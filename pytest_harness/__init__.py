"""The pytest plugin of `harness`, kept outside the `harness` package so that loading it into a
pytest session imports neither torch nor `harness` (pytest loads every installed plugin into
every session of every project). The entry point is `pytest_harness.plugin`; each module below
does one job and imports the heavy parts only inside the hooks and fixtures that need them:

- `options`: command-line options (all `--harness-*`) and ini options (all `harness_*`);
- `devices`: the `cuda` marker on real CUDA or the emulated accelerator, `--harness-device`;
- `fixtures`: `harness_device`, `harness_tracer`, `harness_tiny_mixtral`, `harness_mixtral_gguf`;
- `merge`: the session's traces, merged across pytest-xdist workers into one HTML report;
- `cases`: YAML case files collected as tests, from the configured paths only;
- `assertions`: failed verdict comparisons explained, the verdict as a JUnit XML property;
- `profiles`: hypothesis profiles, registered and loaded only when asked.
"""
