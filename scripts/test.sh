#!/usr/bin/env bash
# The whole test suite: sets itself up if needed (scripts/setup.sh), then runs pytest in the venv.
#   scripts/test.sh                          # everything, on ComfyUI 0.3.75 (unit, in process, server, browser)
#   scripts/test.sh -m "not slow"            # the fast subset (no ComfyUI), about a minute
#   scripts/test.sh --comfyui DIR|FILE.tar.gz  # every ComfyUI-dependent test (in process, server, browser)
#                                            # against another ComfyUI: your own install or a source archive
#   scripts/test.sh ... --frontend 1.58.1     # that comfyui-frontend-package instead of the pinned one
# Extra arguments go to pytest; any selection runs in the same two sessions as the whole suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$HERE"
export PYTHONDONTWRITEBYTECODE=1
echo "[p3s-test] ComfyUI $P3S_COMFYUI_VERSION at $P3S_COMFYUI" >&2
# pytest's root is tests/ (the repo root is the pack, an __init__.py pytest must not import).
PYTEST=("$P3S_VENV/bin/python" -m pytest -c tests/pytest.ini --rootdir tests)
# Always in two sessions, so the in-process ComfyUI (with its SD1.5 and a training run) and a server
# (with its own) are never in memory together (24 GB machines): first every test not marked server or
# browser, then those. tests/conftest.py refuses a session that would hold both.
if [ $# -eq 0 ]; then
  # With --comfyui only the tests that need ComfyUI run (the others do not depend on which ComfyUI is
  # installed).
  first="not server and not browser"
  [ -n "${P3S_COMFYUI_SRC:-}" ] && first="slow and not server and not browser"
  status=0
  "${PYTEST[@]}" tests -m "$first" || status=$?
  "${PYTEST[@]}" tests -m "server or browser" || status=$?
  exit $status
fi
# With arguments (any pytest selection: test paths, -k, -m, ...): the same two sessions, each with the
# caller's arguments; a -m of the caller is combined with each session's. With no test path among
# them, everything under tests/.
mark=""
args=()
paths=0
while [ $# -gt 0 ]; do
  case "$1" in
    -m) mark="${2:?-m needs a marker expression}"; shift 2; continue ;;
    -m*) mark="${1#-m}"; shift; continue ;;
    -k|-p|-c|-o|--deselect|--ignore|--ignore-glob|--rootdir|--basetemp|--tb|-W|--maxfail|--durations)
      args+=("$1" "${2:-}"); shift; [ $# -gt 0 ] && shift; continue ;;
  esac
  [ -e "${1%%::*}" ] && paths=1
  args+=("$1")
  shift
done
[ $paths -eq 0 ] && args+=(tests)
both=""
[ -n "$mark" ] && both="($mark) and "
rc1=0
rc2=0
echo "[p3s-test] session 1 of 2: -m \"${both}not server and not browser\"" >&2
"${PYTEST[@]}" "${args[@]}" -m "${both}not server and not browser" || rc1=$?
echo "[p3s-test] session 2 of 2: -m \"${both}(server or browser)\"" >&2
"${PYTEST[@]}" "${args[@]}" -m "${both}(server or browser)" || rc2=$?
# 5 = no test selected in that session: fine as long as the other session ran some.
if [ $rc1 -eq 5 ] && [ $rc2 -eq 5 ]; then exit 5; fi
for rc in $rc1 $rc2; do
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then exit $rc; fi
done
exit 0
