#!/usr/bin/env bash
# What a session with a GPU runs, in one go: the CUDA tests (autocast, a real out-of-memory retry), what --evaluate
# costs on the GPU, and the CT-sized comparison with nnUNetv2_predict and nnunetv2-cam 0.1.6.1. Each step has its
# own time limit, so one slow step leaves the others' results.
#     bash benchmarks/gpu_checks.sh OUT_FOLDER        (python: $PYTHON, default python3; tiny models as the suite)
set -u
OUT=${1:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 200 "$PY" -m pytest -q -rs -s Testing/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout 90 "$PY" benchmarks/evaluation_cost.py --device cuda --out "$OUT/evaluation_cost.json" 2>&1 | tail -20
timeout 260 "$PY" benchmarks/gpu_ct.py --out "$OUT" 2>&1 | tee "$OUT/gpu_ct.log"
