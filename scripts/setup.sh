#!/usr/bin/env bash
# Set up .venv with the harness and its test tools.
#
# The venv sees none of the system's packages (a system pytest plugin such as pytest-benchmark
# would load into every test run). torch is the one exception: an existing torch (in the active
# environment, or the system's python3) is left alone: it and the packages it needs are linked
# into .venv, never reinstalled. Where there is none, a machine with an NVIDIA GPU gets PyPI's
# default (CUDA) build of torch, and a machine without one the CPU wheel, never the multi-GB
# CUDA build.
#
#   bash scripts/setup.sh                   # the package and its test tools (about a minute)
#   bash scripts/setup.sh --with-llamacpp   # also llama.cpp, compiled from source (4-8 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${HARNESS_TORCH_VERSION:-2.13.0}
EXTRAS=test
LLAMACPP=
for arg in "$@"; do
  case "$arg" in
    --with-llamacpp) EXTRAS=test,thirdparty; LLAMACPP=1 ;;
    *) echo "setup: unknown option $arg (known: --with-llamacpp)" >&2; exit 2 ;;
  esac
done

if [ -n "${VIRTUAL_ENV:-}" ]; then
  py=python
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    # The system's torch, where it has one, is linked in with the GPU runtime it needs (nvidia-*,
    # triton); pip installs its small pure-Python requirements, so that no later install or
    # upgrade in .venv can touch a file of the system's.
    if python3 -c "import torch" 2>/dev/null; then
      site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      python3 - "$site" <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path

site = Path(sys.argv[1])
todo, seen = ["torch"], set()
while todo:  # torch and the installed GPU runtime packages it requires, transitively
    name = todo.pop()
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue  # a requirement for another platform or an extra: not installed
    key = dist.metadata["Name"].lower().replace("_", "-")
    if key in seen or not key.startswith(("torch", "nvidia-", "triton", "cuda-")):
        continue
    seen.add(key)
    base = Path(dist.locate_file(""))
    for top in {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}:
        if (base / top).exists() and not (site / top).exists():
            (site / top).symlink_to(base / top)
    for req in dist.requires or ():
        if "extra ==" not in req:
            todo.append(re.match(r"[A-Za-z0-9._-]+", req)[0])
print(f"setup: linked the system's torch {md.version('torch')} and {len(seen) - 1} GPU runtime packages")
EOF
    fi
  fi
  py=.venv/bin/python
fi
pip=("$py" -m pip install --quiet --disable-pip-version-check)

# torch and llama.cpp's build need a few GB; say so plainly before pip fails half-way with ENOSPC.
free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
if [ -n "$free_mb" ] && [ "$free_mb" -lt 3000 ]; then
  echo "setup: warning: only ${free_mb} MB free on $(df -P . | awk 'NR == 2 {print $6}'); torch and its build need about 3000 MB" >&2
fi

if "$py" -c "import torch" 2>/dev/null; then
  echo "setup: using the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: installing torch==$TORCH_VERSION (CUDA build, a few GB)"
  "${pip[@]}" "torch==$TORCH_VERSION"
else
  echo "setup: no NVIDIA GPU: installing the CPU wheel torch==$TORCH_VERSION+cpu"
  # PyTorch's CPU index, where it can be reached (pip would retry it for every dependency
  # otherwise); a local wheel found through pip's own configuration serves where it cannot.
  cpu_index=https://download.pytorch.org/whl/cpu
  if "$py" -c "import urllib.request; urllib.request.urlopen('$cpu_index/', timeout=5)" 2>/dev/null; then
    "${pip[@]}" --extra-index-url "$cpu_index" "torch==$TORCH_VERSION+cpu"
  else
    "${pip[@]}" "torch==$TORCH_VERSION+cpu"
  fi
fi

echo "setup: installing the harness and its test tools ($EXTRAS)"
"${pip[@]}" -e ".[$EXTRAS]"

if [ -n "$LLAMACPP" ]; then
  # llama-cpp-python compiles llama.cpp's C++ sources with CMake; pip shows nothing meanwhile.
  echo "setup: building llama.cpp from source (llama-cpp-python): about 4-8 minutes on 2 cores"
  start=$SECONDS
  "${pip[@]}" -e ".[llamacpp]" &
  build=$!
  while kill -0 "$build" 2>/dev/null; do
    sleep 30
    kill -0 "$build" 2>/dev/null && echo "setup: still building llama.cpp ($((SECONDS - start)) s so far)"
  done
  wait "$build"
  echo "setup: llama.cpp built in $((SECONDS - start)) s"
fi
echo "setup: ready ($("$py" -c 'import sys; print(sys.prefix)'))"
