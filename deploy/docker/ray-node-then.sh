#!/bin/sh
# Join the Ray cluster at $RAY_ADDRESS as a node of this container, then run the given command
# (normally `capsctl worker`) and leave the cluster when it exits. A Ray driver must run on a
# Ray node, so a capsctl worker container that is not the head joins first; its GPUs (and CPUs)
# then become cluster resources.      usage: ray-node-then capsctl worker
# Extra `ray start` flags: $RAY_NODE_ARGS (e.g. "--num-cpus=1 --num-gpus=0").
set -eu
case "${RAY_ADDRESS:-}" in
  ""|auto|local|ray://*) exec "$@" ;;  # nothing to join: local Ray, or Ray Client
esac
# shellcheck disable=SC2086
ray start --address="$RAY_ADDRESS" --metrics-export-port="${RAY_METRICS_EXPORT_PORT:-8080}" \
  --disable-usage-stats ${RAY_NODE_ARGS:-}
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
status=0
wait "$child" || status=$?
if kill -0 "$child" 2>/dev/null; then wait "$child" || status=$?; fi  # woken by a signal
ray stop --force >/dev/null 2>&1 || true
exit "$status"
