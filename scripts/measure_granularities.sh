#!/usr/bin/env bash
# The measured rows behind the README's granularity table (issue 7): every registered method at
# two MACs targets, ResNet-20 on Fashion-MNIST with the `short` recipe, seeds 0 1 2, each seed's
# methods pruned from that seed's one baseline. Resumable: finished runs are loaded, not redone
# (`prune` appends a row each time it is run; summaries count each run id once).
#
#   bash scripts/measure_granularities.sh            # everything, one job at a time
#   JOBS=2 THREADS=1 bash scripts/measure_granularities.sh   # two jobs, one thread each
#   SEEDS="0" TARGETS="0.436" METHODS="filter-l1 tmi-gkp" bash scripts/measure_granularities.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin/gkp-bench
SEEDS=${SEEDS:-"0 1 2"}
TARGETS=${TARGETS:-"0.436 0.6"}
METHODS=${METHODS:-$($BIN methods --json | .venv/bin/python -c 'import json,sys; print(" ".join(m["name"] for m in json.load(sys.stdin)))')}
JOBS=${JOBS:-1}
THREADS=${THREADS:-}
COMMON=(--model resnet20 --dataset fashion-mnist --recipe short --no-progress)
PRUNE=("${COMMON[@]}")
if [ -n "$THREADS" ]; then export OMP_NUM_THREADS=$THREADS; PRUNE+=(--threads "$THREADS"); fi

for seed in $SEEDS; do  # baselines first, one at a time (each is shared by every method)
    $BIN train "${COMMON[@]}" --seed "$seed" >/dev/null
done
for seed in $SEEDS; do for target in $TARGETS; do for method in $METHODS; do
    echo "$seed $target $method"
done; done; done | xargs -P "$JOBS" -L 1 bash -c '
    log=runs/measure-logs/$0-$1-$2.log; mkdir -p runs/measure-logs
    '"$BIN"' prune '"${PRUNE[*]}"' --seed "$0" --target "$1" --method "$2" >"$log" 2>&1 \
        && echo "done: seed $0 target $1 $2" || echo "FAILED: seed $0 target $1 $2 (see $log)"'
$BIN leaderboard summary --markdown
