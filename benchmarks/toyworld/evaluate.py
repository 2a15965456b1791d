"""Measure P3S's claims on the toy world and write the results.

    python benchmarks/toyworld/evaluate.py --size full --seeds 0 1 2     # JSON, docs/TOYWORLD.md, grid
    python benchmarks/toyworld/evaluate.py --size ci --seeds 0 --quick   # the CI-sized run

The world (models) is built once (``build.py``, world seed 0) and cached; each evaluation seed picks
one held-out subject (``world.SUBJECTS[seed % 3]``), draws its photos (subject + look-alike
distractor), points, training and sampling seeds. Every figure is a mean over the seeds with its
standard deviation (sample, n - 1) and the per-seed values.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.toyworld import build as B  # noqa: E402
from benchmarks.toyworld import p3s_path as P  # noqa: E402
from benchmarks.toyworld import world as W  # noqa: E402

HEADLINE = ("base", "P3S untrained adapter", "plain fine-tune", "P3S (both points)", "P3S (positive only)",
            "P3S (no RNGR)")
ABLATIONS = ("L_ac off (gamma 0)", "lambda 1 (train and sample)", "self-attention only, own photo (as printed)",
             "cross-attention enhancement, own photo", "copy layout full",
             "schedule fixed 1.0", "schedule window 0-0.5", "schedule window 0.5-1")


def run_seed(world, seed: int, quick: bool, rs_base: P.RunSettings, gs_base: P.GenSettings, log=print,
             planted: bool = False):
    from dataclasses import replace

    from p3s_core.schedule import P3SSchedule

    subject = seed % len(W.SUBJECTS)
    photos = P.make_photos(subject, seed)
    prompt = P.train_prompt(photos)
    bgs = list(W.BG_NAMES)
    prompts = [f"a {W.IDENTIFIER} {photos.shape} on {b}" for b in bgs]
    rs = replace(rs_base, seed=seed)
    gs = replace(gs_base, seed=1000 + 100 * seed)
    res, imgs, timing = {}, {}, {}
    t0 = time.time()
    cleaned = {m: P.rngr_clean(world, photos, m) for m in P.RNGR_MODES}
    rngr = {m: {"iou_subject": c.iou_subject, "iou_distractor": c.iou_distractor,
                "distractor_left": c.distractor_left} for m, c in cleaned.items() if m != "no RNGR"}
    timing["rngr_s"] = time.time() - t0

    def record(name, images):
        imgs[name] = images
        res[name] = P.measure_subject(world, images, photos, bgs)
        log(f"  seed {seed} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in res[name].items()))

    record("base", P.generate_plain(world, prompts, gs))
    record("P3S untrained adapter", P.generate_p3s(world, P.untrained_adapter(world, seed), cleaned["both points"].images,
                                                   prompts, gs))
    t = time.time()
    ft = P.train_plain(world, cleaned["both points"], prompt, rs)
    timing["plain_train_s"] = time.time() - t
    record("plain fine-tune", P.generate_plain(world, prompts, gs, unet=ft))
    del ft
    adapters = {}
    for mode in P.RNGR_MODES:
        t = time.time()
        adapters[mode], result = P.train_p3s(world, cleaned[mode], prompt, rs)
        timing[f"p3s_train_s[{mode}]"] = time.time() - t
        record(f"P3S ({mode})", P.generate_p3s(world, adapters[mode], cleaned[mode].images, prompts, gs))
    main, main_imgs = adapters["both points"], cleaned["both points"].images
    if planted:
        record("planted: features zeroed at the injection",
               P.generate_p3s(world, main, main_imgs, prompts, gs, zero_features=True))
        bug = P.rngr_clean(world, photos, "both points", ignore_negative=True)
        a, _ = P.train_p3s(world, bug, prompt, rs)
        record("planted: negative point ignored", P.generate_p3s(world, a, bug.images, prompts, gs))
    if not quick:
        for name, kw in (("L_ac off (gamma 0)", {"gamma": 0.0}), ("lambda 1 (train and sample)", {"lam": 1.0}),
                         ("self-attention only, own photo (as printed)", {"enhancement": "self", "reference_pairing": "self"}),
                         ("cross-attention enhancement, own photo", {"enhancement": "cross", "reference_pairing": "self"}),
                         ("copy layout full", {"copy_layout": "full"})):
            a, _ = P.train_p3s(world, cleaned["both points"], prompt, replace(rs, **kw))
            record(name, P.generate_p3s(world, a, main_imgs, prompts, gs))
        for name, sched in (("schedule fixed 1.0", P3SSchedule(mode="fixed", weight=1.0)),
                            ("schedule window 0-0.5", P3SSchedule(start_percent=0.0, end_percent=0.5)),
                            ("schedule window 0.5-1", P3SSchedule(start_percent=0.5, end_percent=1.0))):
            record(name, P.generate_p3s(world, main, main_imgs, prompts, replace(gs, schedule=sched)))
    follow = P.base_prompt_following(world, gs, n_prompts=8 if quick else 16, seed=seed)
    imgs["base, descriptive prompts"] = follow.pop("images")
    return {"subject": list(W.SUBJECTS[subject]), "photo_background": photos.background, "train_prompt": prompt,
            "eval_prompts": prompts, "rngr": rngr, "variants": res, "base_prompt_following": follow,
            "timing_s": {k: round(v, 1) for k, v in timing.items()}}, imgs, photos, cleaned


def aggregate(per_seed: list[dict]) -> dict:
    def stat(vals):
        vals = [float(v) for v in vals]
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "values": vals}

    out = {"variants": {}, "rngr": {}, "base_prompt_following": {}}
    for name in per_seed[0]["variants"]:
        out["variants"][name] = {k: stat([s["variants"][name][k] for s in per_seed])
                                 for k in per_seed[0]["variants"][name]}
    for mode in per_seed[0]["rngr"]:
        out["rngr"][mode] = {k: stat([s["rngr"][mode][k] for s in per_seed]) for k in per_seed[0]["rngr"][mode]}
    for k in per_seed[0]["base_prompt_following"]["accuracy"]:
        out["base_prompt_following"][k] = stat([s["base_prompt_following"]["accuracy"][k] for s in per_seed])
    out["base_prompt_following_chance"] = per_seed[0]["base_prompt_following"]["chance"]
    return out


def picture_grid(photos, cleaned, imgs: dict, path: Path, per_row: int = 8, scale: int = 3) -> None:
    """Rows: the photos, the cleaned photos, then each variant's first images (2 per background)."""
    from PIL import Image, ImageDraw

    rows = [("photos (+ / - points)", photos.images), ("cleaned (both points)", cleaned["both points"].images)]
    for name, a in imgs.items():
        per = len(a) // 4 if name != "base, descriptive prompts" else 1
        pick = [a[b * per + j] for b in range(4) for j in range(min(2, per))] if per > 1 else list(a[:per_row])
        rows.append((name, pick[:per_row]))
    cell = W.IMG * scale + 2
    label_w = 190
    im = Image.new("RGB", (label_w + per_row * cell, len(rows) * cell), "white")
    d = ImageDraw.Draw(im)
    for r, (name, pics) in enumerate(rows):
        d.text((4, r * cell + cell // 2 - 6), name[:30], fill="black")
        for c, p in enumerate(pics):
            tile = Image.fromarray((np.clip(p, 0, 1) * 255).astype(np.uint8)).resize((W.IMG * scale,) * 2, Image.NEAREST)
            im.paste(tile, (label_w + c * cell, r * cell))
            if r == 0:
                for (x, y), col in ((photos.positive[c][0], "lime"), *[(q, "red") for q in photos.negative[c]]):
                    cx, cy = label_w + c * cell + x * scale, r * cell + y * scale
                    d.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), outline=col, width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, optimize=True)


def fmt(s: dict, pct: bool = True) -> str:
    if pct:
        return f"{100 * s['mean']:.0f} ± {100 * s['std']:.0f}"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def reading(agg: dict) -> list[str]:
    """Each headline comparison: the mean difference and in how many seeds it goes the claimed way."""
    v = agg["variants"]

    def cmp(a, b, key, higher=True):
        xa, xb = v[a][key]["values"], v[b][key]["values"]
        d = [(p - q) if higher else (q - p) for p, q in zip(xa, xb)]
        wins = sum(x > 0 for x in d)
        return (f"- {a} vs {b}, {key} ({'higher' if higher else 'lower'} is the claim): "
                f"{100 * statistics.fmean(xa):.0f} % vs {100 * statistics.fmean(xb):.0f} %, "
                f"the claimed way in {wins} of {len(d)} seeds (differences {', '.join(f'{100 * x:+.0f}' for x in d)} points)")

    rows = []
    for a, b, key, hi in (("P3S (both points)", "base", "subject_in", True),
                          ("P3S (both points)", "base", "subject_texture", True),
                          ("P3S (both points)", "plain fine-tune", "subject_in", True),
                          ("P3S (both points)", "P3S untrained adapter", "subject_texture", True),
                          ("P3S (both points)", "P3S (no RNGR)", "distractor_in", False),
                          ("P3S (both points)", "P3S (positive only)", "distractor_in", False),
                          ("P3S (both points)", "base", "background_acc", True)):
        if a in v and b in v:
            rows.append(cmp(a, b, key, hi))
    return rows


def markdown(result: dict) -> str:
    agg, info = result["aggregate"], result["world"]
    n = len(result["seeds"])
    acc = info["evaluator_heldout_accuracy"]
    lines = [
        "# The toy world: P3S's claims measured",
        "",
        "Generated by `benchmarks/toyworld/evaluate.py` from `benchmarks/results/toyworld.json`; do not edit by hand.",
        "",
        f"Command: `{result['command']}`. World: `build.py --seed {info['seed']} --size {info['config']['size']}` "
        f"(built in {info['times']['total_s']:.0f} s on {info['threads']} CPU threads: CLIP {info['times']['clip_s']:.0f} s, "
        f"UNet {info['times']['unet_s']:.0f} s, evaluator {info['times']['evaluator_s']:.0f} s). "
        f"{n} evaluation seeds ({', '.join(map(str, result['seeds']))}); each picks a held-out subject, its photos, "
        "points, training and sampling seeds. Figures: mean ± standard deviation over the seeds (per-seed values in the JSON).",
        "",
        f"Evaluator held-out accuracy (1000 fresh world images, all attributes of the image right): shape "
        f"{100 * acc['shape']:.1f} %, colour {100 * acc['colour']:.1f} %, texture {100 * acc['texture']:.1f} %, background "
        f"{100 * acc['bg']:.1f} %.",
        "",
        "## The base model follows its prompts",
        "",
        "Descriptive prompts (`a <colour> <texture> <shape> on <background>`, kinds seen in training), "
        f"{result['settings']['gen']['per_prompt']} images each, read by the evaluator (argmax):",
        "",
        "| attribute | accuracy % | chance % |", "|---|---|---|",
    ]
    for k, v in agg["base_prompt_following"].items():
        lines.append(f"| {k} | {fmt(v)} | {100 * agg['base_prompt_following_chance'][k]:.0f} |")
    lines += [
        "",
        "## Subject in, distractor out",
        "",
        "Prompts `a sks <shape> on <background>` for all four backgrounds (the photos show one: new prompts); "
        "the colour and texture are never named, so only the reference can bring them. `subject in` = the evaluator "
        "reads the subject's colour and texture together (the prompt names the shape); `subject texture` = its texture; `distractor texture` = it reads the look-alike's "
        "texture; `background` = it reads the prompt's background (the prompt's other word still acts). Similarities to "
        "the ideal subject (or distractor) on the prompt's background: CLIP-I stand-in = the world's vision encoder, "
        "DINO stand-in = the evaluator's features (trained independently); CLIP-T = the descriptive caption vs the image.",
        "",
        "| variant | subject in % | subject texture % | distractor texture % | background % | CLIP-I subj | CLIP-I distr | "
        "DINO subj | DINO distr | CLIP-T |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in agg["variants"].items():
        lines.append(f"| {name} | {fmt(v['subject_in'])} | {fmt(v['subject_texture'])} | {fmt(v['distractor_in'])} | "
                     f"{fmt(v['background_acc'])} | {fmt(v['clip_i_subject'], False)} | {fmt(v['clip_i_distractor'], False)} | "
                     f"{fmt(v['dino_subject'], False)} | {fmt(v['dino_distractor'], False)} | {fmt(v['clip_t'], False)} |")
    lines += ["", "### Reading (computed from the per-seed values)", ""] + reading(agg) + [
              "", "RNGR on the photos (masks vs the drawn objects):", "",
              "| points | subject mask IoU | distractor mask IoU | distractor pixels left after inpainting |",
              "|---|---|---|---|"]
    for mode, v in agg["rngr"].items():
        lines.append(f"| {mode} | {fmt(v['iou_subject'], False)} | {fmt(v['iou_distractor'], False)} | "
                     f"{fmt(v['distractor_left'])} % |")
    s = result["settings"]
    lines += ["", "Settings: " + json.dumps(s), "", "![Picture grid](images/toyworld_grid.png)", "",
              "Grid (seed " + str(result["seeds"][0]) + "): the photos with the positive (green) and negative (red) "
              "points, the cleaned photos, then two images per background for each variant, then the base model on "
              "descriptive prompts.", ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in NOTES]
    return "\n".join(lines) + "\n"


NOTES = (
    "The world measured here is the CI-sized one (`build.py --size ci`: 800 UNet steps of batch 16). Its base "
    "model is weak (its samples keep visible noise, see the grid), so absolute rates are low; the comparisons "
    "between variants are what the table is for. `--size full` (2000 UNet steps of batch 32, 300 CLIP steps) "
    "is defined in `build.py` but was not measured in this session (its build was stopped for time).",
    "`subject in` reads colour and texture, not shape: the prompt names the shape, and the CI evaluator's shape "
    "head is weak (see its held-out accuracy); `subject_shape_colour_texture` in the JSON includes shape.",
    "Training: the paper's loop and losses (`train_adapter`, the diffusers `build_step_fn`, gamma 0.1, 10 % "
    "condition dropout, the subject mask weighting the background 0.1x) with this world's learning rate (1e-3; "
    "the paper's 1e-5 is for SD1.5's widths) and 240 steps (60 epochs of 4 photos). The plain fine-tune trains "
    "the whole UNet with the same loss, optimiser, learning rate, steps and draws.",
    "Training defaults (the Trainer's): the cross-attention enhancement, trained with another photo as the "
    "reference (`reference_pairing` auto), the encoder copy layout; the ablations train the paper as printed "
    "(self-attention injection only, each photo its own reference), the enhancement with its own photo, and the "
    "16-layer `full` copy layout.",
    "Ablations left out for time: L_ac's literal reading (measured elsewhere to give about 1/(Nq Nk) of the "
    "default's gradient share) and lambda 0.",
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("ci", "full"), default="full")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="headline variants only (no ablations)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads under load are slower)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "toyworld.json"))
    ap.add_argument("--doc", default=str(REPO / "docs" / "TOYWORLD.md"))
    ap.add_argument("--grid", default=str(REPO / "docs" / "images" / "toyworld_grid.png"))
    ap.add_argument("--doc-only", action="store_true", help="regenerate the Markdown from --out's JSON")
    args = ap.parse_args(argv)
    if args.doc_only:
        Path(args.doc).write_text(markdown(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(args.threads)
    folder = B.build(args.world_seed, args.size, args.threads)
    world = P.ToyWorld(folder)
    rs, gs = P.RunSettings(), P.GenSettings()
    per_seed, t0 = [], time.time()
    first = None
    for s in args.seeds:
        r, imgs, photos, cleaned = run_seed(world, s, args.quick, rs, gs)
        per_seed.append(r)
        if first is None:
            first = (photos, cleaned, imgs)
    from dataclasses import asdict

    result = {"command": "python benchmarks/toyworld/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "world": world.info, "seeds": args.seeds,
              "settings": {"train": {k: v for k, v in asdict(rs).items() if k not in ("seed", "extra")},
                           "gen": {k: (str(v) if k == "schedule" else v) for k, v in asdict(gs).items() if k != "seed"},
                           "photos": 4, "eval_backgrounds": list(W.BG_NAMES)},
              "per_seed": per_seed, "aggregate": aggregate(per_seed),
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
              "eval_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    picture_grid(*first, Path(args.grid))
    Path(args.doc).write_text(markdown(result))
    print(f"wrote {args.out}, {args.doc}, {args.grid} ({result['eval_s']:.0f} s)")


if __name__ == "__main__":
    main()
