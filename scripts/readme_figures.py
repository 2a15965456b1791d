#!/usr/bin/env python3
"""Every measured figure in README.md and docs/*.md, generated from committed result files (issue 24
item 2; the benchmark block: issue 13 part 6; the GPU block: issue 21 item 7).

    scripts/readme_figures.py                 # rewrite every generated block
    scripts/readme_figures.py --check         # exit 1, listing the stale blocks, if any differs
    scripts/readme_figures.py --only bench    # one block (with --check or --print too)
    scripts/readme_figures.py --print         # print the blocks instead of writing them
    scripts/readme_figures.py --root DIR      # a copy of the repository elsewhere

:data:`BLOCKS` is the table: one :class:`Block` per generated block, naming the file it lives in
(between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``), the result file(s) it is rendered from,
its render function and the command that produces those results. Result files are written by the
producers through ``scripts/results_file.py`` (date, machine, torch, command line), under
``benchmarks/results/``. A new block = one row in :data:`BLOCKS` + one render function.
``tests/unit/test_readme_figures.py`` checks every block and that no measured figure is typed outside
them. Needs only the standard library (no ComfyUI, no torch).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = "benchmarks/results"
RESULTS = REPO / RESULTS_DIR / "bench.json"
README = REPO / "README.md"
GPU_RESULTS = "gpu-*.json"  # in RESULTS_DIR
ME = "scripts/readme_figures.py"

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
    return "–" if flag is None else "yes" if flag else "**no**"


def _from(run_or_result: dict, key: str) -> str:
    """' (not measured in this run: from the run of DATE, `command`)' for a section carried over."""
    src = run_or_result.get(f"{key}_from")
    return f" (not measured in this run: kept from the run of {src['date']}, `{src['command']}`)" if src else ""


def ratio_cell(s: dict | None, plain: bool = False) -> str:
    """A ratio with its spread across rounds beside it, and the median s/step:
    ``1.33× (1.30–1.38), 15.40 s``; plain (1.00× by definition): the spread of its s/step."""
    if s is None:
        return "–"
    if plain:
        return f"{s['ratio_to_plain']:.2f}×, {s['median']:.2f} s ({s['min']:.2f}–{s['max']:.2f} s)"
    lo, hi = s["ratio_spread"]
    return f"{s['ratio_to_plain']:.2f}× ({lo:.2f}–{hi:.2f}), {s['median']:.2f} s"


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
    n = result["steps"]
    done = [len(r["rounds"]) for r in result.get("runs", []) if r.get("rounds")]
    rounds = "/".join(str(k) for k in sorted(set(done))) or result["reps"]
    how = (f"per round, each variant samples {n} steps and 1 step, interleaved (the order reversed every other "
           f"round), s/step = (t{n} − t1) / {n - 1}; {rounds} rounds after a discarded warm-up round"
           if result.get("method") else f"{n} steps × {result['reps']} repetitions per variant, interleaved")
    lines = [
        f"`{result['command']}`, {result['date']}, on {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB RAM, "
        f"torch {m['torch']}, device {result['device']}); random weights of the exact SD1.5 / CLIP ViT-L/14 / "
        f"ControlNet shapes, {result['sampler']}; {how}; in one run ({result['wall_seconds'] / 60:.0f} min in "
        "all). SDPA = ComfyUI with `--use-pytorch-cross-attention` (PyTorch SDPA, what GPU users get)"
        + ("; sub-quad = ComfyUI's CPU default (sub-quadratic attention)."
           if any(r.get("attention") == "subquad" for r in result.get("runs", [])) else "."), ""]
    runs = _cols(result.get("runs", []))
    failed = [r for r in result.get("runs", []) if "error" in r]
    if runs:
        h, sep = _head(runs)
        per_round = all("times" in v or "ratio_rounds" in v for r in runs for v in r["steps_per_variant"].values())
        how = ("median over rounds of variant / plain of the same round, its spread (min–max over rounds) "
               "beside it, median s/step"
               if per_round else "median s/step")
        lines += [f"Ratio to plain SD1.5 ({how}):", "", h, sep]
        for name, label in NAMES.items():
            if not any(name in r["steps_per_variant"] for r in runs):
                continue
            _row(lines, label, runs, lambda r, name=name: ratio_cell(r["steps_per_variant"].get(name), name == "plain"))
        checks = [("P3S ≤ 1.3× plain", lambda g: _yes(g["p3s_le_1.3"])),
                  ("P3S below ControlNet", lambda g: _yes(g["p3s_below_controlnet"])),
                  ("P3S + ControlNet ≤ 1 + both overheads",
                   lambda g: _yes(g["p3s+controlnet_le_additive"]) + (
                       f" (bound {g['additive_bound']:.2f}×)" if g.get("additive_bound") is not None else "")),
                  ("weight 0 ≤ 1.02×", lambda g: _yes(g["weight0_le_1.02"])),
                  ("noise check: weight 0 within 0.97–1.03×", lambda g: _yes(g.get("weight0_within_3pct")))]
        for label, fn in checks:
            _row(lines, label if label.startswith("noise") else f"goal: {label}", runs,
                 lambda r, fn=fn: fn(r["goals"]))
        lines.append("")
        tried = [(k, len(a)) for r in runs for rnd in r.get("rounds", [])
                 for k, a in rnd.get("attempts", {}).items()]
        if tried:
            left = sum(len(rnd.get("disturbed", [])) for r in runs for rnd in r.get("rounds", []))
            lines += [f"Samples repeated because other work took the cores (CPU time / wall time under the floor): "
                      f"{sum(1 for _, n in tried if n > 1)} of {len(tried)}; still disturbed after "
                      f"the retries: {left}.", ""]
        noisy = [r for r in runs if r["goals"].get("weight0_within_3pct") is False]
        if noisy:
            lines += ["Noise check failed (" + ", ".join(f"{r['size']}², {BACKENDS.get(r['attention'], r['attention'])}"
                                                         for r in noisy)
                      + "): P3S at weight 0 runs the plain model, yet reads outside 0.97–1.03×; the machine was "
                      "busy with other work during the run, so these ratios cannot be read to ±3 % (see the "
                      "spreads).", ""]
        eff = [r for r in runs if "output_effects" in r]
        if eff:
            h, sep = _head(eff)
            lines += ["How far one DDIM step's latent moves from exact P3S, relative to P3S's own effect "
                      "(exact P3S − plain; 0 = unchanged, 1 = as large as the injection; max / rms)"
                      + _from(eff[0], "output_effects") + ":", "", h, sep]

            for label, key in (("opt-in pooled level-0 keys", "pooled_vs_exact"),
                               ("speed-ups off (float rounding only)", "speedups_off_vs_on")):
                _row(lines, label, eff, lambda r, key=key:
                     f"{r['output_effects'][key]['max']:.2g} / {r['output_effects'][key]['rms']:.2g}")
            lines.append("")
        prof = [r for r in runs if "profile" in r]
        if prof:
            h, sep = _head(prof)
            lines += ["Where a P3S step goes (`scripts/profile_step.py`: timing hooks inside one-step KSampler "
                      "runs, s per UNet evaluation of the CFG batch, medians)" + _from(prof[0], "profile") + ":",
                      "", h, sep]

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
        if result.get("train_from"):
            lines += ["", "Training" + _from(result, "train") + ":"]
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
    folder = folder or REPO / RESULTS_DIR
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


INTRO = """```bash
scripts/bench.sh                  # 256² and 512², all variants, profile, RNGR, import, training
scripts/bench.sh --sizes 512 --steps 3 --reps 6 --variants plain p3s "p3s weight 0" --skip-train --out /tmp/bench
$P3S_VENV/bin/python scripts/profile_step.py --size 512 --attention sdpa  # one step's profile (JSON)
scripts/readme_figures.py         # this section, from benchmarks/results/bench.json
```
Per-step times of plain SD1.5, + P3S, + ControlNet, + both, P3S at weight 0 and P3S with its speed-ups
off are measured in one run and reported as ratios to plain. Each round runs every variant's N-step and
1-step sample, interleaved, the order reversed every other round; a step is (t_N − t_1) / (N − 1), so
what a sample costs once cancels; a first warm-up round is discarded; a sample during which the process
got under 85 % of the warm-up's best core share (CPU time / wall time: other work took the cores) is
repeated, at most `--retries` times (results written before this guard have no such line). A ratio is the median over rounds
of variant / plain of the same round, its spread across rounds (min–max) beside it
(`benchmarks/timing.py`, checked by `tests/unit/test_bench_timing.py`). The results are committed
(`benchmarks/results/bench.json`); this section is generated from them (`tests/unit/test_readme_figures.py`
checks it). Training: `benchmarks/bench_train.py --epoch-images 5` times one real epoch of the Trainer's
loop. P3S at weight 0 installs nothing (the plain model, bit for bit, `tests/integration/test_injector.py`),
so its distance from 1.00× is the noise of the run; the committed run must put it within 0.97–1.03×
(a test checks the file).

Attention: the benchmark runs ComfyUI with PyTorch SDPA (`--use-pytorch-cross-attention`, what GPU users
get). ComfyUI's CPU default, the sub-quadratic kernel, is not benchmarked: there P3S sends its 16
extended self-attentions to SDPA (below) while plain stays on sub-quad, so a ratio would compare two
kernels, not P3S's cost (it read 0.96×); routing plain's self-attention the same way would only repeat
the SDPA column.

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




# --- the generic machinery ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One generated block: ``<!-- name:start -->`` ... ``<!-- name:end -->`` in ``target``."""
    name: str
    target: str                       # the file it lives in, relative to the repository root
    sources: tuple[str, ...]          # the result files (globs allowed) it is rendered from
    render: Callable[[Path], str]     # repository root -> the Markdown between the header and the end marker
    rerun: str | None                 # the producer command (None: computed from the repository itself)

    @property
    def start(self) -> str:
        return f"<!-- {self.name}:start -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    def header(self) -> str:
        src = ", ".join(self.sources)
        how = f"rerun {self.rerun}, then {ME}" if self.rerun else f"rerun {ME}"
        return f"<!-- generated by {ME} from {src}; edit neither by hand: {how} -->"

    def text(self, root: Path = REPO) -> str:
        """The whole block, markers included."""
        return f"{self.start}\n{self.header()}\n{self.render(root)}{self.end}"


def load(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


def _when(r: dict) -> str:
    """``command``, date, on which machine (a results_file.py stamp, or an older file's fields)."""
    m = r.get("machine")
    if isinstance(m, dict):
        where = f"{m.get('cpu') or '?'} ({m.get('cores')} cores, torch {m.get('torch') or '–'})"
    else:
        where = f"{m or '?'} ({r.get('threads', '?')} threads, torch {r.get('torch') or '–'})"
    return f"`{r['command']}`, {r['date']}, on {where}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %" if abs(100 * x) >= 0.1 else f"{100 * x:.2g} %"


def _pct_range(a: float, b: float) -> str:
    lo, hi = sorted((_pct(a)[:-2], _pct(b)[:-2]), key=float)
    return f"{lo} %" if lo == hi else f"{lo}–{hi} %"


# --- renderers of the blocks outside the benchmark section --------------------------------------------
def render_bench(root: Path) -> str:
    return INTRO + render(load(root, f"{RESULTS_DIR}/bench.json"))


def render_gpu_section(root: Path) -> str:
    results = gpu_results(root / RESULTS_DIR)
    body = "\n".join(render_gpu(n, r) for n, r in results) if results else "No GPU run is committed.\n"
    return GPU_INTRO + body


def _mparams(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def render_copy_params(root: Path) -> str:
    a = load(root, f"{RESULTS_DIR}/adapter_size.json")
    p = a["params"]
    return ("- Each of the 16 SD1.5 self-attention layers takes the copy's feature of the same level and width\n"
            "  (copy: one ResNet block + transformer per level, 320/640/1280 + middle, initialised from the base UNet\n"
            f"  like ControlNet; {_mparams(p['copy'])} parameters, {_mparams(p['zero_convs'])} of them in the zero "
            f"convs; the reference encoder {p['encoder'] / 1e3:.1f} k; `scripts/measure_adapter_size.py`)\n"
            "  through its own zero-initialised 1×1 conv.\n")


def render_stored_reference(root: Path) -> str:
    a = load(root, f"{RESULTS_DIR}/adapter_size.json")
    mb = a["per_photo_bytes"] / 1e6
    return ("- **The adapter carries its cleaned reference(s).** The Trainer stores the cleaned photos' VAE latents and\n"
            f"  CLIP ViT-L/14 hidden states in the adapter file ({mb:.1f} MB per photo at {a['resolution']}², "
            f"{a['dtype']}; {_when(a)}), so the Condition Injector needs\n"
            "  no reference photo, VAE or CLIP vision by default; a connected `reference` (with `vae` and\n"
            "  `clip_vision`) overrides it. Older adapter files still load; they then need a connected reference\n"
            "  (the Injector says so). The shipped generate workflows use the stored reference.\n")


def render_copy_precision(root: Path) -> str:
    a, c = load(root, f"{RESULTS_DIR}/adapter_size.json"), load(root, f"{RESULTS_DIR}/copy_precision.json")
    lines = [f"The weights stay as stored ({a['dtype']}: {a['weight_bytes'] / 1e6:.0f} MB in VRAM when fully loaded,",
             f"`scripts/measure_adapter_size.py`). Measured on the {c['device'].upper() if c['device'] == 'cpu' else c['device']} "
             f"({_when(c)}; `{RESULTS_DIR}/copy_precision.json`): {c['setup']}.",
             "How far one step's output moves when the copy and encoder compute in half precision instead of "
             "fp32, as a share of P3S's own effect on that step (P3S − plain; mean and max over the latent):", "",
             "| step | " + " | ".join(d for d in ("bf16", "fp16")) + " |", "|---|---|---|"]
    for step, s in c["steps"].items():
        cells = [_pct_range(s[d]["move_over_effect_mean"], s[d]["move_over_effect_max"])
                 + ("" if s[d].get("finite", True) else " (**not finite**)") for d in ("bf16", "fp16")]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_reference_cost(root: Path) -> str:
    r = load(root, f"{RESULTS_DIR}/reference_cost.json")
    n, avg = r["refs"], f"average of {r['refs']}"
    ratio, over = r["ratio_to_plain"], r["overhead_s"]
    return ("- **One reference per generation.** A training step feeds the copy exactly one photo (the target\n"
            "  itself or another photo of the subject, `reference_pairing` below), never an average of several\n"
            "  unaligned photos: the Condition Injector feeds exactly one reference\n"
            "  (`reference_index`). `reference_mode = average copy features` runs the copy once per reference and\n"
            f"  averages its features: N copy runs per step. Measured ({_when(r)}; random SD1.5 at {r['size']}², "
            f"one DDIM step with CFG, median of {r['rounds']} interleaved rounds): plain 1.00× "
            f"({r['median_step_s']['plain']:.1f} s per step), one\n"
            f"  reference {ratio['one reference']:.2f}×, average of {n} references {ratio[avg]:.2f}× "
            f"(+{over['one reference']:.1f} s vs +{over[avg]:.1f} s per step over plain: "
            f"{r['average_over_one_overhead']:.1f}× the one-reference overhead).\n")


def render_reproducible(root: Path) -> str:
    r = load(root, f"{RESULTS_DIR}/reproducible.json")
    n = r["default_threads"]
    one, many = r["median_step_s_1_thread"], r[f"median_step_s_{n}_threads"]
    faster = "one thread was faster" if one < many else f"{n} threads were faster"
    return (f"The cost depends on the machine and its load. Measured ({_when(r)}; random SD1.5 at "
            f"{r['resolution']}², median of {r['rounds']} interleaved rounds of {r['steps']} steps): a training step "
            f"took {one:.2f} s on one thread and {many:.2f} s on {n} ({faster} on this shared machine, "
            f"ratio {r['ratio_1_thread_over_default']:.2f}).\n")


def _train_rows(root: Path) -> list[tuple[dict, dict]]:
    """``(result, row)`` of each training configuration: the CPU benchmark's (bench.json) and each
    ``train_memory_*.json`` (one configuration per process, so each peak RSS is its own)."""
    bench = load(root, f"{RESULTS_DIR}/bench.json")
    # A bench run that skipped training keeps the previous run's rows, stamped with where they came from.
    origin = {**bench, **bench["train_from"]} if bench.get("train_from") else bench
    out = [(origin, row) for row in bench.get("train") or [] if "error" not in row]
    for f in sorted((root / RESULTS_DIR).glob("train_memory_*.json")):
        r = json.loads(f.read_text())
        out += [(r, row) for row in r["rows"]]
    return sorted(out, key=lambda x: (x[1]["resolution"], x[1]["gradient_checkpointing"]))


def render_train_memory(root: Path) -> str:
    rows = _train_rows(root)
    lines = ["Peak RSS on the CPU, one configuration per process (random SD1.5; the process also holds ComfyUI, "
             "the MODEL, CLIP, VAE, CLIP vision and the cached inputs):", "",
             "| training | peak RSS | RSS before the frozen UNet | frozen UNet's own (unshared) tensors | s/step |",
             "|---|---|---|---|---|"]
    for _, t in rows:
        ck = "on" if t["gradient_checkpointing"] else "off"
        before = t.get("rss_before_frozen_unet_mib")
        lines.append(f"| {t['resolution']}², {t['device']}, gradient checkpointing {ck} | "
                     f"{t['peak_rss_mib'] / 1024:.1f} GiB | " + ("–" if before is None else f"{before / 1024:.1f} GiB")
                     + f" | {t['frozen_unet_own_mib']:.0f} MiB | {t['step_s']:.2f} |")
    lines += ["", "Commands: " + "; ".join(sorted({_when(r) for r, _ in rows})) + "."]
    return "\n".join(lines) + "\n"


# --- the error catalogue's counts (computed from docs/ERRORS.md itself) ----------------------------------
ERRORS_DOC = "docs/ERRORS.md"


def catalogue_counts(root: Path) -> dict:
    """Rows of the catalogue (``| ...`test_...` |`` lines) and how many of them each 'server' kind has."""
    counts = {"rows": 0, "P3S": 0, "400": 0, "no": 0}
    for line in (root / ERRORS_DOC).read_text().splitlines():
        if line.startswith("| ") and "`test_" in line:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            kind = cells[-1].split(":")[0].strip("* ")
            counts["rows"] += 1
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def render_errors_readme(root: Path) -> str:
    c = catalogue_counts(root)
    return (f"- Every error message names the input and the fix: [docs/ERRORS.md](docs/ERRORS.md) lists {c['rows']} refused\n"
            f"  inputs, each tested through the node; the {c['P3S']} a prompt can carry are also sent as API prompts "
            f"through the\n  real server (each returns its typed message), and {c['400']} more are refused by "
            "ComfyUI's own validation first.\n")


def render_errors_doc(root: Path) -> str:
    c = catalogue_counts(root)
    return ("Each row below is a test in\n"
            "[`tests/integration/test_bad_inputs.py`](../tests/integration/test_bad_inputs.py), run through the\n"
            "node in the real ComfyUI 0.3.75: it checks the error class, that the message names the input and\n"
            "contains the fix, and (where it can be observed) that nothing ran before the refusal. Messages are\n"
            f"abridged; `…` marks cuts. The catalogue has **{c['rows']} rows**; `test_catalogue_lists_every_test` "
            "keeps this\npage and the test file in step (every test named, the row count above).\n\n"
            "The last column, **server**, says how the row travels through the real server (API prompt, `POST\n"
            f"/prompt`): **P3S** ({c['P3S']} rows): the prompt reaches the node and the execution error carries the typed\n"
            f"`P3S: input '…': … Fix: …` message; **400** ({c['400']} rows): ComfyUI's own validation refuses the "
            "prompt first\n(a value outside the widget's range, a choice not in its list, a link of the wrong type); "
            f"**no: …** ({c['no']}\nrows): a prompt cannot carry that input (a Python object, an image no core node "
            "makes, a model file of\nanother family). The catalogue test in\n"
            "[`tests/integration/test_server_survival.py`](../tests/integration/test_server_survival.py) parses this\n"
            "column, sends every P3S row (each variant of a row) and every 400 row to one real server, with good\n"
            "prompts in between that must still succeed, and fails if a row has no prompt or a prompt has no row.\n")


# --- the two copy layouts (issue 22 item 2) -----------------------------------------------------------------
def render_copy_layouts(root: Path) -> str:
    r = load(root, f"{RESULTS_DIR}/copy_layouts.json")
    ps, params = r["per_step"], r["parameters"]
    lines = [f"Measured in one run, interleaved ({_when(r)}; {r['size']}², PyTorch SDPA, real ComfyUI {r['comfyui']}, "
             f"{r['rounds']} rounds of {r['steps']} DDIM steps, the order reversed every other round; a ratio is the "
             "median over rounds of layout / plain of the same round, spread min–max):", "",
             "| | per step | vs. plain | copy parameters | copy transformers |", "|---|---|---|---|---|"]
    for name in ("plain", "encoder", "full"):
        p = ps[name]
        lo, hi = p["ratio_spread"]
        c = params.get(name)
        lines.append(f"| {'plain SD1.5' if name == 'plain' else f'`{name}`'} | {p['median_s']:.2f} s | "
                     f"{p['ratio_to_plain']:.2f}× ({lo:.2f}–{hi:.2f}) | "
                     + (f"{c['copy'] / 1e6:.1f} M | {c['copy_transformers']} |" if c else "– | – |"))
    slower = ps["full"]["median_s"] / ps["encoder"]["median_s"] - 1
    grow = params["full"]["copy"] / params["encoder"]["copy"]
    lines += ["", f"`full` makes a P3S step {slower:.0%} slower than `encoder` and has {grow:.1f}× its parameters "
              "(file size and the optimiser state of training grow with them)."]
    return "\n".join(lines) + "\n"


# --- held-out denoising loss against the plain model (issue 22 item 4) ---------------------------------
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
    if max(diffs) < 0.01:
        lines += [f"The reference barely matters: the other photo instead of the target's own moves the trained "
                  f"adapter's loss by at most {max(diffs):.3%} per pair, so this margin measures what the adapter "
                  "does to the denoiser, not what it took from the reference.", ""]
    else:
        lines += [f"The reference matters: the other photo instead of the target's own moves the trained "
                  f"adapter's loss by up to {max(diffs):.1%} per pair (mean {sum(diffs) / len(diffs):.1%}); the "
                  "other-photo row is the one that counts, as at generation the reference is never the image "
                  "being made.", ""]


def _trained_as(st: dict, tr: dict | None = None) -> str:
    """", enhancement X, reference pairing Y (used: Z)" from a part's settings / training (absent in older files)."""
    src = {**st, **(tr or {})}
    if "enhancement" not in src:
        return f", reference pairing `{st['reference_pairing']}`"
    return (f", enhancement `{src['enhancement']}`, reference pairing `{st['reference_pairing']}` (used: "
            f"`{src.get('pairing_used')}`)")


def _ablation_lines(lines, a) -> None:
    """The toy world's enhancement x training-reference ablation (issue 22: why "auto" pairs the cross
    enhancement with another photo)."""
    seeds = a["seeds"]
    lines += [f"**Which training reference the cross-attention enhancement needs** (`{a['run']['command']}`, "
              f"{a['world']}, photos and training draws of seeds {', '.join(map(str, seeds))}): the held-out loss "
              "with the other photo as the reference, trained adapter vs the plain denoiser (positive: lower than "
              "plain; in brackets the same adapter with the target's own photo as the reference):", "",
              "| enhancement | training reference | " + " | ".join(f"seed {x}" for x in seeds) + " | mean |",
              "|---|---|" + "---|" * (len(seeds) + 1)]
    for row in a["rows"]:
        cells = [f"{x['trained_vs_plain']:+.1%} ({(x['plain'] - x['same_photo']) / x['plain']:+.1%})"
                 for x in row["per_seed"]]
        lines.append(f"| {row['enhancement']} | {row['reference_pairing']} | " + " | ".join(cells)
                     + f" | {row['mean_trained_vs_plain']:+.1%} |")
    lines.append("")


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
                  f"{st['learning_rate']:g}{_trained_as(st, tr)}); each photo as the "
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
                  f"photos ({st['steps']} steps, lr {st['lr']:g}{_trained_as(st)}, the toy world's settings), "
                  "evaluated the same "
                  "way through `P3SDiffusersInjector` (the same Eq. 7-10 as the nodes) with the next photo as "
                  "the other reference:", ""]
        _heldout_table(lines, t["summary"])
        lines.append("")
        _reference_effect(lines, t["cases"])
        _dilution_lines(lines, t["dilution_untrained"], _short_diffusers)
    a = result.get("toyworld_ablation")
    if a:
        _ablation_lines(lines, a)
    return "\n".join(lines)


def render_heldout_section(root: Path) -> str:
    return render_heldout(load(root, f"{RESULTS_DIR}/heldout_loss.json"))


R = RESULTS_DIR
BLOCKS: list[Block] = [
    Block("bench", "README.md", (f"{R}/bench.json",), render_bench, "scripts/bench.sh"),
    Block("gpu", "README.md", (f"{R}/{GPU_RESULTS}",), render_gpu_section, "scripts/gpu_check.py"),
    Block("copy-params", "README.md", (f"{R}/adapter_size.json",), render_copy_params,
          "scripts/measure_adapter_size.py --out benchmarks/results/adapter_size.json"),
    Block("stored-reference", "README.md", (f"{R}/adapter_size.json",), render_stored_reference,
          "scripts/measure_adapter_size.py --out benchmarks/results/adapter_size.json"),
    Block("copy-precision", "README.md", (f"{R}/adapter_size.json", f"{R}/copy_precision.json"),
          render_copy_precision, "benchmarks/copy_precision.py and scripts/measure_adapter_size.py"),
    Block("reference-cost", "README.md", (f"{R}/reference_cost.json",), render_reference_cost,
          "scripts/measure_reference_cost.py --size 256 --refs 3 --rounds 2 --out benchmarks/results/reference_cost.json"),
    Block("reproducible", "README.md", (f"{R}/reproducible.json",), render_reproducible,
          "scripts/bench_reproducible.py --resolution 64 --out benchmarks/results/reproducible.json"),
    Block("train-memory", "README.md", (f"{R}/bench.json", f"{R}/train_memory_*.json"), render_train_memory,
          "benchmarks/bench_train.py --resolution R --checkpointing off|on --out benchmarks/results/train_memory_R_off|on.json"),
    Block("copy-layouts", "README.md", (f"{R}/copy_layouts.json",), render_copy_layouts, "benchmarks/copy_layouts.py"),
    Block("heldout", "README.md", (f"{R}/heldout_loss.json",), render_heldout_section, "benchmarks/heldout_loss.py"),
    Block("errors", "README.md", (ERRORS_DOC,), render_errors_readme, None),
    Block("errors-counts", ERRORS_DOC, (ERRORS_DOC,), render_errors_doc, None),
]


#: Documents generated whole by another script (never scanned for typed figures): path -> (source, generator).
GENERATED_FILES = {"docs/TOYWORLD.md": ("benchmarks/results/toyworld.json", "benchmarks/toyworld/evaluate.py")}

#: What a measured figure looks like in prose: a number with a unit of time, memory, share or ratio, a
#: small power of ten, a "before → after" pair, a parameter count or a catalogue count.
MEASURED = re.compile(r"""(?<![\w.\-/])(
      \d+(?:[.,]\d+)*\s?(?:%|×|GiB|GB|MiB|MB|KB|kB|ms|min|s)(?!\w)
    | \d+\.\d+x(?!\w)
    | \d+(?:\.\d+)?e-\d+
    | \d+(?:\.\d+)?\s?→\s?\d
    | \d+(?:\.\d+)?\s?M\s+parameters
    | \d+\s+(?:rows|refused\s+inputs)
)""", re.X)

#: Numbers that look like measurements but are settings, limits or definitions, each with its reason.
#: Matched as exact text; keep it short: a measured figure belongs in a generated block.
NOT_MEASURED = {
    "lr 1e-5": "the paper's learning rate (Sec. IV-A)",
    "such as 1e-5 (paper)": "the paper's learning rate, in an error message's fix",
    "γ = 0.1, 10 % condition dropout": "the paper's training settings",
    "at 0.1× in the denoising loss": "the pack's background weight (a setting)",
    "background\n  0.1×": "the pack's background weight (a setting)",
    "8 × 8 grid": "the toy world's patch grid (a setting)",
    "fixed 2×": "the toy world's latent map (a definition)",
    "24 GB machine": "the machine the test split is made for",
    "tolerance of 1e-4": "a test's tolerance",
    "relative 1e-3": "a test's tolerance",
    "margin of 1e-3": "a documented tolerance of an input check",
    "(2 -> 4 rows)": "a bad input's shape, in the error catalogue",
}


def typed_figures(root: Path = REPO) -> list[str]:
    """``"file:line: text"`` for each measured-looking figure in README.md and docs/*.md outside the
    generated blocks of :data:`BLOCKS` (and outside :data:`GENERATED_FILES`), less :data:`NOT_MEASURED`."""
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    hits = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel in GENERATED_FILES:
            continue
        text = path.read_text()
        for b in BLOCKS:
            if b.target == rel and (found := find(text, b)) is not None:
                text = text.replace(found, "\n" * found.count("\n"))
        for allowed in NOT_MEASURED:
            text = text.replace(allowed, re.sub(r"\S", "_", allowed))
        lines = text.splitlines()
        for m in MEASURED.finditer(text):  # the whole text: a figure may wrap onto the next line
            no = text.count("\n", 0, m.start()) + 1
            hits.append(f"{rel}:{no}: {' '.join(m.group(0).split())!r} in {lines[no - 1].strip()[:100]!r}")
    return hits


def find(text: str, b: Block) -> str | None:
    """The block ``b`` as it stands in ``text`` (markers included), or None when its markers are missing."""
    i = text.find(b.start)
    j = text.find(b.end, i + 1)
    return text[i:j + len(b.end)] if i >= 0 and j > i else None


def block(result: dict) -> str:
    """The benchmark block for one ``bench.json`` result (kept for callers of the old interface)."""
    b = BLOCKS[0]
    return f"{b.start}\n{b.header()}\n{INTRO}{render(result)}{b.end}"


def stale(root: Path = REPO, blocks: list[Block] | None = None) -> list[str]:
    """``"name (target): why"`` for each block whose file does not hold its generated text."""
    out = []
    for b in blocks or BLOCKS:
        text = (root / b.target).read_text()
        if text.count(b.start) != 1 or text.count(b.end) != 1:
            out.append(f"{b.name} ({b.target}): {text.count(b.start)} start / {text.count(b.end)} end markers, want 1 / 1")
        elif find(text, b) != b.text(root):
            out.append(f"{b.name} ({b.target}): differs from {', '.join(b.sources)}")
    return out


def write(root: Path = REPO, blocks: list[Block] | None = None) -> list[str]:
    """Rewrite each block in place; returns the names of the blocks that changed."""
    changed = []
    for b in blocks or BLOCKS:
        path = root / b.target
        text = path.read_text()
        old = find(text, b)
        if old is None:
            raise SystemExit(f"{b.target} has no {b.start} ... {b.end} block: add the two markers where it goes")
        new = b.text(root)
        if old != new:
            path.write_text(text.replace(old, new))
            changed.append(b.name)
    return changed




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1, listing them, if any block is stale")
    ap.add_argument("--print", action="store_true", help="print the generated blocks, write nothing")
    ap.add_argument("--only", action="append", metavar="NAME", choices=[b.name for b in BLOCKS],
                    help="only this block (repeatable)")
    ap.add_argument("--root", type=Path, default=REPO, help="the repository root (default: this checkout)")
    args = ap.parse_args(argv)
    blocks = [b for b in BLOCKS if not args.only or b.name in args.only]
    if args.print:
        print("\n\n".join(f"{b.target}:\n{b.text(args.root)}" for b in blocks))
        return 0
    if args.check:
        bad = stale(args.root, blocks)
        for line in bad:
            print(f"stale: {line}", file=sys.stderr)
        if bad:
            print(f"run {ME} to regenerate", file=sys.stderr)
        return 1 if bad else 0
    for name in write(args.root, blocks):
        print(f"rewrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
