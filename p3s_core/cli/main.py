"""The command line's parser and entry point (``python -m p3s``, the ``p3s`` console script)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..copy_config import COPY_LAYOUTS, DEFAULT_COPY_LAYOUT
from ..copy_unet import DEFAULT_ENHANCEMENT, ENHANCEMENTS
from ..train import DEFAULT_REFERENCE_PAIRING, REFERENCE_PAIRINGS
from ..errors import P3SError
from .commands import cmd_eval, cmd_generate, cmd_mask, cmd_train
from .common import CLIInputError


def _common_models(p, clip=True):
    p.add_argument("--model", required=True,
                   help="SD1.5: a local diffusers folder or a single-file .safetensors checkpoint")
    p.add_argument("--tokenizer", default=None,
                   help="CLIP tokenizer folder for single-file checkpoints (default: $P3S_TOKENIZER or ComfyUI's comfy/sd1_tokenizer via $P3S_COMFYUI)")
    if clip:
        p.add_argument("--clip-vision", required=True,
                       help="CLIP ViT-L/14 vision (paper's encoder): a transformers folder or .safetensors file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="model dtype (default: %(default)s)")


def _train_args(p):
    p.add_argument("--prompt", default="a photo of sks dog",
                   help="training prompt with the identifier (default: %(default)r)")
    p.add_argument("--epochs", type=int, default=60, help="paper: %(default)s")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate; paper: %(default)s")
    p.add_argument("--gamma", type=float, default=0.1, help="Eq. 15 weight of L_ac; paper: %(default)s")
    p.add_argument("--cond-dropout", type=float, default=0.1, help="condition dropout; paper: %(default)s")
    p.add_argument("--identifier", default="sks", help="rare identifier token; paper: %(default)s")
    p.add_argument("--ac-layers", default="last", choices=("last", "all"),
                   help="L_ac on the last cross-attention layer (paper) or all 16 (default: %(default)s)")
    p.add_argument("--enhancement", default=DEFAULT_ENHANCEMENT, choices=ENHANCEMENTS,
                   help="self + cross attention (paper, Fig. 3) or the self-attention injection only "
                        "(default: %(default)s)")
    p.add_argument("--reference-pairing", default=DEFAULT_REFERENCE_PAIRING, choices=REFERENCE_PAIRINGS,
                   help="training reference: 'auto' (another photo for the cross enhancement with 2+ photos, "
                        "else the photo itself), 'self' (paper) or 'other photo' (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=512, help="short side of the photos (default: %(default)s)")
    p.add_argument("--copy-layout", default=DEFAULT_COPY_LAYOUT, choices=COPY_LAYOUTS,
                   help="trainable copy: 'encoder' (encoder half + middle, 4 transformers) or 'full' (a copy "
                        "layer for each of the UNet's 16 transformers, as the paper; 3.5x the parameters, "
                        "slower steps) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0 = torch's default). On the CPU the same seed gives the same adapter "
                   "bytes with --threads 1 (multi-threaded reductions are not reproducible); torchrun uses 1 per process")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="p3s", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mask", help="points -> subject masks and cleaned photos (Eq. 1-3)", formatter_class=fmt)
    m.add_argument("photos", help="folder of photos")
    m.add_argument("--points", required=True, help='JSON: {"photo.png": {"positive": [[x, y]], "negative": [[x, y]]}} in pixels')
    m.add_argument("--clip-vision", required=True, help="CLIP ViT-L/14 vision: transformers folder or .safetensors")
    m.add_argument("--out", required=True, help="output folder (cleaned <name>.png + <name>_mask.png)")
    m.add_argument("--sigma", type=float, default=0.75, help="Gaussian smoothing (Eq. 2), in CLIP patches")
    m.add_argument("--grow", type=int, default=4, help="grow the masks by this many pixels")
    m.add_argument("--fill", default="biharmonic", help="Eq. 3 inpainting: biharmonic, blur, flat, none")
    m.add_argument("--remove", default="distractor", choices=("distractor", "background", "both"),
                   help="what is removed")
    m.add_argument("--device", default="auto", help="cpu / cuda")
    m.set_defaults(func=cmd_mask)

    t = sub.add_parser("train", help="photos -> adapter (Eq. 4-15)", formatter_class=fmt)
    t.add_argument("photos", help="folder of (cleaned) photos of the subject")
    t.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    t.add_argument("--masks", default=None, help="folder with <name>_mask.png from p3s mask (background weighs 0.1)")
    _common_models(t)
    _train_args(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="adapter + prompts -> images (Eq. 6-10)", formatter_class=fmt)
    g.add_argument("--adapter", required=True, help="adapter .safetensors (from p3s train or the ComfyUI Trainer)")
    g.add_argument("--reference", required=True, help="folder with the cleaned reference photo(s)")
    g.add_argument("--reference-index", type=int, default=0,
                   help="which reference photo (0 = the first, sorted by name) the copy reads, as the "
                   "Condition Injector's reference_index; each is fitted to the image without stretching")
    g.add_argument("--reference-mode", default="one reference", choices=("one reference", "average copy features"),
                   help="one reference (--reference-index), or the copy once per reference with its features averaged")
    g.add_argument("--out", required=True, help="output folder: prompts.json + <prompt index>/<k>.png")
    g.add_argument("--prompt", action="append", help="prompt (repeatable)")
    g.add_argument("--dreambench", default=None, metavar="SUBJECT", help="add the 25 DreamBench prompts of SUBJECT; output goes to OUT/SUBJECT")
    g.add_argument("--class-noun", default=None, help="class noun for --dreambench subjects outside DreamBench")
    g.add_argument("--identifier", default="sks", help="identifier token")
    g.add_argument("--negative-prompt", default="", help="negative prompt")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps; paper: %(default)s")
    g.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance; paper: %(default)s")
    g.add_argument("--n", type=int, default=1, help="images per prompt")
    g.add_argument("--size", type=int, default=512, help="image size")
    g.add_argument("--seed", type=int, default=0, help="seed (prompt i uses seed + 1000 i)")
    g.add_argument("--lam", type=float, default=None, help="Eq. 7 lambda (default: the adapter's, paper 0.2)")
    g.add_argument("--strength", type=float, default=1.0, help="multiplies the injection weight")
    g.add_argument("--apply-to", default="cond and uncond", choices=("cond and uncond", "cond only"),
                   help="CFG rows that get the injection")
    g.add_argument("--schedule", default="paper", choices=("paper", "fixed", "quadratic_increasing", "quadratic_decreasing"),
                   help="Eq. 10 weight schedule (paper: 1 - 0.5 (t/T)^2 + 0.2)")
    g.add_argument("--start-percent", type=float, default=0.0, help="injection window start (0 = first step)")
    g.add_argument("--end-percent", type=float, default=1.0, help="injection window end")
    g.add_argument("--controlnet", default=None, help="SD1.5 ControlNet (folder or .safetensors)")
    g.add_argument("--control-image", default=None, help="the ControlNet's control image")
    _common_models(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="DreamBench CLIP-I / CLIP-T / DINOv2 with the paper's figures", formatter_class=fmt)
    e.add_argument("generated", help="folder with <subject>/prompts.json + <i>/*.png (p3s generate --dreambench)")
    e.add_argument("--real", required=True, help="DreamBench dataset folder (<subject>/*.jpg)")
    e.add_argument("--clip", required=True, help="CLIP ViT-B/32 transformers folder (openai/clip-vit-base-patch32)")
    e.add_argument("--dino", required=True, help="DINOv2 transformers folder (e.g. facebook/dinov2-small)")
    e.add_argument("--out", required=True, help="output folder (dreambench.json, dreambench.md)")
    e.add_argument("--identifier", default="sks", help="identifier removed from the prompts for CLIP-T")
    e.add_argument("--clip-t-text", default="class", choices=("class", "prompt"),
                   help="CLIP-T text: the prompt without the identifier (class) or as written")
    e.add_argument("--device", default="auto", help="cpu / cuda")
    e.set_defaults(func=cmd_eval)

    try:
        from .train_many import add_parser as add_many
    except ImportError:  # pragma: no cover
        add_many = None
    if add_many is not None:
        add_many(sub, fmt, _common_models, _train_args)
    for p in sub.choices.values():
        p.add_argument("--config", default=None, help="read defaults from a p3s_<command>.json written by an earlier run")
    return ap


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE`` its saved arguments are the defaults (so required
    options and folders may be left out) and the arguments given now override them."""
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config and known.command:
        path = Path(known.config)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CLIInputError("config", f"{path} cannot be read as JSON ({exc})",
                                "pass a p3s_<command>.json written by an earlier run") from exc
        if data.get("command") != known.command:
            raise CLIInputError("config", f"{path.name} is for 'p3s {data.get('command')}', not "
                                f"'p3s {known.command}'", f"use the p3s_{known.command}.json of an earlier run")
        sp = ap._subparsers._group_actions[0].choices.get(known.command)
        if sp is not None:
            saved = {k: v for k, v in data.get("args", {}).items()
                     if k in {a.dest for a in sp._actions} and k != "command"}
            for a in sp._actions:  # saved values satisfy required options and folders
                if a.dest in saved:
                    a.required = False
                    if not a.option_strings:
                        a.nargs = "?"
            sp.set_defaults(**saved)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(argv)
        return int(args.func(args) or 0)
    except P3SError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
