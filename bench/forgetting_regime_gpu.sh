#!/usr/bin/env bash
# Issue 24's forgetting regime on one GPU, inside a time budget: bench/forgetting_regime.sh's
# queue as parallel workers (a 135M model at batch 8 leaves a large GPU mostly idle, so
# one process per chain of variants), each variant evaluated in process (the trainer's
# greedy generation: no vLLM needed) in fp32 like the CPU runs. Its result sets carry -gpu
# in their tags (so1-x4-gpu-seed<s>, lo4-gpu-seed<s>): their evaluator is not the CPU sets'
# (vLLM), so they replicate the comparison rather than add seeds to it.
#   bench/forgetting_regime_gpu.sh [BUDGET_S]     # default 480; PY= the Python to use
# At the budget every worker is stopped; finished variants are kept (resumable like the CPU
# queue: a second call runs what is left). Interference (bench/interference.py) measures
# each seed's key runs as soon as they are in, on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUDGET=${1:-480}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
LOGS=runs/forgetting_regime_gpu
mkdir -p "$LOGS"
START=$(date +%s)
left() { echo $((START + BUDGET - $(date +%s))); }

so1_x4() {  # seed, variants...: one after the other (a matched top-k after its twin)
  for variant in "${@:2}"; do
    "$PY" -m bench.cl_quality --order short_order_1 --train-rows 512 --tag "so1-x4-gpu-seed$1" \
      --set "train.seed=$1" --set train.precision=fp32 --variants "$variant" || return
  done
}
lo4() {  # seed, variants...
  for variant in "${@:2}"; do
    "$PY" -m bench.cl_quality --order long_order_4 --eval-schedule needed --tag "lo4-gpu-seed$1" \
      --set "train.seed=$1" --set train.precision=fp32 --variants "$variant" || return
  done
}
measure() {  # seed, variants...: once each variant's row is in (polled), its run is measured
  local rows=bench/results/cl_quality/so1-x4-gpu-seed$1
  for variant in "${@:2}"; do
    until [ -f "$rows/$variant.json" ]; do sleep 5; done
    "$PY" -m bench.interference --measure-only --runs runs/bench/cl_quality \
      --tag "so1-x4-gpu-seed$1" --variants "$variant" || return
  done
}
worker() {  # name, function, args...: in its own process group, stopped at the budget
  local name=$1
  shift
  timeout -k 10 "$(left)" bash -c "$(declare -f so1_x4 lo4 measure); $*" \
    > "$LOGS/$name.log" 2>&1 &
}
export PY
for seed in 1 2 3; do
  worker "gated-$seed" so1_x4 "$seed" incLoRA+jump incLoRA+topk@jump incLoRA+jump-ref \
    ella+jump inflora+jump
  worker "dense-$seed" so1_x4 "$seed" incLoRA incLoRA+topk seqLoRA ella inflora
  worker "lo4-$seed" lo4 "$seed" incLoRA seqLoRA
  worker "measure-$seed" measure "$seed" incLoRA+jump incLoRA incLoRA+topk
done
wait
echo "== forgetting regime (GPU): $(($(date +%s) - START)) s; rows:"
ls bench/results/cl_quality/*-gpu-seed*/ bench/results/interference/*-gpu-seed*/ 2>/dev/null
