#!/usr/bin/env bash
# Issue 24, point 1: does the dense baseline forget? seqLoRA and incLoRA on short_order_1
# at 4x the steps per task (512 train rows), 3 seeds (the seed also draws the rows).
# Resumable: bench/cl_quality.py keeps each finished variant and resumes a stopped one.
#   OMP_NUM_THREADS=1 nohup bench/forgetting_regime.sh > runs/forgetting_regime.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
for seed in 1 2 3; do
  .venv/bin/python -m bench.cl_quality --order short_order_1 --train-rows 512 \
    --tag "so1-x4-seed$seed" --set "train.seed=$seed" --variants incLoRA seqLoRA "$@"
done
