#!/usr/bin/env bash
# Device command of the WKV-7 kernel shoot-out (bench/wkv_shootout.py), run from the repository root:
#   bash bench/wkv_shootout.sh [wkv_shootout.py options, e.g. --kernels triton,ours_cuda --budget-s 200]
# Needs, beside the working tree (none of it in git):
#   .device/wheels-wkv/   wheels installed with --no-index --no-deps into /tmp/site: fla-core, einops (fla's
#                         chunk_rwkv7), rwkv-ops, flashrwkv2 (useless without tilelang, which is too big to carry),
#                         ninja (torch.utils.cpp_extension builds with it)
#   .device/blinkdl/      BlinkDL's RWKV-v7/train_temp/cuda/rwkv7_clampw*.cu/.cpp (RWKV-LM, Apache-2.0)
# Writes $OUT/wkv_shootout.json and $OUT/wkv_shootout.log (OUT defaults to /tmp/wkv_shootout). The script keeps to
# a 290 s budget (CUDA builds included); a kernel that cannot import or build prints one line and is skipped.
set -uo pipefail
OUT=${OUT:-/tmp/wkv_shootout}
mkdir -p "$OUT" bench/_external
PY=$(command -v python3 || command -v python)
log="$OUT/wkv_shootout.log"
{
  echo "== $(date -u) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  echo "== python: $PY ($("$PY" --version 2>&1)); nvcc: $(command -v nvcc || echo none); CUDA_HOME=${CUDA_HOME:-unset}"
} | tee "$log"
if ls .device/wheels-wkv/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels-wkv/*.whl 2>&1 | tail -3 | tee -a "$log"
else
  echo "== no wheels in .device/wheels-wkv: fla and rwkv-ops will be reported unavailable" | tee -a "$log"
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH
blinkdl=()
[ -f .device/blinkdl/rwkv7_clampw.cu ] && blinkdl=(--blinkdl-src .device/blinkdl)
timeout 330 "$PY" bench/wkv_shootout.py "${blinkdl[@]}" --budget-s 290 --out "$OUT/wkv_shootout.json" "$@" 2>&1 \
  | tee -a "$log"
rc=${PIPESTATUS[0]}
cp bench/_external/build_*.log "$OUT/" 2>/dev/null
echo "== exit $rc" | tee -a "$log"
exit "$rc"
