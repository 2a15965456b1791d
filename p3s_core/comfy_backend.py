"""The only module that touches ComfyUI internals (imported lazily, inside functions).

ComfyUI APIs this pack relies on, all present in 0.3.75 and 0.33 (look here when upstream changes):
- ``ModelPatcher.clone()``, ``set_model_attn1_patch(fn)`` (a chained list),
  ``add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, key, fn)``, ``set_additional_models(key, [...])``,
  ``get_model_object("model_sampling")``, ``model.model.model_config.unet_config``;
- ``model_sampling.percent_to_sigma(p)``, ``model_sampling.timestep(sigma)``;
- the attn1 patch signature ``fn(n, context, value, extra_options)`` with ``extra_options`` holding
  ``block``, ``block_index``, ``cond_or_uncond``, ``sigmas``, ``original_shape`` and any key added to
  ``transformer_options`` by a diffusion-model wrapper;
- ``transformer_options["patches_replace"]["attn1"]`` keyed ``(block_name, number[, index])`` (another
  node's attention replacement, e.g. PAG / SAG: P3S leaves those layers to it),
  ``transformer_options["patches"]["attn1_patch"]`` (the other nodes' attn1 patches, named in errors),
  and ``extra_options`` being one fresh dict per transformer-block call (P3S counts its K/V slots there);
- the DIFFUSION_MODEL wrapper signature ``fn(executor, x, timesteps, context, y, control,
  transformer_options, **kwargs)`` where ``x`` is the UNet input and ``timesteps`` the 0..999 index;
- ``comfy.model_patcher.ModelPatcher`` / ``CoreModelPatcher`` (0.33: ``ModelPatcherDynamic`` under
  Dynamic VRAM) and ``comfy.model_management`` to load the adapter;
- ``VAE.encode``, ``model.model.process_latent_in``, ``CLIPVision.encode_image``;
- ``transformer_options["optimized_attention_override"]`` called as ``fn(func, q, k, v, heads,
  **kwargs)`` by ComfyUI's ``wrap_attn`` around every attention kernel (``func`` the kernel it
  picked, ``__name__`` ``attention_sub_quad`` for its CPU default), and
  ``comfy.ldm.modules.attention.attention_pytorch`` (its PyTorch SDPA kernel), used by
  :class:`_ExtendedAttentionRoute`.

Regional injection (issue 16, math in ``region.py``) also relies on, in both versions:
- ``ModelPatcher.set_model_attn1_output_patch(fn)`` (a chained list) with ``fn(n, extra_options)``
  called right after self-attention, ``extra_options`` being the very dict the attn1 patches of the
  same ``BasicTransformerBlock.forward`` call received (so the attn1 patch can hand data to it);
- ``executor.class_obj`` of the DIFFUSION_MODEL wrapper being the ``UNetModel``, whose
  ``input_blocks[i]`` / ``middle_block`` / ``output_blocks[i]`` hold a ``SpatialTransformer`` with
  ``transformer_blocks[block_index].attn1`` (a ``CrossAttention``);
- ``CrossAttention.forward(x, context=None, value=None, mask=None, transformer_options={})``.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

import torch

from .copy_unet import LAYER_MAP, layer_key
from .errors import ModelMismatchError
from .injection import DEFAULT_LAMBDA, append_kv_slot, injected_context_value
from .region import Region, blend_tokens

APPLY_TO = ("cond and uncond", "cond only")
CLIP_VIT_L = {"hidden": 1024, "patch": 14, "image_size": 224, "tokens": 257}


# --- model checks ------------------------------------------------------------------------------
def check_sd15(model, input_name: str = "model") -> None:
    """Refuse anything that is not an SD1.5-family UNet (320 channels, context 768, no ADM)."""
    cfg = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None)
    if cfg is None:
        raise ModelMismatchError(input_name, "this is not a ComfyUI MODEL with a UNet",
                                 "connect the MODEL output of a Load Checkpoint node with an SD1.5 checkpoint")
    ctx, ch, adm = cfg.get("context_dim"), cfg.get("model_channels"), cfg.get("adm_in_channels")
    if ctx != 768 or ch != 320 or adm is not None or cfg.get("use_linear_in_transformer"):
        family = {2048: "SDXL", 1024: "SD2.x", 4096: "a DiT (Flux/SD3)"}.get(ctx, "not SD1.5")
        if cfg.get("image_model"):
            family = f"a {cfg['image_model']} model"
        raise ModelMismatchError(
            input_name,
            f"the model is {family} (context_dim={ctx}, model_channels={ch}); P3S adapters are made for SD1.5",
            "load an SD1.5 checkpoint (or an SD1.5 fine-tune) and connect its MODEL here")
    in_ch = cfg.get("in_channels", 4)
    if in_ch != 4:
        # The copy runs on the UNet input x_t; an inpainting / instruct UNet gets x_t plus extra
        # channels there, which the 4-channel copy cannot take (it would fail mid-sampling).
        raise ModelMismatchError(
            input_name,
            f"the UNet takes {in_ch} input channels (an SD1.5 inpainting or instruct-pix2pix model); "
            "P3S adapters work on the 4-channel SD1.5 UNet",
            "connect the MODEL of a regular (non-inpainting) SD1.5 checkpoint")


def check_vae_sd15(vae, input_name: str = "vae") -> None:
    """Refuse a VAE whose latents are not SD1.5's 4-channel, 8x latents (e.g. an SD3/Flux VAE)."""
    if not (callable(getattr(vae, "encode", None)) and callable(getattr(vae, "decode", None))
            and getattr(vae, "first_stage_model", None) is not None):
        raise ModelMismatchError(input_name, f"this is not a usable ComfyUI VAE (got a {type(vae).__name__})",
                                 "connect the VAE output of the SD1.5 checkpoint's Load Checkpoint node")
    channels = getattr(vae, "latent_channels", 4)
    ratio = getattr(vae, "downscale_ratio", 8)
    if channels != 4 or ratio != 8:
        raise ModelMismatchError(
            input_name,
            f"the VAE makes {channels}-channel latents at 1/{ratio} scale; SD1.5 uses 4 channels at 1/8 "
            "(is it an SD3 / Flux / video VAE?)",
            "connect the VAE of the SD1.5 checkpoint (Load Checkpoint's VAE output)")


def check_clip_vit_l(clip_vision, input_name: str = "clip_vision") -> None:
    """Refuse CLIP vision models other than ViT-L/14 at 224 (the paper's encoder, Sec. IV-A)."""
    model = getattr(clip_vision, "model", None)
    emb = getattr(getattr(getattr(model, "vision_model", None), "embeddings", None), "patch_embedding", None)
    w = getattr(emb, "weight", None)
    size = getattr(clip_vision, "image_size", None)
    if w is None or tuple(w.shape[:1]) != (CLIP_VIT_L["hidden"],) or w.shape[-1] != CLIP_VIT_L["patch"] \
            or size != CLIP_VIT_L["image_size"]:
        found = "unknown" if w is None else f"width {w.shape[0]}, patch {w.shape[-1]}, image {size}"
        raise ModelMismatchError(
            input_name, f"the CLIP vision model is not OpenAI CLIP ViT-L/14 ({found})",
            "load clip-vit-large-patch14 (ViT-L/14, 224 px) with a Load CLIP Vision node")


# --- reference encoding ------------------------------------------------------------------------
def clip_patch_tokens(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """CLIP ViT-L/14 last hidden states [N, 257, 1024] of already-square 224x224 IMAGE tensors."""
    import comfy.model_management as mm

    out = clip_vision.encode_image(images, crop=False)
    return out["last_hidden_state"].to(mm.intermediate_device()).float()


def letterboxed_batch(images: torch.Tensor):
    """Letterbox each image to a 224 square (no crop, Eq. 1 must see the whole image)."""
    from .rngr import letterbox

    squares, boxes = [], []
    for i in range(images.shape[0]):
        sq, box = letterbox(images[i, :, :, :3].float().cpu().numpy(), size=CLIP_VIT_L["image_size"])
        squares.append(torch.from_numpy(sq))
        boxes.append(box)
    return torch.stack(squares), boxes


def encode_reference(model, vae, clip_vision, images: torch.Tensor):
    """(I'_latent in the model's latent space [N,4,h,w], CLIP last hidden state [N,257,1024])."""
    rgb = images[..., :3]  # the nodes have checked the batch (nodes/common.py check_image_batch)
    latent = vae.encode(rgb)
    latent = model.model.process_latent_in(latent).float()
    squares, _ = letterboxed_batch(rgb)
    hidden = clip_patch_tokens(clip_vision, squares)
    return latent, hidden


# --- the patch -----------------------------------------------------------------------------------
def adapter_patcher_class():
    """The patcher class ComfyUI uses for its own auxiliary models (ControlNet, upscalers, model
    patches): ``comfy.model_patcher.CoreModelPatcher``, which ComfyUI 0.33 points at
    ``ModelPatcherDynamic`` when Dynamic VRAM is on (NVIDIA, no ``--disable-dynamic-vram``) and
    which is the plain ``ModelPatcher`` otherwise (0.3.75 has no ``CoreModelPatcher``). A plain
    patcher in the same ``load_models_gpu`` list as a dynamic UNet would make 0.33 take its
    non-dynamic memory path (``free_memory(for_dynamic=False)``: other dynamic models unloaded,
    pinned-memory budget enforced) on every sampling run."""
    import comfy.model_patcher as cmp

    return getattr(cmp, "CoreModelPatcher", cmp.ModelPatcher)


def adapter_patcher(adapter):
    """One patcher per adapter object (of :func:`adapter_patcher_class`), so every injector using it
    shares ComfyUI's bookkeeping (a patcher per injector would leave ComfyUI tracking dead patchers
    of a live module). ``ModelPatcherDynamic`` itself falls back to the plain patcher for a CPU load
    device. The adapter is plain torch layers: a dynamic load moves its weights whole (the
    non-``comfy_cast_weights`` branch of ``ModelPatcherDynamic.load``), a lowvram load of the plain
    patcher loads them whole too, so the copy never runs with weights on another device."""
    cls = adapter_patcher_class()
    made_by, patcher = getattr(adapter, "_p3s_patcher", (None, None))
    if patcher is None or made_by is not cls:
        import comfy.model_management as mm

        patcher = cls(adapter, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        object.__setattr__(adapter, "_p3s_patcher", (cls, patcher))
    return patcher


def _layer_key(extra_options) -> str:
    return layer_key(extra_options["block"], extra_options.get("block_index", 0))


#: copy_unet layer key -> UNet level (0 = the highest resolution)
_LEVEL = {e["key"]: e["level"] for e in LAYER_MAP}


def token_grid(n_tokens: int, original_shape):
    """The (h, w) grid of a layer's ``n_tokens`` in a UNet whose input latent is ``original_shape``
    (each level halves the size, rounding up as the stride-2 convs do); None if no level fits."""
    h0, w0 = int(original_shape[-2]), int(original_shape[-1])
    for ds in (1, 2, 4, 8, 16, 32):
        h, w = -(-h0 // ds), -(-w0 // ds)
        if h * w == n_tokens:
            return h, w
    return None


def _resize_tokens(f: torch.Tensor, n_tokens: int, original_shape) -> torch.Tensor | None:
    """Resize a [B, T, C] token map to ``n_tokens`` when another patch (e.g. Kohya Deep Shrink)
    changed the layer's grid; None when either grid cannot be inferred."""
    if len(original_shape) < 2:
        return None
    src, dst = token_grid(f.shape[1], original_shape), token_grid(n_tokens, original_shape)
    if src is None or dst is None:
        return None
    b, t, c = f.shape
    grid = f.transpose(1, 2).reshape(b, c, *src)
    grid = torch.nn.functional.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


@dataclass
class _Bank:
    """Per-step features of one injector, passed down in ``transformer_options`` (never stored)."""
    features: dict
    weight: float
    active: torch.Tensor | None
    lam: float
    replaced: frozenset = frozenset()  # attn1 blocks another node replaced in this model call
    others: tuple = ()  # names of the other nodes' attn1 patches (for error messages)
    region: object = None  # _RegionRun of this step when the injector has a region (issue 16)
    route: object = None  # _ExtendedAttentionRoute of this step (None: ComfyUI's kernel for every call)
    pool_level0: bool = False  # opt-in: level-0 copy tokens pooled 2x2 in the extra keys (LEVEL0_KEYS)


#: ``extra_options`` key (one dict per transformer-block call) counting the K/V entries per token
#: after the P3S patches that already ran in this block: 1 = the layer's own z.
KV_SLOTS = "p3s_kv_slots"

#: core nodes whose attention patches P3S can name in an error (module of the patch -> node)
_KNOWN_PATCHES = {
    "nodes_hypertile": "HyperTile", "nodes_tomesd": "TomePatchModel (ToMe)",
    "nodes_hypernetwork": "Load Hypernetwork", "nodes_pag": "Perturbed-Attention Guidance",
    "nodes_sag": "Self-Attention Guidance", "nodes_nag": "Normalized Attention Guidance",
}


def describe_patch(fn) -> str:
    """A user-facing name for another node's attention patch: the core node, or module.function."""
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    for key, node in _KNOWN_PATCHES.items():
        if key in (mod or ""):
            return f"'{node}'"
    return f"the attention patch {mod}.{name}"


def _replaced_attn1(transformer_options) -> frozenset:
    return frozenset((transformer_options.get("patches_replace") or {}).get("attn1", {}) or ())


def _other_attn1_patches(transformer_options) -> tuple:
    patches = (transformer_options.get("patches") or {}).get("attn1_patch", ())
    return tuple(dict.fromkeys(describe_patch(p) for p in patches if not isinstance(p, P3SInjectorPatch)))


#: Level-0 extra keys (issue 14): "all (exact)" is Eq. 7 as written; the opt-in pools the copy
#: feature 2x2 in the extra K/V of the four-times-larger level-0 layers (a quarter of their extra
#: attention cost; the value's ``z + lam f`` keeps every token). Not the paper's; measured in the benchmark.
LEVEL0_KEYS = ("all (exact)", "pooled 2x2 (faster)")


class _ExtendedAttentionRoute:
    """ComfyUI ``optimized_attention_override`` for one P3S model call (Eq. 8's kernel, issue 14).

    When ComfyUI runs its sub-quadratic kernel (its CPU default, chunked ``baddbmm`` + softmax),
    the self-attention calls whose keys P3S extended go through ComfyUI's own PyTorch SDPA kernel
    instead (the same softmax(QK^T/sqrt d)V, fused: no [queries x keys] matrix written to memory);
    every other call (the plain layers, cross-attention, masked calls) reaches the kernel ComfyUI
    picked, or another node's override, unchanged. The attn1 patch announces the (batch, key
    tokens) of the call it extended; only a call of exactly that shape is routed.
    """

    #: class switch (benchmark "speed-ups off", tests); routed kernels by ComfyUI function name
    enabled = True
    KERNELS = ("attention_sub_quad",)

    def __init__(self, previous=None):
        self.previous = previous
        self.expect = None
        self.routed = 0

    def __call__(self, func, *args, **kwargs):
        expect, k = self.expect, (args[1] if len(args) > 1 else None)
        if (expect is not None and len(args) == 4 and isinstance(k, torch.Tensor) and k.dim() == 3
                and (k.shape[0], k.shape[1]) == expect and kwargs.get("mask") is None
                and not kwargs.get("skip_reshape", False) and getattr(func, "__name__", "") in self.KERNELS):
            import comfy.ldm.modules.attention as attention

            self.expect = None
            self.routed += 1
            return attention.attention_pytorch(*args, **kwargs)
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


def _pooled_tokens(f: torch.Tensor, original_shape) -> torch.Tensor | None:
    """2x2 average pool of a [B, h*w, C] level token map (None when the grid is unknown or odd)."""
    grid = token_grid(f.shape[1], original_shape) if len(original_shape) >= 2 else None
    if grid is None or grid[0] % 2 or grid[1] % 2:
        return None
    b, _, c = f.shape
    pooled = torch.nn.functional.avg_pool2d(f.transpose(1, 2).reshape(b, c, *grid), 2)
    return pooled.flatten(2).transpose(1, 2)


class P3SInjectorPatch:
    """The attn1 patch (Eq. 7-8) and the per-step DIFFUSION_MODEL wrapper (Eq. 6, 9-10) of one adapter.

    The wrapper runs the trainable copy once per sampling step and hands its 16 features to the
    attn1 patch through a per-call copy of ``transformer_options`` under ``self.key``; nothing
    per-run is stored on this object, so clones sharing it stay independent. ``to()`` returns
    ``self`` (ComfyUI would otherwise cast a patch module to the UNet's fp16); the adapter is moved
    by ComfyUI's model management through :meth:`models` / ``set_additional_models``.
    """

    def __init__(self, adapter, i2: torch.Tensor | None, schedule, lam: float = DEFAULT_LAMBDA,
                 strength: float = 1.0, apply_to: str = "cond and uncond", model_sampling=None,
                 feature_hook=None, reference_index: int = 0, reference_mode: str = "one reference",
                 region: Region | None = None, level0_keys: str = LEVEL0_KEYS[0]):
        from .encoder import REFERENCE_MODES

        if apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}")
        if reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode must be one of {REFERENCE_MODES}")
        if level0_keys not in LEVEL0_KEYS:
            raise ValueError(f"level0_keys must be one of {LEVEL0_KEYS}")
        self.pool_level0 = level0_keys == LEVEL0_KEYS[1]
        self.key = f"p3s_{uuid.uuid4().hex[:12]}"
        self.adapter = adapter
        self.i2 = i2
        self.schedule = schedule
        self.lam = float(lam)
        self.strength = float(strength)
        self.apply_to = apply_to
        self.feature_hook = feature_hook  # training: sees the copy's outputs (attention map)
        self.reference_index = int(reference_index)
        self.reference_mode = reference_mode
        self._warned_sizes: set = set()
        self._warned_pooling = False
        self.region = region  # issue 16: inject only inside this region (None = everywhere)
        self.num_timesteps = 1000
        self.sigma_start = self.sigma_end = None
        if model_sampling is not None:
            self.num_timesteps = int(getattr(model_sampling, "num_timesteps", len(model_sampling.sigmas)))
            if schedule is not None:
                self.sigma_start = float(model_sampling.percent_to_sigma(schedule.start_percent))
                self.sigma_end = float(model_sampling.percent_to_sigma(schedule.end_percent))

    # ComfyUI calls these ------------------------------------------------------------------------
    def to(self, *args, **kwargs):
        return self

    def models(self):
        return [self.adapter_patcher()]

    def adapter_patcher(self):
        return adapter_patcher(self.adapter)

    # the weight of this step ---------------------------------------------------------------------
    def step_weight(self, sigma: float, timestep: float) -> float:
        """Eq. 9-10: eps_t times strength, 0 outside the start/end window (ComfyUI's sigma idiom)."""
        if self.strength == 0.0:
            return 0.0
        if self.schedule is None:
            return self.strength
        if self.sigma_start is not None and not (self.sigma_end <= sigma <= self.sigma_start):
            return 0.0
        from .schedule import timestep_to_t_over_T

        t_over_T = timestep_to_t_over_T(min(max(timestep, 0.0), self.num_timesteps - 1), self.num_timesteps)
        return float(self.schedule.curve(t_over_T)) * self.strength

    def _active_rows(self, batch: int, cond_or_uncond) -> torch.Tensor | None:
        if self.apply_to == "cond and uncond" or not cond_or_uncond:
            return None
        chunk = batch // len(cond_or_uncond)
        rows = [c == 0 for c in cond_or_uncond for _ in range(chunk)]
        return torch.tensor(rows, dtype=torch.bool)

    def diffusion_wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        sigmas = transformer_options.get("sigmas")
        sigma = float(sigmas.max()) if sigmas is not None else float("inf")
        weight = self.step_weight(sigma, float(timesteps.max()))
        if weight == 0.0 or (self.region is not None and self.region.empty):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        active = self._active_rows(x.shape[0], transformer_options.get("cond_or_uncond"))
        if active is not None and not bool(active.any()):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        feats = self.copy_features(x, timesteps, context, active)
        options = dict(transformer_options)
        route = None
        if _ExtendedAttentionRoute.enabled:
            route = _ExtendedAttentionRoute(transformer_options.get("optimized_attention_override"))
            options["optimized_attention_override"] = route
        options[self.key] = _Bank(features=feats, weight=weight, active=active, lam=self.lam,
                                  replaced=_replaced_attn1(transformer_options),
                                  others=_other_attn1_patches(transformer_options), route=route,
                                  pool_level0=self._pool_level0(transformer_options))
        if self.region is not None:
            options[self.key].region = _RegionRun(self.region, getattr(executor, "class_obj", None))
        return executor(x, timesteps, context, y, control, options, **kwargs)

    def _pool_level0(self, transformer_options) -> bool:
        """The opt-in pooled level-0 keys, except where only the exact per-token K/V layout works:
        beside a node that cuts K/V into tiles by token order (HyperTile, ToMe) or a second P3S
        injector (it extends the keys token by token, :func:`append_kv_slot`)."""
        if not self.pool_level0:
            return False
        patches = (transformer_options.get("patches") or {}).get("attn1_patch", ())
        blockers = [o for o in _other_attn1_patches(transformer_options) if "HyperTile" in o or "ToMe" in o]
        if sum(isinstance(p, P3SInjectorPatch) for p in patches) > 1:
            blockers.append("another P3S Condition Injector")
        if blockers and not self._warned_pooling:
            self._warned_pooling = True
            import logging

            logging.getLogger("P3S").warning(
                "[P3S Condition Injector] level0_keys 'pooled 2x2 (faster)' is not used beside %s: "
                "the exact keys are used instead", ", ".join(blockers))
        return not blockers

    def copy_features(self, x, timesteps, context, active=None):
        """Eq. 6 once per step: the copy on x_t + I'' (I'' fitted to x_t without stretching).

        ``reference_mode`` "one reference": reference ``reference_index`` only. "average copy
        features": the copy runs once per reference and its features are averaged (N times the
        copy's cost per step). With an ``active`` row mask (``cond only``) the copy runs on the
        active rows only (no layer reads the others' features); theirs are zeros of the right shape."""
        from .encoder import aspects_differ, check_reference_index, prepare_reference

        p = next(self.adapter.parameters())
        dev, dt = p.device, p.dtype
        want_map = self.feature_hook is not None
        rows = None
        if active is not None and not want_map and not bool(active.all()):
            rows = torch.nonzero(active.to(x.device)).flatten()
            full, x, timesteps, context = x.shape[0], x[rows], timesteps[rows], context[rows]
        xs, ts, cs = x.to(dev, dt), timesteps.to(dev, dt), context.to(dev, dt)
        if self.i2 is None:
            out = self.adapter.copy(xs, ts, cs, None, return_attn_map=want_map)
        else:
            size = tuple(x.shape[-2:])
            self._warn_aspect(aspects_differ, size)
            i2 = self.i2.to(dev, dt)
            if self.reference_mode == "one reference":
                indices = [check_reference_index(self.reference_index, int(i2.shape[0]))]
            else:
                indices = list(range(int(i2.shape[0])))
            out = None
            for i in indices:
                ref = prepare_reference(i2, x.shape[0], size, index=i)
                one = self.adapter.copy(xs, ts, cs, ref, return_attn_map=want_map)
                if out is None:
                    out = dict(one)
                else:
                    for k in out:
                        out[k] = out[k] + one[k]
            if len(indices) > 1:
                out = {k: v / len(indices) for k, v in out.items()}
        if self.feature_hook is not None:
            self.feature_hook(out)
        if rows is not None:
            out = {key: f.new_zeros((full,) + tuple(f.shape[1:])).index_copy_(0, rows.to(f.device), f)
                   for key, f in out.items()}
        return out

    def _warn_aspect(self, aspects_differ, size) -> None:
        """Log once per generation size when a reference's aspect ratio differs from the latent's."""
        if size in self._warned_sizes:
            return
        self._warned_sizes.add(size)
        ref_hw = tuple(self.i2.shape[-2:])
        if aspects_differ(ref_hw, size):
            import logging

            logging.getLogger("P3S").warning(
                "[P3S Condition Injector] the reference (latent %dx%d, aspect %.3f) and the image "
                "being generated (latent %dx%d, aspect %.3f) differ in aspect ratio: the reference is "
                "scaled uniformly and its centre cropped to fit (never stretched); generate at the "
                "reference's aspect ratio to keep all of it", ref_hw[0], ref_hw[1],
                ref_hw[1] / ref_hw[0], size[0], size[1], size[1] / size[0])

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        """Eq. 7 on this layer's K/V. Works from K/V (``context``/``value``), never from the queries
        ``n``, so a patch that merges (ToMe) or tiles (HyperTile) the queries before or after this
        one composes; K/V are laid out per token (:func:`interleave_slots`). A layer whose attention
        another node replaced (PAG, SAG: ``patches_replace``) is left to that node."""
        bank = extra_options.get(self.key)
        if bank is None:
            return n, context_attn1, value_attn1
        block = extra_options["block"]
        if bank.replaced and ((block[0], block[1], extra_options.get("block_index", 0)) in bank.replaced
                              or tuple(block) in bank.replaced):
            return n, context_attn1, value_attn1
        if bank.region is not None:
            return self._region_attn1(n, context_attn1, value_attn1, extra_options, bank)
        f = bank.features.get(_layer_key(extra_options))
        if f is None:
            return n, context_attn1, value_attn1
        slots = int(extra_options.get(KV_SLOTS, 1))
        ctx, val = context_attn1, value_attn1
        self._check_kv(ctx, val, slots, bank)
        tokens = ctx.shape[1] // slots
        if f.shape[0] != ctx.shape[0]:
            raise ModelMismatchError(
                "model", f"{self._others(bank)} changed the batch of self-attention's keys in "
                f"{_layer_key(extra_options)} ({f.shape[0]} -> {ctx.shape[0]} rows)",
                f"remove {self._others(bank)} from the MODEL path of this P3S Condition Injector")
        f = f.to(device=ctx.device, dtype=ctx.dtype)
        if f.shape[1] != tokens:
            resized = _resize_tokens(f, tokens, extra_options.get("original_shape", ()))
            if resized is None:
                raise ModelMismatchError(
                    "model", f"self-attention in {_layer_key(extra_options)} has {tokens} key tokens, which is "
                    f"no token grid of this layer (the P3S feature has {f.shape[1]}); {self._others(bank)} "
                    "changed them", f"remove {self._others(bank)} from the MODEL path of this P3S Condition Injector")
            f = resized
        active = bank.active.to(ctx.device) if bank.active is not None else None
        pooled = None
        if bank.pool_level0 and slots == 1 and ctx is val and active is None \
                and _LEVEL.get(_layer_key(extra_options)) == 0:
            pooled = _pooled_tokens(f, extra_options.get("original_shape", ()))
        if pooled is not None:
            # Opt-in (LEVEL0_KEYS): K' = [z, eps pool(f)], V' = [z + lam eps f, eps pool(f)].
            w = float(bank.weight)
            context = torch.cat([ctx, pooled * w], dim=1)
            value = torch.cat([torch.add(ctx, f, alpha=bank.lam * w), pooled * w], dim=1)
        elif slots == 1 and ctx is val:
            context, value = injected_context_value(ctx, f, bank.weight, bank.lam, active, interleaved=True)
            if context is ctx:  # nothing injected in any row: the plain attention, bit for bit
                return n, context_attn1, value_attn1
        else:
            # After a second injector or a patch that rewrote K/V per token (a hypernetwork).
            plain = None if active is None else ~active
            context, value = append_kv_slot(ctx, val, f * bank.weight, bank.lam, slots, plain)
        extra_options[KV_SLOTS] = slots + 1
        if bank.route is not None:
            bank.route.expect = (context.shape[0], context.shape[1])
        return n, context, value

    @staticmethod
    def _others(bank) -> str:
        return ", ".join(bank.others) if bank.others else "another node's self-attention patch"

    def _check_kv(self, ctx, val, slots, bank):
        if ctx.dim() != 3 or val.dim() != 3 or ctx.shape[:2] != val.shape[:2] or ctx.shape[1] % slots:
            raise ModelMismatchError(
                "model", f"{self._others(bank)} gave self-attention keys {tuple(ctx.shape)} and values "
                f"{tuple(val.shape)} that P3S cannot extend",
                f"remove {self._others(bank)} from the MODEL path of this P3S Condition Injector")

    # regional injection (issue 16; the math and the reasons are in region.py) ----------------
    def _region_attn1(self, n, context_attn1, value_attn1, extra_options, bank):
        """Leave K/V as they came (the model computes its plain attention for every query) and hand
        the inside tokens' injected K/V to :meth:`region_output` through ``extra_options``."""
        grid = token_grid(n.shape[1], extra_options.get("original_shape", ()))
        if grid is None:
            raise ModelMismatchError(
                "model", f"cannot place the region on a self-attention layer of {n.shape[1]} tokens",
                "remove the node that changes the UNet's internal resolution, or drop the region")
        w = bank.region.region.weights(grid, device=n.device, dtype=n.dtype)
        if not bool((w > 0).any()):
            return n, context_attn1, value_attn1
        options = dict(extra_options)
        options[self.key] = replace(bank, region=None)
        _, context, value = self(n, context_attn1, value_attn1, options)  # the unmasked Eq. 7 K/V
        if context is context_attn1 and value is value_attn1:  # nothing injected at this layer
            return n, context_attn1, value_attn1
        extra_options[self.key + ":region"] = (n, context, value, w, bank)
        return n, context_attn1, value_attn1

    def region_output(self, out, extra_options):
        """attn1 output patch: ``w * A_inj + (1 - w) * A`` on the region's tokens (region.py)."""
        stash = extra_options.pop(self.key + ":region", None)
        if stash is None:
            return out
        n, context, value, w, bank = stash
        index = (w > 0).nonzero().flatten()
        rows = bank.active.to(out.device) if bank.active is not None else None
        if rows is not None and bool(rows.all()):
            rows = None
        if rows is not None:
            n, context, value = n[rows], context[rows], value[rows]
        attn1 = bank.region.attn1(extra_options)
        injected = attn1(n[:, index], context=context, value=value, transformer_options=extra_options)
        return blend_tokens(out, injected, index, w[index], rows)


@dataclass
class _RegionRun:
    """A region plus the UNet of this step (to find each layer's own ``attn1`` module)."""
    region: Region
    unet: object

    def attn1(self, extra_options):
        block = extra_options["block"]
        unet = self.unet
        if unet is None:
            raise ModelMismatchError("model", "the UNet was not reachable from the P3S wrapper",
                                     "apply the region on an SD1.5 MODEL from Load Checkpoint")
        seq = unet.middle_block if block[0] == "middle" else \
            (unet.input_blocks if block[0] == "input" else unet.output_blocks)[block[1]]
        for layer in seq:
            blocks = getattr(layer, "transformer_blocks", None)
            if blocks is not None:
                return blocks[extra_options.get("block_index", 0)].attn1
        raise ModelMismatchError("model", f"no self-attention found in UNet block {block}",
                                 "apply the region on an SD1.5 MODEL from Load Checkpoint")


def apply_injector(model, adapter, i2, schedule, lam=DEFAULT_LAMBDA, strength=1.0,
                   apply_to="cond and uncond", feature_hook=None, reference_index=0,
                   reference_mode="one reference", region: Region | None = None,
                   level0_keys: str = LEVEL0_KEYS[0]):
    """A ``model.clone()`` with the P3S attn1 patch and per-step wrapper installed (chaining-safe)."""
    import comfy.patcher_extension as pe

    check_sd15(model)
    m = model.clone()
    patch = P3SInjectorPatch(adapter, i2, schedule, lam=lam, strength=strength, apply_to=apply_to,
                             model_sampling=m.get_model_object("model_sampling"), feature_hook=feature_hook,
                             reference_index=reference_index, reference_mode=reference_mode,
                             region=region, level0_keys=level0_keys)
    if patch.strength == 0.0 and feature_hook is None:
        # Speed: weight 0 everywhere is the plain model; install nothing (no per-layer patch
        # call, no wrapper, the adapter is not loaded with the model).
        return m, patch
    m.set_model_attn1_patch(patch)
    if region is not None:
        m.set_model_attn1_output_patch(patch.region_output)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, patch.key, patch.diffusion_wrapper)
    m.set_additional_models(patch.key, [patch.adapter_patcher()])
    return m, patch


def base_unet_state_dict(model) -> dict:
    """The SD1.5 UNet weights (LDM names, no prefix) of a ComfyUI MODEL, for the copy's init."""
    return model.get_model_object("diffusion_model").state_dict()
