"""The command line's shared parts: reading photos, points and models, one training run, settings."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

from ..errors import ImageInputError, P3SError, PointsError

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


def progress_bar(**kw):
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


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def text_embeddings(pipe, prompts: Sequence[str]):
    """The SD1.5 text encoder's last hidden states [N, 77, C] (what the UNet attends to)."""
    import torch

    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0].float().cpu()


def resize_short_side(img, resolution: int):
    import numpy as np
    from PIL import Image

    from ..train import resized_size

    h, w = resized_size(img.shape[0], img.shape[1], resolution)
    if (h, w) == img.shape[:2]:
        return img
    im = Image.fromarray((img * 255).round().astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


# --- mask ---------------------------------------------------------------------------------------
def read_points(path, images: Sequence[Path]):
    from ..points import ImagePoints

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


def settings_from(args):
    from ..copy_unet import DEFAULT_ENHANCEMENT
    from ..train import DEFAULT_REFERENCE_PAIRING, TrainSettings

    return TrainSettings(epochs=args.epochs, lr=args.lr, gamma=args.gamma,
                         cond_dropout=args.cond_dropout, seed=args.seed, resolution=args.resolution,
                         identifier=args.identifier, ac_layers=args.ac_layers,
                         enhancement=getattr(args, "enhancement", DEFAULT_ENHANCEMENT),
                         reference_pairing=getattr(args, "reference_pairing", DEFAULT_REFERENCE_PAIRING))


def prepare_training(pipe, clip, photos: Sequence[Path], prompt: str, resolution: int, masks_dir=None):
    """One :class:`~p3s_core.train.TrainBatch` per photo (latent, text, CLIP hidden, mask)."""
    import numpy as np
    import torch

    from .. import diffusers_engine as db
    from ..train import TrainBatch

    ctx, unc = text_embeddings(pipe, [prompt, ""]).split(1)
    batches = []
    for path in photos:
        img = resize_short_side(read_rgb(path), resolution)
        lat, hid = db.encode_reference(pipe.vae, clip, torch.from_numpy(img)[None])
        mask = None
        if masks_dir is not None:
            mp = Path(masks_dir) / f"{path.stem}_mask.png"
            if not mp.is_file():
                raise ImageInputError("masks", f"no mask {mp.name} for {path.name}",
                                      "run p3s mask first, or leave --masks out")
            m = torch.from_numpy(resize_short_side(read_rgb(mp), resolution)[..., 0].copy())[None, None]
            mask = torch.nn.functional.interpolate(m, size=tuple(lat.shape[-2:]), mode="area").clamp(0, 1)
        batches.append(TrainBatch(latent=lat, context=ctx.clone(), uncond=unc.clone(), clip_hidden=hid,
                                  mask=mask))
    del np
    return batches


def train_one(pipe, clip, photos, prompt, settings, out_path, masks_dir=None, progress=True,
              desc="P3S train", copy_layout: str = "encoder"):
    """Train one adapter (copy layout ``copy_layout``, ``--copy-layout``) on ``photos`` and save it
    atomically to ``out_path``; returns the result."""
    from .. import diffusers_engine as db
    from ..adapter import save_adapter
    from ..precision import resolve_precision
    from ..train import train_adapter

    batches = prepare_training(pipe, clip, photos, prompt, settings.resolution, masks_dir)
    adapter = db.new_adapter_for_unet(pipe.unet, seed=settings.seed, config=db.copy_config_for(pipe.unet, copy_layout),
                                      clip_dim=int(clip.config.hidden_size), training={"steps": 0},
                                      enhancement=settings.enhancement)
    device = next(pipe.unet.parameters()).device
    adapter.to(device)
    precision = resolve_precision(device, "auto", next(pipe.unet.parameters()).dtype)
    step_fn, close = db.build_step_fn(pipe.unet, adapter, settings, dict(pipe.scheduler.config),
                                      precision=precision)
    bar = progress_bar(total=settings.epochs * len(batches), desc=desc, unit="step", disable=not progress)

    def on_step(step, total, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        with precision.matmul_mode():
            result = train_adapter(adapter, batches, step_fn, settings, on_step=on_step, device=device,
                                   precision=precision)
    finally:
        close()
        bar.close()
    adapter.to("cpu")
    adapter.training_info = {"prompt": prompt, "images": len(batches), "settings": settings.to_dict(),
                             "steps": result.steps, "loss": result.losses[-1], "engine": "diffusers",
                             "precision": result.precision, "skipped_steps": int(result.skipped_steps),
                             "reference_pairing": result.reference_pairing}
    save_adapter(adapter, out_path)
    return result


def set_threads(n: int) -> None:
    import torch

    if n < 0:
        raise CLIInputError("threads", f"{n} is negative", "use 0 (default) or a positive thread count")
    if n:
        torch.set_num_threads(int(n))


def schedule_from(args):
    from ..schedule import P3SSchedule

    return P3SSchedule(mode=args.schedule, start_percent=args.start_percent, end_percent=args.end_percent)
