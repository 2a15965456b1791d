# Sourced by run.sh, test.sh and bench.sh: set up if needed (scripts/setup.sh) and export the
# P3S_VENV / P3S_COMFYUI / P3S_COMFYUI_VERSION / P3S_RANDOM_MODELS paths it prints.
# `--comfyui DIR|FILE.tar.gz` among the caller's arguments (or P3S_COMFYUI_SRC) picks the ComfyUI;
# it is taken out of the caller's arguments here, the rest are left for the caller.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) export P3S_COMFYUI_SRC="${2:?--comfyui needs a ComfyUI folder or a .tar.gz source archive}"; shift 2 ;;
    --comfyui=*) export P3S_COMFYUI_SRC="${1#--comfyui=}"; shift ;;
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
