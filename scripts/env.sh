# Sourced by run.sh, test.sh and bench.sh: set up if needed (scripts/setup.sh) and export the
# P3S_VENV / P3S_COMFYUI / P3S_RANDOM_MODELS paths it prints.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
setup_out="$(bash "$HERE/scripts/setup.sh")"
while IFS='=' read -r key value; do
  case "$key" in P3S_*) export "$key=$value" ;; esac
done <<< "$setup_out"
export PYTHONUNBUFFERED=1
