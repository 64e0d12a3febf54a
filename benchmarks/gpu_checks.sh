#!/usr/bin/env bash
# What a session with a GPU runs, in one go: the CUDA tests (autocast, a real out-of-memory retry), what --evaluate
# costs on the GPU, the CT-sized comparison with nnUNetv2_predict and nnunetv2-cam 0.1.6.1, and an ROI re-explained
# through the server on the CT-sized case. Each step has its own time limit, so one slow step leaves the others'
# results.
#     bash benchmarks/gpu_checks.sh OUT_FOLDER [cuda] [eval] [ct] [roi]   (default: all; python: $PYTHON, default
#     python3; tiny models as the suite)
set -u
OUT=${1:-benchmarks/results/gpu}
shift || true
STEPS=${*:-cuda eval ct roi}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
has() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
has cuda && timeout 200 "$PY" -m pytest -q -rs -s Testing/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
has eval && timeout 90 "$PY" benchmarks/evaluation_cost.py --device cuda --out "$OUT/evaluation_cost.json" 2>&1 | tail -20
has ct && timeout 260 "$PY" benchmarks/gpu_ct.py --out "$OUT" 2>&1 | tee "$OUT/gpu_ct.log"
has roi && timeout 200 "$PY" benchmarks/gpu_roi.py --out "$OUT" 2>&1 | tee "$OUT/gpu_roi.log"
true
