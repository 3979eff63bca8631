"""YAML cases: schema errors that name file, key path and line; environment-variable model paths;
the runner on the shipped seed case and its fixed twin; `harness cases` output and exit codes;
case files collected by the pytest plugin (a good one, a failing one, a malformed one)."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from harness import faults
from harness.cases import (
    Case,
    CaseError,
    find_case_files,
    load_case,
    load_cases,
    model_file,
    parse_case,
    run_case,
)
from harness.cli import main
from harness.errors import UsageError
from tests.plugin_util import plugin_args

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "cases"
SEED = SHIPPED / "candle-1815-mixtral-router.yaml"
FIXED = SHIPPED / "candle-1815-mixtral-router-fixed.yaml"

GOOD = """\
description: a clean tiny model on CUDA
model:
  synth: tiny
  layout: per-expert
  router: f16
device: cuda
tokens: [1, 5, 9]
expect:
  verdict: clean
schema: harness-case/1
"""

SEED_LIKE = """\
model:
  synth: tiny
  type: Q4_K_M
  layout: per-expert
  router: f16
device: cuda
fault: candle-1815
tokens: [1, 5, 9, 260, 42]
expect:
  verdict: dirty
  class: mismatch
  module: {module}
  tensor: blk.0.ffn_gate_inp.weight
schema: harness-case/1
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they cost ~10x
    (run_case already uses 1 thread for synthetic models; this covers GGUF paths and loads)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- schema ------------------------------------------------------------------------------------


def test_seed_case_parses_as_the_issue_describes():
    case = load_case(SEED)
    assert case.name == "candle-1815-mixtral-router"  # the file's stem
    synth = case.model.synth
    assert (synth.layout, synth.router, synth.file_type) == ("per-expert", "f16", "Q4_K_M")
    assert (case.device, case.accelerator, case.fault) == ("cuda", "auto", "candle-1815")
    assert case.expect.verdict == "dirty"
    assert case.expect.first == {
        "class": "mismatch",
        "module": "layers.0.moe.router",
        "tensor": "blk.0.ffn_gate_inp.weight",
    }
    assert case.line("expect.module") == 21
    twin = load_case(FIXED)
    assert twin.model == case.model and twin.fault is None and twin.expect.verdict == "clean"


def test_defaults_and_overrides():
    case = parse_case(
        "model: {synth: {preset: tiny, block_count: 3, rms_eps: 1}}\n"
        "prompt: hello\n"
        "expect: {verdict: dirty, tensor: null}\n",
        "dir/x.yaml",
    )
    assert case.name == "x" and case.device is None and case.cuda_indices() == [0]
    assert case.model.synth.config.block_count == 3 and case.model.synth.config.rms_eps == 1.0
    assert (case.model.synth.file_type, case.model.synth.layout, case.model.synth.router) == (
        "Q4_K_M",
        "merged",
        "f32",
    )
    assert case.expect.first == {"tensor": None}  # given as null: compared with None
    assert (case.decode, case.strategy, case.prompt, case.tokens) == (0, "quantized", "hello", None)


BASE = """\
model:
  synth: tiny
device: cuda
tokens: [1, 2, 3]
expect:
  verdict: dirty
  module: layers.0.attn
"""

# (name, text, line, key path, words in the problem)
SCHEMA_ERRORS = [
    ("unknown top key", BASE + "expct: 1\n", 8, "expct", "unknown key; did you mean 'expect'?"),
    ("unknown nested key", BASE + "  modul: x\n", 8, "expect.modul", "did you mean 'module'?"),
    (
        "wrong type",
        BASE.replace("module: layers.0.attn", "module: [a, b]"),
        7,
        "expect.module",
        "expected a string or null, got a list",
    ),
    ("boolean is no integer", BASE + "decode: true\n", 8, "decode", "expected an integer, got a boolean"),
    ("negative", BASE + "decode: -1\n", 8, "decode", "must be at least 0, got -1"),
    (
        "bad verdict",
        BASE.replace("verdict: dirty", "verdict: dirt"),
        6,
        "expect.verdict",
        "'dirt' is not one of: clean, dirty",
    ),
    (
        "bad class",
        BASE + "  class: mistmatch\n",
        8,
        "expect.class",
        "is not one of: mismatch, sync, stray",
    ),
    ("bad accelerator", BASE + "accelerator: gpu\n", 8, "accelerator", "is not one of: auto, emulated, real"),
    (
        "bad layout",
        BASE.replace("synth: tiny", "synth: tiny\n  layout: mixed"),
        3,
        "model.layout",
        "is not one of: merged, per-expert",
    ),
    ("bad type", BASE.replace("synth: tiny", "synth: tiny\n  type: Q9_K"), 3, "model.type", "'Q9_K'"),
    ("bad preset", BASE.replace("synth: tiny", "synth: huge"), 2, "model.synth", "'huge'"),
    (
        "bad override type",
        BASE.replace("synth: tiny", "synth: {preset: tiny, block_count: two}"),
        2,
        "model.synth.block_count",
        "expected an integer, got a string",
    ),
    (
        "inconsistent config",
        BASE.replace("synth: tiny", "synth:\n    head_count: 3"),
        3,
        "model.synth.head_count",
        "3 heads do not divide embedding_length 256",
    ),
    (
        "synth and path",
        BASE.replace("synth: tiny", "synth: tiny\n  path: m.gguf"),
        2,
        "model",
        "exactly one of 'synth'",
    ),
    (
        "type with a path",
        BASE.replace("synth: tiny", "path: m.gguf\n  type: Q8_0"),
        3,
        "model.type",
        "only with model.synth",
    ),
    (
        "device and device_map",
        BASE + "device_map: {embed: cpu, layers.0-1: cuda:0, head: cuda:0}\n",
        8,
        "device_map",
        "give device or device_map, not both",
    ),
    (
        "bad device",
        BASE.replace("device: cuda", "device: tpu:0"),
        3,
        "device",
        "'tpu:0' is not a device name",
    ),
    (
        "bad device-map key",
        BASE.replace("device: cuda", "device_map:\n  embed: cpu\n  layer.0: cuda:0"),
        5,
        "device_map.layer.0",
        "keys are embed, head, layers.N or layers.A-B",
    ),
    (
        "bad device-map device",
        BASE.replace("device: cuda", "device_map:\n  embed: cpu\n  layers.0-1: gpu1"),
        5,
        "device_map.layers.0-1",
        "'gpu1' is not a device name",
    ),
    ("missing expect", BASE.split("expect:")[0], 1, "expect", "missing (every case says what it expects"),
    (
        "missing verdict",
        BASE.replace("  verdict: dirty\n", ""),
        6,
        "expect.verdict",
        "missing (clean or dirty)",
    ),
    (
        "offence fields on a clean run",
        BASE.replace("verdict: dirty", "verdict: clean"),
        7,
        "expect.module",
        "only with verdict: dirty",
    ),
    (
        "unknown fault",
        BASE + "fault: candle-1816\n",
        8,
        "fault",
        "unknown fault 'candle-1816' (did you mean 'candle-1815'? known faults: candle-1815, ",
    ),
    (
        "token not an integer",
        BASE.replace("tokens: [1, 2, 3]", "tokens:\n  - 1\n  - 2\n  - three"),
        7,
        "tokens[2]",
        "expected a token id (an integer), got a string",
    ),
    ("tokens and prompt", BASE + "prompt: hi\n", 8, "prompt", "give tokens or prompt, not both"),
    (
        "neither tokens nor prompt",
        BASE.replace("tokens: [1, 2, 3]\n", ""),
        1,
        "tokens",
        "missing: give tokens",
    ),
    ("duplicate key", BASE + "device: cpu\n", 8, "device", "duplicate key"),
    ("another schema", BASE + "schema: openapi/3\n", 8, "schema", "'openapi/3' is not a case schema"),
    (
        "not a mapping",
        BASE.replace("  synth: tiny", "  - synth"),
        2,
        "model",
        "expected a mapping, got a list",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"), [e[1:] for e in SCHEMA_ERRORS], ids=[e[0] for e in SCHEMA_ERRORS]
)
def test_schema_errors_name_file_key_and_line(tmp_path, text, line, key, problem):
    path = write(tmp_path / "cases" / "foo.yaml", text)
    with pytest.raises(CaseError) as info:
        load_case(path)
    err = info.value
    assert str(err).startswith(f"{path}:{line}: {key}: "), str(err)
    assert problem in str(err)
    assert (err.path, err.line, err.key) == (str(path), line, key)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("model:\n  synth: tiny\n expect: {verdict: clean}\n", 3, "invalid YAML"),
        ("model: {synth: tiny\ntokens: [1]\n", 2, "invalid YAML"),
        ("tokens: [1, 2\n", 2, "invalid YAML"),
        ("a: b: c\n", 1, "mapping values are not allowed here"),
    ],
)
def test_malformed_yaml_names_the_line(tmp_path, text, line, problem):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(CaseError, match=problem) as info:
        load_case(path)
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    assert info.value.key is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the file is empty"),
        ("- 1\n- 2\n", "expected a mapping, got a list"),
        ("just text\n", "got a string"),
    ],
)
def test_a_case_is_a_mapping(tmp_path, text, problem):
    path = write(tmp_path / "x.yaml", text)
    with pytest.raises(CaseError, match=problem) as info:
        load_case(path)
    assert str(info.value).startswith(f"{path}:1: ")


def test_not_utf8(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(CaseError, match="not UTF-8"):
        load_case(path)


def test_duplicate_case_names_across_files(tmp_path):
    write(tmp_path / "a.yaml", "name: same\n" + GOOD)
    write(tmp_path / "b.yaml", "name: same\n" + GOOD)
    with pytest.raises(CaseError, match=r"b\.yaml:1: name: case name 'same' is also used by .*a\.yaml"):
        load_cases([tmp_path])


def test_find_case_files(tmp_path):
    write(tmp_path / "d" / "b.yml", GOOD)
    write(tmp_path / "d" / "a.yaml", GOOD)
    write(tmp_path / "d" / "notes.txt", "not a case")
    write(tmp_path / "d" / "other.yaml", GOOD.replace("schema: harness-case/1\n", ""))  # undeclared
    assert [p.name for p in find_case_files([tmp_path / "d"])] == ["a.yaml", "b.yml"]
    assert find_case_files([tmp_path / "d" / "other.yaml"]) == [tmp_path / "d" / "other.yaml"]  # named
    with pytest.raises(UsageError, match="no such file or directory"):
        find_case_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no case files here \(\*\.yaml, \*\.yml declaring"):
        find_case_files([tmp_path / "empty"])


def test_every_shipped_case_loads_and_faults_point_where_the_catalog_says():
    """Each shipped fault case expects the location and class that the catalog gives for its model
    and placement (loaded on the emulated accelerator, nothing run)."""
    from harness.model.mixtral import Mixtral
    from harness.trace.emulated import EmulatedCuda

    cases = load_cases([SHIPPED])
    names = {c.name for c in cases}
    assert {"candle-1815-mixtral-router", "candle-1815-mixtral-router-fixed"} <= names
    with_faults = [c for c in cases if c.fault]
    assert len({c.fault for c in with_faults}) >= 4
    assert any(c.device_map for c in cases) and any(c.n_gpu_layers for c in cases)
    with EmulatedCuda(device_count=2):
        for c in with_faults:
            model = Mixtral.from_gguf(
                model_file(c.model.synth),
                device=c.device,
                device_map=c.device_map,
                n_gpu_layers=c.n_gpu_layers,
                max_seq_len=8,
            )
            fault = faults.get(c.fault)
            module, tensor = fault.location(model)
            expected = {"class": fault.expected(model), "module": module, "tensor": tensor}
            assert c.expect.verdict == "dirty" and c.expect.first == expected, c.name


# -- model paths -------------------------------------------------------------------------------


def test_env_var_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_GGUF", "/models/mixtral.gguf")
    monkeypatch.setenv("MODELS", "/data")
    monkeypatch.delenv("HARNESS_NOT_SET", raising=False)

    def path_of(p: str) -> Case:
        return parse_case(
            f"model: {{path: '{p}'}}\ntokens: [1]\nexpect: {{verdict: clean}}\n", tmp_path / "c.yaml"
        )

    assert path_of("${HARNESS_GGUF}").model.resolved_path() == Path("/models/mixtral.gguf")
    assert path_of("$MODELS/q4.gguf").model.resolved_path() == Path("/data/q4.gguf")
    assert path_of("sub/m.gguf").model.resolved_path() == tmp_path / "sub" / "m.gguf"
    assert path_of("~/m.gguf").model.resolved_path() == Path.home() / "m.gguf"
    unset = path_of("${HARNESS_NOT_SET}/m.gguf")
    assert unset.model.unset_variables() == ["HARNESS_NOT_SET"]
    with pytest.raises(KeyError, match="HARNESS_NOT_SET"):
        unset.model.resolved_path()
    result = run_case(unset, out_dir=None)
    assert result.skipped and result.skip_reason == "model.path needs $HARNESS_NOT_SET, which is not set"


def test_a_case_runs_a_gguf_named_by_an_env_var(tmp_path, monkeypatch):
    gguf = model_file(load_case(FIXED).model.synth)
    monkeypatch.setenv("HARNESS_GGUF", str(gguf))
    case = parse_case(
        "model: {path: '${HARNESS_GGUF}'}\ndevice: cuda\ntokens: [1, 5, 9]\nexpect: {verdict: clean}\n",
        tmp_path / "env.yaml",
    )
    result = run_case(case, out_dir=tmp_path)
    assert result.passed, result.report()
    monkeypatch.setenv("HARNESS_GGUF", str(tmp_path / "gone.gguf"))
    with pytest.raises(CaseError, match=r"env\.yaml:1: model\.path: no such file: .*gone\.gguf"):
        run_case(case, out_dir=None)


def test_a_case_whose_logits_are_not_finite_fails(tmp_path):
    """Finite weights that overflow the forward (output norm 3e38): the trace of the devices is
    clean, but a run without a finite result does not pass as clean."""
    from tests.gguf_edit import rewrite

    def huge(raw):
        raw = raw.copy()
        raw[:] = 3.0e38
        return raw

    gguf = rewrite(
        model_file(load_case(FIXED).model.synth), tmp_path / "huge.gguf", edit={"output_norm.weight": huge}
    )
    case = parse_case(
        f"model: {{path: '{gguf}'}}\ndevice: cuda\ntokens: [1, 5, 9]\nexpect: {{verdict: clean}}\n",
        tmp_path / "huge.yaml",
    )
    result = run_case(case, out_dir=tmp_path)
    assert not result.passed and result.summary["verdict"] == "clean"
    assert result.raised.startswith("NonFiniteLogitsError: ") and "NaN or inf" in result.raised
    assert "which the trace does not explain" in result.line()


# -- the runner ----------------------------------------------------------------------------------


def test_seed_case_and_its_fixed_twin(tmp_path):
    import torch

    seed = run_case(load_case(SEED), out_dir=tmp_path)
    assert seed.passed, seed.report()
    assert seed.accelerator == ("cuda" if torch.cuda.is_available() else "emulated")
    assert seed.summary["verdict"] == "dirty"
    assert seed.got == {
        "verdict": "dirty",
        "class": "mismatch",
        "module": "layers.0.moe.router",
        "tensor": "blk.0.ffn_gate_inp.weight",
    }
    assert seed.expected == seed.got
    assert seed.raised and "device" in seed.raised  # CUDA refuses the matmul; the trace has it
    assert seed.trace_path == tmp_path / "candle-1815-mixtral-router.jsonl"
    records = [json.loads(line) for line in seed.trace_path.read_text().splitlines()]
    assert records[0]["record"] == "header" and records[0]["case"] == seed.name
    assert records[-1]["record"] == "summary" and records[-1]["verdict"] == "dirty"
    assert seed.line().startswith(
        "PASS candle-1815-mixtral-router  dirty: mismatch at layers.0.moe.router (blk.0.ffn_gate_inp.weight)  ("
    )

    fixed = run_case(load_case(FIXED), out_dir=tmp_path)
    assert fixed.passed, fixed.report()
    assert fixed.got == {"verdict": "clean"} and fixed.raised is None
    assert fixed.summary["counts"]["mismatch"] == fixed.summary["counts"]["sync"] == 0
    assert fixed.summary["steps"]["traced"] == 3  # the prefill and 2 decode steps
    assert fixed.to_dict()["status"] == "passed"


def test_a_wrong_expectation_fails_with_expected_and_got(tmp_path):
    case = parse_case(SEED_LIKE.format(module="layers.1.moe.router"), tmp_path / "wrong.yaml")
    result = run_case(case, out_dir=tmp_path)
    assert result.status == "failed" and not result.passed
    assert result.failures() == ["expected module layers.1.moe.router, got layers.0.moe.router"]
    assert result.line().startswith(
        "FAIL wrong: expected module layers.1.moe.router, got layers.0.moe.router"
    )
    report = result.report()
    assert "first offence: mismatch in 'layers.0.moe.router'" in report
    assert str(tmp_path / "wrong.jsonl") in report


def test_a_fault_that_does_not_apply_names_the_fault_line(tmp_path):
    text = "model: {synth: tiny}\ndevice: cpu\nfault: candle-1815\ntokens: [1, 5]\nexpect: {verdict: dirty}\n"
    with pytest.raises(CaseError) as info:
        run_case(parse_case(text, tmp_path / "rt.yaml"), out_dir=None)
    assert str(info.value).startswith(
        f"{tmp_path / 'rt.yaml'}:3: fault: candle-1815 does not apply to the placement"
    )
    assert "it needs an F16/F32/BF16 QMatMul weight" in str(info.value)


def test_a_token_outside_the_vocabulary_names_the_tokens_line(tmp_path):
    text = "model: {synth: tiny}\ndevice: cuda:0\ntokens:\n  - 99999\nexpect: {verdict: clean}\n"
    with pytest.raises(CaseError) as info:
        run_case(parse_case(text, tmp_path / "rt.yaml"), out_dir=None)
    assert str(info.value) == (
        f"{tmp_path / 'rt.yaml'}:4: tokens: token id 99999 is outside the vocabulary 0..383"
    )


def test_accelerator_real_without_a_gpu_is_skipped(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    case = parse_case(GOOD + "accelerator: real\n", tmp_path / "real.yaml")
    result = run_case(case, out_dir=None)
    assert (
        result.skipped
        and "accelerator: real needs 1 CUDA device(s); this machine has 0" in result.skip_reason
    )


def test_cpu_case_runs_without_an_accelerator(tmp_path):
    case = parse_case(GOOD.replace("device: cuda", "device: cpu"), tmp_path / "cpu.yaml")
    result = run_case(case, out_dir=None)
    assert result.passed and result.accelerator == "cpu" and result.trace_path is None


# -- the command line ----------------------------------------------------------------------------


def test_cli_runs_cases_and_exits_0(tmp_path, capsys):
    shutil.copy(SEED, tmp_path / SEED.name)
    shutil.copy(FIXED, tmp_path / FIXED.name)
    out_dir = tmp_path / "out"
    assert main(["cases", str(tmp_path), "--out-dir", str(out_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS candle-1815-mixtral-router-fixed  clean  (")
    assert lines[1].startswith("PASS candle-1815-mixtral-router  dirty: mismatch at layers.0.moe.router")
    assert lines[-1] == "2 passed, 0 failed"
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "candle-1815-mixtral-router-fixed.jsonl",
        "candle-1815-mixtral-router.jsonl",
        "models",  # the synthesized model the traces name, kept beside them
    ]
    assert len(list((out_dir / "models").glob("*.gguf"))) == 1  # the twins share one


def test_cli_exits_1_when_a_case_fails_and_json(tmp_path, capsys):
    write(tmp_path / "wrong.yaml", SEED_LIKE.format(module="layers.1.moe.router"))
    shutil.copy(FIXED, tmp_path / FIXED.name)
    assert (
        main(["cases", str(tmp_path / "wrong.yaml"), str(tmp_path / FIXED.name), "--out-dir", str(tmp_path)])
        == 1
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FAIL wrong: expected module layers.1.moe.router, got layers.0.moe.router  (")
    assert lines[-1] == "1 passed, 1 failed"

    assert main(["cases", str(tmp_path / "wrong.yaml"), "--json", "--out-dir", str(tmp_path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["passed"], doc["failed"], doc["errors"]) == (0, 1, 0)
    (case,) = doc["cases"]
    assert case["status"] == "failed"
    assert (
        case["expected"]["module"] == "layers.1.moe.router" and case["got"]["module"] == "layers.0.moe.router"
    )
    assert case["summary"]["first_offence"]["tensor"] == "blk.0.ffn_gate_inp.weight"


def test_cli_exits_2_on_a_malformed_case_before_running_any(tmp_path, capsys):
    write(tmp_path / "a-good.yaml", GOOD)
    bad = write(tmp_path / "b-bad.yaml", GOOD.replace("verdict: clean", "verdict: clean\n  modul: x"))
    assert main(["cases", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran
    assert captured.err.splitlines() == [
        f"harness: error: {bad}:10: expect.modul: unknown key; did you mean 'module'?"
    ]


def test_cli_exits_2_on_a_case_that_cannot_run(tmp_path, capsys):
    write(tmp_path / "cpu-fault.yaml", GOOD.replace("device: cuda", "device: cpu") + "fault: candle-1815\n")
    assert main(["cases", str(tmp_path), "--out-dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(
        f"ERROR cpu-fault: {tmp_path / 'cpu-fault.yaml'}:11: fault: candle-1815 does not apply"
    )
    assert out[-1] == "0 passed, 0 failed, 1 errors"


def test_cli_exits_2_on_a_missing_path(tmp_path, capsys):
    assert main(["cases", str(tmp_path / "nope")]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err


# -- pytest collection ---------------------------------------------------------------------------


def _plugin_args() -> list[str]:
    return plugin_args()


def test_pytest_collects_cases(pytester):
    pytester.makeini("[pytest]\nharness_cases = cases\n")
    write(pytester.path / "cases" / "good.yaml", GOOD)
    write(pytester.path / "cases" / "wrong.yaml", SEED_LIKE.format(module="layers.1.moe.router"))
    write(pytester.path / "cases" / "notes.yaml", "title: not a case\n")  # not declared: never read
    undeclared = GOOD.replace("schema: harness-case/1\n", "")  # a case in all but the declaration
    write(pytester.path / "cases" / "theirs.yaml", undeclared.replace("device: cuda", "device: tpu"))
    write(pytester.path / "data" / "other.yaml", GOOD)  # declared, but not under a configured path

    result = pytester.runpytest(
        *_plugin_args(), "-p", "no:cacheprovider", "-rA", "--harness-report", "r.html"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["PASSED cases/good.yaml::good", "FAILED cases/wrong.yaml::wrong*"])
    # The cases' traces are the session's report, with each case's outcome.
    result.stdout.fnmatch_lines(["harness report: r.html (2 traces from 2 tests)"])
    report = (pytester.path / "r.html").read_text(encoding="utf-8")
    assert "cases/good.yaml::good" in report and "cases/wrong.yaml::wrong" in report
    assert '<span class="outcome failed">failed</span>' in report
    out = result.stdout.str()
    assert "expected module layers.1.moe.router, got layers.0.moe.router" in out
    assert "first offence: mismatch in 'layers.0.moe.router'" in out
    assert "Traceback" not in out and "def runtest" not in out
    assert (pytester.path / "reports" / "cases" / "good.jsonl").is_file()

    off = pytester.runpytest(*_plugin_args(), "--harness-no-cases", "-p", "no:cacheprovider")
    off.assert_outcomes()


def test_pytest_skips_a_case_whose_model_variable_is_not_set_at_the_case_file(pytester, monkeypatch):
    """`-rs` names the case file (not the plugin's module) and the variable."""
    monkeypatch.delenv("HARNESS_NOT_SET", raising=False)
    pytester.makeini("[pytest]\nharness_cases = cases\n")
    theirs = GOOD.replace(
        "  synth: tiny\n  layout: per-expert\n  router: f16\n", "  path: ${HARNESS_NOT_SET}\n"
    )
    write(pytester.path / "cases" / "theirs.yaml", theirs)
    result = pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED [1] cases/theirs.yaml: model.path needs $HARNESS_NOT_SET, which is not set"]
    )


def test_pytest_collects_no_yaml_unless_configured(pytester):
    """A project that never set `harness_cases`: its YAML, even declared case files, is not read."""
    write(pytester.path / "cases" / "good.yaml", GOOD)
    write(pytester.path / "tests" / "cases" / "data.yaml", "model: theirs\nexpect: [1, 2\n")
    result = pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    result.assert_outcomes()


def test_pytest_malformed_case_fails_collection_with_file_and_line(pytester):
    pytester.makeini("[pytest]\nharness_cases = cases\n")
    write(pytester.path / "cases" / "good.yaml", GOOD)
    write(pytester.path / "cases" / "bad.yaml", GOOD.replace("device: cuda", "device: tpu"))
    result = pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider", "--collect-only")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting cases/bad.yaml*",
            "malformed case file: cases/bad.yaml:6: device: 'tpu' is not a device name*",
        ]
    )
    assert "Traceback" not in result.stdout.str()
