#!/usr/bin/env bash
# The whole test suite: sets itself up if needed (scripts/setup.sh), then runs pytest in the venv.
#   scripts/test.sh                 # everything (unit, real ComfyUI in process, server, browser)
#   scripts/test.sh -m "not slow"   # the fast subset, in seconds
# Extra arguments go to pytest.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
setup_out="$(bash "$HERE/scripts/setup.sh")"
while IFS='=' read -r key value; do
  case "$key" in P3S_*) export "$key=$value" ;; esac
done <<< "$setup_out"
cd "$HERE"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec "$P3S_VENV/bin/python" -m pytest -c tests/pytest.ini --rootdir tests "$@"
