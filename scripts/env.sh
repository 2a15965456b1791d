# Sourced by run.sh, test.sh and bench.sh: set up if needed (scripts/setup.sh) and export the
# P3S_VENV / P3S_COMFYUI / P3S_COMFYUI_VERSION / P3S_FRONTEND_VERSION / P3S_RANDOM_MODELS values it prints.
# `--comfyui DIR|FILE.tar.gz` among the caller's arguments (or P3S_COMFYUI_SRC) picks the ComfyUI;
# `--frontend VERSION` (or P3S_FRONTEND) serves that comfyui-frontend-package instead of the one the ComfyUI
# pins (a venv of its own). Both are taken out of the caller's arguments here, the rest are left for the caller.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) export P3S_COMFYUI_SRC="${2:?--comfyui needs a ComfyUI folder or a .tar.gz source archive}"; shift 2 ;;
    --comfyui=*) export P3S_COMFYUI_SRC="${1#--comfyui=}"; shift ;;
    --frontend) export P3S_FRONTEND="${2:?--frontend needs a comfyui-frontend-package version}"; shift 2 ;;
    --frontend=*) export P3S_FRONTEND="${1#--frontend=}"; shift ;;
    *) _rest+=("$1"); shift ;;
  esac
done
set -- ${_rest[@]+"${_rest[@]}"}
unset _rest
setup_out="$(bash "$HERE/scripts/setup.sh")"
while IFS='=' read -r key value; do
  case "$key" in P3S_*) export "$key=$value" ;; esac
done <<< "$setup_out"
export PYTHONUNBUFFERED=1
