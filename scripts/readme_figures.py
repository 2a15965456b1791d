#!/usr/bin/env python3
"""The README's benchmark figures, generated from the committed benchmark results.

    scripts/readme_figures.py            # rewrite README.md's two generated blocks
    scripts/readme_figures.py --check    # exit 1 if either block differs from the committed results
    scripts/readme_figures.py --print    # print both blocks

The block between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is :func:`render` of
``benchmarks/results/bench.json`` (written by ``scripts/bench.sh``, the CPU benchmark); the block
between ``<!-- gpu:start -->`` and ``<!-- gpu:end -->`` is :func:`render_gpu` of each
``benchmarks/results/gpu-*.json`` (written by ``scripts/gpu_check.py`` on a CUDA machine). Nothing in
them is typed by hand. The block between ``<!-- heldout:start -->`` and ``<!-- heldout:end -->`` is
:func:`heldout_block` of ``benchmarks/results/heldout_loss.json`` (``benchmarks/heldout_loss.py``: P3S
against the plain model on held-out denoising loss); it is rewritten and checked where the README has
its markers. Needs only the standard library (no ComfyUI, no torch).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench.json"
README = REPO / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
GPU_START, GPU_END = "<!-- gpu:start -->", "<!-- gpu:end -->"
GPU_RESULTS = "gpu-*.json"  # in RESULTS' folder
HELDOUT_START, HELDOUT_END = "<!-- heldout:start -->", "<!-- heldout:end -->"
HELDOUT_RESULTS = "heldout_loss.json"  # in RESULTS' folder

NAMES = {"plain": "plain SD1.5", "p3s": "+ P3S", "controlnet": "+ ControlNet",
         "p3s+controlnet": "+ P3S + ControlNet", "p3s weight 0": "P3S at weight 0",
         "p3s, speed-ups off": "+ P3S, speed-ups off (before)",
         "p3s, level-0 keys pooled": "+ P3S, opt-in pooled level-0 keys",
         "p3s region (left half)": "+ P3S in a region (left half)",
         "p3s 2 regions (left + right)": "+ 2 P3S injectors in 2 regions (left, right)"}
BACKENDS = {"sdpa": "SDPA", "subquad": "sub-quad"}
LEVEL_NAMES = {"0": "level 0 (image/8)", "1": "level 1 (image/16)", "2": "level 2 (image/32)",
               "3": "middle (image/64)"}


def _yes(flag) -> str:
    return "yes" if flag else "**no**"


def _cols(runs):
    order = list(BACKENDS)
    ok = [r for r in runs if "error" not in r]
    return sorted(ok, key=lambda r: (r["size"], order.index(r["attention"]) if r["attention"] in order else 9))


def _row(lines, label, runs, cell):
    """One table row: ``label`` and ``cell(run)`` for each run."""
    lines.append(f"| {label} | " + " | ".join(cell(r) for r in runs) + " |")


def _head(runs):
    cols = [f"{r['size']}², {BACKENDS.get(r['attention'], r['attention'])}" for r in runs]
    return "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)


def render(result: dict) -> str:
    """The Markdown block (without the markers) for one ``bench.json``."""
    m = result["machine"]
    lines = [
        f"`{result['command']}`, {result['date']}, on {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB RAM, "
        f"torch {m['torch']}, device {result['device']}); random weights of the exact SD1.5 / CLIP ViT-L/14 / "
        f"ControlNet shapes, {result['sampler']}, {result['steps']} steps × {result['reps']} repetitions per "
        f"variant, interleaved, in one run ({result['wall_seconds'] / 60:.0f} min in all). "
        "SDPA = ComfyUI with `--use-pytorch-cross-attention` (PyTorch SDPA, what GPU users get); "
        "sub-quad = ComfyUI's CPU default (sub-quadratic attention).", ""]
    runs = _cols(result.get("runs", []))
    failed = [r for r in result.get("runs", []) if "error" in r]
    if runs:
        h, sep = _head(runs)
        per_round = all("times" in v for r in runs for v in r["steps_per_variant"].values())
        how = ("median over rounds of variant / plain in the same round; median s/step" if per_round
               else "median s/step")
        lines += [f"Ratio to plain SD1.5 ({how}):", "", h, sep]
        for name, label in NAMES.items():
            cells = []
            for r in runs:
                s = r["steps_per_variant"].get(name)
                cells.append("–" if s is None else f"{s['ratio_to_plain']:.2f}× ({s['median']:.2f} s)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        checks = [("P3S ≤ 1.3× plain", lambda g: _yes(g["p3s_le_1.3"])),
                  ("P3S below ControlNet", lambda g: _yes(g["p3s_below_controlnet"])),
                  ("P3S + ControlNet ≤ 1 + both overheads",
                   lambda g: f"{_yes(g['p3s+controlnet_le_additive'])} (bound {g['additive_bound']:.2f}×)"),
                  ("weight 0 ≤ 1.02×", lambda g: _yes(g["weight0_le_1.02"]))]
        for label, fn in checks:
            _row(lines, f"goal: {label}", runs, lambda r, fn=fn: fn(r["goals"]))
        lines.append("")
        eff = [r for r in runs if "output_effects" in r]
        if eff:
            h, sep = _head(eff)
            lines += ["How far one DDIM step's latent moves from exact P3S, relative to P3S's own effect "
                      "(exact P3S − plain; 0 = unchanged, 1 = as large as the injection; max / rms):", "", h, sep]

            for label, key in (("opt-in pooled level-0 keys", "pooled_vs_exact"),
                               ("speed-ups off (float rounding only)", "speedups_off_vs_on")):
                _row(lines, label, eff, lambda r, key=key:
                     f"{r['output_effects'][key]['max']:.2g} / {r['output_effects'][key]['rms']:.2g}")
            lines.append("")
        prof = [r for r in runs if "profile" in r]
        if prof:
            h, sep = _head(prof)
            lines += ["Where a P3S step goes (`scripts/profile_step.py`: timing hooks inside one-step KSampler "
                      "runs, s per UNet evaluation of the CFG batch, medians):", "", h, sep]

            def row(label, fn):
                _row(lines, label, prof, lambda r: fn(r["profile"]))

            row("plain step", lambda p: f"{p['plain_step_s']:.3f}")
            row("P3S step", lambda p: f"{p['p3s_step_s']:.3f} ({p['p3s_step_s'] / p['plain_step_s']:.2f}×)")
            row("of which the copy (Eq. 6)",
                lambda p: f"{p['copy_s']:.3f} ({100 * p['copy_s'] / p['plain_step_s']:.0f} % of plain)")
            for lv, label in LEVEL_NAMES.items():
                row(f"extra self-attention, {label}",
                    lambda p, lv=lv: f"{p['extra_attention_s'][lv]:+.3f} (plain {p['attn1_plain_s'][lv]:.3f})")
            row("other (patch, wrapper, rest)", lambda p: f"{p['other_s']:+.3f}")
            lines.append("")
    for r in failed:
        where = f"{r['size']}², " if "size" in r else ""
        lines.append(f"Not measured: {where}{BACKENDS.get(r['attention'], r['attention'])} ({r['error']}).")
    if failed:
        lines.append("")
    rn = result.get("rngr")
    if rn:
        total = rn.get("mask_plus_letterbox_ms_512", {}).get("median")
        lines.append(f"RNGR mask beyond the CLIP forward, 512²: {rn['mask_ms_512']['median']:.1f} ms "
                     f"+ letterbox {rn['letterbox_ms_512']['median']:.1f} ms"
                     + (f" = {total:.1f} ms (goal ≤ 50 ms: {_yes(rn['goal_le_50ms'])})." if total else "."))
    if result.get("import"):
        lines.append(f"Pack import (ComfyUI's loader, fresh process): {result['import']['seconds']['median']:.2f} s.")
    train = result.get("train")
    if train:
        lines += ["", "| training | s/step | s/epoch (measured) | peak RSS | peak CUDA |", "|---|---|---|---|---|"]
        for t in train:
            ck = "on" if t.get("gradient_checkpointing") else "off"
            if "error" in t:
                lines.append(f"| checkpointing {ck} | failed | | | |")
                continue
            epoch = t.get("epoch_s")
            ep = f"{epoch:.1f} ({t['epoch_images']} photos)" if epoch is not None else "–"
            cuda = f"{t['peak_cuda_mib'] / 1024:.1f} GiB" if t.get("peak_cuda_mib") else "–"
            lines.append(f"| {t['resolution']}², {t['device']}, gradient checkpointing {ck} | {t['step_s']:.2f} | "
                         f"{ep} | {t['peak_rss_mib'] / 1024:.1f} GiB | {cuda} |")
    return "\n".join(lines).rstrip() + "\n"


# --- the GPU block (scripts/gpu_check.py) ------------------------------------------------------------
GPU_MODES = {"dynamic": "Dynamic VRAM on (default)", "legacy": "`--disable-dynamic-vram`"}
GPU_VARIANTS = {"plain": "plain SD1.5", "p3s": "+ P3S", "controlnet": "+ ControlNet",
                "p3s+controlnet": "+ P3S + ControlNet"}


def gpu_results(folder: Path | None = None) -> list[tuple[str, dict]]:
    """``(file name, result)`` of each committed ``gpu-*.json``, by name."""
    folder = folder or RESULTS.parent
    return [(f.name, json.loads(f.read_text())) for f in sorted(folder.glob(GPU_RESULTS))]


def _gib(mib) -> str:
    return f"{mib / 1024:.1f} GiB" if mib else "–"


def _load_line(line: str) -> str:
    """One ComfyUI loading line, without its timestamp/level prefix, the usable-memory figure kept."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    line = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line
    return line.strip()


def render_gpu(name: str, result: dict) -> str:
    """The Markdown of one ``gpu-*.json`` (a heading, the sampling table, training, low-VRAM runs)."""
    st, m = result["settings"], result.get("machine", {})
    servers = result.get("servers", {})
    facts = next((f for f in servers.values() if f.get("device")), {})
    dev = re.match(r"\S+ (.+?) : ", facts.get("device") or "")  # "cuda:0 NVIDIA H200 : cudaMallocAsync"
    gpu = dev.group(1) if dev else (m.get("nvidia_smi") or "a GPU").split(",")[0]
    dtype = next((f["unet_dtype"] for f in servers.values() if f.get("unet_dtype")), None)
    lines = [f"`{name}`: `{result['command']}`, {result['date']}, on {gpu} "
             f"({m.get('nvidia_smi') or 'nvidia-smi: –'}), torch {facts.get('pytorch') or '–'}, "
             f"ComfyUI {facts.get('comfyui') or '–'}; random weights of the exact SD1.5 / CLIP ViT-L/14 / "
             f"ControlNet shapes; {st['size']}², {st['sampler']} ({st['scheduler']}), {st['steps']} steps, "
             f"CFG {st['cfg']:g}, UNet {st['unet_dtype']}" + (f" (ComfyUI: weight dtype {dtype})" if dtype else "")
             + f"; P3S: {st['p3s']}; ControlNet: {st['controlnet']}."
             + (f" Pack: {result['how']['pack']}." if result.get("how", {}).get("pack") else ""), ""]
    modes = [md for md in GPU_MODES if md in result.get("sampling", {})]
    if modes:
        rounds = {md: len(result["sampling"][md].get("rounds", [])) for md in modes}
        lines += [f"Per-step time, ratio to plain SD1.5 (each round runs every variant, the order reversed every "
                  f"other round; a step = (t{st['steps']} − t{st['short_steps']}) / {st['steps'] - st['short_steps']} "
                  "of warm KSampler runs, timed by ComfyUI; ratio = median over rounds of variant / plain of the "
                  "same round, spread min–max; rounds: "
                  + ", ".join(f"{rounds[md]} ({md})" for md in modes) + "):", "",
                  "| | " + " | ".join(GPU_MODES[md] for md in modes) + " |", "|---|" + "---|" * len(modes)]
        for v, label in GPU_VARIANTS.items():
            cells = []
            for md in modes:
                s = result["sampling"][md].get("variants", {}).get(v)
                if not s or s.get("ratio_to_plain") is None:
                    cells.append("–")
                    continue
                lo, hi = s["ratio_spread"]
                cells.append(f"{s['ratio_to_plain']:.3f}× ({lo:.3f}–{hi:.3f}), "
                             f"{1000 * s['per_step_s']['median']:.1f} ms")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for label, key in (("whole 50-step prompt, + P3S / plain", "p3s"),
                           ("whole 50-step prompt, + ControlNet / plain", "controlnet")):
            label = label.replace("50", str(st["steps"]))
            cells = []
            for md in modes:
                s = result["sampling"][md].get("variants", {}).get(key) or {}
                r = s.get("prompt_ratio_to_plain")
                cells.append("–" if r is None else f"{r:.3f}× ({s['prompt_s']['median']:.2f} s)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for label, key in ((f"goal: P3S ≤ {result['goals']['p3s_max_ratio']:g}× plain", "p3s_le_1.25"),
                           ("goal: P3S below ControlNet", "p3s_below_controlnet")):
            cells = [_yes((result["sampling"][md].get("goals") or {}).get(key)) for md in modes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        for md in modes:
            if result["sampling"][md].get("error"):
                lines.append(f"Sampling, {md}: **failed** ({result['sampling'][md]['error'][:200]}).")
    t = result.get("train") or {}
    if t.get("epochs"):
        g = t.get("goals", {})
        if t.get("error"):
            lines.append(f"Training ({t['epochs']} epochs × {t['images']} photos at {t['size']}²): **did not finish** "
                         f"({t['error'][:200]}).")
        else:
            took = t.get("exec_s") or t.get("wall_s")
            lines.append(f"Training (the P3S Trainer through ComfyUI, {t['epochs']} epochs × {t['images']} photos = "
                         f"{t['steps']} steps at {t['size']}², gradient checkpointing {st['gradient_checkpointing']}, "
                         f"{GPU_MODES.get(t['mode'], t['mode'])}): {took:.1f} s for the whole prompt (input caching "
                         f"and save included; goal ≤ {result['goals']['train_max_s']:g} s: {_yes(g.get('le_60s'))}), "
                         f"peak {_gib(t.get('peak_gpu_mib'))} of GPU memory for the server process "
                         f"(nvidia-smi; goal ≤ {result['goals']['train_max_gib']:g} GB: {_yes(g.get('le_10gb'))}).")
        lines.append("")
    low = result.get("lowvram") or []
    if low:
        lines += [f"Little VRAM: a server started with `--reserve-vram` = the card's total − N GiB, + P3S, "
                  f"{st['steps']} steps, once (model loading included):", "",
                  "| run | completed | time | partial loads | vs. the full-load run (same seed) |",
                  "|---|---|---|---|---|"]
        for r in low:
            vs = r.get("vs_full_load") or {}
            cmp = (f"max abs diff {vs['max_abs_diff']:.2g} (of max {vs['max_abs']:.2g})"
                   if "max_abs_diff" in vs else "–")
            took = r.get("exec_s") or r.get("wall_s")
            lines.append(f"| {GPU_MODES.get(r['mode'], r['mode'])}, {r['left_gib']:g} GiB left "
                         f"(`--reserve-vram {r['reserve_vram_gib']:g}`) | {_yes(r.get('completed'))} | "
                         + (f"{took:.1f} s" if took else "–") + f" | {r.get('partial_loads', '–')} | {cmp} |")
        lines.append("")
        for r in low:
            loads = [_load_line(ln) for ln in r.get("load_lines", [])
                     if re.search(r"loaded (partially|completely)|dynamic VRAM loading|Requested to load", ln)]
            if loads:
                lines.append(f"ComfyUI's loading lines, {r['mode']}, {r['left_gib']:g} GiB left:")
                lines += ["```", *loads, "```"]
            if r.get("error"):
                lines.append(f"Error ({r['mode']}, {r['left_gib']:g} GiB): `{r['error'][:300]}`")
        lines.append("")
    if result.get("cuts"):
        lines.append("Cut to fit the time limit: " + "; ".join(result["cuts"]) + ".")
    return "\n".join(lines).rstrip() + "\n"


GPU_INTRO = """```bash
$P3S_VENV/bin/python scripts/gpu_check.py --out benchmarks/results/gpu-NAME.json   # a CUDA machine, < 10 min
scripts/readme_figures.py         # this section, from benchmarks/results/gpu-*.json
```
"""


def gpu_block(results: list[tuple[str, dict]]) -> str:
    note = ("<!-- generated by scripts/readme_figures.py from benchmarks/results/gpu-*.json; "
            "edit neither by hand: rerun scripts/gpu_check.py, then scripts/readme_figures.py -->")
    body = "\n".join(render_gpu(n, r) for n, r in results) if results else "No GPU run is committed.\n"
    return f"{GPU_START}\n{note}\n{GPU_INTRO}{body}{GPU_END}"


INTRO = """```bash
scripts/bench.sh                  # 256² and 512², both attention backends, profile, RNGR, import, training
scripts/bench.sh --sizes 512 --attention sdpa --steps 2 --reps 2 --skip-train --out /tmp/bench
$P3S_VENV/bin/python scripts/profile_step.py --size 512 --attention subquad  # one step's profile (JSON)
scripts/readme_figures.py         # this section, from benchmarks/results/bench.json
```
Per-step times of plain SD1.5, + P3S, + ControlNet, + both, P3S at weight 0 and P3S with its speed-ups
off are measured in one run, interleaved, per attention backend, and reported as ratios to plain. The
results are committed (`benchmarks/results/bench.json`); this section is generated from them
(`tests/unit/test_readme_figures.py` checks it). Training: `benchmarks/bench_train.py --epoch-images 5`
times one real epoch of the Trainer's loop. P3S at weight 0 installs nothing (the plain model, bit for
bit, `tests/integration/test_injector.py`), so its distance from 1.00× is the run-to-run noise of the
machine the run was on.

Speed-ups (each exact within float32 rounding, each with a test in `tests/unit/test_speed_equivalence.py`,
`tests/unit/test_injection.py` or `tests/integration/test_attention_speed.py`):
the copy computes its text-independent start (time embedding, level 0's ResBlock and self-attention) once
for the two CFG halves; the 16 zero convs run as linear maps on the tokens; with `cond only` the copy runs
on the cond rows only; at weight 0 nothing is installed; the extended K/V are built in their per-token
layout in one pass; under ComfyUI's sub-quadratic kernel (its CPU default) the 16 self-attentions whose
keys P3S extended go through ComfyUI's own PyTorch SDPA kernel (every other attention call is left to the
kernel ComfyUI picked). The RNGR letterbox and mask post-processing compute the same numbers with fewer passes.

Opt-in, not exact: the Condition Injector's `level0_keys = pooled 2x2 (faster)` averages the subject's
extra keys over 2×2 tokens in the five highest-resolution self-attention layers (a quarter of their extra
attention); its speed and how far it moves the output are in the tables below.

### Latest benchmark
"""


def block(result: dict) -> str:
    note = ("<!-- generated by scripts/readme_figures.py from benchmarks/results/bench.json; "
            "edit neither by hand: rerun scripts/bench.sh, then scripts/readme_figures.py -->")
    return f"{START}\n{note}\n{INTRO}{render(result)}{END}"


HELDOUT_PARTS = {"comfyui": "The random SD1.5 through the real nodes",
                 "toyworld": "The toy world's trained denoiser through the diffusers engine"}


def _heldout_table(lines, summary) -> None:
    lines += ["| reference | plain model | untrained adapter | trained adapter | trained vs plain | "
              "trained vs untrained | untrained vs plain | pairs where trained < plain |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, m in summary.items():
        label = "the other photo" if kind == "other photo" else "the target's own photo"
        lines.append(f"| {label} | {m['plain']:.4f} | {m['untrained']:.4f} | {m['trained']:.4f} | "
                     f"{m['trained_vs_plain']:+.1%} | {m['trained_vs_untrained']:+.1%} | "
                     f"{m['untrained_vs_plain']:+.1%} | {m['trained_beats_plain_pairs']} of {m['pairs']} |")


def _reference_effect(lines, cases) -> None:
    """How much the trained adapter's loss depends on which photo is the reference (per pair)."""
    own = {c["target"]: c["trained"] for c in cases if c["reference_kind"] == "same photo"}
    diffs = [abs(a - b) / b for c in cases if c["reference_kind"] == "other photo"
             for a, b in zip(c["trained"], own[c["target"]])]
    lines += [f"The reference barely matters: the other photo instead of the target's own moves the trained "
              f"adapter's loss by at most {max(diffs):.3%} per pair, so this margin measures what the adapter "
              "does to the denoiser, not what it took from the reference.", ""]


def _dilution_lines(lines, dil, short) -> None:
    per = dil["per_layer"]
    lines += [f"The untrained adapter's dilution per self-attention layer (the share of the layer's attention "
              f"mass, per query and head, on the appended zero-logit keys; other-photo reference): mean "
              f"{dil['mean']:.0%}, from {dil['min']:.0%} to {dil['max']:.0%}.", "",
              "| layer | " + " | ".join(short(n) for n in per) + " |", "|---" * (len(per) + 1) + "|",
              "| dilution | " + " | ".join(f"{v:.0%}" for v in per.values()) + " |", ""]


def _short_ldm(name: str) -> str:  # input_blocks.1.1.transformer_blocks.0 -> in 1
    parts = name.split(".")
    return {"input_blocks": "in", "output_blocks": "out", "middle_block": "mid"}[parts[0]] + (
        "" if parts[0] == "middle_block" else f" {parts[1]}")


def _short_diffusers(name: str) -> str:  # down_blocks.0.attentions.1.transformer_blocks.0 -> down 0.1
    parts = name.split(".")
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[parts[0]] + (
        "" if parts[0] == "mid_block" else f" {parts[1]}.{parts[3]}")


def render_heldout(result: dict) -> str:
    """The Markdown (without the markers) for one ``heldout_loss.json`` (its ``comfyui`` and ``toyworld`` parts)."""
    lines = []
    c = result.get("comfyui")
    if c:
        st, tr = c["settings"], c["training"]
        lines += [f"**{HELDOUT_PARTS['comfyui']}** (`{c['run']['command']}`; "
                  "`tests/integration/test_heldout_loss.py` asserts it): the P3S Trainer node trained an adapter "
                  f"on {st['photos']} photos of one subject at {st['size']}² ({tr['steps']} steps, lr "
                  f"{st['learning_rate']:g}, reference pairing `{st['reference_pairing']}`); each photo as the "
                  f"target on held-out (noise, t) pairs (noise seed {st['heldout_seed']}, not the Trainer's; "
                  f"t = {', '.join(map(str, st['timesteps']))}), through the Condition Injector's patch (stored "
                  f"reference by `reference_index`, Eq. 10 weight, λ {st['lam']:g}). Mean denoising loss (lower "
                  "is better); a margin is the relative drop of the trained adapter's loss:", ""]
        _heldout_table(lines, c["summary"])
        lines.append("")
        _reference_effect(lines, c["cases"])
        _dilution_lines(lines, c["dilution_untrained"], _short_ldm)
    t = result.get("toyworld")
    if t:
        st = t["settings"]
        lines += [f"**{HELDOUT_PARTS['toyworld']}** (`{t['run']['command']}`, {st['world']}: a denoiser that "
                  f"has learnt its world, where the random SD1.5 has not): P3S trained on {st['photos']} cleaned "
                  f"photos ({st['steps']} steps, lr {st['lr']:g}, the toy world's settings), evaluated the same "
                  "way through `P3SDiffusersInjector` (the same Eq. 7-10 as the nodes) with the next photo as "
                  "the other reference:", ""]
        _heldout_table(lines, t["summary"])
        lines.append("")
        _reference_effect(lines, t["cases"])
        _dilution_lines(lines, t["dilution_untrained"], _short_diffusers)
    return "\n".join(lines)


def heldout_block(result: dict) -> str:
    note = ("<!-- generated by scripts/readme_figures.py from benchmarks/results/heldout_loss.json; "
            "edit neither by hand: rerun benchmarks/heldout_loss.py, then scripts/readme_figures.py -->")
    return f"{HELDOUT_START}\n{note}\n{render_heldout(result)}{HELDOUT_END}"


def readme_block(text: str, start: str = START, end: str = END) -> str:
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    return text[i:j + len(end)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md's blocks are not the generated ones")
    ap.add_argument("--print", action="store_true", help="print the generated blocks")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--gpu-results", type=Path, default=None,
                    help=f"the folder of the {GPU_RESULTS} files (default: --results' folder)")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    new = {(START, END): block(json.loads(args.results.read_text())),
           (GPU_START, GPU_END): gpu_block(gpu_results(args.gpu_results or args.results.parent))}
    text = args.readme.read_text()
    heldout = args.results.parent / HELDOUT_RESULTS
    if (args.print or HELDOUT_START in text) and heldout.is_file():
        new[(HELDOUT_START, HELDOUT_END)] = heldout_block(json.loads(heldout.read_text()))
    if args.print:
        print("\n\n".join(new.values()))
        return 0
    old = {k: readme_block(text, *k) for k in new}
    if args.check:
        stale = [k[0] for k in new if old[k] != new[k]]
        if stale:
            print(f"{args.readme} is out of date ({', '.join(stale)}): run scripts/readme_figures.py", file=sys.stderr)
            return 1
        return 0
    for k in new:
        text = text.replace(old[k], new[k])
    args.readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
