#!/usr/bin/env bash
# Used for benchmarks/results/gpu_check_h200.* (2026-12-04). It expects, beside it in one folder
# (e.g. .gpu/ in the checkout that the device tool sends, ignored by git and named in `carry`):
#   pack/                      git archive of this pack;  comfyui-0.33.0.tar.gz  (the unmodified source archive)
#   whl/*.whl                  cp312 manylinux wheels of what ComfyUI 0.33 needs and the device image lacks
#                              (list: benchmarks/results/gpu_check_h200.json, how.carried_wheels)
#   site-extra/                comfy-kitchen 0.2.31 unpacked, without backends/{cuda,hip}/_C.abi3.so (size limit)
# Run there as:  OUT="$OUT" BUDGET_S=535 bash .gpu/go.sh   (the device call's timeout_s 560)
#
# One device call: ComfyUI 0.33.0 + this pack (snapshot in .gpu/pack) + random-weight SD1.5 / CLIP
# ViT-L/14 vision generated here, then scripts/gpu_check.py, mode by mode, within a time budget.
# Everything worth keeping is written under $OUT as it happens (go.log, progress.log, JSON, server logs).
#
# Environment (defaults are the device run):
#   OUT           results folder (required)
#   PY            python (python3: the image's torch venv)
#   P3S_WORK      scratch folder (/tmp/p3sgpu)
#   GO_SITE       a ready site-packages folder to use instead of installing .gpu/whl (local dry run)
#   EPOCHS IMAGES SIZE STEPS     gpu_check's --epochs --images --size --sample-steps (60 5 512 20)
#   MODES         modes in order (dynamic,legacy)
#   SERVER_ARGS   extra ComfyUI arguments, space-separated (e.g. --cpu for a CPU dry run)
#   BUDGET_S      seconds from start by which everything must have ended (540)
#   MODEL_WORKERS value-generation threads for make_random_models (12)
set -uo pipefail
T0=$(date +%s)
G="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${OUT:?OUT is not set}"
PY="${PY:-python3}"
W="${P3S_WORK:-/tmp/p3sgpu}"
EPOCHS="${EPOCHS:-60}"; IMAGES="${IMAGES:-5}"; SIZE="${SIZE:-512}"; STEPS="${STEPS:-20}"
MODES="${MODES:-dynamic,legacy}"
BUDGET_S="${BUDGET_S:-540}"
MODEL_WORKERS="${MODEL_WORKERS:-12}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$W"; rm -f "$W/modes.txt"
exec > >(tee -a "$OUT/go.log") 2>&1
el() { echo $(( $(date +%s) - T0 )); }
say() { echo "[go $(el)s] $*"; }
left() { echo $(( BUDGET_S - $(el) )); }

say "start; host $(hostname); budget ${BUDGET_S}s; epochs $EPOCHS x $IMAGES images at ${SIZE}^2; modes $MODES"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee "$W/nvidia-smi.txt"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

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
"$PY" -c "
import importlib, importlib.metadata as md
for m, d in [('comfy_aimdo','comfy-aimdo'),('comfy_kitchen','comfy-kitchen'),('av','av'),('torchsde','torchsde'),
             ('sqlalchemy','SQLAlchemy'),('alembic','alembic'),('pydantic','pydantic'),('blake3','blake3'),
             ('torchaudio','torchaudio'),('transformers','transformers'),('safetensors','safetensors'),('skimage','scikit-image')]:
    importlib.import_module(m); print(f'  {d} {md.version(d)}')
" || { say "FAILED: an import"; exit 3; }

# --- ComfyUI 0.33.0 (unmodified archive) and an empty front end ----------------------------------
rm -rf "$W/comfy" && mkdir -p "$W/comfy" && tar -xzf "$G/comfyui-0.33.0.tar.gz" -C "$W/comfy"
export P3S_COMFYUI="$W/comfy/ComfyUI-0.33.0"
[ -f "$P3S_COMFYUI/main.py" ] || { say "FAILED: no ComfyUI main.py"; exit 3; }
mkdir -p "$W/frontend" && echo '<!doctype html><title>no front end (HTTP API only)</title>' > "$W/frontend/index.html"
say "ComfyUI $(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$P3S_COMFYUI/comfyui_version.py") at $P3S_COMFYUI"

# --- random-weight models (seeded, generated here) -----------------------------------------------
export P3S_RANDOM_MODELS="$W/models"
if [ ! -f "$P3S_RANDOM_MODELS/.complete" ]; then
  "$PY" "$G/pack/scripts/make_random_models.py" --seed 0 --out "$P3S_RANDOM_MODELS" --only sd15,clip_vision \
    --comfyui "$P3S_COMFYUI" --workers "$MODEL_WORKERS" || { say "FAILED: make_random_models"; exit 3; }
  touch "$P3S_RANDOM_MODELS/.complete"
fi
say "models ready"

# --- progress watcher: GPU memory in use (whole card) and the trainer's last step line -------------
export TMPDIR="$W/tmp"; rm -rf "$TMPDIR"; mkdir -p "$TMPDIR"
(
  while true; do
    mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)
    last=$(cat "$TMPDIR"/p3s_gpu_*/server-*.log 2>/dev/null | grep -a "P3S Trainer\] step" | tail -n 1 | cut -c1-120)
    echo "$(el) gpu_used_mib=${mem:-?} ${last}" >> "$OUT/progress.log"
    sleep 1
  done
) &
WATCH=$!
trap 'kill $WATCH 2>/dev/null' EXIT

# --- gpu_check, one mode per call, each inside what is left of the budget ------------------------
read -r -a XARGS <<< "${SERVER_ARGS:-}"
SARGS=(--server-arg="--front-end-root=$W/frontend")
for a in ${XARGS[@]+"${XARGS[@]}"}; do SARGS+=(--server-arg="$a"); done
E="$EPOCHS"
PREV_TOTAL=""; PREV_TRAIN=""; PREV_E=""
IFS=',' read -r -a MODE_LIST <<< "$MODES"
for mode in "${MODE_LIST[@]}"; do
  L=$(left)
  if [ -n "$PREV_TOTAL" ]; then
    # Scale this mode's epochs to what is left: fixed cost = previous total - its training's epochs share.
    E=$("$PY" -c "
tot, tr, e, left, want = $PREV_TOTAL, $PREV_TRAIN, $PREV_E, $L, $EPOCHS
fixed = max(tot - tr, 0) * 1.3 + 30
per = tr / max(e, 1) * 1.15
print(max(0, min(want, int((left - fixed) / per))) if per > 0 else want)")
  fi
  if [ "$E" -lt 1 ] || [ "$L" -lt 60 ]; then say "SKIP $mode: ${L}s left, would fit $E epochs"; continue; fi
  [ "$E" != "$EPOCHS" ] && say "NOTE $mode: epochs reduced to $E to fit ${L}s"
  say "mode $mode: $E epochs, ${L}s left"
  t=$(date +%s); echo "$mode start $(el)" >> "$W/modes.txt"
  timeout -s INT -k 20 $(( L - 15 )) "$PY" "$G/pack/scripts/gpu_check.py" --modes "$mode" --epochs "$E" --images "$IMAGES" \
    --size "$SIZE" --sample-steps "$STEPS" --timeout $(( L - 40 )) "${SARGS[@]}" 2>&1 | tee "$OUT/gpu_check_$mode.out"
  rc=$?
  PREV_TOTAL=$(( $(date +%s) - t )); PREV_E="$E"; echo "$mode end $(el)" >> "$W/modes.txt"
  PREV_TRAIN=$("$PY" -c "
import json, sys
rows = [json.loads(l) for l in open('$OUT/gpu_check_$mode.out') if l.startswith('{')]
print(rows[-1]['train']['wall_s'] if rows and rows[-1]['train'].get('wall_s') else 0)" 2>/dev/null || echo 0)
  say "mode $mode: rc $rc, ${PREV_TOTAL}s in all, training ${PREV_TRAIN}s"
  for f in "$TMPDIR"/p3s_gpu_"$mode"_*/server-*.log; do [ -f "$f" ] && cp "$f" "$OUT/server-$mode.log"; done
done

# --- one JSON ------------------------------------------------------------------------------------
"$PY" - "$OUT" "$EPOCHS" "$(el)" "$W" <<'EOF'
import json, platform, subprocess, sys
from pathlib import Path
out, epochs, el, w = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
rows = []
for f in sorted(out.glob("gpu_check_*.out")):
    rows += [json.loads(l) for l in f.read_text().splitlines() if l.startswith("{")]
import torch
smi = (w / "nvidia-smi.txt").read_text().strip().splitlines()
res = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "nvidia_smi": smi[1] if len(smi) > 1 else None, "comfyui": "0.33.0",
       "requested_epochs": epochs, "go_elapsed_s": el, "rows": rows}
prog = (out / "progress.log").read_text().splitlines() if (out / "progress.log").exists() else []
used = [int(l.split("gpu_used_mib=")[1].split()[0]) for l in prog if "gpu_used_mib=" in l and l.split("gpu_used_mib=")[1].split()[0].isdigit()]
res["card_used_mib_max"] = max(used) if used else None
# per mode: the whole card's used memory (1 s samples) between the mode's start and end
spans = {}
if (w / "modes.txt").exists():
    for line in (w / "modes.txt").read_text().splitlines():
        m, what, t = line.split()
        spans.setdefault(m, {})[what] = int(t)
samples = []
for l in prog:
    try:
        t, v = l.split()[0], l.split("gpu_used_mib=")[1].split()[0]
        samples.append((int(t), int(v)))
    except (IndexError, ValueError):
        pass
for r in rows:
    s = spans.get(r["mode"], {})
    vals = [v for t, v in samples if s.get("start", -1) <= t <= s.get("end", 10**9)]
    r["card_used_mib_max"] = max(vals) if vals else None
(out / "gpu_check.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res))
EOF
say "done"
