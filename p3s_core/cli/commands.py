"""The command line's commands: mask (Eq. 1-3), train (Eq. 4-15), generate (Eq. 6-10), eval."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .common import (CLIInputError, list_images, load_clip_vision, pick_device, pick_dtype, progress_bar, read_points,
                     read_rgb, resize_short_side, save_rgb, schedule_from, set_threads, settings_from, train_one,
                     write_config)


def cmd_mask(args) -> int:
    import numpy as np
    import torch

    from ..rngr import INPAINT_MODES, inpaint, letterbox, rngr_mask

    images = list_images(args.photos)
    points = read_points(args.points, images)
    if args.fill not in INPAINT_MODES:
        raise CLIInputError("fill", f"{args.fill!r} is not one of {INPAINT_MODES}", "use biharmonic")
    out = Path(args.out)
    clip = load_clip_vision(args.clip_vision, pick_device(args.device))
    write_config(out, "mask", args)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    for path in progress_bar(iterable=images, desc="P3S mask", unit="photo"):
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

def cmd_train(args) -> int:
    set_threads(args.threads)
    photos = list_images(args.photos)
    settings = settings_from(args)
    settings.validate(args.prompt)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIInputError("out", f"{out.name} does not end in .safetensors",
                            "name the adapter file e.g. my_dog.safetensors")
    from .. import diffusers_engine as db

    dev = pick_device(args.device)
    pipe = db.load_pipeline(args.model, tokenizer=args.tokenizer, dtype=pick_dtype(args.dtype), device=dev)
    clip = load_clip_vision(args.clip_vision, dev)
    write_config(out.parent, "train", args)
    res = train_one(pipe, clip, photos, args.prompt, settings, out, args.masks,
                    copy_layout=args.copy_layout)
    print(f"P3S train: {res.steps} steps, last loss {res.losses[-1]:.5f}, reference pairing "
          f"{res.reference_pairing}; adapter saved to {out}" + (f" ({res.pairing_note})" if res.pairing_note else ""))
    return 0


# --- generate -----------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    import torch

    from .. import diffusers_engine as db
    from ..adapter import load_adapter
    from ..encoder import check_reference_index, fit_reference

    prompts = list(args.prompt or [])
    if args.dreambench:
        from .evaluation import prompts_for

        prompts += prompts_for(args.dreambench, args.class_noun, args.identifier)
    if not prompts:
        raise CLIInputError("prompt", "no prompt given", "pass --prompt 'a photo of sks dog' (repeatable) or --dreambench SUBJECT")
    refs = list_images(args.reference, "reference")
    sched = schedule_from(args)
    adapter = load_adapter(args.adapter)
    if (args.controlnet is None) != (args.control_image is None):
        raise CLIInputError("controlnet", "--controlnet and --control-image go together",
                            "pass both (a ControlNet and its control image) or neither")
    dev = pick_device(args.device)
    pipe = db.load_pipeline(args.model, controlnet=args.controlnet, tokenizer=args.tokenizer,
                            dtype=pick_dtype(args.dtype), device=dev)
    clip = load_clip_vision(args.clip_vision, dev)
    adapter.to(dev)
    check_reference_index(args.reference_index, len(refs), "--reference-index")
    # I'' of every reference photo (Eq. 4-5), each fitted to the generated latent grid without
    # stretching (scaled by one factor, centre cropped), as the Condition Injector fits them
    grid = (args.size // 8, args.size // 8)
    i2 = torch.cat([fit_reference(db.encode_reference(pipe.vae, clip, torch.from_numpy(
        resize_short_side(read_rgb(p), args.size))[None], adapter), grid) for p in refs])
    out = Path(args.out) / args.dreambench if args.dreambench else Path(args.out)
    write_config(out, "generate", args)
    control = None
    if args.control_image:
        from PIL import Image

        control = Image.open(args.control_image).convert("RGB")
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    bar = progress_bar(total=len(prompts), desc="P3S generate", unit="prompt")
    for i, prompt in enumerate(prompts):
        images = db.generate(pipe, adapter, i2, [prompt], args.negative_prompt, args.steps, args.cfg,
                             sched, args.lam, args.strength, args.apply_to, args.seed + i * 1000,
                             args.size, args.size, args.n, control, progress=False,
                             reference_index=args.reference_index, reference_mode=args.reference_mode)[0]
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
    from . import evaluation as dbm

    data = dbm.collect_generated(Path(args.generated), Path(args.real))
    enc = dbm.load_encoders(args.clip, args.dino, pick_device(args.device))
    out = Path(args.out)
    write_config(out, "eval", args)
    result = dbm.score(data, enc, args.identifier, args.clip_t_text,
                       progress=lambda it: progress_bar(iterable=it, desc="P3S eval", unit="subject"))
    (out / "dreambench.json").write_text(json.dumps(result, indent=2))
    table = dbm.format_table(result)
    (out / "dreambench.md").write_text(table + "\n")
    print(table)
    return 0


# --- parser -------------------------------------------------------------------------------------
