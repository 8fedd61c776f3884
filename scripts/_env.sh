# Sourced by scripts/*.sh: make (or reuse) a virtual environment with this package installed.
# - Uses the active venv if there is one, else ./.venv (created on first use).
# - Installs the CPU build of torch first when torch is missing, so pip does not pull a multi-GB CUDA build.
#   (On this project's CI machines `torch==2.13.0` resolves to a local CPU wheel.) On a GPU machine install the
#   torch build you want before running these scripts; an existing torch is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PIP="python -m pip -q --disable-pip-version-check"
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0"
  $PIP install "torch==2.13.0"
fi
extras=${DIFFRWKV_EXTRAS:-}
echo "[setup] installing diffrwkv${extras:+[$extras]} (editable)"
$PIP install -e ".${extras:+[$extras]}"
