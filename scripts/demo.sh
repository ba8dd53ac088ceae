#!/usr/bin/env bash
# The whole pipeline on one machine: set-up, `capsctl up` (local Redis, local Ray, a worker),
# a 2-rank DDP LeNet5 job and a full-size 2-rank CapsNet job on real MNIST subsets, followed live, then the
# robustness table (accuracy per test rotation) and a plot; `capsctl down` at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

export RAY_USAGE_STATS_ENABLED=0
export CAPSNET_STATE_DIR=${CAPSNET_STATE_DIR:-$PWD/.capsctl/state}
export CAPSNET_ARTIFACTS=${CAPSNET_ARTIFACTS:-$PWD/.capsctl/artifacts}
if [ -z "${CAPSNET_DATA_DIR:-}" ] && [ -d ../shared/data/MNIST/raw ]; then
  CAPSNET_DATA_DIR=$(cd ../shared/data && pwd); export CAPSNET_DATA_DIR
fi
out=${DEMO_OUT:-$PWD/demo-output}
mkdir -p "$out"
capsctl=.venv/bin/capsctl

$capsctl up --num-cpus 4
trap '$capsctl down' EXIT

job_id() { .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["id"])'; }
echo "== LeNet5, 2-rank DDP on CPU, MNIST shifted by up to 2 px =="
lenet=$($capsctl submit lenet5 --cpu-ranks 2 --epochs 4 --batch-size 128 --lr 2e-3 --train-subset 20000 --val-split 2000 \
        --test-subset 2000 --eval-angles 0,15,35,45 --name demo-lenet5 --json | job_id)
$capsctl logs -f "$lenet"
echo "== CapsNet, full size (8.2 M parameters), 2-rank DDP on CPU, only 4,000 images: a smoke test, not a comparison (README: Results) =="
caps=$($capsctl submit capsnet --cpu-ranks 2 --epochs 2 --batch-size 128 --lr 2e-3 --train-subset 4000 --val-split 1000 \
       --test-subset 1000 --eval-angles 0,15,35,45 --name demo-capsnet --json | job_id)
$capsctl logs -f "$caps"

$capsctl results "$lenet" --plot "$out/lenet5.png"
$capsctl results "$caps" --plot "$out/capsnet.png"
echo
echo "== robustness: both runs side by side (accuracy on the test set rotated by each angle) =="
$capsctl compare "$lenet" "$caps" --plot "$out/accuracy_vs_angle.png"
$capsctl compare "$lenet" "$caps" --csv > "$out/compare.csv"
