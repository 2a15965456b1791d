"""The whole P3S path on the toy world, through the code users run:

points -> RNGR mask (:func:`p3s_core.rngr.rngr_mask` on the world's vision patch tokens) ->
inpainting (:func:`p3s_core.inpainting.inpaint`) -> training (:func:`p3s_core.train.train_adapter`
with the diffusers engine's :func:`~p3s_core.diffusers_engine.build_step_fn`) -> generation
(:func:`p3s_core.diffusers_engine.generate`, i.e. :class:`P3SDiffusersInjector` on a
``StableDiffusionPipeline``). Plus the baselines: the base model and a plain fine-tune of the UNet.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.toyworld import build as B
from benchmarks.toyworld import world as W


class ToyWorld:
    """The built world's models, loaded from its cache folder (safetensors / JSON only)."""

    def __init__(self, folder: Path):
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from safetensors.torch import load_file
        from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModelWithProjection

        self.folder = Path(folder)
        self.info = json.loads((self.folder / "build.json").read_text())
        self.tokenizer = W.load_tokenizer(self.folder / "tokenizer")
        # the world's own folders, never a hub (local_files_only on every call)
        self.text_encoder = CLIPTextModel.from_pretrained(self.folder / "text_encoder", local_files_only=True)
        self.text_encoder.eval().requires_grad_(False)
        self.vision = CLIPVisionModelWithProjection.from_pretrained(self.folder / "vision", local_files_only=True)
        self.vision.eval().requires_grad_(False)
        self.clip = CLIPModel(CLIPConfig.from_json_file(self.folder / "clip_config.json"))
        self.clip.load_state_dict(load_file(str(self.folder / "clip.safetensors")))
        self.clip.eval().requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(self.folder / "unet", local_files_only=True)
        self.unet.eval().requires_grad_(False)
        self.vae = W.make_latent_map_class()()
        self.scheduler = DDIMScheduler(**B.SCHEDULER)
        self.evaluator = B.Evaluator()
        self.evaluator.load_state_dict(load_file(str(self.folder / "evaluator.safetensors")))
        self.evaluator.eval().requires_grad_(False)
        self._pipe_cls = StableDiffusionPipeline

    def pipeline(self, unet=None):
        pipe = self._pipe_cls(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                              unet=unet if unet is not None else self.unet, scheduler=self.scheduler,
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def text(self, prompts):
        return B.text_embed(self.text_encoder, self.tokenizer, prompts)


# --- the subject's photos ------------------------------------------------------------------------
@dataclass
class Photos:
    images: list            # float32 [32, 32, 3]
    positive: list          # [(x, y)] per photo: the subject's centre
    negative: list          # [(x, y)] per photo: the distractor's centre ([] without one)
    subject_masks: list
    distractor_masks: list
    shape: str
    colour: str
    texture: str
    distractor_texture: str
    background: str


def make_photos(subject: int, seed: int, n: int = 4, distractor: bool = True, background: str = "sand") -> Photos:
    """``n`` photos of subject ``SUBJECTS[subject]`` (with its look-alike beside it) on one background."""
    shape, colour, texture, dtex = W.SUBJECTS[subject]
    rng = np.random.default_rng(10_000 + seed)
    ims, pos, neg, sm, dm = [], [], [], [], []
    for _ in range(n):
        boxes = W.place(rng, 2 if distractor else 1, sizes=(12, 14))
        objs = [W.Obj(shape, colour, texture, *boxes[0])]
        if distractor:
            objs.append(W.Obj(shape, colour, dtex, *boxes[1]))
        img, masks = W.render(objs, background, rng, return_masks=True)
        ims.append(img)
        cen = [(o.x + o.size / 2.0, o.y + o.size / 2.0) for o in objs]
        pos.append([cen[0]])
        neg.append([cen[1]] if distractor else [])
        sm.append(masks[0])
        dm.append(masks[1] if distractor else np.zeros_like(masks[0]))
    return Photos(ims, pos, neg, sm, dm, shape, colour, texture, dtex, background)


# --- RNGR + inpainting ---------------------------------------------------------------------------
RNGR_MODES = ("both points", "positive only", "no RNGR")


@dataclass
class Cleaned:
    images: list
    masks: list | None        # subject masks (bool [32, 32]) or None
    distractor_masks: list
    iou_subject: float
    iou_distractor: float
    distractor_left: float    # share of the distractor's pixels not inpainted


def _iou(a, b):
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 1.0


def rngr_clean(world: ToyWorld, photos: Photos, mode: str = "both points", sigma: float = 1.0,
               grow: int = 2, ignore_negative: bool = False) -> Cleaned:
    """Points -> RNGR masks (Eq. 1-2) -> the distractor inpainted (Eq. 3). ``ignore_negative`` plants
    the bug "the negative point is ignored" (the negative points never reach RNGR)."""
    from p3s_core.diffusers_engine import encode_reference
    from p3s_core.inpainting import inpaint
    from p3s_core.letterbox import letterbox
    from p3s_core.points import ImagePoints
    from p3s_core.rngr import grow_mask, rngr_mask

    if mode not in RNGR_MODES:
        raise ValueError(mode)
    if mode == "no RNGR":
        return Cleaned([im.copy() for im in photos.images], None, [np.zeros((W.IMG, W.IMG), bool)] * len(photos.images),
                       float("nan"), float("nan"), 1.0)
    imgs = torch.from_numpy(np.stack(photos.images))
    _, hidden = encode_reference(world.vae, world.vision, imgs)
    out, masks, dmasks, ious, diou, left = [], [], [], [], [], []
    for i, img in enumerate(photos.images):
        _, box = letterbox(img, 224)
        negative = [] if (mode == "positive only" or ignore_negative) else photos.negative[i]
        res = rngr_mask(hidden[i], box, ImagePoints(list(photos.positive[i]), list(negative)),
                        image_hw=img.shape[:2], sigma=sigma)
        dmask = grow_mask(res.distractor_mask, grow) & ~res.subject_mask if res.distractor_mask.any() \
            else res.distractor_mask
        out.append(inpaint(img, dmask, "biharmonic") if dmask.any() else img.copy())
        masks.append(res.subject_mask)
        dmasks.append(dmask)
        ious.append(_iou(res.subject_mask, photos.subject_masks[i]))
        if photos.distractor_masks[i].any():
            diou.append(_iou(res.distractor_mask, photos.distractor_masks[i]))
            left.append(float((photos.distractor_masks[i] & ~dmask).sum() / photos.distractor_masks[i].sum()))
    return Cleaned(out, masks, dmasks, float(np.mean(ious)), float(np.mean(diou)) if diou else float("nan"),
                   float(np.mean(left)) if left else 0.0)


# --- training ------------------------------------------------------------------------------------
@dataclass
class RunSettings:
    steps: int = 240
    lr: float = 1e-3
    gamma: float = 0.1
    ac_reading: str = "mass"
    lam: float = 0.2
    reference_pairing: str = "auto"     # the Trainer's default (p3s_core.train.resolve_reference_pairing)
    enhancement: str | None = None      # None: the Trainer's default (p3s_core.copy_unet.DEFAULT_ENHANCEMENT)
    copy_layout: str | None = None      # None: the Trainer's default (p3s_core.copy_config.DEFAULT_COPY_LAYOUT)
    cond_dropout: float = 0.1
    seed: int = 0
    extra: dict = field(default_factory=dict)


def train_prompt(photos: Photos) -> str:
    return f"a {W.IDENTIFIER} {photos.shape} on {photos.background}"


def batches_for(world: ToyWorld, images, masks, prompt: str):
    from p3s_core.diffusers_engine import encode_reference
    from p3s_core.train import TrainBatch

    ctx, unc = world.text([prompt, ""]).split(1)
    lat, hid = encode_reference(world.vae, world.vision, torch.from_numpy(np.stack(images)))
    out = []
    for i in range(len(images)):
        m = None
        if masks is not None:
            m = torch.from_numpy(masks[i].astype(np.float32))[None, None]
            m = F.interpolate(m, size=tuple(lat.shape[-2:]), mode="area").clamp(0, 1)
        out.append(TrainBatch(latent=lat[i:i + 1], context=ctx.clone(), uncond=unc.clone(),
                              clip_hidden=hid[i:i + 1], mask=m))
    return out


def train_settings(rs: RunSettings, n_photos: int):
    from p3s_core.train import TrainSettings

    return TrainSettings(epochs=max(1, rs.steps // n_photos), lr=rs.lr, gamma=rs.gamma, cond_dropout=rs.cond_dropout,
                         seed=rs.seed, resolution=64, identifier=W.IDENTIFIER, ac_reading=rs.ac_reading,
                         reference_pairing=rs.reference_pairing)


def train_p3s(world: ToyWorld, cleaned: Cleaned, prompt: str, rs: RunSettings):
    """A new adapter (copy initialised from the world's UNet) trained on the cleaned photos."""
    from p3s_core import diffusers_engine as db
    from p3s_core.train import train_adapter

    batches = batches_for(world, cleaned.images, cleaned.masks, prompt)
    settings = train_settings(rs, len(batches))
    from p3s_core.copy_config import DEFAULT_COPY_LAYOUT
    from p3s_core.copy_unet import DEFAULT_ENHANCEMENT

    config = db.copy_config_for(world.unet).with_layout(rs.copy_layout or DEFAULT_COPY_LAYOUT)
    adapter = db.new_adapter_for_unet(world.unet, seed=rs.seed, config=config,
                                      clip_dim=int(world.vision.config.hidden_size), lam=rs.lam,
                                      training={"steps": 0}, enhancement=rs.enhancement or DEFAULT_ENHANCEMENT)
    step_fn, close = db.build_step_fn(world.unet, adapter, settings, B.SCHEDULER)
    try:
        result = train_adapter(adapter, batches, step_fn, settings)
    finally:
        close()
    return adapter, result


def untrained_adapter(world: ToyWorld, seed: int = 0, lam: float = 0.2):
    from p3s_core import diffusers_engine as db

    return db.new_adapter_for_unet(world.unet, seed=seed, config=db.copy_config_for(world.unet),
                                   clip_dim=int(world.vision.config.hidden_size), lam=lam)


def train_plain(world: ToyWorld, cleaned: Cleaned, prompt: str, rs: RunSettings):
    """The baseline: a plain fine-tune of the whole UNet on the same photos, prompt, mask weighting,
    optimiser, learning rate, steps, dropout and draws (t, noise) as P3S's loop; no adapter."""
    from p3s_core.diffusers_engine.training import training_betas
    from p3s_core.train import make_optimizer, masked_ldm_loss

    unet = copy.deepcopy(world.unet)
    batches = batches_for(world, cleaned.images, cleaned.masks, prompt)
    settings = train_settings(rs, len(batches))
    abar = torch.cumprod(1 - training_betas(B.SCHEDULER), 0)
    params = list(unet.parameters())
    for p in params:
        p.requires_grad_(True)
    unet.train()
    opt = make_optimizer(params, settings)
    g = torch.Generator().manual_seed(rs.seed)
    with torch.enable_grad():
        for _ in range(settings.epochs):
            for idx in torch.randperm(len(batches), generator=g).tolist():
                b = batches[idx]
                drop = bool(torch.rand((), generator=g).item() < rs.cond_dropout)
                t = torch.randint(0, 1000, (1,), generator=g)
                noise = torch.randn(tuple(b.latent.shape), generator=g)
                a = abar[t].float()
                xt = a.sqrt() * b.latent + (1 - a).sqrt() * noise
                eps = unet(xt, t, encoder_hidden_states=b.uncond if drop else b.context).sample
                loss = masked_ldm_loss(noise, eps, b.mask, settings.mask_background_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    unet.eval().requires_grad_(False)
    return unet


# --- generation ----------------------------------------------------------------------------------
@dataclass
class GenSettings:
    steps: int = 20
    cfg: float = 4.0
    per_prompt: int = 4
    seed: int = 1000
    schedule: object = None   # a P3SSchedule (None: the paper's Eq. 10)
    lam: float | None = None
    strength: float = 1.0


def generate_p3s(world: ToyWorld, adapter, cleaned_images, prompts, gs: GenSettings, unet=None,
                 zero_features: bool = False):
    """Images [N, 32, 32, 3] for ``prompts`` (``per_prompt`` each), reference ``i % n_photos`` for
    prompt ``i``, through :func:`p3s_core.diffusers_engine.generate`. ``zero_features`` plants the
    bug "the copy's features are zeroed at the injection" (the self-attention features and the
    cross-attention enhancement's)."""
    from p3s_core import diffusers_engine as db
    from p3s_core.schedule import P3SSchedule

    pipe = world.pipeline(unet)
    i2 = db.encode_reference(world.vae, world.vision, torch.from_numpy(np.stack(cleaned_images)), adapter=adapter)
    sched = gs.schedule if gs.schedule is not None else P3SSchedule()
    out = []
    patches = []
    if zero_features:  # both halves of the injection: Eq. 7's features and the cross enhancement's
        from p3s_core.diffusers_engine import attention as A

        orig_self, orig_cross = A.injected_context_value, A.enhanced_cross_output

        def zeroed(z, f, *a, **k):
            return orig_self(z, torch.zeros_like(f), *a, **k)

        def zeroed_cross(out, g, *a, **k):
            return orig_cross(out, torch.zeros_like(g), *a, **k)

        patches = [("injected_context_value", orig_self), ("enhanced_cross_output", orig_cross)]
        A.injected_context_value, A.enhanced_cross_output = zeroed, zeroed_cross
    try:
        for i, prompt in enumerate(prompts):
            ims = db.generate(pipe, adapter, i2, [prompt], steps=gs.steps, guidance_scale=gs.cfg, schedule=sched,
                              lam=gs.lam, strength=gs.strength, seed=gs.seed + 7919 * i, height=W.IMG,
                              width=W.IMG, num_images_per_prompt=gs.per_prompt, progress=False,
                              reference_index=i % int(i2.shape[0]))[0]
            out += [np.asarray(im, dtype=np.float32) / 255.0 for im in ims]
    finally:
        if patches:
            for name, fn in patches:
                setattr(A, name, fn)
    return np.stack(out)


def generate_plain(world: ToyWorld, prompts, gs: GenSettings, unet=None):
    """The plain pipeline (the base model, or a fine-tuned UNet), the same seeds as :func:`generate_p3s`."""
    pipe = world.pipeline(unet)
    out = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(gs.seed + 7919 * i)
        ims = pipe(prompt=prompt, num_inference_steps=gs.steps, guidance_scale=gs.cfg, height=W.IMG, width=W.IMG,
                   num_images_per_prompt=gs.per_prompt, generator=g).images
        out += [np.asarray(im, dtype=np.float32) / 255.0 for im in ims]
    return np.stack(out)


# --- measurements --------------------------------------------------------------------------------
def ideal(shape, colour, texture, bg, seed=0):
    """The subject alone, centred, on ``bg``: the target image of an embedding similarity."""
    rng = np.random.default_rng(seed)
    return W.render([W.Obj(shape, colour, texture, 9, 9, 14)], bg, rng)


def clip_text_embeds(world: ToyWorld, captions):
    """The world's CLIP text embedding (pooled, projected) of ``captions``."""
    ids = world.tokenizer(list(captions), padding="max_length", max_length=W.MAX_TOKENS, truncation=True,
                          return_tensors="pt").input_ids
    return world.clip.text_projection(world.clip.text_model(input_ids=ids).pooler_output)


def clip_image_embeds(world: ToyWorld, imgs01: torch.Tensor):
    """The world's CLIP image embedding (pooled, projected) of images [N, 32, 32, 3] in [0, 1]."""
    return world.clip.visual_projection(world.clip.vision_model(pixel_values=B.clip_pixels(imgs01)).pooler_output)


def measure_subject(world: ToyWorld, imgs: np.ndarray, photos: Photos, bgs) -> dict:
    """Subject / distractor presence by the evaluator, background accuracy (the prompt's other word),
    and embedding similarities to the ideal subject / distractor image on the prompt's background:
    CLIP-I stand-in (the world's vision encoder), DINO stand-in (the evaluator's features), CLIP-T
    stand-in (the descriptive caption vs the image, both through the world's CLIP)."""
    x = torch.from_numpy(imgs).float()
    per = len(imgs) // len(bgs)
    bg_idx = torch.tensor([W.BG_NAMES.index(b) for b in bgs]).repeat_interleave(per)
    with torch.no_grad():
        out = world.evaluator(x)
        sh = torch.sigmoid(out["shape"])[:, W.SHAPES.index(photos.shape)] > 0.5
        co = torch.sigmoid(out["colour"])[:, W.COLOUR_NAMES.index(photos.colour)] > 0.5
        tex = torch.sigmoid(out["texture"])
        te = tex[:, W.TEXTURES.index(photos.texture)] > 0.5
        de = tex[:, W.TEXTURES.index(photos.distractor_texture)] > 0.5
        bg_ok = out["bg"].argmax(1) == bg_idx
        subj = np.stack([ideal(photos.shape, photos.colour, photos.texture, b) for b in bgs])
        dist = np.stack([ideal(photos.shape, photos.colour, photos.distractor_texture, b) for b in bgs])
        rep = lambda a: torch.from_numpy(a).repeat_interleave(per, 0)  # noqa: E731

        def clip_emb(a):
            e = world.vision(pixel_values=B.clip_pixels(a)).image_embeds
            return F.normalize(e, dim=-1)

        def dino_emb(a):
            return F.normalize(world.evaluator.features(a), dim=-1)

        ge, se, de_ = clip_emb(x), clip_emb(rep(subj)), clip_emb(rep(dist))
        gd, sd, dd = dino_emb(x), dino_emb(rep(subj)), dino_emb(rep(dist))
        caps = [f"a {photos.colour} {photos.texture} {photos.shape} on {b}" for b in bgs]
        te_ = F.normalize(clip_text_embeds(world, caps), dim=-1).repeat_interleave(per, 0)
        ie = F.normalize(clip_image_embeds(world, x), dim=-1)
        clip_t = float((ie * te_).sum(-1).mean())
    return {"subject_in": float((co & te).float().mean()),
            "subject_shape_colour_texture": float((sh & co & te).float().mean()),
            "subject_texture": float(te.float().mean()),
            "subject_colour": float(co.float().mean()),
            "distractor_in": float(de.float().mean()),
            "background_acc": float(bg_ok.float().mean()),
            "clip_i_subject": float((ge * se).sum(-1).mean()), "clip_i_distractor": float((ge * de_).sum(-1).mean()),
            "dino_subject": float((gd * sd).sum(-1).mean()), "dino_distractor": float((gd * dd).sum(-1).mean()),
            "clip_t": clip_t}


def base_prompt_following(world: ToyWorld, gs: GenSettings, n_prompts: int = 12, seed: int = 0) -> dict:
    """The base model on descriptive single-object prompts (no held-out kinds): how often the named
    shape / colour / texture / background is what the evaluator reads (argmax of its heads)."""
    rng = np.random.default_rng(20_000 + seed)
    kinds = [W.random_kind(rng, False) + (W.BG_NAMES[rng.integers(len(W.BG_NAMES))],) for _ in range(n_prompts)]
    prompts = [f"a {c} {t} {s} on {b}" for s, c, t, b in kinds]
    imgs = generate_plain(world, prompts, gs)
    with torch.no_grad():
        out = world.evaluator(torch.from_numpy(imgs).float())
    per = gs.per_prompt
    res = {}
    for j, (name, names) in enumerate((("shape", W.SHAPES), ("colour", W.COLOUR_NAMES), ("texture", W.TEXTURES),
                                       ("bg", W.BG_NAMES))):
        want = torch.tensor([names.index(k[j]) for k in kinds]).repeat_interleave(per)
        res[name] = float((out[name].argmax(1) == want).float().mean())
    chance = {"shape": 1 / len(W.SHAPES), "colour": 1 / len(W.COLOUR_NAMES), "texture": 1 / len(W.TEXTURES),
              "bg": 1 / len(W.BG_NAMES)}
    return {"accuracy": res, "chance": chance, "images": imgs, "prompts": prompts}
