#!/usr/bin/env bash
# The main job: set up if needed, then start the real ComfyUI with this pack on 127.0.0.1.
#   scripts/run.sh [--port 8188] [--models /path/to/ComfyUI/models] [--workflow workflows/x.json]
# Without --models the generated random-weight models are used (their images are noise).
# With --workflow the workflow runs headless through the server and the written files are printed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$P3S_VENV/bin/python" "$HERE/scripts/run.py" "$@"
