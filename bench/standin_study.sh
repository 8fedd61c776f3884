#!/usr/bin/env bash
# The pretrained-backbone study on one GPU machine, from the repository root (docs/pretrained.md).
#   Carried: .device/wheels (hydra-core, omegaconf, antlr4, pyrwkv-tokenizer wheels), .device/standin (the corpus's
#   token arrays from bench/standin_corpus.py, xz-compressed), .device/captions/bundle (bench/captions_prepare.py).
#   Pretrains the stand-in once per machine (/tmp/standin), then trains and evaluates the recipes named in VARS.
#   Environment: PRE (pretraining seconds, 240), VARS (frozen,lmhead), TAG, BUDGET (seconds per recipe, 100),
#   SEED (0), DEC (the L2T decoder), LIMIT (seconds for the whole call, 585), EXTRA (more captions_run flags).
#   Writes host.txt, the pretraining log and report, and captions_$TAG.tar into $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DIFFRWKV_WKV_BACKEND=triton
export TRITON_CACHE_DIR=/tmp/tc TORCHINDUCTOR_CACHE_DIR=/tmp/ti
mkdir -p /tmp/tc /tmp/ti /tmp/standin
{ date -u; uname -r; grep -m1 "model name" /proc/cpuinfo; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python -c "import torch,triton;print(torch.__version__, triton.__version__)"; } | tee $OUT/host.txt
PRE=${PRE:-240}
if [ ! -f /tmp/standin/standin-L6-D512.pth ]; then
  python bench/standin_pretrain.py --corpus .device/standin --out /tmp/standin/standin-L6-D512.pth --n-layer 6 --n-embd 512 \
    --length 512 --batch 32 --lr 1.5e-3 --budget-s $PRE --device cuda --fast --wkv-backend triton \
    --report $OUT/standin.json 2>&1 | tee $OUT/pretrain.log | grep -v "^\[pretrain\] step"
fi
ls -la /tmp/standin
VARS=${VARS:-frozen,lmhead}; TAG=${TAG:-p}; BUDGET=${BUDGET:-100}; SEED=${SEED:-0}; DEC=${DEC:-confidence:1:b1:t0:g1}
LEFT=$(( ${LIMIT:-585} - SECONDS ))
python bench/captions_run.py --fast --t2l-steps 1 --variants $VARS --backbone /tmp/standin/standin-L6-D512.pth \
  --budget-s $BUDGET --seed $SEED --tag $TAG --eval-batch 1024 --l2t-decoders $DEC --data .device/captions/bundle \
  --out /tmp/cap_$TAG --tar $OUT/captions_$TAG.tar --deadline-s $LEFT --eval-reserve-s 45 --device cuda ${EXTRA:-} 2>&1 \
  | grep -v "^\s*$" | tail -60
