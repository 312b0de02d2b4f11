#!/bin/bash
# The whole GPU check, one script: run from the repository root as `bash .gpucheck/gpucheck/run_gpu.sh`.
# Env: OUT (results folder), GPUCHECK_INSTALL=0 to skip the wheel install (CPU rehearsal),
#      GPUCHECK_DEVICE (cuda|cpu), GPUCHECK_LAYERS (0 = TinyLlama's 22; fewer for the CPU rehearsal),
#      GPUCHECK_QUICK=1 for rehearsal sizes.
set -u
G=$PWD/.gpucheck
OUT=${OUT:-/tmp/gpucheck-out}; mkdir -p "$OUT"
W=${GPUCHECK_WORK:-/tmp/gw}; rm -rf "$W"; mkdir -p "$W/results"
DEV=${GPUCHECK_DEVICE:-cuda}; LAYERS=${GPUCHECK_LAYERS:-0}; QUICK=${GPUCHECK_QUICK:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       OLORA_CACHE=$W/cache MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 HF_HOME=$W/hf
PY=${PY:-python3}
STEPS=$OUT/steps.txt; : > "$STEPS"
step() {  # step NAME TIMEOUT_S CMD... : runs, records rc and seconds
  local name=$1 limit=$2; shift 2
  echo; echo "======== $name: $*"; local t=$SECONDS
  timeout -k 10 "$limit" "$@"; local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t))" | tee -a "$STEPS"
  return $rc
}
cd "$G"
SITE=""
if [ "${GPUCHECK_INSTALL:-1}" = 1 ]; then
  step install 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl || exit 3
  SITE=/tmp/site:
fi
tar -xzf assets.tar.gz -C "$W" || exit 4
export PYTHONPATH=${SITE}$G/src:$G/tests:$G/gpucheck:$W/olmo_stub
export GPUCHECK_SMOLLM2_TOKENIZER=$W/smollm2-tok
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 || true

step env_peak 90 $PY gpucheck/env_and_peak.py "$OUT/env.json" $([ "$QUICK" = 1 ] && echo 512)

step pytest_gpu 180 $PY -m pytest -m gpu tests/modeling/test_gpu.py tests/training/test_gpu_training.py -p gpucheck_plugin -v -rA --junitxml="$OUT/pytest_junit.xml"

if [ "$QUICK" = 1 ]; then IR="--ranks 4 --layers 2"; else IR=""; fi
step bench_init 240 $PY bench/bench_init.py --device "$DEV" --dtype bfloat16 $IR --out "$W/results/init" \
  && cp "$W/results/init/"*.json "$OUT/"

step make_model 120 $PY gpucheck/make_tinyllama.py "$W/tinyllama" "$W/model" "$LAYERS"

if [ "$QUICK" = 1 ]; then TA="--steps 2 --warmup 1 --max-examples 400"; FT="train.max_steps=4 train.eval_steps=2 train.save_steps=2 data.max_examples=200 data.max_seq_length=128"
else TA="--steps 8 --warmup 2"; FT=""; fi
step bench_train_mb8 200 $PY bench/bench_train.py --model "$W/model" --repeats 1 $TA --out "$W/results/mb8" \
  && cp "$W/results/mb8/train_${DEV}.json" "$OUT/train_${DEV}_mb8.json"

step bench_train_profile 200 $PY bench/bench_train.py --model "$W/model" --repeats 1 $TA --cases stage-olora hand-olora --profile --out "$W/results/prof" \
  && cp "$W/results/prof/train_${DEV}_profile."* "$OUT/"

step finetune 200 $PY gpucheck/finetune.py "$W/model" "$W/ft" "$OUT/finetune.json" "$OUT/env.json" $FT

if [ "$QUICK" = 1 ]; then MB=16; else MB=64; fi
step bench_train_mb$MB 200 $PY bench/bench_train.py --model "$W/model" --repeats 1 $TA --micro-batch $MB --max-examples 0 --out "$W/results/mbL" \
  && cp "$W/results/mbL/train_${DEV}.json" "$OUT/train_${DEV}_mb${MB}.json"

echo; echo "======== summary"; cat "$STEPS"
if [ "$DEV" = cuda ]; then nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv 2>&1 || true; fi
