#!/usr/bin/env bash
# One device call: BlinkDL's RWKV-7 training step (wall and GPU kernel time) against ours and Llama, same machine.
# Run from the repository root:   bash bench/speed_call.sh
# with these git-ignored folders carried beside the working tree:
#   .device/wheels*/                      wheels installed with --no-index --no-deps into /tmp/site (fla, ninja, ...)
#   .device/blinkdl-src/                  BlinkDL's RWKV-v7/train_temp src/model.py + the cuda/ files it builds
#                                         (RWKV-LM, Apache-2.0; copied here into the git-ignored bench/_external/)
#   .device/triton-cache.tgz.*            optional: the compile caches an earlier call saved (Triton, Inductor,
#                                         torch extensions); restored into /tmp first
# Stages, in order (STAGES to pick or reorder; each under `timeout`, within LIMIT seconds in all, RESERVE kept for
# saving the caches); every result lands in $OUT:
#   host      the host line (kernel, CPU, GPU/driver, versions, eager launch latency): host/results.json, host.txt
#   blinkdl   his step at 0.1B then 0.4B (BL_SHAPES, T 512, batch 16): blinkdl_0.1b.json, blinkdl_0.4b.json; retried with
#             RWKV_JIT_ON=0 (--jit 0) where the JIT build fails
#   cuda      ours, rwkv7-lm and denoiser-causal-full, the fast path, --wkv-backend cuda, 0.1B and 0.4B: tp_cuda/
#   default   the same with --wkv-backend $DEFAULT_BACKEND (auto: cuda where it builds): tp_default/
#   fla       ours, rwkv7-lm at both shapes with --wkv-backend fla (fla autotunes for minutes on a fresh machine):
#             tp_fla/
#   rebuild   ours, rwkv7-lm at both shapes with DIFFRWKV_WKV_CUDA_RECOMPUTE=1 (the WKV backward rebuilds its
#             states with a second forward instead of the forward keeping them): tp_rebuild/
#   budget    ours, rwkv7-lm at both shapes with --memory-budget 1.0 (the compiled blocks recompute nothing):
#             tp_budget/
#   ab:LABEL  ours with the settings in AB_<LABEL> (environment NAME=VALUE, budget=X, keep=F, residual=bf16|fp32,
#             master=1|0, flat=1|0, inductor:NAME=VALUE, host=1),
#             AB_ROWS at AB_SHAPES:
#             tp_ab_LABEL/ (an A/B of settings inside one call)
#   llama     llama-lm (autocast cast cache on, as users run it) at 0.1B and 0.4B: tp_llama/
#   graphs    with what time is left: bench/gpu_check_graphs.py with DIFFRWKV_WKV_BACKEND=cuda (graphed against
#             eager, model and trainer level): graphs.json
#   ce        the chunked head + cross-entropy checked, its rows kernel timed per launch, then the head timed per chunk
#             size in CE_TIME (default 4096; bench/gpu_check_ce.py --rows --time):
#             ce.json
#   ffn       the channel-mix FFN operator checked against an fp64 reference and the unfused path, then both timed
#             (bench/gpu_check_ffn.py, with FFN_ARGS, e.g. --tiles; up to FFN_CAP seconds, default 120): ffn.json
#   check     (named in STAGES only) the compiled blocks' gradients against eager (bench/gpu_check_compiled.py) with
#             the settings in CHECK_ENV (default DIFFRWKV_MIX_ORDER_REDUCTION=1): check.json, check.log
#   master    (named in STAGES only) the master-weight AdamW checked and timed (bench/gpu_check_master.py, with
#             MASTER_ARGS, e.g. --sweep): master.json, master.log
#   bytes     (named in STAGES only) Inductor's byte count of the compiled blocks on the GPU (bench/block_bytes.py
#             --device cuda), CHECK_ENV as above: bytes.json, bytes.log
#   wkv       the WKV-7 op shoot-out (bench/wkv_shootout.sh; WKV_KERNELS picks the kernels) with our backward
#             keeping its states (the default), then ours again rebuilding them: wkv/, wkv_recompute/
#   blocks    (named in STAGES only) where our WKV backward's thread blocks run and for how long, by block count
#             (bench/wkv_block_trace.py; BLOCK_SHAPES, default 192, 264, 132 and 216 blocks): wkv_trace.json
#   code      (named in STAGES only; last) the modules Inductor generated in this call, each a compiled graph's Triton
#             kernels under the names the profiles show (triton_red_fused_20, ...): inductor_code.tgz
#   sampling  (named in STAGES only) latent -> text at 0.1B, bf16 autocast, 256 sentences of 32 tokens: the default
#             decoders with the RWKV state cache on / off beside the AR decoder's greedy decode: sampling.json
# CE_CHUNK (rows a chunk of the head's cross-entropy) is passed to every throughput stage when set.
# Then summary.md (the figures side by side) and the caches as $OUT/triton-cache.tgz.aa, .ab, ... (15 MB parts;
# CACHE_DIRS picks them among tc ti te, default "tc te"): carry them as .device/triton-cache.tgz.* next time.
set -uo pipefail
OUT=${OUT:-/tmp/speed_call}
LIMIT=${LIMIT:-540}
RESERVE=${RESERVE:-25}
STAGES=${STAGES:-blinkdl,cuda,llama,sampling,rebuild,fla}
DEFAULT_BACKEND=${DEFAULT_BACKEND:-auto}
WARMUP=${WARMUP:-12}
STEPS=${STEPS:-8}
PROFILE=${PROFILE:-8}
FAST="--compile-blocks --cuda-graphs --chunked-ce --memory-budget 0.7 --compile-denoiser --device-cache --no-count-flops"
mkdir -p "$OUT" bench/_external /tmp/tc /tmp/ti /tmp/te
PY=$(command -v python3 || command -v python)
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
export TRITON_CACHE_DIR=/tmp/tc TORCHINDUCTOR_CACHE_DIR=/tmp/ti TORCH_EXTENSIONS_DIR=/tmp/te
note() { echo "== [$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/stages.txt"; }

shopt -s nullglob
wheels=(.device/wheels*/*.whl)  # .device/wheels/, .device/wheels-wkv/, or any other .device/wheels-*/ carried
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" 2>&1 | tail -3
else
  note "no carried wheels: fla (the default backend's kernels) and ninja may be missing"
fi
if ls .device/triton-cache.tgz.* >/dev/null 2>&1; then
  cat .device/triton-cache.tgz.* | tar xzf - -C /tmp 2>/dev/null && note "compile caches restored: $(du -sh /tmp/tc /tmp/ti /tmp/te | tr '\n' ' ')"
fi
if [ -f .device/blinkdl-src/src/model.py ]; then
  rm -rf bench/_external/blinkdl-src && cp -r .device/blinkdl-src bench/_external/blinkdl-src
fi

# run NAME CAP CMD...: CMD under timeout (CAP seconds, or what the call has left), output in $OUT/NAME.log
run() {
  local name=$1 cap=$2
  shift 2
  local left=$((LIMIT - RESERVE - SECONDS))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 20 ]; then
    note "$name: skipped (${left}s left)"
    return 124
  fi
  note "$name: start (up to ${t}s)"
  timeout -k 5 "$t" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc"
  tail -4 "$OUT/$name.log"
  return $rc
}

TP=("$PY" bench/throughput.py --warmup "$WARMUP" --steps "$STEPS" ${CE_CHUNK:+--ce-chunk "$CE_CHUNK"})

for stage in ${STAGES//,/ }; do
  case $stage in
    host)
      { uname -r; grep -m1 "model name" /proc/cpuinfo; nvidia-smi --query-gpu=name,driver_version,memory.total \
          --format=csv,noheader; command -v nvcc && nvcc --version | tail -1; } >"$OUT/host.txt" 2>&1
      run host 60 "${TP[@]}" --rows none --out "$OUT/host"
      ;;
    blinkdl)
      jit=1
      for shape in ${BL_SHAPES:-0.1b 0.4b}; do
        run "blinkdl_$shape" 200 "$PY" bench/blinkdl_step.py --src bench/_external/blinkdl-src --shape "$shape" \
          --jit $jit --out "$OUT/blinkdl_$shape.json"
        if [ ! -f "$OUT/blinkdl_$shape.json" ] && [ $jit = 1 ]; then
          jit=0
          run "blinkdl_${shape}_nojit" 150 "$PY" bench/blinkdl_step.py --src bench/_external/blinkdl-src \
            --shape "$shape" --jit 0 --out "$OUT/blinkdl_$shape.json"
        fi
      done
      ;;
    cuda)
      run tp_cuda ${CUDA_CAP:-200} "${TP[@]}" --shapes 0.1b,0.4b --rows rwkv7-lm,denoiser-causal-full $FAST --wkv-backend cuda \
        --profile "$PROFILE" --out "$OUT/tp_cuda"
      ;;
    default)
      run tp_default 170 "${TP[@]}" --shapes 0.1b,0.4b --rows rwkv7-lm,denoiser-causal-full $FAST \
        --wkv-backend "$DEFAULT_BACKEND" --profile "$PROFILE" --out "$OUT/tp_default"
      ;;
    llama)
      run tp_llama 90 "${TP[@]}" --shapes 0.1b,0.4b --rows llama-lm --no-count-flops --profile "$PROFILE" --out "$OUT/tp_llama"
      ;;
    graphs)
      DIFFRWKV_WKV_BACKEND=cuda run graphs 150 "$PY" bench/gpu_check_graphs.py --out "$OUT/graphs.json"
      ;;
    ffn)
      run ffn "${FFN_CAP:-120}" "$PY" bench/gpu_check_ffn.py ${FFN_ARGS:-} --out "$OUT/ffn.json"
      ;;
    ce)
      run ce 150 "$PY" bench/gpu_check_ce.py --rows --time ${CE_TIME:-4096} --out "$OUT/ce.json"
      ;;
    check)
      # the compiled blocks' gradients against eager, with the Inductor settings of CHECK_ENV (NAME=VALUE ...; default
      # the mix-order reduction left on, the setting still opt-in)
      run check 170 env ${CHECK_ENV:-DIFFRWKV_MIX_ORDER_REDUCTION=1} "$PY" bench/gpu_check_compiled.py \
        --out "$OUT/check.json"
      ;;
    master)
      # the master-weight AdamW's Triton update against its torch path, then timed against torch's fused AdamW
      run master 120 "$PY" bench/gpu_check_master.py ${MASTER_ARGS:-} --out "$OUT/master.json"
      ;;
    bytes)
      # Inductor's byte count of the compiled blocks with Triton's own fusion (0.4B width; CHECK_ENV as above)
      run bytes 90 env ${CHECK_ENV:-DIFFRWKV_MIX_ORDER_REDUCTION=1} "$PY" bench/block_bytes.py --device cuda --top 40 \
        --out "$OUT/bytes.json"
      ;;
    blocks)
      run blocks 120 "$PY" bench/wkv_block_trace.py ${BLOCK_SHAPES:+--shapes "$BLOCK_SHAPES"} --out "$OUT/wkv_trace.json"
      ;;
    wkv)
      run wkv 200 env DIFFRWKV_WKV_CUDA_RECOMPUTE=0 OUT="$OUT/wkv" bash bench/wkv_shootout.sh --kernels "${WKV_KERNELS:-blinkdl_v3,ours_cuda}" \
        --budget-s 150
      run wkv_recompute 90 env DIFFRWKV_WKV_CUDA_RECOMPUTE=1 OUT="$OUT/wkv_recompute" bash bench/wkv_shootout.sh \
        --kernels ours_cuda --budget-s 60
      ;;
    rebuild)
      run tp_rebuild 150 env DIFFRWKV_WKV_CUDA_RECOMPUTE=1 "${TP[@]}" --shapes 0.1b,0.4b --rows rwkv7-lm $FAST \
        --wkv-backend cuda --profile "$PROFILE" --out "$OUT/tp_rebuild"
      ;;
    budget)
      run tp_budget 150 "${TP[@]}" --shapes 0.1b,0.4b --rows rwkv7-lm ${FAST/--memory-budget 0.7/--memory-budget 1.0} \
        --wkv-backend cuda --profile "$PROFILE" --out "$OUT/tp_budget"
      ;;
    fla)
      run tp_fla 300 "${TP[@]}" --shapes 0.1b,0.4b --rows rwkv7-lm $FAST --wkv-backend fla --profile "$PROFILE" \
        --out "$OUT/tp_fla"
      ;;
    sampling)
      run sampling 120 "$PY" bench/bench_sampling.py --rows decoders --autocast bf16 --layers 12 --width 768 \
        --vocab 65536 --n 256 --length 32 --out "$OUT/sampling.json"
      ;;
    ab:*)
      # ab:LABEL runs AB_ROWS (default rwkv7-lm) at AB_SHAPES (default 0.4b) with the fast path, --wkv-backend cuda
      # and the settings in AB_<LABEL>: NAME=VALUE environment assignments, budget=X (the compiled blocks' memory
      # budget), keep=F (--wkv-keep-states F), residual=bf16|fp32 (--bf16-residual / --no-bf16-residual; the
      # default is bf16), master=1|0 (--master-weights / --no-master-weights; off by default), flat=1|0 (--flat-adamw /
      # --no-flat-adamw; on CUDA on by default),
      # inductor:NAME=VALUE (--inductor NAME=VALUE, an Inductor option), ce=N (--ce-chunk N), host=1 (--host-profile:
      # the host's functions over steps timed alone, cProfile), tree=DIR (the package
      # and bench/throughput.py from DIR, another copy of the repository: a change timed against the code before it in
      # one call);
      # up to AB_CAP seconds (150)
      label=${stage#ab:}
      spec_var="AB_${label}"
      envs=() budget=0.7 keep=() ind=() tp=("${TP[@]}")
      for item in ${!spec_var:-}; do
        case $item in
          budget=*) budget=${item#budget=} ;;
          keep=*) keep=(--wkv-keep-states "${item#keep=}") ;;
          residual=bf16) ind+=(--bf16-residual) ;;
          residual=fp32) ind+=(--no-bf16-residual) ;;
          master=1) ind+=(--master-weights) ;;
          master=0) ind+=(--no-master-weights) ;;
          flat=1) ind+=(--flat-adamw) ;;
          flat=0) ind+=(--no-flat-adamw) ;;
          inductor:*) ind+=(--inductor "${item#inductor:}") ;;
          ce=*) ind+=(--ce-chunk "${item#ce=}") ;;
          host=1) ind+=(--host-profile) ;;
          tree=*) envs+=("PYTHONPATH=${item#tree=}:/tmp/site") tp[1]="${item#tree=}/bench/throughput.py" ;;
          *=*) envs+=("$item") ;;
        esac
      done
      run "tp_ab_$label" "${AB_CAP:-150}" env "${envs[@]}" "${tp[@]}" --shapes "${AB_SHAPES:-0.4b}" --rows "${AB_ROWS:-rwkv7-lm}" \
        ${FAST/--memory-budget 0.7/--memory-budget $budget} "${keep[@]}" "${ind[@]}" --wkv-backend cuda --profile "$PROFILE" \
        --out "$OUT/tp_ab_$label"
      mkdir -p "$OUT/tp_ab_$label" && echo "${!spec_var:-} (budget $budget)" >"$OUT/tp_ab_$label/spec.txt"
      ;;
    code)
      # Inductor's cache is not restored from earlier calls, so every module under it was written by this one
      find /tmp/ti -name '*.py' -exec grep -l 'async_compile.triton(' {} + 2>/dev/null | tar czf "$OUT/inductor_code.tgz" -T -
      note "code: $(tar tzf "$OUT/inductor_code.tgz" 2>/dev/null | wc -l) modules"
      ;;
    *) note "unknown stage $stage (known: host, blinkdl, cuda, default, fla, rebuild, budget, llama, graphs, ce, ffn, check, master, bytes, blocks, code, wkv, sampling, ab:LABEL)" ;;
  esac
done

"$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
def f(x, spec=",.0f"):
    return format(x, spec) if isinstance(x, (int, float)) else "-"
host = (load(out / "host" / "results.json") or {}).get("host")
print(f"# Speed call\n\nHost: {host}\n")
# the last column is the host-independent bar: his step's GPU kernel time over our step's wall time (alone; steps back
# to back), >= 1 where ours would beat his on a host that launches his kernels instantly
print("| shape | what | tokens/s (step alone) | back to back | kernel-bound | GPU kernel ms / step | launches / step "
      "| loss 1st step | peak GiB | status | his GPU ms / our step ms (alone; back to back) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
def bar(his_kms, tokens, *rates):
    if not his_kms or not tokens:
        return "-"
    return "; ".join(f"{his_kms / (1000 * tokens / t):.2f}x" if t else "-" for t in rates)
for shape in ("0.1b", "0.4b"):
    b = load(out / f"blinkdl_{shape}.json")
    his_kms = (b or {}).get("gpu_kernel_ms_per_step")
    if b:
        print(f"| {shape} | BlinkDL train_temp (jit {b['env']['RWKV_JIT_ON']}) | {f(b.get('tokens_per_s'))} | "
              f"{f(b.get('tokens_per_s_run'))} | {f(b.get('tokens_per_s_kernel_bound'))} | "
              f"{f(his_kms, '.1f')} | {f(b.get('kernels_per_step'))} | "
              f"{f(b.get('first_loss'), '.4f')} | {f(b.get('peak_mem_gib'), '.1f')} | {b.get('status')} | - |")
    ab = sorted(p.name for p in out.glob("tp_ab_*"))
    for tag in ("tp_cuda", "tp_rebuild", "tp_budget", *ab, "tp_fla", "tp_default", "tp_llama"):
        res = load(out / tag / "results.json") or {"rows": []}
        for r in res["rows"]:
            if r["shape"] != shape:
                continue
            prof = r.get("profile") or {}
            kms = prof.get("gpu_kernel_ms_per_step")
            kb = res["batch"] * res["length"] / (kms / 1000) if kms else None
            what = f"{r['row']} ({(r.get('notes') or {}).get('wkv_backend', '-')})"
            if tag in ("tp_rebuild", "tp_budget"):  # the A/B stages: say which
                what += {"tp_rebuild": ", WKV states rebuilt", "tp_budget": ", memory budget 1.0"}[tag]
            elif tag.startswith("tp_ab_"):
                spec = (out / tag / "spec.txt").read_text().strip() if (out / tag / "spec.txt").exists() else ""
                what += f", {tag[6:]}: {spec}"
            tokens = res["batch"] * res["length"]
            print(f"| {shape} | {what} | {f(r.get('tokens_per_s'))} | {f(r.get('tokens_per_s_run'))} | {f(kb)} | "
                  f"{f(kms, '.1f')} | {f(prof.get('kernels_per_step'))} | {f(r.get('first_loss'), '.4f')} | "
                  f"{f(r.get('peak_mem_gib'), '.1f')} | {r['status']} | "
                  f"{bar(his_kms, tokens, r.get('tokens_per_s'), r.get('tokens_per_s_run'))} |")
# a step timed alone, under the profiler: where our GPU waits (bench/throughput.py step_timeline)
alone_rows = []
for tag in ("tp_cuda", *sorted(p.name for p in out.glob("tp_ab_*")), "tp_default"):
    for r in (load(out / tag / "results.json") or {"rows": []})["rows"]:
        t = (r.get("profile") or {}).get("alone") or {}
        if t.get("steps"):
            alone_rows.append(f"| {r['shape']} | {r['row']} ({tag}) | {t['lead_ms']:.2f} | {t['busy_ms']:.2f} | "
                              f"{t['idle_ms']:.2f} | {t['tail_ms']:.2f} |")
if alone_rows:
    print("\n## Our step alone, under the profiler (ms): before the first kernel, kernels, between them, after\n")
    print("| shape | what | before | kernels | between | after |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(alone_rows))
# where the GPU time goes: his step's kernel categories beside our LM step's (bench/throughput.py KERNEL_CATEGORIES)
for shape in ("0.1b", "0.4b"):
    his = ((load(out / f"blinkdl_{shape}.json") or {}).get("profile") or {}).get("categories") or {}
    # our LM step from the cuda stage, else from the first A/B stage
    ours = next((r.get("profile", {}).get("categories") for tag in ("tp_cuda", *sorted(p.name for p in
                 out.glob("tp_ab_*"))) for r in (load(out / tag / "results.json") or {"rows": []})["rows"]
                 if r["shape"] == shape and r["row"] == "rwkv7-lm"), None) or {}  # fmt: skip
    if his and ours:
        print(f"\n## GPU kernel ms a step by category, {shape}: BlinkDL vs ours (LM step)\n")
        print("| category | BlinkDL | ours | ours - his |")
        print("|---|---:|---:|---:|")
        for cat in sorted(set(his) | set(ours), key=lambda c: -max(his.get(c, {}).get("ms_per_step", 0),
                                                                    ours.get(c, {}).get("ms_per_step", 0))):
            a_ms = his.get(cat, {}).get("ms_per_step", 0.0)
            b_ms = ours.get(cat, {}).get("ms_per_step", 0.0)
            print(f"| {cat} | {a_ms:.2f} | {b_ms:.2f} | {b_ms - a_ms:+.2f} |")
s = load(out / "sampling.json")
if s:
    r0 = s["results"][0] if s["results"] else {}
    print(f"\n## Sampling, latent -> text ({s['device']}, batch {r0.get('batch')}, {r0.get('length')} tokens)\n")
    print("| run | RWKV state cache | dtype | sentences/s | tokens/s | model s / total s |")
    print("|---|---|---|---:|---:|---:|")
    for r in s["results"]:
        print(f"| {r['run']} | {r.get('state_cache', '-')} | {r.get('dtype', '-')} | "
              f"{f(r['sentences_per_s'], ',.1f')} | {f(r['tokens_per_s'])} | "
              f"{f(r.get('model_s'), '.2f')} / {f(r.get('total_s'), '.2f')} |")
    print()
    for k, v in (s.get("agreement") or {}).items():
        print(f"- rows identical, {k}: {v:.3f}")
EOF

# Only 8 files come back from a device call: all but the summary, the stage log and the cache parts go into results.tgz.
( cd "$OUT" && tar czf /tmp/results.tgz --exclude='triton-cache.tgz.*' . && \
  find . -mindepth 1 -maxdepth 1 ! -name summary.md ! -name stages.txt ! -name 'triton-cache.tgz.*' -exec rm -rf {} + && \
  mv /tmp/results.tgz results.tgz )
if [ -n "${NOSAVE:-}" ]; then exit 0; fi
# Triton's kernels and the torch extensions (our WKV kernel, his) by default: with Inductor's cache as well the parts
# outgrew what a call brings back (5 x 15 MB beside the results) and what the next one can carry (64 MiB in all)
tar czf - -C /tmp ${CACHE_DIRS:-tc te} 2>/dev/null | split -b 15M - "$OUT/triton-cache.tgz."
note "caches saved: $(ls -la "$OUT"/triton-cache.tgz.* | awk '{s += $5} END {printf "%.1f MB", s / 1e6}')"
