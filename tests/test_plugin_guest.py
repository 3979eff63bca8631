"""The plugin as a guest in someone else's project, tried as a new user would.

A throwaway project gets its own venv (no system site packages) made from a wheel of this
package built here (`pip wheel . --no-deps`), with its requirements, torch among them, installed
by pip from wherever pip finds them (here: the local CPU wheel pip is configured with). The
project has what ML projects commonly have: a conftest that defines `--device` and a `device`
fixture, its own `cuda` marker, its own hypothesis profile, YAML files in `tests/cases/` of an
unrelated schema (one has `model:` and `expect:` keys), and hypothesis property tests.

Its suite is run twice, with the plugin (loaded by its entry point) and with `-p no:harness`,
under `CI=true` (which once switched hypothesis profiles): the outcomes must be the same, and so
must what the project's tests see of their settings (hypothesis profile and settings, examples
run, options, markers), but for the plugin's own `--harness-*` options and `harness_cuda` marker.
Neither session may import torch or harness: the project uses neither.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import venv
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parents[1]

PROJECT = {
    "pyproject.toml": """
        [tool.pytest.ini_options]
        addopts = "--strict-markers"
        markers = ["cuda: needs a real GPU (this project's own meaning: skipped without one)"]
        """,
    "conftest.py": """
        import json
        import os
        import sys

        import pytest
        from hypothesis import settings

        settings.register_profile("ci", max_examples=7, derandomize=True)
        settings.register_profile("dev", max_examples=11)
        settings.load_profile(os.environ.get("MY_PROFILE", "dev"))


        def pytest_addoption(parser):
            parser.addoption("--device", default="cpu", help="where this project's tests run")


        @pytest.fixture
        def device(request):
            return request.config.getoption("--device")


        def pytest_collection_modifyitems(config, items):
            for item in items:
                if item.get_closest_marker("cuda"):
                    item.add_marker(pytest.mark.skip(reason="no GPU in this project's CI"))


        def pytest_sessionfinish(session):
            config = session.config
            options = {
                k: v
                for k, v in sorted(vars(config.option).items())
                if not k.startswith("harness") and isinstance(v, (str, int, float, bool, type(None), list))
                and k not in ("plugins", "junitxml", "xmlpath")
            }
            seen = {
                "profile": settings.get_current_profile_name(),
                "settings": repr(settings()),
                "options": options,
                "markers": [m for m in config.getini("markers") if not m.startswith("harness")],
                "harness_loaded": config.pluginmanager.has_plugin("harness"),
                "heavy": sorted(m for m in ("torch", "harness") if m in sys.modules),
            }
            with open(os.environ["SEEN"], "w") as f:
                json.dump(seen, f, indent=1, sort_keys=True)
        """,
    "tests/__init__.py": "",
    "tests/cases/model.yaml": """
        # this project's own test data: nothing to do with harness cases
        model: resnet18
        input: [1, 3, 224, 224]
        expect:
          top1: 0.69
        """,
    "tests/cases/broken.yaml": "model: [unclosed\nexpect: {\n",
    "tests/test_project.py": """
        import os
        from pathlib import Path

        import pytest
        import yaml
        from hypothesis import given, settings
        from hypothesis import strategies as st

        CASES = Path(__file__).parent / "cases"


        def test_device_option(device, pytestconfig):
            assert device == pytestconfig.getoption("--device") == "cpu"


        def test_own_yaml_is_untouched():
            assert yaml.safe_load((CASES / "model.yaml").read_text())["expect"] == {"top1": 0.69}
            assert (CASES / "broken.yaml").read_text().startswith("model: [unclosed")


        @pytest.mark.cuda
        def test_needs_a_gpu():
            raise AssertionError("this project skips its cuda tests")


        EXAMPLES = []


        @given(st.integers())
        def test_property(n):
            EXAMPLES.append(n)
            assert n + 0 == n


        def test_examples_and_profile():
            with open(os.environ["SEEN"] + ".examples", "w") as f:
                f.write(str(len(EXAMPLES)))
            assert settings().max_examples == 11


        def test_failing_on_purpose():
            assert 1 == 2
        """,
}


def _write_project(root: Path) -> None:
    for name, text in PROJECT.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")


def _clean_env(**more: str) -> dict[str, str]:
    """This environment without what would let the guest see this checkout or this session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHON", "HYPOTHESIS"))}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **more}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_clean_env(), **kw)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> dict:
    """The wheel, a fresh venv with it installed (and its requirements), and the project."""
    import torch

    root = tmp_path_factory.mktemp("guest")
    timings = {}
    start = time.perf_counter()
    # Built from a copy of what the package is made of, so that no build output lands in the checkout.
    source = root / "source"
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "harness", "pytest_harness"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy
        copy(
            REPO / part,
            source / part,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(root / "wheel")])
    wheel = next((root / "wheel").glob("harness-*.whl"))
    timings["wheel"] = time.perf_counter() - start

    start = time.perf_counter()
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)  # no system packages
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # This environment's pip installs into the venv (`--python`): no ensurepip, same configuration.
    # torch: the version this environment has (here the local CPU wheel pip is configured with).
    torch_version = torch.__version__
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            str(wheel),
            f"torch=={torch_version}",
        ]
    )
    timings["venv"] = time.perf_counter() - start
    project = root / "project"
    _write_project(project)
    return {"python": python, "project": project, "timings": timings, "root": root}


def _suite(guest: dict, *args: str) -> tuple[dict, dict, dict]:
    """Run the project's suite in its venv: (outcomes by test, what the session saw, examples)."""
    seen = guest["root"] / f"seen-{len(args)}.json"
    xml = guest["root"] / f"junit-{len(args)}.xml"
    env = _clean_env(CI="true", SEEN=str(seen))
    done = subprocess.run(
        [str(guest["python"]), "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={xml}", "-rA", *args],
        cwd=guest["project"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # the one failing test
    assert "Traceback" not in done.stderr, done.stderr
    outcomes = {}
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    examples = int(Path(str(seen) + ".examples").read_text())
    return outcomes, json.loads(seen.read_text()), {"examples": examples, "stdout": done.stdout}


@pytest.mark.slow
def test_a_project_of_its_own_runs_unchanged_with_the_plugin(guest):
    python = guest["python"]
    installed = _run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print([(e.name, e.value) for e in m.entry_points(group='pytest11')])",
        ]
    ).stdout
    assert "('harness', 'pytest_harness.plugin')" in installed
    assert "benchmark" not in installed  # no unrelated plugin reaches the venv

    with_plugin, seen_with, run_with = _suite(guest)
    without, seen_without, run_without = _suite(guest, "-p", "no:harness")

    assert seen_with["harness_loaded"] is True and seen_without["harness_loaded"] is False
    assert with_plugin == without
    assert with_plugin == {
        "tests.test_project::test_device_option": "passed",
        "tests.test_project::test_own_yaml_is_untouched": "passed",
        "tests.test_project::test_needs_a_gpu": "skipped",
        "tests.test_project::test_property": "passed",
        "tests.test_project::test_examples_and_profile": "passed",
        "tests.test_project::test_failing_on_purpose": "failure",
    }
    for key in ("profile", "settings", "options", "markers"):
        assert seen_with[key] == seen_without[key], key
    assert seen_with["profile"] == "dev" and "max_examples=11" in seen_with["settings"]
    assert run_with["examples"] == run_without["examples"] == 11
    assert seen_with["options"]["device"] == "cpu"
    # Loading the plugin imported neither torch nor harness into the project's session.
    assert seen_with["heavy"] == seen_without["heavy"] == []
    # The plugin's own options are there, under their prefix.
    help_text = _run([str(python), "-m", "pytest", "--help"], cwd=guest["project"]).stdout
    assert "--harness-device=DEVICE" in help_text and help_text.count("--device=") == 1  # the project's
    print(
        f"guest venv: wheel {guest['timings']['wheel']:.1f} s, venv and install {guest['timings']['venv']:.1f} s"
    )
