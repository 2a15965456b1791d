#!/usr/bin/env bash
# The main job: set up if needed, then start the real ComfyUI with this pack on 127.0.0.1.
#   scripts/run.sh [--port 8188] [--models /path/to/ComfyUI/models] [--workflow workflows/x.json]
# Without --models the generated random-weight models are used (their images are noise).
# With --workflow the workflow runs headless through the server and the written files are printed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
setup_out="$(bash "$HERE/scripts/setup.sh")"
while IFS='=' read -r key value; do
  case "$key" in P3S_*) export "$key=$value" ;; esac
done <<< "$setup_out"
export PYTHONUNBUFFERED=1
exec "$P3S_VENV/bin/python" "$HERE/scripts/run.py" "$@"
