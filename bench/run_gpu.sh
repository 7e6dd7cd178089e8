#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): GPU test suite and both benchmarks, raw results to $OUT.
#   run(command="bash bench/run_gpu.sh", timeout_s=600)
# The machine has torch, triton, transformers and peft but no network: nothing is installed. The package runs
# from a copy where kernels/ sits at fastalign/kernels (what `pip install` does), without the C++ extension.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench/results}
mkdir -p "$OUT"
W=/tmp/fastalign_gpu
rm -rf "$W" && cp -r "$REPO" "$W" && rm -rf "$W/fastalign/kernels" && mv "$W/kernels" "$W/fastalign/kernels"
cd "$W" || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$W" TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu_nvidia_smi.txt"
python3 -m fastalign.cli info --json | tee "$OUT/gpu_info.json"
python3 -m pytest -q -ra -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
python3 bench/bench_linear_logprobs.py --repeats ${REPEATS:-10} 2>&1 | tail -30 | tee "$OUT/gpu_bench_linear_logprobs.log"
python3 bench/bench_dpo_loss.py --repeats ${REPEATS:-10} 2>&1 | tail -15 | tee "$OUT/gpu_bench_dpo_loss.log"
cp bench/results/*-cuda-*.json "$OUT/" 2>/dev/null
ls -la "$OUT"
