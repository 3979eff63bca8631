"""The package as a new user meets it: an installed wheel, a project of their own, a folder outside the checkout.

Too slow for CI (a wheel, a venv, a dozen pytest sessions: about 3 minutes on 2 busy cores); run
it before a release, or after a change to packaging, the plugin, the CLI or the README:

    python scripts/guest_check.py [--out scripts/results/guest_check.json] [--keep DIR]

1. A wheel of HEAD (`git archive`: what is committed, nothing else) built with `pip wheel
   --no-deps`; it must hold the report's template and the entry points (`harness`, pytest11).
2. A fresh venv (no system packages) with the wheel, this environment's torch version and
   pytest-xdist installed by pip, from wherever pip finds them. Not editable, no PYTHONPATH.
3. The CLI in a folder outside the checkout: `--version`, `--help` of every command, then each
   command on a GGUF made there with `harness synth`, bad input included (one line, exit 2,
   nothing left behind).
4. A project of the user's own (its `--device` option and `device` fixture, its hypothesis
   profile, its `tests/cases/*.yaml` of another schema and a broken one, `--strict-markers`,
   `--strict-config`, warnings as errors) with README.md's code blocks as its tests and scripts:
   run plain, under `CI=true` with pytest-xdist, the emulated device, the HTML report and JUnit
   XML, with `-p no:harness`, with a case file of theirs; `--collect-only`, `--fixtures`,
   `--help` and the plugin's import without torch.

Each check is a row (name, ok, what was seen); the script prints them and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFTEST = """
import pytest
from hypothesis import settings

settings.register_profile("mine", max_examples=9)
settings.load_profile("mine")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="this project's own device option")


@pytest.fixture
def device(request):
    return request.config.getoption("--device")
"""

OWN_TESTS = """
from hypothesis import given, settings
from hypothesis import strategies as st


def test_own_device_option(device):
    assert device == "cpu"


@given(st.integers())
def test_own_profile(n):
    assert settings().max_examples == 9
"""

PYPROJECT = """
[project]
name = "guest"
version = "0"

[tool.pytest.ini_options]
addopts = "--strict-markers --strict-config -ra -p no:cacheprovider"
filterwarnings = ["error"]
markers = ["cuda: this project's own marker"]
testpaths = ["tests"]
"""


class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool, seen: str = "") -> bool:
        self.rows.append({"check": name, "ok": bool(ok), "seen": seen.strip()[-600:]})
        print(
            f"{'ok  ' if ok else 'FAIL'} {name}{': ' + seen.strip()[-300:] if not ok and seen else ''}",
            flush=True,
        )
        return ok


def run(
    cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(venv: Path, **more: str) -> dict[str, str]:
    """No trace of this checkout or of this session: the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST", "HYPOTHESIS", "CI"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **more}


def readme_blocks() -> list[str]:
    return re.findall(
        r"^```python\n(.*?)^```$", (REPO / "README.md").read_text(encoding="utf-8"), re.S | re.M
    )


def build(checks: Checks, root: Path) -> Path:
    source = root / "source"
    source.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    done = run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(root / "wheel")],
        root,
    )
    checks.add("wheel builds (pip wheel --no-deps)", done.returncode == 0, done.stderr)
    wheel = next((root / "wheel").glob("harness-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    checks.add("wheel holds the report template", "harness/report/template.html.j2" in names)
    checks.add("wheel holds pytest_harness", "pytest_harness/plugin.py" in names)
    checks.add(
        "wheel's entry points: harness command, pytest11 plugin",
        "harness = harness.cli:main" in entry_points and "harness = pytest_harness.plugin" in entry_points,
        entry_points,
    )
    return wheel


def install(checks: Checks, root: Path, wheel: Path) -> Path:
    import torch

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    start = time.perf_counter()
    version = torch.__version__.split("+")[0]
    done = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            str(wheel),
            f"torch=={version}",
            "pytest-xdist",
        ],
        root,
    )
    checks.add(
        f"venv: wheel, torch=={version}, pytest-xdist installed ({time.perf_counter() - start:.0f} s)",
        done.returncode == 0,
        done.stderr,
    )
    where = run([str(python), "-c", "import harness, pytest_harness; print(harness.__file__)"], root).stdout
    checks.add("harness is imported from the venv", str(venv) in where, where)
    return venv


def cli(checks: Checks, venv: Path, folder: Path) -> None:
    env = clean_env(venv)
    harness = str(venv / "bin" / "harness")

    def call(*args: str) -> subprocess.CompletedProcess:
        return run([harness, *args], folder, env)

    done = call("--version")
    checks.add(
        "harness --version",
        done.returncode == 0 and done.stdout.startswith("harness 0"),
        done.stdout + done.stderr,
    )
    done = run([str(venv / "bin" / "python"), "-m", "harness", "--help"], folder, env)
    commands = re.findall(r"^    (\w+) ", done.stdout, re.M)
    checks.add(
        f"python -m harness --help lists {len(commands)} commands",
        done.returncode == 0 and len(commands) >= 10,
        done.stdout,
    )
    bad = [c for c in commands if call(c, "--help").returncode != 0]
    checks.add("every command's --help", not bad, f"failed: {bad}")

    done = call("synth", "m.gguf", "--preset", "tiny", "--layout", "per-expert", "--router", "f16", "--quiet")
    checks.add("synth m.gguf", done.returncode == 0 and (folder / "m.gguf").is_file(), done.stderr)
    done = call("synth", "m.gguf", "--preset", "tiny")
    checks.add("synth refuses to overwrite", done.returncode == 2 and "--force" in done.stderr, done.stderr)
    for args, code, expect in (
        (["inspect", "m.gguf"], 0, "general.file_type"),
        (["tokenize", "m.gguf", "hello"], 0, "->"),
        (["run", "-m", "m.gguf", "-p", "hello", "-n", "4", "--device", "emulated"], 0, "hello"),
        (["logits", "m.gguf", "--tokens", "1,2,3", "-o", "l.npy"], 0, "[3, "),
        (
            [
                "trace",
                "m.gguf",
                "--device",
                "emulated",
                "--decode",
                "1",
                "-o",
                "t.jsonl",
                "--report",
                "t.html",
                "--perfetto",
                "t.json",
            ],
            0,
            "clean",
        ),
        (
            ["trace", "m.gguf", "--device", "emulated", "--fault", "candle-1815", "-o", "f.jsonl"],
            1,
            "MISMATCH",
        ),
        (["report", "t.jsonl", "f.jsonl", "-o", "r.html", "--fail-on-dirty"], 1, "wrote r.html"),
        (["bench", "-m", "m.gguf", "-p", "8", "-n", "4", "-r", "2"], 0, "pp8"),
        (["faults"], 0, "candle-1815"),
        (["demo", "--out-dir", "demo"], 0, "caught"),
    ):
        done = call(*args)
        checks.add(
            f"harness {' '.join(args)} -> exit {code}",
            done.returncode == code and expect in done.stdout + done.stderr,
            done.stdout + done.stderr,
        )
    checks.add(
        "report template rendered from the wheel",
        "<html" in (folder / "r.html").read_text(encoding="utf-8")[:2000],
    )
    before = sorted(p.name for p in folder.iterdir())
    for args, message in (
        (["cases"], "no case files given"),
        (["trace", "m.gguf", "--device", "cuda:7"], "--device: device cuda:7 does not exist here"),
        (["report", "t.jsonl", "-o", "absent/r.html"], "the folder absent does not exist"),
        (["logits", "m.gguf", "--tokens", "1,,2", "-o", "x.npy"], "--tokens: item 2"),
    ):
        done = call(*args)
        one_line = done.returncode == 2 and len(done.stderr.splitlines()) == 1 and message in done.stderr
        checks.add(f"harness {' '.join(args)}: one line, exit 2", one_line, done.stderr)
    checks.add("bad input leaves nothing behind", sorted(p.name for p in folder.iterdir()) == before)


def project(checks: Checks, venv: Path, root: Path) -> None:
    proj = root / "project"
    (proj / "tests" / "cases").mkdir(parents=True)
    blocks = readme_blocks()
    suite = next(b for b in blocks if "harness_tracer" in b)
    files = {
        "pyproject.toml": PYPROJECT,
        "conftest.py": CONFTEST,
        "tests/test_own.py": OWN_TESTS,
        "tests/test_readme.py": suite,
        "tests/cases/data.yaml": "model: resnet18\nexpect: {top1: 0.69}\n",
        "tests/cases/broken.yaml": "model: [unclosed\n",
    }
    for name, text in files.items():
        (proj / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    python = str(venv / "bin" / "python")

    def pytest(*args: str, **env: str) -> subprocess.CompletedProcess:
        return run([python, "-m", "pytest", *args], proj, clean_env(venv, **env))

    def passed(done: subprocess.CompletedProcess) -> str:
        return (re.findall(r"=+ (.*?) in [\d.]+s", done.stdout) or [done.stdout[-300:] + done.stderr[-300:]])[
            -1
        ]

    done = pytest()
    checks.add(f"pytest: {passed(done)}", done.returncode == 0 and "4 passed" in done.stdout, done.stdout)
    done = pytest(
        "-n",
        "2",
        "--harness-device",
        "emulated",
        "--harness-report",
        "out/r.html",
        "--junitxml",
        "out/j.xml",
        "-W",
        "error",
        CI="true",
    )
    junit = (proj / "out" / "j.xml").read_text(encoding="utf-8") if (proj / "out" / "j.xml").is_file() else ""
    checks.add(
        f"CI=true pytest -n 2 --harness-device emulated --harness-report --junitxml -W error: {passed(done)}",
        done.returncode == 0
        and "4 passed" in done.stdout
        and (proj / "out" / "r.html").is_file()
        and junit.count("harness_verdict") == 2,
        done.stdout,
    )
    done = pytest("-p", "no:harness", "tests/test_own.py")
    checks.add(
        f"pytest -p no:harness tests/test_own.py: {passed(done)}",
        done.returncode == 0 and "2 passed" in done.stdout,
        done.stdout,
    )
    for args in (["--collect-only", "-q"], ["--fixtures"], ["--help"], ["tests/test_own.py"]):
        done = run([python, "-X", "importtime", "-m", "pytest", *args], proj, clean_env(venv))
        heavy = sorted(set(re.findall(r"\| +(torch|harness)(?:\.|$)", done.stderr, re.M)))
        checks.add(
            f"pytest {' '.join(args)} imports neither torch nor harness",
            done.returncode == 0 and not heavy,
            f"{heavy} {done.stdout[-300:]}",
        )
    done = run([python, "-X", "importtime", "-c", "import pytest_harness.plugin"], proj, clean_env(venv))
    cumulative = {m: int(us) for us, m in re.findall(r"\| +(\d+) \| +(\S+)$", done.stderr, re.M)}
    checks.add(
        f"import pytest_harness.plugin: {cumulative.get('pytest_harness.plugin', 0) / 1000:.0f} ms with pytest, "
        f"{(cumulative.get('pytest_harness.plugin', 0) - cumulative.get('pytest', 0)) / 1000:.1f} ms of its own; no torch",
        "torch" not in cumulative and "harness" not in cumulative,
    )
    # Their own case file, on their own GGUF, with the rest of their YAML beside it left alone.
    run([str(venv / "bin" / "harness"), "synth", "tests/cases/mine.gguf", "--quiet"], proj, clean_env(venv))
    (proj / "tests" / "cases" / "mine.yaml").write_text(
        "schema: harness-case/1\nmodel: {path: mine.gguf}\ntokens: [1, 2, 3]\nexpect: {verdict: clean}\n"
    )
    done = pytest(
        "-o", "harness_cases=tests/cases", "--harness-report", "out/cases.html", "-k", "mine", "-rA"
    )
    report = (
        (proj / "out" / "cases.html").read_text(encoding="utf-8")
        if (proj / "out" / "cases.html").is_file()
        else ""
    )
    checks.add(
        f"pytest -o harness_cases=tests/cases --harness-report: {passed(done)}",
        done.returncode == 0
        and "PASSED tests/cases/mine.yaml::mine" in done.stdout
        and "mine.yaml::mine" in report,
        done.stdout,
    )
    for i, block in enumerate(b for b in blocks if b is not suite):
        (proj / "model.gguf").unlink(missing_ok=True)
        run(
            [str(venv / "bin" / "harness"), "synth", "model.gguf", "--preset", "tiny", "--quiet"],
            proj,
            clean_env(venv),
        )
        (proj / f"readme_{i}.py").write_text(block, encoding="utf-8")
        done = run([python, f"readme_{i}.py"], proj, clean_env(venv))
        checks.add(
            f"README block {i + 1} ({block.splitlines()[0]} ...) runs as written",
            done.returncode == 0,
            done.stderr,
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--keep", help="work in this folder (kept) instead of a temporary one")
    args = p.parse_args()
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="guest-check-") as tmp:
        root = Path(args.keep).resolve() if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        wheel = build(checks, root)
        venv = install(checks, root, wheel)
        (root / "elsewhere").mkdir()
        cli(checks, venv, root / "elsewhere")
        project(checks, venv, root)
        seconds = time.perf_counter() - start
    failed = [r for r in checks.rows if not r["ok"]]
    print(f"{len(checks.rows) - len(failed)} of {len(checks.rows)} checks passed in {seconds:.0f} s")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"seconds": round(seconds), "checks": checks.rows}, indent=1) + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
