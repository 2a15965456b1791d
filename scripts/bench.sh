#!/usr/bin/env bash
# Every benchmark in one run: writes benchmarks/results/bench.{json,md,png}. Arguments go to benchmarks/run.py.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
setup_out="$(bash "$HERE/scripts/setup.sh")"
while IFS='=' read -r key value; do
  case "$key" in P3S_*) export "$key=$value" ;; esac
done <<< "$setup_out"
export PYTHONUNBUFFERED=1
exec "$P3S_VENV/bin/python" "$HERE/benchmarks/run.py" "$@"
