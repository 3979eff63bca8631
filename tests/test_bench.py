"""harness.bench: measurement of a tiny model on the CPU, llama-bench's JSON, the three formats."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys

import pytest

from harness import bench
from harness.errors import UsageError
from harness.gguf_file import open_gguf
from harness.quant.types import GGMLType
from harness.synth import synthesize

# What `llama-bench -o json -p 512 -n 128` prints (fields trimmed to those read, plus a few).
LLAMA_JSON = [
    {
        "build_commit": "abc1234",
        "model_filename": "/tmp/m.gguf",
        "model_size": 28448408736,
        "gpu_info": "NVIDIA H100 80GB HBM3",
        "n_prompt": 512,
        "n_gen": 0,
        "avg_ts": 3908.5,
        "stddev_ts": 344.0,
        "samples_ts": [3600.0, 3900.0, 4225.5],
    },
    {
        "build_commit": "abc1234",
        "model_filename": "/tmp/m.gguf",
        "model_size": 28448408736,
        "gpu_info": "NVIDIA H100 80GB HBM3",
        "n_prompt": 0,
        "n_gen": 128,
        "avg_ts": 183.7,
        "stddev_ts": 2.3,
        "samples_ts": [181.4, 183.7, 186.0],
    },
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.gguf"
    synthesize(path, "tiny", file_type="Q4_K_M")
    return path


def test_measure_times_every_repetition_on_the_cpu(tiny):
    r = bench.measure(tiny, "cpu", n_prompt=9, n_gen=4, repetitions=2, warmup=1)
    assert r.engine == "harness" and r.file_bytes == tiny.stat().st_size
    assert len(r.prefill_seconds) == 2 and len(r.decode_seconds) == 2
    assert all(s > 0 for s in r.prefill_seconds + r.decode_seconds)
    assert r.prefill_tokens_per_second == [9 / s for s in r.prefill_seconds]
    assert r.decode_stats["median"] == pytest.approx(sum(4 / s for s in r.decode_seconds) / 2)
    assert r.load_seconds > 0 and r.peak_gpu_memory_bytes is None and r.copy_bytes_per_second is None
    d = r.to_dict()
    assert d["decode_tokens_per_second_median"] == r.decode_stats["median"]
    json.dumps(d)  # serializable as it is


def test_decode_bytes_per_token_counts_two_of_eight_experts(tiny):
    mf = open_gguf(tiny)
    c = mf.config
    experts = sum(mf.nbytes(n) for n in mf.tensor_names if "_exps" in n)
    embed = mf.nbytes("token_embd.weight")
    others = sum(mf.nbytes(n) for n in mf.tensor_names) - experts - embed
    tied = "output.weight" not in mf
    expected = (
        others + experts * c.expert_used_count / c.expert_count + (embed if tied else embed / c.vocab_size)
    )
    assert bench.decode_bytes_per_token(tiny) == int(expected)


def test_measure_rejects_bad_arguments(tiny, tmp_path):
    with pytest.raises(UsageError, match="no such model file"):
        bench.measure(tmp_path / "absent.gguf", "cpu")
    with pytest.raises(UsageError, match="positive"):
        bench.measure(tiny, "cpu", n_prompt=0)


def test_parse_llama_bench_json_names_tests_like_llama_bench():
    out = bench.parse_llama_bench_json(json.dumps(LLAMA_JSON), "llama-bench -m m.gguf")
    assert out["pp512"] == 3908.5 and out["tg128"] == 183.7
    assert out["command"] == "llama-bench -m m.gguf"
    assert out["tests"]["tg128"]["samples_ts"] == [181.4, 183.7, 186.0]
    with pytest.raises(UsageError, match="not JSON"):
        bench.parse_llama_bench_json("main: error loading model")
    with pytest.raises(UsageError, match="lacks"):
        bench.parse_llama_bench_json(json.dumps([{"n_prompt": 512}]))


def _fake_llama_bench(tmp_path, body: str):
    """An executable that stands in for llama-bench: records its argv and runs `body`."""
    exe = tmp_path / "llama-bench"
    exe.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n{body}\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_run_llama_bench_passes_the_test_arguments_and_parses(tiny, tmp_path):
    exe = _fake_llama_bench(tmp_path, f"print(json.dumps({LLAMA_JSON!r}))")
    out = bench.run_llama_bench(exe, tiny, n_prompt=512, n_gen=128, repetitions=3)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == [
        "-m",
        str(tiny),
        "-p",
        "512",
        "-n",
        "128",
        "-ngl",
        "99",
        "-r",
        "3",
        "-fa",
        "1",
        "-o",
        "json",
    ]
    assert out["pp512"] == 3908.5 and out["tg128"] == 183.7
    assert out["command"].startswith(str(exe)) and "-fa 1" in out["command"]


def test_run_llama_bench_failures_are_one_clear_error(tiny, tmp_path):
    with pytest.raises(UsageError, match="no such executable"):
        bench.run_llama_bench(tmp_path / "nope", tiny)
    exe = _fake_llama_bench(tmp_path, "print('failed to load model', file=sys.stderr); sys.exit(1)")
    with pytest.raises(UsageError, match="exited 1: failed to load model"):
        bench.run_llama_bench(exe, tiny)


def test_format_results_md_json_csv(tiny):
    r = bench.BenchResult(
        engine="harness",
        model_path=os.fspath(tiny),
        file_bytes=2**30,
        device_name="cpu",
        n_prompt=512,
        n_gen=128,
        prefill_seconds=[1.0, 0.5],
        decode_seconds=[1.0, 2.0],
    )
    llama = bench.parse_llama_bench_json(json.dumps(LLAMA_JSON))
    md = bench.format_results([r, llama], "md").splitlines()
    assert md[0] == "| engine | model | size | device | test | t/s |"
    assert md[2] == "| harness | tiny.gguf | 1.00 GiB | cpu | pp512 | 768.00 ± 362.04 |"
    assert md[3] == "| harness | tiny.gguf | 1.00 GiB | cpu | tg128 | 96.00 ± 45.25 |"
    assert md[5].startswith(
        "| llama.cpp | m.gguf | 26.49 GiB | NVIDIA H100 80GB HBM3 | tg128 | 183.70 ± 2.30 |"
    )
    rows = json.loads(bench.format_results([r, llama], "json"))
    assert [row["test"] for row in rows] == ["pp512", "tg128", "pp512", "tg128"]
    assert rows[2]["ts_median"] == 3900.0
    parsed = list(csv.DictReader(io.StringIO(bench.format_results([r], "csv"))))
    assert float(parsed[0]["ts_median"]) == 768.0
    with pytest.raises(UsageError, match="md, json, csv"):
        bench.format_results([r], "xml")


def test_bench_trace_reports_events_per_decoded_token(tiny, tmp_path, monkeypatch):
    """benchmarks/bench_trace.py on the CPU: its JSON has the decode steps' events per token, and
    they and the prefill's add up to the whole trace; each mode's garbage collections; each traced
    mode's ratio to the untraced run of the same repeat; the traces it wrote are deleted."""
    import importlib.util
    import tempfile
    from pathlib import Path

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trace.py"
    spec = importlib.util.spec_from_file_location("bench_trace", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "trace.json"
    args = ["--model", str(tiny), "--decode", "3", "--prompt-tokens", "4", "--repeats", "1"]
    assert (
        module.main([*args, "--sample-every", "2", "--threads", "1", "--out", str(out), "--name", "t"]) == 0
    )
    result = json.loads(out.read_text())["t"]
    assert result["verdict"] == "clean"
    per_token = result["events_per_decoded_token"]
    assert per_token > 0 and result["events_prefill"] > 0
    assert result["events_prefill"] + 3 * per_token == pytest.approx(result["events_full"], abs=0.2)
    assert set(result["gc"]) == {"untraced", "full", "sampled2"} and result["gc_tracked_objects"] > 0
    wall = result["wall_s"]  # one repeat: each paired ratio is that repeat's own
    for mode in ("full", "sampled2"):
        assert result["ratio_wall_paired"][mode] == pytest.approx(
            wall[mode][0] / wall["untraced"][0], abs=1.5e-3
        )
    assert list(scratch.iterdir()) == []


def test_with_config_changes_fused_settings_and_runs_the_script(tmp_path, monkeypatch, capsys):
    """benchmarks/with_config.py: HARNESS_CONFIG's changes are made in fused's settings dicts (a
    type's setting by its name, a plain key itself) before the script runs, which sees them; an
    unknown dict, type or plain key stops it with a message naming HARNESS_CONFIG."""
    import importlib.util
    from pathlib import Path

    from harness.quant import fused
    from harness.quant.types import GGMLType

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "with_config.py"
    spec = importlib.util.spec_from_file_location("with_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(fused.INT_MATVEC_CONFIG, GGMLType.Q4_K, dict(fused.INT_MATVEC_CONFIG[GGMLType.Q4_K]))
    monkeypatch.setattr(fused, "MOE_FFN_CONFIG", dict(fused.MOE_FFN_CONFIG))
    monkeypatch.setattr(fused, "NORM_CONFIG", dict(fused.NORM_CONFIG))
    monkeypatch.setattr(fused, "ATTENTION_CONFIG", dict(fused.ATTENTION_CONFIG))
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\nfrom harness.quant import fused\nfrom harness.quant.types import GGMLType\n"
        "print('saw', fused.INT_MATVEC_CONFIG[GGMLType.Q4_K]['unroll'], fused.MOE_FFN_CONFIG['int_h'],\n"
        "      fused.NORM_CONFIG['int_out'], fused.NORM_CONFIG['router'], fused.ATTENTION_CONFIG['int_out'],\n"
        "      sys.argv[1:])\n"
    )
    monkeypatch.setenv(
        "HARNESS_CONFIG",
        '{"INT_MATVEC_CONFIG": {"Q4_K": {"unroll": 2}}, "MOE_FFN_CONFIG": {"int_h": true}, '
        '"NORM_CONFIG": {"int_out": true, "router": true}, "ATTENTION_CONFIG": {"int_out": true}}',
    )
    monkeypatch.setattr(sys, "argv", ["with_config.py", str(script), "--flag"])
    module.main()
    assert "saw 2 True True True True ['--flag']" in capsys.readouterr().out
    for bad in (
        '{"NO_SUCH_CONFIG": {}}',
        '{"INT_MATVEC_CONFIG": {"Q9_K": {}}}',
        "{not json",
        '{"QKV_CONFIG": {"one_lunch": true}}',
    ):
        monkeypatch.setenv("HARNESS_CONFIG", bad)
        with pytest.raises(SystemExit, match="HARNESS_CONFIG"):
            module.main()


def test_run_gpu_settings_are_switches_fused_has():
    """benchmarks/run_gpu.sh parses (bash -n), and each of its SETTINGS (name|config JSON|test
    words) names settings dicts and keys that fused has, with values of the default's type (a
    per-type setting: a GGML type the dict has and launch setting keys, ints): a renamed or
    misspelt switch would otherwise be timed as the defaults."""
    import re
    import subprocess
    from pathlib import Path

    from harness.quant import fused

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    block = re.search(r"^SETTINGS=\(\n(.*?)^\)", script.read_text(), re.S | re.M).group(1)
    settings = [line.strip().strip("'").split("|") for line in block.splitlines()]
    assert [name for name, _, _ in settings][0] == "base" and len(settings) >= 2
    for name, config, _ in settings:
        for table, change in json.loads(config).items():
            for key, value in change.items():
                if isinstance(value, dict):  # as benchmarks/with_config.py applies it
                    assert GGMLType[key] in getattr(fused, table), (name, table, key)
                    assert set(value) <= set(fused.MATVEC_SETTING_KEYS), (name, table, key)
                    assert all(type(v) is int for v in value.values()), (name, table, key)
                else:
                    assert type(getattr(fused, table)[key]) is type(value), (name, table, key)
