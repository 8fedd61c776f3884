# Sourced by scripts/*.sh: make (or reuse) a virtual environment with this package installed.
# - Uses the active venv if there is one, else ./.venv (created on first use).
# - Keeps an installed torch. Without one it installs torch $TORCH_VERSION, choosing the build:
#   * Linux without an NVIDIA GPU: the CPU build. If pip's own sources already offer it (a local wheel folder or
#     index, as on this project's CI machines), from there; otherwise from PyTorch's CPU index
#     (https://download.pytorch.org/whl/cpu), because the plain `torch` wheel for Linux is the multi-GB CUDA build.
#   * anything else (an NVIDIA GPU, macOS, Windows): pip's default, the CUDA build on Linux.
#   DIFFRWKV_TORCH_INDEX=<url> overrides the index (e.g. https://download.pytorch.org/whl/cu128 for another CUDA).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PIP="python -m pip -q --disable-pip-version-check"
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

has_nvidia_gpu() {
  [ -e /dev/nvidia0 ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
}

# the torch version pip would pick from its configured sources (e.g. 2.13.0+cpu), without installing anything
torch_pip_would_pick() {
  local report
  report=$(mktemp)
  if $PIP install --dry-run --no-deps --ignore-installed --report "$report" "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    python -c 'import json, sys; print(json.load(open(sys.argv[1]))["install"][0]["metadata"]["version"])' "$report"
  fi
  rm -f "$report"
}

if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${DIFFRWKV_TORCH_INDEX:-}" ]; then
    echo "[setup] installing torch $TORCH_VERSION from $DIFFRWKV_TORCH_INDEX"
    $PIP install "torch==$TORCH_VERSION" --index-url "$DIFFRWKV_TORCH_INDEX" --extra-index-url https://pypi.org/simple
  elif [ "$(uname -s)" = Linux ] && ! has_nvidia_gpu && [[ "$(torch_pip_would_pick)" != *+cpu ]]; then
    echo "[setup] no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION from $CPU_INDEX"
    $PIP install "torch==$TORCH_VERSION" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
  else
    echo "[setup] installing torch $TORCH_VERSION"
    $PIP install "torch==$TORCH_VERSION"
  fi
fi
extras=${DIFFRWKV_EXTRAS:-}
echo "[setup] installing diffrwkv${extras:+[$extras]} (editable)"
$PIP install -e ".${extras:+[$extras]}"
