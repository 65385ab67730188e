#!/usr/bin/env bash
# Issue 24's forgetting regime on one GPU, inside a time budget: bench/forgetting_regime.sh's
# queue as one chain of variants per seed, the chains in parallel (a 135M model at batch 8
# leaves a large GPU mostly idle), each variant evaluated in process (the trainer's greedy
# generation: no vLLM needed) in fp32 like the CPU runs. Its result sets carry -gpu in their
# tags (so1-x4-gpu-seed<s>, lo4-gpu-seed<s>): their evaluator is not the CPU sets' (vLLM),
# so they replicate the comparison rather than add seeds to it.
#   bench/forgetting_regime_gpu.sh [BUDGET_S]     # default 480; PY= the Python to use
# At the budget every chain is stopped; finished variants are kept (resumable like the CPU
# queue: a second call runs what is left). Interference (bench/interference.py) measures
# each seed's key runs as soon as they are in, on the GPU. Measured on one H200 whose
# machine gave the processes 2 CPUs: three chains finished one so1-x4 variant each about
# every 150 s (docs/benchmarks.md, section 5).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUDGET=${1:-480}
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || [ "$BUDGET" -eq 0 ]; then
  echo "usage: $0 [BUDGET_S]: a whole number of seconds above 0, got '$BUDGET'" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
LOGS=runs/forgetting_regime_gpu
mkdir -p "$LOGS"
rm -f "$LOGS"/*.done
START=$(date +%s)
left() { echo $((START + BUDGET - $(date +%s))); }

so1_x4() {  # seed, variants...: one after the other (a matched top-k after its twin)
  for variant in "${@:2}"; do
    "$PY" -m bench.cl_quality --order short_order_1 --train-rows 512 --tag "so1-x4-gpu-seed$1" \
      --set "train.seed=$1" --set train.precision=fp32 --variants "$variant" || return
  done
}
lo4() {  # seed, variants...: on 100 dev rows per task, as the CPU set (forgetting_regime.sh)
  for variant in "${@:2}"; do
    "$PY" -m bench.cl_quality --order long_order_4 --eval-schedule needed --tag "lo4-gpu-seed$1" \
      --eval-rows 100 --set "train.seed=$1" --set train.precision=fp32 --variants "$variant" \
      || return
  done
}
measure() {  # seed, variants...: once each variant's row is in (polled), its run is
  # measured; a variant whose chain (seed-<seed>) ended without it is passed over
  local rows=bench/results/cl_quality/so1-x4-gpu-seed$1
  for variant in "${@:2}"; do
    until [ -f "$rows/$variant.json" ] || [ -f "$LOGS/seed-$1.done" ]; do sleep 5; done
    [ -f "$rows/$variant.json" ] || continue
    "$PY" -m bench.interference --measure-only --runs runs/bench/cl_quality \
      --tag "so1-x4-gpu-seed$1" --variants "$variant" --merge-scales 0.5 0.75 ||
      echo "== interference of $variant failed (above); the next one goes on" >&2
  done
}
workers=()
worker() {  # name, commands: in their own process group, stopped at the budget; logs kept
  timeout -k 10 "$(left)" bash -c "$(declare -f so1_x4 lo4 measure); $2; touch $LOGS/$1.done" \
    >> "$LOGS/$1.log" 2>&1 &
  workers+=($!)
}
trap 'kill "${workers[@]}" 2> /dev/null' INT TERM  # (timeout passes it to its group)
export PY LOGS
for s in 1 2 3; do  # per seed: the key pair first, then the rivals, then the 15-task stream
  worker "seed-$s" "so1_x4 $s incLoRA+jump incLoRA incLoRA+topk incLoRA+topk@jump seqLoRA \
    incLoRA+jump-ref ella ella+jump inflora inflora+jump; lo4 $s incLoRA seqLoRA"
  worker "measure-$s" "measure $s incLoRA+jump incLoRA incLoRA+topk incLoRA+topk@jump"
done
wait
echo "== forgetting regime (GPU): $(($(date +%s) - START)) s; rows:"
ls bench/results/cl_quality/*-gpu-seed*/ bench/results/interference/*-gpu-seed*/ 2> /dev/null || true
