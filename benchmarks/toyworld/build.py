"""Build the toy world: one command, CPU, fixed seeds, cached by seed and config hash.

    python benchmarks/toyworld/build.py --seed 0 --size full   # about 20 min on a shared 2-core CPU
    python benchmarks/toyworld/build.py --seed 0 --size ci     # about 5 min

Trained here, in SD1.5's architecture at small width (no weights are downloaded or committed):

* a text encoder and a patch vision encoder (transformers ``CLIPModel``, trained contrastively on the
  captions; the vision tower also learns per-patch labels, so its patch tokens separate objects and
  RNGR has something real to work on). The vision tower takes the 224 px letterboxed input the pack
  gives CLIP ViT-L/14, with 28 px patches: an 8 x 8 patch grid (4 x 4 px of a 32 px image each);
* a fixed 2x latent map in the VAE's place (:func:`world.make_latent_map_class`, exact on the world);
* a text-conditional diffusers ``UNet2DConditionModel`` with SD1.5's block layout (3 cross-attention
  down blocks + 1 plain, 2 layers per block, attention at the three highest resolutions, one
  transformer each) at width 16 (16/32/64/64), context 64, on 16 x 16 x 4 latents, eps-prediction on SD1.5's
  scaled-linear betas;
* the evaluator: a small CNN with presence heads (shape, colour, texture) and a background head,
  trained on images that include the held-out subjects, with its held-out accuracy recorded.

The folder (``$P3S_CACHE_DIR`` or ``~/.cache/p3s-comfyui``)/``toyworld-<size>-s<seed>-<hash>`` holds
safetensors and JSON only; ``build.json`` there records the timings and accuracies.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from benchmarks.toyworld import world as W  # noqa: E402

BUILD_VERSION = 1


@dataclass(frozen=True)
class BuildConfig:
    size: str = "full"
    n_images: int = 20000
    clip_steps: int = 300
    clip_batch: int = 64
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    ema: float = 0.995
    cls_steps: int = 500
    width: int = 16

    @classmethod
    def of(cls, size: str) -> "BuildConfig":
        if size == "full":
            return cls()
        if size == "ci":
            return cls(size="ci", n_images=6000, clip_steps=100, clip_batch=48, unet_steps=800, unet_batch=16,
                       ema=0.99, cls_steps=200)
        raise ValueError(f"--size is ci or full, not {size!r}")

    def key(self) -> str:
        blob = json.dumps({"v": BUILD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def cache_root() -> Path:
    return Path(os.environ.get("P3S_CACHE_DIR", Path.home() / ".cache" / "p3s-comfyui"))


def world_dir(seed: int, cfg: BuildConfig) -> Path:
    return cache_root() / f"toyworld-{cfg.size}-s{seed}-{cfg.key()}"


# --- configs -------------------------------------------------------------------------------------
def clip_config():
    from transformers import CLIPConfig

    text = dict(vocab_size=137, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=W.MAX_TOKENS, bos_token_id=135,
                eos_token_id=136, pad_token_id=136, projection_dim=64)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  image_size=224, patch_size=28, projection_dim=64)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def unet_config(width: int = 32) -> dict:
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(width, 2 * width, 4 * width, 4 * width), norm_num_groups=8,
                cross_attention_dim=64, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


# --- data ----------------------------------------------------------------------------------------
def make_data(n: int, seed: int, allow_held_out: bool):
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, W.IMG, W.IMG, 3), np.uint8)
    caps, labs, plabs = [], [], []
    for i in range(n):
        objs, bg = W.random_scene(rng, allow_held_out)
        img, masks = W.render(objs, bg, rng, return_masks=True)
        imgs[i] = np.round(img * 255)
        caps.append(W.caption(objs, bg))
        labs.append(W.labels(objs, bg))
        plabs.append(W.patch_labels(objs, masks, bg))
    return {"img": imgs, "caption": caps, "labels": labs, "patch": np.stack(plabs)}


CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def clip_pixels(imgs01: torch.Tensor) -> torch.Tensor:
    """[N, 32, 32, 3] in [0, 1] -> CLIP input [N, 3, 224, 224]: the pack's letterbox of a square image
    is a bilinear resize to 224 (checked against ``p3s_core.letterbox`` in the tests), then OpenAI's
    mean / std."""
    x = imgs01.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    return (x - CLIP_MEAN) / CLIP_STD


def to01(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).float() / 255.0


# --- stages --------------------------------------------------------------------------------------
class PatchHeads(torch.nn.Module):
    SIZES = (2, len(W.SHAPES), len(W.COLOUR_NAMES), len(W.TEXTURES), len(W.BG_NAMES))

    def __init__(self, dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(dim, k) for k in self.SIZES])

    def loss(self, tokens, lab):  # tokens [B, 64, D], lab [B, 8, 8, 5]
        lab = lab.reshape(lab.shape[0], -1, 5)
        total = 0.0
        for j, h in enumerate(self.heads):
            total = total + F.cross_entropy(h(tokens).reshape(-1, self.SIZES[j]), lab[..., j].reshape(-1),
                                            ignore_index=-1)
        return total / len(self.heads)


def train_clip(data, cfg: BuildConfig, seed: int, tok, log):
    from transformers import CLIPModel

    torch.manual_seed(seed * 101 + 1)
    model = CLIPModel(clip_config())
    heads = PatchHeads(64)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed * 101 + 2)
    n = len(data["caption"])
    ids_all = tok(data["caption"], padding="max_length", max_length=W.MAX_TOKENS, truncation=True,
                  return_tensors="pt").input_ids
    patch = torch.from_numpy(data["patch"])
    model.train()
    t0 = time.time()
    for step in range(cfg.clip_steps):
        lr = 1e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / cfg.clip_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, n, (cfg.clip_batch,), generator=g)
        pix = clip_pixels(to01(data["img"][idx.numpy()]))
        out = model(input_ids=ids_all[idx], pixel_values=pix, return_loss=True)
        # captions repeat (the same scene words): contrast only distinct captions as negatives
        same = (ids_all[idx][:, None, :] == ids_all[idx][None, :, :]).all(-1).float()
        logits = out.logits_per_image
        target = same / same.sum(1, keepdim=True)
        l_con = (-(target * logits.log_softmax(1)).sum(1).mean()
                 - (target * logits.t().log_softmax(1)).sum(1).mean()) / 2
        l_patch = heads.loss(out.vision_model_output.last_hidden_state[:, 1:], patch[idx])
        loss = l_con + l_patch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.clip_steps - 1:
            log(f"clip {step}/{cfg.clip_steps} contrastive {float(l_con.detach()):.3f} patch {float(l_patch.detach()):.3f} "
                f"({time.time() - t0:.0f}s)")
    return model.eval().requires_grad_(False), heads.eval()


def split_clip(model):
    """The text tower as a ``CLIPTextModel`` (what the pipeline's text encoder is) and the vision tower
    as a ``CLIPVisionModelWithProjection`` (what the pack loads as CLIP ViT-L/14); the projections and
    the full model stay too, for the CLIP-T stand-in."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    cfg = model.config
    text = CLIPTextModel(cfg.text_config)
    (text.text_model if hasattr(text, "text_model") else text).load_state_dict(model.text_model.state_dict())
    vision = CLIPVisionModelWithProjection(cfg.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    return text.eval().requires_grad_(False), vision.eval().requires_grad_(False)


def text_embed(text_model, tok, prompts):
    ids = tok(list(prompts), padding="max_length", max_length=W.MAX_TOKENS, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return text_model(ids)[0]


def train_unet(data, cfg: BuildConfig, seed: int, text_model, tok, log):
    from diffusers import UNet2DConditionModel

    from p3s_core.diffusers_engine.training import training_betas

    torch.manual_seed(seed * 101 + 3)
    unet = UNet2DConditionModel(**unet_config(cfg.width))
    ema = UNet2DConditionModel(**unet_config(cfg.width))
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    vae = W.make_latent_map_class()()
    abar = torch.cumprod(1 - training_betas(SCHEDULER), 0).float()
    caps = list(data["caption"])
    uniq = sorted(set(caps)) + [""]
    emb = {}
    for i in range(0, len(uniq), 512):
        chunk = uniq[i:i + 512]
        for c, e in zip(chunk, text_embed(text_model, tok, chunk)):
            emb[c] = e
    with torch.no_grad():
        lat = torch.cat([vae.encode(to01(data["img"][i:i + 2048]).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
                         for i in range(0, len(caps), 2048)])
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed * 101 + 4)
    unet.train()
    t0 = time.time()
    ema_params = list(ema.parameters())
    for step in range(cfg.unet_steps):
        lr = cfg.unet_lr * min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(caps), (cfg.unet_batch,), generator=g)
        drop = torch.rand(cfg.unet_batch, generator=g) < 0.1
        ctx = torch.stack([emb[""] if d else emb[caps[i]] for i, d in zip(idx.tolist(), drop.tolist())])
        x0 = lat[idx]
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        d = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_params, unet.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
        if step % 200 == 0 or step == cfg.unet_steps - 1:
            log(f"unet {step}/{cfg.unet_steps} loss {float(loss.detach()):.4f} ({time.time() - t0:.0f}s)")
    return ema.eval()


class Evaluator(torch.nn.Module):
    """The attribute classifier (presence of each shape / colour / texture, the background) whose
    penultimate features are the independent-encoder (DINO stand-in) embedding."""

    def __init__(self):
        super().__init__()
        c = [3, 32, 64, 96, 128]
        layers = []
        for i in range(4):
            layers += [torch.nn.Conv2d(c[i], c[i + 1], 3, stride=1 if i == 0 else 2, padding=1),
                       torch.nn.GroupNorm(8, c[i + 1]), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(128, len(W.SHAPES)),
                                          "colour": torch.nn.Linear(128, len(W.COLOUR_NAMES)),
                                          "texture": torch.nn.Linear(128, len(W.TEXTURES)),
                                          "bg": torch.nn.Linear(128, len(W.BG_NAMES))})

    def features(self, imgs01):  # [N, 32, 32, 3] in [0, 1]
        return self.body(imgs01.permute(0, 3, 1, 2) * 2 - 1).mean(dim=(2, 3))

    def forward(self, imgs01):
        f = self.features(imgs01)
        return {k: h(f) for k, h in self.heads.items()}


def _batch_labels(labs, idx):
    return ({k: torch.from_numpy(np.stack([labs[i][k] for i in idx])) for k in ("shape", "colour", "texture")},
            torch.tensor([labs[i]["bg"] for i in idx]))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur / noise / colour jitter, so the evaluator also reads the sampler's softer images."""
    n = x.shape[0]
    k = torch.rand(n, 1, 1, 1, generator=g)
    blur = F.avg_pool2d(F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate"), 3, 1).permute(0, 2, 3, 1)
    x = torch.where(k < 0.3, 0.5 * x + 0.5 * blur, x)
    x = x * (1 + 0.08 * torch.randn(n, 1, 1, 3, generator=g)) + 0.04 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def evaluator_accuracy(model, data) -> dict:
    with torch.no_grad():
        out = model(to01(data["img"]))
    labs = data["labels"]
    res = {}
    for k in ("shape", "colour", "texture"):
        y = np.stack([lab[k] for lab in labs]) > 0.5
        res[k] = float(((out[k].numpy() > 0) == y).all(axis=1).mean())
    res["bg"] = float((out["bg"].argmax(1).numpy() == np.array([lab["bg"] for lab in labs])).mean())
    return res


def train_evaluator(cfg: BuildConfig, seed: int, log):
    torch.manual_seed(seed * 101 + 5)
    data = make_data(max(4000, cfg.n_images // 2), seed * 101 + 6, allow_held_out=True)
    test = make_data(1000, seed * 101 + 7, allow_held_out=True)
    model = Evaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed * 101 + 8)
    t0 = time.time()
    n = len(data["labels"])
    for step in range(cfg.cls_steps):
        idx = torch.randint(0, n, (128,), generator=g).tolist()
        y, bg = _batch_labels(data["labels"], idx)
        out = model(augment(to01(data["img"][idx]), g))
        loss = sum(F.binary_cross_entropy_with_logits(out[k], y[k]) for k in y) + F.cross_entropy(out["bg"], bg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == cfg.cls_steps - 1:
            log(f"evaluator {step}/{cfg.cls_steps} loss {float(loss.detach()):.4f} ({time.time() - t0:.0f}s)")
    model.eval().requires_grad_(False)
    return model, evaluator_accuracy(model, test)


# --- the build -----------------------------------------------------------------------------------
def build(seed: int = 0, size: str = "full", threads: int = 1, force: bool = False, log=print) -> Path:
    from safetensors.torch import save_file

    cfg = BuildConfig.of(size)
    out = world_dir(seed, cfg)
    if (out / "build.json").is_file() and not force:
        log(f"toyworld: cached at {out}")
        return out
    torch.set_num_threads(threads)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.time()
    W.tokenizer_files(tmp / "tokenizer")
    tok = W.load_tokenizer(tmp / "tokenizer")
    data = make_data(cfg.n_images, seed * 101, allow_held_out=False)
    times["data_s"] = time.time() - t0

    t = time.time()
    clip, heads = train_clip(data, cfg, seed, tok, log)
    text, vision = split_clip(clip)
    save_file(clip.state_dict(), str(tmp / "clip.safetensors"))
    (tmp / "clip_config.json").write_text(clip.config.to_json_string())
    vision.save_pretrained(tmp / "vision", safe_serialization=True)
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    times["clip_s"] = time.time() - t

    t = time.time()
    unet = train_unet(data, cfg, seed, text, tok, log)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    times["unet_s"] = time.time() - t

    t = time.time()
    evaluator, acc = train_evaluator(cfg, seed, log)
    save_file(evaluator.state_dict(), str(tmp / "evaluator.safetensors"))
    times["evaluator_s"] = time.time() - t
    times["total_s"] = time.time() - t0
    info = {"seed": seed, "config": dataclasses.asdict(cfg), "key": cfg.key(), "threads": threads,
            "times": {k: round(v, 1) for k, v in times.items()}, "evaluator_heldout_accuracy": acc,
            "held_out_subjects": [list(s) for s in W.SUBJECTS]}
    (tmp / "build.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"toyworld: built {out} in {times['total_s']:.0f}s; evaluator held-out accuracy {acc}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=("ci", "full"), default="full")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads under load are slower)")
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = ap.parse_args(argv)
    print(build(args.seed, args.size, args.threads, args.force))


if __name__ == "__main__":
    main()
