#!/usr/bin/env bash
# Issue 24: the forgetting regime, then the comparison in it. Point 1: does the dense
# baseline forget? seqLoRA and incLoRA, 3 seeds each (the seed also draws the rows), in two
# candidate regimes:
#   (b) short_order_1 at 4x the steps per task (512 train rows), the full accuracy matrix
#       through vLLM (2.4x faster than in process here, bench/results/eval_engine.json);
#   (a) long_order_4 (15 tasks) at the per-task budget of issue 10 (128 rows), evaluated on
#       the needed entries only (train.eval_schedule) through vLLM (bench/eval_engine.py).
# Point 3, in (b) once its dense baseline is in, in the issue's order of priority: the
# learned gate and top-k, top-k at the learned gate's density, ELLA and InfLoRA with and
# without the gate, the authors' threshold training (a named preset); 3 seeds each.
# Resumable: bench/cl_quality.py keeps each finished variant and resumes a stopped one.
#   OMP_NUM_THREADS=2 nohup bench/forgetting_regime.sh > runs/forgetting_regime.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
so1_x4() {
  .venv/bin/python -m bench.cl_quality --order short_order_1 --train-rows 512 \
    --eval-engine vllm --tag "so1-x4-seed$1" --set "train.seed=$1" --variants "${@:2}"
}
# Seed by seed, so the key pairs (the learned gate against dense and top-k) have a seed
# in as early as the baselines do.
for seed in 1 2 3; do
  so1_x4 "$seed" incLoRA seqLoRA incLoRA+jump incLoRA+topk
done
for seed in 1 2 3; do
  so1_x4 "$seed" incLoRA+topk@jump
done
for seed in 1 2 3; do
  .venv/bin/python -m bench.cl_quality --order long_order_4 --eval-schedule needed \
    --eval-engine vllm --tag "lo4-seed$seed" --set "train.seed=$seed" \
    --variants incLoRA seqLoRA
done
for seed in 1 2 3; do
  so1_x4 "$seed" ella ella+jump inflora inflora+jump incLoRA+jump-ref
done
