#!/usr/bin/env python3
"""The README's benchmark figures, generated from the committed benchmark results.

    scripts/readme_figures.py            # rewrite the block of README.md between the bench markers
    scripts/readme_figures.py --check    # exit 1 if the README's block differs from bench.json's
    scripts/readme_figures.py --print    # print the block

The block between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is
:func:`render` of ``benchmarks/results/bench.json`` (written by ``scripts/bench.sh``); nothing in it
is typed by hand. Needs only the standard library (no ComfyUI, no torch).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench.json"
README = REPO / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

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


def readme_block(text: str) -> str:
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    return text[i:j + len(END)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md's block is not the generated one")
    ap.add_argument("--print", action="store_true", help="print the generated block")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    new = block(json.loads(args.results.read_text()))
    if args.print:
        print(new)
        return 0
    text = args.readme.read_text()
    old = readme_block(text)
    if args.check:
        if old != new:
            print(f"{args.readme} is out of date: run scripts/readme_figures.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(text.replace(old, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
