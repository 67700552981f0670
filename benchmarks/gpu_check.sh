#!/usr/bin/env bash
# The GPU checks of issues [model] and [train] in one run, for a session lent an H100/H200:
#   PYTHONPATH=. bash benchmarks/gpu_check.sh "$OUT" [SECONDS]   (SECONDS: the whole run, default 570;
#   give the device tool a timeout_s a little above it)
# Steps run in order of importance, each under its own time limit and never past the whole
# run's, so a step that hangs or fails costs only its own minutes and the ones after it still run
# while time is left. Each step's output goes to OUT/NAME.log as it runs and then to OUT/gpu.log;
# every benchmark's JSON line also to OUT/results.jsonl. Estimated on an H200: 7-8 minutes
# (decode 3, train_step 2-3).
set -uo pipefail
out=${1:-.}
deadline=$((SECONDS + ${2:-570}))
export PYTHONUNBUFFERED=1
: >"$out/gpu.log"
: >"$out/results.jsonl"

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS left=$((deadline - SECONDS))
  if ((left < 20)); then
    echo "=== $name: skipped, ${left} s of the run left" | tee -a "$out/gpu.log"
    return
  fi
  ((limit > left - 10)) && limit=$((left - 10))
  echo "=== $name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  { echo "=== $name: $*"; cat "$out/$name.log"; echo "=== $name: exit $rc after $((SECONDS - start)) s"; } >>"$out/gpu.log"
  grep -h '^{"benchmark"' "$out/$name.log" >>"$out/results.jsonl"
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

step preflight 90 bash -c '
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers, triton; print(sys.version.split()[0], torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import pytest; print(\"pytest\", pytest.__version__)"
  command -v gcc cc
  python3 -c "import torch; f = torch.compile(lambda x: (x * 2).sin()); print(\"torch.compile on cuda:\", f(torch.ones(4, device=\"cuda\")).sum().item())"
'
step tests 120 python3 -m pytest -q tests/test_engine.py tests/test_model.py
step decode 300 python3 benchmarks/decode.py --device cuda --dtype bfloat16 --shape llama-124m --batch-sizes 1,64 \
  --peer-caches static,dynamic --eager-too
step train_step 240 python3 benchmarks/train_step.py --device cuda --dtype bfloat16 --shape llama-124m --repeats 10 --compile
step pretrain_memory 90 python3 benchmarks/pretrain_memory.py --device cuda --dtype bfloat16 --shape llama-124m
step pretrain_throughput 150 python3 benchmarks/pretrain_throughput.py --device cuda --shape llama-124m --steps 20 --repeats 7
