#!/usr/bin/env bash
# The GPU checks of issues [model] and [train] in one run, for a session lent an H100/H200:
#   PYTHONPATH=. bash benchmarks/gpu_check.sh "$OUT"
# Each script prints its figures and a final JSON line; everything is also written to OUT/gpu.log.
set -uo pipefail
out=${1:-.}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pytest -q tests/test_model.py tests/test_engine.py tests/test_checkpoint.py
  python3 benchmarks/train_step.py --device cuda --dtype bfloat16 --shape gpt2-124m --repeats 10 --compile
  python3 benchmarks/decode.py --device cuda --dtype bfloat16 --shape llama-124m --batch-sizes 1,64
  python3 benchmarks/decode.py --device cuda --dtype bfloat16 --shape llama-124m --batch-sizes 1,64 --peer-cache static
  python3 benchmarks/decode.py --device cuda --dtype bfloat16 --shape llama-124m --batch-sizes 1 --peer-cache static --no-cuda-graphs
  python3 benchmarks/pretrain_throughput.py --device cuda --shape gpt2-124m --steps 20
  python3 benchmarks/pretrain_memory.py --device cuda --dtype bfloat16 --shape gpt2-124m
} 2>&1 | tee "$out/gpu.log"
