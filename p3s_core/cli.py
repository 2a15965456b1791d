"""``p3s``: P3S outside ComfyUI, on diffusers (``python -m p3s ...`` or the ``p3s`` console script).

Commands (paper defaults shown by ``--help``):

* ``mask``: photos + clicked points -> subject masks and cleaned photos (Eq. 1-3, RNGR);
* ``train``: a folder of (cleaned) photos -> an adapter file (Eq. 4-15; the same files as the nodes);
* ``generate``: adapter + reference + prompts -> images (DDIM 50, CFG 7.5; Eq. 6-10);
* ``eval``: the DreamBench metrics (CLIP-I, CLIP-T, DINOv2) with the paper's figures beside them;
* ``train-many``: one adapter per subject folder, sharded over ``accelerate launch`` / ``torchrun``
  processes (:mod:`p3s_core.many`).

Every run writes ``p3s_<command>.json`` next to its outputs (the resolved arguments); ``--config
FILE`` reads such a file as defaults, so ``p3s train --config out/p3s_train.json`` repeats a run.
Bad input raises a typed :class:`~p3s_core.errors.P3SError` before any work: the command prints
``P3S: input '...': problem. Fix: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import ImageInputError, P3SError, PointsError, TrainingConfigError

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")
CONFIG_VERSION = 1


class CLIInputError(P3SError):
    """A command-line argument or input folder that cannot be used."""


# --- helpers ------------------------------------------------------------------------------------
def list_images(folder, name: str = "photos") -> list[Path]:
    p = Path(folder)
    if not p.is_dir():
        raise ImageInputError(name, f"{p} is not a folder", f"pass a folder of {', '.join(IMAGE_EXT)} images")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXT and "_mask" not in f.stem)
    if not files:
        raise ImageInputError(name, f"{p} has no images", "put 3-5 photos of the subject in it (png/jpg/webp)")
    return files


def read_rgb(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def save_rgb(arr, path) -> None:
    import numpy as np
    from PIL import Image

    tmp = Path(path).with_suffix(".tmp.png")
    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(tmp)
    os.replace(tmp, path)


def write_config(folder, command: str, args: argparse.Namespace) -> Path:
    """``p3s_<command>.json`` with the resolved arguments (``--config`` reads it back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"p3s_config_version": CONFIG_VERSION, "command": command,
            "args": {k: v for k, v in vars(args).items() if k not in ("func", "config")},
            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = folder / f"p3s_{command}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(**kw)


def load_clip_vision(path, device="cpu"):
    """CLIP ViT-L/14 vision from a local transformers folder or a single .safetensors file in the
    transformers layout (the shipped config), fp32."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CLIInputError("clip_vision", f"{p} has no config.json",
                                "pass a transformers CLIP ViT-L/14 folder or a .safetensors file")
        m = CLIPVisionModelWithProjection.from_pretrained(str(p), local_files_only=True,
                                                          torch_dtype=torch.float32)
    elif p.is_file() and p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        cfg = json.loads((Path(__file__).parent / "configs" / "clip_vit_l14_vision.json").read_text())
        cfg.pop("model_type", None)
        with torch.device("meta"):
            m = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
        sd = {k: v.float() for k, v in load_file(str(p)).items()}
        missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise CLIInputError("clip_vision", f"{p.name} is not a CLIP ViT-L/14 vision model in the "
                                f"transformers layout ({len(missing)} tensors missing, e.g. {missing[0]})",
                                "pass clip-vit-large-patch14 (model.safetensors) or its folder")
    else:
        raise CLIInputError("clip_vision", f"{p} is not a folder or a .safetensors file",
                            "pass the CLIP ViT-L/14 vision model (folder or .safetensors; never pickles)")
    return m.eval().requires_grad_(False).to(device)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def text_embeddings(pipe, prompts: Sequence[str]):
    """The SD1.5 text encoder's last hidden states [N, 77, C] (what the UNet attends to)."""
    import torch

    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0].float().cpu()


def _resize(img, resolution: int):
    import numpy as np
    from PIL import Image

    from .comfy_backend_train import resized_size

    h, w = resized_size(img.shape[0], img.shape[1], resolution)
    if (h, w) == img.shape[:2]:
        return img
    im = Image.fromarray((img * 255).round().astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


# --- mask ---------------------------------------------------------------------------------------
def read_points(path, images: Sequence[Path]):
    from .points import ImagePoints

    p = Path(path)
    if not p.is_file():
        raise PointsError("points", f"{p} does not exist",
                          'write a JSON file {"photo.png": {"positive": [[x, y]], "negative": [[x, y]]}}')
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        raise PointsError("points", f"{p} is not valid JSON ({exc})", "fix the JSON syntax") from exc
    out = {}
    for img in images:
        entry = data.get(img.name) if isinstance(data, dict) else None
        if not isinstance(entry, dict) or not entry.get("positive"):
            raise PointsError("points", f"no positive point for {img.name} in {p.name}",
                              f'add "{img.name}": {{"positive": [[x, y]], "negative": []}} (pixels)')
        try:
            out[img.name] = ImagePoints([tuple(map(float, q)) for q in entry["positive"]],
                                        [tuple(map(float, q)) for q in entry.get("negative", [])])
        except (TypeError, ValueError) as exc:
            raise PointsError("points", f"the points of {img.name} are not [x, y] pairs",
                              "write each point as [x, y] in pixels") from exc
    return out


def cmd_mask(args) -> int:
    import numpy as np
    import torch

    from .rngr import INPAINT_MODES, inpaint, letterbox, rngr_mask

    images = list_images(args.photos)
    points = read_points(args.points, images)
    if args.fill not in INPAINT_MODES:
        raise CLIInputError("fill", f"{args.fill!r} is not one of {INPAINT_MODES}", "use biharmonic")
    out = Path(args.out)
    clip = load_clip_vision(args.clip_vision, _device(args.device))
    write_config(out, "mask", args)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    for path in _tqdm(iterable=images, desc="P3S mask", unit="photo"):
        img = read_rgb(path)
        sq, box = letterbox(img, size=int(clip.config.image_size))
        x = (torch.from_numpy(sq).permute(2, 0, 1)[None] - mean) / std
        with torch.no_grad():
            tokens = clip(pixel_values=x.to(clip.device)).last_hidden_state[0].float().cpu().numpy()
        res = rngr_mask(tokens, box, points[path.name], img.shape[:2], sigma=args.sigma, grow=args.grow)
        if args.remove == "distractor":
            region = res.distractor_mask
        elif args.remove == "background":
            region = ~res.subject_mask
        else:
            region = res.distractor_mask | ~res.subject_mask
        save_rgb(inpaint(img, region, args.fill), out / f"{path.stem}.png")
        save_rgb(np.repeat(res.subject_mask[..., None].astype(np.float32), 3, axis=-1),
                 out / f"{path.stem}_mask.png")
    print(f"P3S mask: {len(images)} cleaned photo(s) and subject masks in {out}")
    return 0


# --- train --------------------------------------------------------------------------------------
def settings_from(args):
    from .train import TrainSettings

    return TrainSettings(epochs=args.epochs, lr=args.lr, gamma=args.gamma,
                         cond_dropout=args.cond_dropout, seed=args.seed, resolution=args.resolution,
                         identifier=args.identifier, ac_layers=args.ac_layers)


def prepare_training(pipe, clip, photos: Sequence[Path], prompt: str, resolution: int, masks_dir=None):
    """One :class:`~p3s_core.train.TrainBatch` per photo (latent, text, CLIP hidden, mask)."""
    import numpy as np
    import torch

    from . import diffusers_backend as db
    from .train import TrainBatch

    ctx, unc = text_embeddings(pipe, [prompt, ""]).split(1)
    batches = []
    for path in photos:
        img = _resize(read_rgb(path), resolution)
        lat, hid = db.encode_reference(pipe.vae, clip, torch.from_numpy(img)[None])
        mask = None
        if masks_dir is not None:
            mp = Path(masks_dir) / f"{path.stem}_mask.png"
            if not mp.is_file():
                raise ImageInputError("masks", f"no mask {mp.name} for {path.name}",
                                      "run p3s mask first, or leave --masks out")
            m = torch.from_numpy(_resize(read_rgb(mp), resolution)[..., 0].copy())[None, None]
            mask = torch.nn.functional.interpolate(m, size=tuple(lat.shape[-2:]), mode="area").clamp(0, 1)
        batches.append(TrainBatch(latent=lat, context=ctx.clone(), uncond=unc.clone(), clip_hidden=hid,
                                  mask=mask))
    del np
    return batches


def train_one(pipe, clip, photos, prompt, settings, out_path, masks_dir=None, progress=True,
              desc="P3S train"):
    """Train one adapter on ``photos`` and save it atomically to ``out_path``; returns the result."""
    from . import diffusers_backend as db
    from .adapter import save_adapter
    from .train import train_adapter

    batches = prepare_training(pipe, clip, photos, prompt, settings.resolution, masks_dir)
    adapter = db.new_adapter_for_unet(pipe.unet, seed=settings.seed, config=db.copy_config_for(pipe.unet),
                                      clip_dim=int(clip.config.hidden_size), training={"steps": 0})
    device = next(pipe.unet.parameters()).device
    adapter.to(device)
    step_fn, close = db.build_step_fn(pipe.unet, adapter, settings, dict(pipe.scheduler.config))
    bar = _tqdm(total=settings.epochs * len(batches), desc=desc, unit="step", disable=not progress)

    def on_step(step, total, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        result = train_adapter(adapter, batches, step_fn, settings, on_step=on_step, device=device)
    finally:
        close()
        bar.close()
    adapter.to("cpu")
    adapter.training_info = {"prompt": prompt, "images": len(batches), "settings": settings.to_dict(),
                             "steps": result.steps, "loss": result.losses[-1], "engine": "diffusers"}
    save_adapter(adapter, out_path)
    return result


def set_threads(n: int) -> None:
    import torch

    if n < 0:
        raise CLIInputError("threads", f"{n} is negative", "use 0 (default) or a positive thread count")
    if n:
        torch.set_num_threads(int(n))


def cmd_train(args) -> int:
    set_threads(args.threads)
    photos = list_images(args.photos)
    settings = settings_from(args)
    settings.validate(args.prompt)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIInputError("out", f"{out.name} does not end in .safetensors",
                            "name the adapter file e.g. my_dog.safetensors")
    from . import diffusers_backend as db

    dev = _device(args.device)
    pipe = db.load_pipeline(args.model, tokenizer=args.tokenizer, dtype=_dtype(args.dtype), device=dev)
    clip = load_clip_vision(args.clip_vision, dev)
    write_config(out.parent, "train", args)
    res = train_one(pipe, clip, photos, args.prompt, settings, out, args.masks)
    print(f"P3S train: {res.steps} steps, last loss {res.losses[-1]:.5f}; adapter saved to {out}")
    return 0


# --- generate -----------------------------------------------------------------------------------
def schedule_from(args):
    from .schedule import P3SSchedule

    return P3SSchedule(mode=args.schedule, start_percent=args.start_percent, end_percent=args.end_percent)


def cmd_generate(args) -> int:
    import torch

    from . import diffusers_backend as db
    from .adapter import load_adapter

    prompts = list(args.prompt or [])
    if args.dreambench:
        from .dreambench import prompts_for

        prompts += prompts_for(args.dreambench, args.class_noun, args.identifier)
    if not prompts:
        raise CLIInputError("prompt", "no prompt given", "pass --prompt 'a photo of sks dog' (repeatable) or --dreambench SUBJECT")
    refs = list_images(args.reference, "reference")
    sched = schedule_from(args)
    adapter = load_adapter(args.adapter)
    if (args.controlnet is None) != (args.control_image is None):
        raise CLIInputError("controlnet", "--controlnet and --control-image go together",
                            "pass both (a ControlNet and its control image) or neither")
    dev = _device(args.device)
    pipe = db.load_pipeline(args.model, controlnet=args.controlnet, tokenizer=args.tokenizer,
                            dtype=_dtype(args.dtype), device=dev)
    clip = load_clip_vision(args.clip_vision, dev)
    adapter.to(dev)
    i2s = []  # I'' of every reference photo (Eq. 4-5), brought to the first one's size
    for p in refs:
        i2 = db.encode_reference(pipe.vae, clip, torch.from_numpy(_resize(read_rgb(p), args.size))[None], adapter)
        if i2s and i2.shape[-2:] != i2s[0].shape[-2:]:
            i2 = torch.nn.functional.interpolate(i2, size=tuple(i2s[0].shape[-2:]), mode="bilinear",
                                                 align_corners=False)
        i2s.append(i2)
    i2 = torch.cat(i2s)
    out = Path(args.out) / args.dreambench if args.dreambench else Path(args.out)
    write_config(out, "generate", args)
    control = None
    if args.control_image:
        from PIL import Image

        control = Image.open(args.control_image).convert("RGB")
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    bar = _tqdm(total=len(prompts), desc="P3S generate", unit="prompt")
    for i, prompt in enumerate(prompts):
        images = db.generate(pipe, adapter, i2, [prompt], args.negative_prompt, args.steps, args.cfg,
                             sched, args.lam, args.strength, args.apply_to, args.seed + i * 1000,
                             args.size, args.size, args.n, control, progress=False)[0]
        (out / str(i)).mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(images):
            tmp = out / str(i) / f".{k:02d}.tmp.png"
            im.save(tmp)
            os.replace(tmp, out / str(i) / f"{k:02d}.png")
        bar.update(1)
    bar.close()
    print(f"P3S generate: {len(prompts)} prompt(s) x {args.n} image(s) in {out}")
    return 0


# --- eval ---------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from . import dreambench as dbm

    data = dbm.collect_generated(Path(args.generated), Path(args.real))
    enc = dbm.load_encoders(args.clip, args.dino, _device(args.device))
    out = Path(args.out)
    write_config(out, "eval", args)
    result = dbm.score(data, enc, args.identifier, args.clip_t_text,
                       progress=lambda it: _tqdm(iterable=it, desc="P3S eval", unit="subject"))
    (out / "dreambench.json").write_text(json.dumps(result, indent=2))
    table = dbm.format_table(result)
    (out / "dreambench.md").write_text(table + "\n")
    print(table)
    return 0


# --- parser -------------------------------------------------------------------------------------
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
    p.add_argument("--resolution", type=int, default=512, help="short side of the photos (default: %(default)s)")
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
        from .many import add_parser as add_many
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
