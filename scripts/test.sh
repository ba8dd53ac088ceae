#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Tests start their own redis-server,
# Ray and Prometheus instances; real MNIST is read from ../shared/data (or CAPSNET_DATA_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest "$@"
