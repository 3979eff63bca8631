"""scripts/setup.sh: the venv sees none of the system's packages, but an existing torch is left
alone (linked in, with the GPU runtime it needs); the llama.cpp build says what it does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def test_setup_script_is_valid_bash_and_makes_an_isolated_venv():
    text = SETUP.read_text()
    subprocess.run(["bash", "-n", str(SETUP)], check=True)
    assert "--system-site-packages" not in text.replace("none of the system's", "")
    assert re.search(r"^\s*python3 -m venv \.venv$", text, re.M)
    assert "building llama.cpp from source (llama-cpp-python): about 4-8 minutes" in text
    assert "still building llama.cpp" in text  # a line every 30 s while it compiles


def test_an_existing_torch_is_linked_and_nothing_else(tmp_path):
    pytest.importorskip("torch")
    snippet = re.search(r"<<'EOF'\n(.*?)\nEOF\n", SETUP.read_text(), re.S)[1]
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # This interpreter plays the system's python3 that has torch.
    done = subprocess.run([sys.executable, "-", site], input=snippet, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("setup: linked the system's torch ")
    linked = sorted(p.name for p in Path(site).iterdir() if p.is_symlink())
    assert "torch" in linked and any(n.startswith("torch-") and n.endswith(".dist-info") for n in linked)
    assert all(n.startswith(("torch", "functorch", "nvidia", "triton", "cuda")) for n in linked), linked
    probe = (
        "import importlib.metadata as m, importlib.util as u; "
        "print(m.version('torch'), [n for n in ('pytest', 'pytest_benchmark', 'hypothesis', 'numpy') if u.find_spec(n)])"
    )
    seen = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, check=True)
    import torch

    assert seen.stdout.split(" ", 1) == [torch.__version__, "[]\n"]  # torch, and no other package
