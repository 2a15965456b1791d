#!/usr/bin/env bash
# The device side of benchmarks/results/gpu-*.json (issue 21 item 7; the earlier gpu_check_h200.* came
# from this script's first version). It expects, beside it in one folder (e.g. .gpu/ in the checkout
# that the device tool sends, ignored by git and named in `carry`):
#   pack/                      git archive of this pack (scripts/gpu_check.py may be overlaid from a branch)
#   comfyui-0.33.0.tar.gz      the unmodified ComfyUI source archive
#   whl/*.whl                  cp312 manylinux wheels of what ComfyUI 0.33 needs and the device image lacks
#                              (list: benchmarks/results/gpu_check_h200.json, how.carried_wheels)
#   site-extra/                comfy-kitchen 0.2.31 unpacked, without backends/{cuda,hip}/_C.abi3.so (size limit)
# Run there as:  OUT="$OUT" BUDGET_S=475 GC_ARGS="--rounds 4" bash .gpu/go.sh   (device call: carry .gpu, timeout_s 500)
#
# One device call: ComfyUI 0.33.0 + the pack + random-weight SD1.5 / CLIP ViT-L/14 vision / SD1.5
# ControlNet generated here, then ONE scripts/gpu_check.py run inside what is left of the budget:
# training (dynamic), sampling ratios (dynamic, legacy), low-VRAM runs. Everything worth keeping is
# written under $OUT as it happens: go.log, progress.log, gpu-h200.json (rewritten after each phase),
# server-dynamic.log, server-legacy.log, server-lowvram.log.
#
# Environment (defaults are the device run):
#   OUT           results folder (required)
#   PY            python (python3: the image's torch venv)
#   P3S_WORK      scratch folder (/tmp/p3sgpu)
#   GO_SITE       a ready site-packages folder to use instead of installing .gpu/whl (local dry run)
#   GO_MODELS     a ready random-models folder (local dry run; default: generated here)
#   GC_ARGS       extra gpu_check.py arguments, space-separated (e.g. small sizes for a dry run)
#   SERVER_ARGS   extra ComfyUI arguments, space-separated (e.g. --cpu for a CPU dry run)
#   JSON_NAME     the JSON's name under $OUT (gpu-h200.json)
#   BUDGET_S      seconds from start by which everything must have ended (480)
#   MODEL_WORKERS value-generation threads for make_random_models (12)
set -uo pipefail
T0=$(date +%s)
G="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${OUT:?OUT is not set}"
PY="${PY:-python3}"
W="${P3S_WORK:-/tmp/p3sgpu}"
BUDGET_S="${BUDGET_S:-480}"
JSON_NAME="${JSON_NAME:-gpu-h200.json}"
MODEL_WORKERS="${MODEL_WORKERS:-12}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/go.log") 2>&1
el() { echo $(( $(date +%s) - T0 )); }
say() { echo "[go $(el)s] $*"; }
left() { echo $(( BUDGET_S - $(el) )); }

say "start; host $(hostname); budget ${BUDGET_S}s; gpu_check extra args: ${GC_ARGS:-none}"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee "$W/nvidia-smi.txt"

# --- packages ------------------------------------------------------------------------------------
if [ -n "${GO_SITE:-}" ]; then
  SITE="$GO_SITE"
else
  SITE="$W/site"
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$G"/whl/*.whl \
    || { say "FAILED: pip install of the carried wheels"; exit 3; }
  # comfy-kitchen 0.2.31 without its compiled CUDA/HIP kernels (176 MB + 59 MB): its eager/triton
  # backends remain; ComfyUI uses the kernels only for quantized weights and --use-ck-attention.
  cp -r "$G"/site-extra/* "$SITE"/
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
say "packages ready"
# versions, in the background (imports take seconds)
"$PY" -c "
import importlib.metadata as md, sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available',
      torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')
print('  ' + ', '.join(f'{d} {md.version(d)}' for d in ('comfy-aimdo', 'comfy-kitchen', 'av', 'torchsde', 'SQLAlchemy',
      'alembic', 'pydantic', 'blake3', 'torchaudio', 'transformers', 'safetensors', 'scikit-image')))
" > "$W/versions.txt" 2>&1 &
VERS=$!

# --- ComfyUI 0.33.0 (unmodified archive) and an empty front end ----------------------------------
rm -rf "$W/comfy" && mkdir -p "$W/comfy" && tar -xzf "$G/comfyui-0.33.0.tar.gz" -C "$W/comfy"
export P3S_COMFYUI="$W/comfy/ComfyUI-0.33.0"
[ -f "$P3S_COMFYUI/main.py" ] || { say "FAILED: no ComfyUI main.py"; exit 3; }
mkdir -p "$W/frontend" && echo '<!doctype html><title>no front end (HTTP API only)</title>' > "$W/frontend/index.html"
say "ComfyUI $(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$P3S_COMFYUI/comfyui_version.py") at $P3S_COMFYUI"

# --- random-weight models (seeded, generated here) -----------------------------------------------
if [ -n "${GO_MODELS:-}" ]; then
  export P3S_RANDOM_MODELS="$GO_MODELS"
else
  export P3S_RANDOM_MODELS="$W/models"
  if [ ! -f "$P3S_RANDOM_MODELS/.complete" ]; then
    "$PY" "$G/pack/scripts/make_random_models.py" --seed 0 --out "$P3S_RANDOM_MODELS" --only sd15,clip_vision,controlnet \
      --comfyui "$P3S_COMFYUI" --workers "$MODEL_WORKERS" || { say "FAILED: make_random_models"; exit 3; }
    touch "$P3S_RANDOM_MODELS/.complete"
  fi
fi
wait $VERS; cat "$W/versions.txt"
say "models ready"

# --- progress watcher: GPU memory in use (whole card) and the trainer's last step line -------------
export TMPDIR="$W/tmp"; rm -rf "$TMPDIR"; mkdir -p "$TMPDIR"
(
  while true; do
    mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)
    last=$(cat "$OUT"/server-*.log 2>/dev/null | grep -a "P3S Trainer\] step" | tail -n 1 | cut -c1-120)
    echo "$(el) gpu_used_mib=${mem:-?} ${last}" >> "$OUT/progress.log"
    sleep 1
  done
) &
WATCH=$!
trap 'kill $WATCH 2>/dev/null' EXIT

# --- gpu_check: one run, inside what is left of the budget ---------------------------------------
read -r -a XARGS <<< "${SERVER_ARGS:-}"
read -r -a GARGS <<< "${GC_ARGS:-}"
SARGS=(--server-arg="--front-end-root=$W/frontend")
for a in ${XARGS[@]+"${XARGS[@]}"}; do SARGS+=(--server-arg="$a"); done
L=$(left)
say "gpu_check: ${L}s left"
timeout -s INT -k 20 $(( L - 10 )) "$PY" "$G/pack/scripts/gpu_check.py" --out "$OUT/$JSON_NAME" --log-dir "$OUT" \
  --budget-s $(( L - 30 )) "${SARGS[@]}" ${GARGS[@]+"${GARGS[@]}"}
say "gpu_check: rc $?"

# --- the machine's facts, added to the JSON --------------------------------------------------------
"$PY" - "$OUT/$JSON_NAME" "$(el)" "$W" "$OUT/progress.log" <<'EOF'
import json, sys
from pathlib import Path
path, el, w, prog = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
res = json.loads(path.read_text()) if path.exists() else {"error": "gpu_check wrote no JSON"}
smi = (w / "nvidia-smi.txt").read_text().strip().splitlines()
vers = (w / "versions.txt").read_text().strip().splitlines() if (w / "versions.txt").exists() else []
used = []
for line in (prog.read_text().splitlines() if prog.exists() else []):
    v = line.split("gpu_used_mib=")[1].split()[0] if "gpu_used_mib=" in line else ""
    if v.isdigit():
        used.append(int(v))
res["machine"] = {"nvidia_smi": smi[1] if len(smi) > 1 else None, "versions": vers, "go_elapsed_s": el,
                  "card_used_mib_max_1s": max(used) if used else None}
path.write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res.get("summary", res.get("error")), indent=1))
EOF
say "done"
