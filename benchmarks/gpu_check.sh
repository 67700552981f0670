#!/usr/bin/env bash
# Issue [gpu]'s checks in one window of about ten minutes on one H100/H200:
#   bash benchmarks/gpu_check.sh [FOLDER] [SECONDS]
# FOLDER: where results.jsonl (every figure, one JSON line each) and gpu.log (everything printed) go;
# default $OUT when set, else a new folder under $TMPDIR that the first line names. SECONDS: the whole
# run, default 560 (give the device tool a timeout_s a little above it). PYTHON: the interpreter,
# default .venv/bin/python when there is one, else python3.
#
# Steps run in order of importance, each under its own deadline and never past the whole run's, so a
# step that hangs or fails costs only its own minutes. Every benchmark prints gptlab's figure first
# and the peer's after, each as its own JSON line the moment it is measured (benchmarks/common.py's
# emit appends it to results.jsonl too), so a step cut off keeps what it printed. Each step ends with a
# gpu_check_step line (its exit status and seconds). benchmarks/RESULTS.md says which line decides
# each GPU target. Without a CUDA device every step is skipped, each said, and the run exits 0.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-${OUT:-}}
[[ -n $out ]] || out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$out" || exit 1
log=$out/gpu.log
results=$out/results.jsonl
deadline=$((SECONDS + ${2:-560}))
python=${PYTHON:-python3}
[[ -z ${PYTHON:-} && -x .venv/bin/python ]] && python=.venv/bin/python
export BENCHMARK_RESULTS=$results PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
: >"$log"
: >"$results"
echo "gpu_check: writing $results and $log" | tee -a "$log"

record() {  # record STEP JSON_FIELDS: the step's line in results.jsonl
  echo "{\"benchmark\": \"gpu_check_step\", \"step\": \"$1\", $2}" >>"$results"
}

skip=""
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >>"$log" 2>&1; then
  skip="no CUDA device (torch.cuda.is_available() is false for $python)"
fi

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS left=$((deadline - SECONDS))
  if [[ -n $skip ]] || ((left < 20)); then
    local why=${skip:-"${left} s of the run left"}
    echo "=== $name: skipped: $why" | tee -a "$log"
    record "$name" "\"skipped\": \"$why\""
    return
  fi
  ((limit > left - 10)) && limit=$((left - 10))
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  record "$name" "\"exit\": $rc, \"seconds\": $((SECONDS - start)), \"limit\": $limit"
}

[[ -z $skip ]] && nvidia-smi 2>&1 | tee -a "$log"
step preflight 60 "$python" benchmarks/preflight.py --device cuda
step train_step 150 "$python" benchmarks/train_step.py --device cuda --dtype bfloat16 --shape gpt2-124m --repeats 10 \
  --compile --ours-first
step decode 180 "$python" benchmarks/decode.py --device cuda --dtype bfloat16 --shape llama-124m --batch-sizes 1,64 \
  --peer-caches static --eager-too --ours-first
step decode_logits 60 "$python" benchmarks/decode_logits.py --device cuda --dtype bfloat16 --shape llama-124m \
  --batch-sizes 1,64
step trainer_mfu 120 "$python" benchmarks/trainer_mfu.py --device cuda --shape gpt2-124m --steps 30
step profile 60 "$python" benchmarks/profile_steps.py --device cuda --train-shape gpt2-124m --decode-shape llama-124m
step tests 90 "$python" -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py tests/test_decode_step.py tests/test_engine.py \
  tests/test_model.py tests/test_logprobs.py
echo "gpu_check: done in $SECONDS s; $(grep -c '' "$results") lines in $results" | tee -a "$log"
