#!/usr/bin/env bash
# Every GPU measurement of the GPU-sweeps work in one run, under 8 minutes on one H100/H200.
# Torch and this repository only (no Ray, no Redis): what the lent GPU machine has.
#
#   CAPSNET_DATA_DIR=/path/to/shared/data bash benchmarks/gpu_all.sh [OUT_DIR]
#
# Steps (each under its own timeout, so one slow step cannot eat the others' time):
#   1. the card, driver and torch version;
#   2. gpu_check.py: device/CPU agreement, img/s fp32 vs bf16, a timed epoch per model (100 s);
#   3. bench_tta.py at batch 128 (the CPU default), at batch 512 with lr 3e-3, and the same
#      under torch.compile(mode="reduce-overhead") (CUDA graphs; warm-up included) (3 x 70 s);
#   4. the leaderboard protocol, 3 epochs over all training images, 5 models x 3 seeds x 2
#      augmentations (150 s).
# Logs go to OUT_DIR (default $OUT or benchmarks/results/gpu); the README's tables come from them.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
py=${PYTHON:-python}
step() {  # step NAME SECONDS CMD...: run, time, keep the log, never stop the script
  local name=$1 limit=$2; shift 2
  local began=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc in $((SECONDS - began)) s (limit $limit s)" | tee -a "$out/summary.txt"
  tail -n 25 "$out/$name.log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/device.txt"
step gpu_check 100 $py benchmarks/gpu_check.py
step tta_b128 70 $py benchmarks/bench_tta.py --device cuda --batch-size 128
step tta_b512 70 $py benchmarks/bench_tta.py --device cuda --batch-size 512 --lr 3e-3
step tta_b512_graphs 70 $py benchmarks/bench_tta.py --device cuda --batch-size 512 --lr 3e-3 --compile reduce-overhead
step zoo 150 $py benchmarks/bench_zoo.py --device cuda --epochs 3 --train-subset 0 --out "$out/zoo"
cat "$out/summary.txt"
