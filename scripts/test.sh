#!/usr/bin/env bash
# The whole test suite: sets itself up if needed (scripts/setup.sh), then runs pytest in the venv.
#   scripts/test.sh                 # everything (unit, real ComfyUI in process, server, browser)
#   scripts/test.sh -m "not slow"   # the fast subset (no ComfyUI), about a minute
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$HERE"
export PYTHONDONTWRITEBYTECODE=1
# pytest's root is tests/ (the repo root is the pack, an __init__.py pytest must not import).
PYTEST=("$P3S_VENV/bin/python" -m pytest -c tests/pytest.ini --rootdir tests)
if [ $# -eq 0 ]; then
  # The whole suite, in two sessions so the in-process ComfyUI (with its SD1.5 and a training run)
  # and the server (with its own) are never in memory together: 24 GB machines.
  status=0
  "${PYTEST[@]}" tests -m "not server and not browser" || status=$?
  "${PYTEST[@]}" tests -m "server or browser" || status=$?
  exit $status
fi
# With arguments: one session; with no test path among them, everything under tests/.
paths=()
for arg in "$@"; do [ -e "${arg%%::*}" ] && paths+=("$arg"); done
[ ${#paths[@]} -eq 0 ] && set -- "$@" tests
exec "${PYTEST[@]}" "$@"
