#!/usr/bin/env bash
# Every benchmark in one run: writes benchmarks/results/bench.{json,md,png}. Arguments go to benchmarks/run.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$P3S_VENV/bin/python" "$HERE/benchmarks/run.py" "$@"
