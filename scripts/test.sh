#!/usr/bin/env bash
# The whole test suite: sets itself up if needed (scripts/setup.sh), then runs pytest in the venv.
#   scripts/test.sh                          # everything, on ComfyUI 0.3.75 (unit, in process, server, browser)
#   scripts/test.sh -m "not slow"            # the fast subset (no ComfyUI), about a minute
#   scripts/test.sh --comfyui DIR|FILE.tar.gz  # every ComfyUI-dependent test (in process, server, browser)
#                                            # against another ComfyUI: your own install or a source archive
#   scripts/test.sh ... --frontend 1.58.1     # that comfyui-frontend-package instead of the pinned one
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$HERE"
export PYTHONDONTWRITEBYTECODE=1
echo "[p3s-test] ComfyUI $P3S_COMFYUI_VERSION at $P3S_COMFYUI" >&2
# pytest's root is tests/ (the repo root is the pack, an __init__.py pytest must not import).
PYTEST=("$P3S_VENV/bin/python" -m pytest -c tests/pytest.ini --rootdir tests)
if [ $# -eq 0 ]; then
  # In two sessions so the in-process ComfyUI (with its SD1.5 and a training run) and the server
  # (with its own) are never in memory together: 24 GB machines. With --comfyui only the tests that
  # need ComfyUI run (the others do not depend on which ComfyUI is installed).
  first="not server and not browser"
  [ -n "${P3S_COMFYUI_SRC:-}" ] && first="slow and not server and not browser"
  status=0
  "${PYTEST[@]}" tests -m "$first" || status=$?
  "${PYTEST[@]}" tests -m "server or browser" || status=$?
  exit $status
fi
# With arguments: one session; with no test path among them, everything under tests/.
paths=()
for arg in "$@"; do [ -e "${arg%%::*}" ] && paths+=("$arg"); done
[ ${#paths[@]} -eq 0 ] && set -- "$@" tests
exec "${PYTEST[@]}" "$@"
