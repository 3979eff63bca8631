#!/usr/bin/env bash
# Set up .venv with the harness and its test tools.
#
# torch: an existing torch (in the active environment, or the system's, which the venv can see)
# is left alone. Otherwise a machine with an NVIDIA GPU gets PyPI's default (CUDA) build, and a
# machine without one gets the CPU wheel, never the multi-GB CUDA build.
#
#   bash scripts/setup.sh                   # the package and its test tools
#   bash scripts/setup.sh --with-llamacpp   # also llama.cpp (built from source, ~4 min) for the cross-checks
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${HARNESS_TORCH_VERSION:-2.13.0}
EXTRAS=test
for arg in "$@"; do
  case "$arg" in
    --with-llamacpp) EXTRAS=test,thirdparty,llamacpp ;;
    *) echo "setup: unknown option $arg (known: --with-llamacpp)" >&2; exit 2 ;;
  esac
done

if [ -n "${VIRTUAL_ENV:-}" ]; then
  py=python
else
  [ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
  py=.venv/bin/python
fi
pip=("$py" -m pip install --quiet --disable-pip-version-check)

if "$py" -c "import torch" 2>/dev/null; then
  echo "setup: using the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: installing torch==$TORCH_VERSION (CUDA build)"
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

"${pip[@]}" -e ".[$EXTRAS]"
echo "setup: ready ($("$py" -c 'import sys; print(sys.prefix)'))"
