"""The ComfyUI side of P3S training (paper Sec. III-B Eq. 11-15, IV-A): inputs, step function, run.

Imports ComfyUI lazily (inside functions), like :mod:`p3s_core.comfy_backend`. ComfyUI APIs used
here, besides those listed there:

- ``comfy.model_management``: ``get_torch_device``, ``unet_offload_device``, ``unload_all_models``,
  ``throw_exception_if_processing_interrupted``, ``soft_empty_cache``, ``cast_to_device``,
  ``lora_compute_dtype`` (0.33 only; float32 otherwise);
- weight patches (:func:`patched_weight`): ``ModelPatcher.patches`` / ``.backup`` /
  ``.weight_wrapper_patches`` / ``.is_dynamic()`` (0.33), ``comfy.model_patcher.get_key_weight``,
  ``comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=...)``,
  ``comfy.float.stochastic_rounding``, ``string_to_seed`` (``comfy.utils`` in 0.33,
  ``comfy.model_patcher`` in 0.3.75); ``model.model.model_config.unet_config`` and
  ``model.model.manual_cast_dtype`` to rebuild the UNet (``UNetModel(**config, device, operations)``);
- ``ModelPatcher.set_model_attn2_replace(fn, block_name, number)`` with
  ``fn(q, k, v, extra_options) -> out`` (q/k/v already projected, ``extra_options["n_heads"]``),
  ``ModelPatcher.wrappers`` (merged into ``transformer_options["wrappers"]`` as the samplers do);
- ``model.model.diffusion_model`` (the LDM ``UNetModel``; its ``forward(x, timesteps, context,
  transformer_options=...)``), ``model_sampling.sigma/timestep/noise_scaling/calculate_input``;
- ``CLIP.tokenize`` / ``CLIP.encode_from_tokens(tokens, return_pooled=True)`` (CLIPTextEncode);
- ``comfy.utils.common_upscale``, ``comfy.utils.ProgressBar``.

How one training step runs (:func:`build_step_fn`):

1. ``t ~ U{0..999}``, ``noise ~ N(0, I)`` from the training generator; ``sigma =
   model_sampling.sigma(t)``; ``x_t = model_sampling.noise_scaling(sigma, noise, x0)``.
2. ``I'' = adapter.encode_reference(x0, clip_hidden)`` (Eq. 4-5, the encoder trains); with
   ``reference_pairing="other photo"`` the loop passes another photo (``ref_latent``, flipped at
   random, fitted to x0's grid without stretching) and its CLIP hidden states instead.
3. The frozen base UNet runs on ``calculate_input(sigma, x_t)`` at ``timestep(sigma)`` through the
   P3S patch (:func:`p3s_core.comfy_backend.apply_injector`, weight 1, strength 1): the copy runs
   once (Eq. 6) and its features enter all 16 self-attention layers (Eq. 7-8).
4. ``L_LDM`` = MSE between the UNet's eps prediction and the noise (Eq. 14; SD1.5 predicts eps, so
   the raw UNet output is compared, not ``calculate_denoised``; other parameterisations are
   refused). ``L_ac`` (Eq. 11-13) compares the copy's cross-attention map with the original UNet's
   LAST cross-attention layer (``("output", 11)`` attn2), captured with an attn2 replace patch that
   computes ``softmax(QK^T/sqrt d)`` explicitly. Both maps are averaged over heads. Normalised as
   ``settings.ac_reading`` says ("mass" by default, see :mod:`p3s_core.losses`).
5. The run stores the cleaned photos' latents and CLIP hidden states in the adapter
   (:func:`stored_reference`), the Condition Injector's default reference; progress, the loss plot
   and the adapter's ``training`` metadata report ``L_LDM`` and ``gamma * L_ac`` apart.

Decisions:

* Gradients must flow through the frozen UNet into the copy's features, but ComfyUI creates the
  UNet weights under ``torch.inference_mode()`` (inference tensors cannot be saved for backward),
  and on ComfyUI 0.33 with Dynamic VRAM (``ModelPatcherDynamic``) the loaded module tree carries
  pinned host buffers / virtual allocations and applies LoRAs only at cast time. The trainer
  therefore never deep-copies the MODEL: :func:`frozen_unet_copy` builds a fresh ``UNetModel`` of
  the same config from plain torch layers and gives it the weights as the graph patched them,
  computed per key with ComfyUI's own patch arithmetic (:func:`patched_weight`), in the model's
  own dtype. Unpatched weights on the training device are shared with the MODEL (no copy), so on
  the CPU training needs no second UNet; on a GPU the copy is the only UNet in VRAM (ComfyUI's
  loaded models are unloaded first).
* The original map ``M_o`` is detached: the frozen UNet is the anchor the copy's attention is pulled
  to ("the frozen and slower-changing source model"); ``detach_original=False`` lets gradients
  reach the copy through ``M_o`` too.
* ``ac_layers="all"`` (Table IV's "whole U-Net"): every one of the 16 SD1.5 cross-attention layers
  is compared with the copy's cross-attention map of the level with the same resolution (LAYER_MAP),
  and the 16 losses are averaged.
* On CUDA the step runs under ``torch.autocast`` in bfloat16 where supported (no autocast
  otherwise; not exercised on this project's CPU test machines). ``gradient_checkpointing``
  recomputes the frozen UNet's blocks in the backward pass; by default (None) it is on where it
  pays (:func:`checkpointing_pays`: on GPUs, and on the CPU from 256^2).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from .comfy_backend import token_grid
from .copy_unet import ATTN_MAP_KEY, LAYER_MAP, layer_key
from .encoder import fit_reference
from .errors import ImageInputError, ModelMismatchError, TrainingConfigError, TrainingDivergedError
from .losses import attention_consistency_loss, attention_probs
from .train import TrainBatch, TrainSettings, masked_ldm_loss

log = logging.getLogger("P3S")

LAST_CROSS_ATTENTION = ("output", 11)
PRECISIONS = ("auto", "fp32")


# --- inputs ------------------------------------------------------------------------------------------
def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) with the short side = ``resolution`` and the long side scaled alike, rounded to a
    multiple of 8 (the VAE's factor). Decision: resize, never crop (the subject may sit anywhere)."""
    scale = resolution / min(height, width)
    if height <= width:
        return resolution, max(8, int(round(width * scale / 8)) * 8)
    return max(8, int(round(height * scale / 8)) * 8), resolution


def _resize_image(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[1,H,W,C] IMAGE -> [1,h,w,C] (ComfyUI's common_upscale, bilinear, no crop)."""
    import comfy.utils

    if tuple(image.shape[1:3]) == (h, w):
        return image
    x = image.movedim(-1, 1)
    x = comfy.utils.common_upscale(x, w, h, "bilinear", "disabled")
    return x.movedim(1, -1).clamp(0, 1)


def encode_prompt(clip, prompt: str) -> torch.Tensor:
    """The CLIPTextEncode conditioning tensor [1, 77*k, 768] of ``prompt``."""
    tokens = clip.tokenize(prompt)
    cond, _pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond


def cache_inputs(model, clip, vae, clip_vision, images: torch.Tensor, prompt: str,
                 masks: torch.Tensor | None = None, resolution: int = 512) -> list[TrainBatch]:
    """Encode everything training needs once (frozen encoders): one :class:`TrainBatch` per image.

    Per image: resized so the short side is ``resolution`` (:func:`resized_size`), the VAE latent
    after ``process_latent_in`` and the CLIP ViT-L/14 last hidden state
    (:func:`p3s_core.comfy_backend.encode_reference`), the prompt's and the empty prompt's text
    encodings, and the subject mask (one mask for all images or one per image) at latent size.
    Tensors are made outside inference mode, on the CPU (intermediate device), in float32.
    """
    import comfy.model_management as mm

    from .comfy_backend import encode_reference

    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise ImageInputError("images", "no training images", "connect 3-5 photos of the subject")
    cpu = mm.intermediate_device()
    raw = []
    with torch.no_grad():  # the encoders are frozen; ComfyUI's own mode (inference) is kept here
        context = encode_prompt(clip, prompt)
        uncond = encode_prompt(clip, "")
        for i in range(images.shape[0]):
            img = images[i:i + 1, :, :, :3].float()
            h, w = resized_size(int(img.shape[1]), int(img.shape[2]), int(resolution))
            latent, hidden = encode_reference(model, vae, clip_vision, _resize_image(img, h, w))
            mask = None
            if masks is not None:
                m = masks[i if masks.shape[0] > 1 else 0].float().reshape(1, 1, *masks.shape[-2:])
                mask = torch.nn.functional.interpolate(m.to(cpu), size=tuple(latent.shape[-2:]),
                                                       mode="area").clamp(0, 1)
            raw.append((latent, hidden, mask))
    with torch.inference_mode(False):  # normal tensors: autograd may save them
        def normal(t):
            return None if t is None else t.to(cpu, torch.float32).clone()

        context, uncond = normal(context), normal(uncond)
        if uncond.shape[1] != context.shape[1]:  # long prompts: repeat the empty one like CFG does
            reps = math.ceil(context.shape[1] / uncond.shape[1])
            uncond = uncond.repeat(1, reps, 1)[:, :context.shape[1]].clone()
        batches = [TrainBatch(latent=normal(lat), context=context, uncond=uncond,
                              clip_hidden=normal(hid), mask=normal(m)) for lat, hid, m in raw]
    return batches


# --- the frozen UNet ---------------------------------------------------------------------------------
def check_eps_prediction(model) -> None:
    """Refuse models that do not predict noise (v-prediction, EDM, flow): Eq. 14 compares eps."""
    import comfy.model_sampling as cms

    ms = model.get_model_object("model_sampling")
    if isinstance(ms, cms.V_PREDICTION) or not isinstance(ms, cms.EPS):
        raise ModelMismatchError(
            "model", f"the model's parameterisation is {type(ms).__name__} (not eps-prediction); "
            "the P3S Trainer implements the paper's noise-prediction loss (Eq. 14)",
            "train on an eps-prediction SD1.5 checkpoint (the standard SD1.5 and its fine-tunes)")


class _TorchOps:
    """Plain ``torch.nn`` layers in the shape of ComfyUI's ``operations`` namespace (``comfy.ops``):
    the trainer's frozen UNet is built from them so that it carries none of ComfyUI's casting
    machinery (lowvram weight functions, Dynamic VRAM's pinned host buffers and virtual
    allocations). On equal weights and dtypes their forward is the one ComfyUI's ops run."""

    Linear = torch.nn.Linear
    Conv1d = torch.nn.Conv1d
    Conv2d = torch.nn.Conv2d
    Conv3d = torch.nn.Conv3d
    GroupNorm = torch.nn.GroupNorm
    LayerNorm = torch.nn.LayerNorm
    ConvTranspose1d = torch.nn.ConvTranspose1d
    ConvTranspose2d = torch.nn.ConvTranspose2d
    Embedding = torch.nn.Embedding

    @classmethod
    def conv_nd(cls, dims, *args, **kwargs):
        if dims == 2:
            return cls.Conv2d(*args, **kwargs)
        if dims == 3:
            return cls.Conv3d(*args, **kwargs)
        raise ValueError(f"unsupported dimensions: {dims}")


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor sharing ``t``'s memory: no copy. ComfyUI creates its
    weights under ``torch.inference_mode()``, and autograd may not save inference tensors; an alias
    made outside inference mode can be saved (the weights are only read, never written)."""
    if not t.is_inference():
        return t.detach()
    with torch.inference_mode(False):
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _string_seed(key: str) -> int:
    import comfy.utils

    fn = getattr(comfy.utils, "string_to_seed", None)  # 0.33; 0.3.75 has it in comfy.model_patcher
    if fn is None:
        import comfy.model_patcher

        fn = comfy.model_patcher.string_to_seed
    return fn(key)


def original_weight(patcher, key: str) -> torch.Tensor:
    """The un-patched weight of ``key`` ("diffusion_model.<name>") whatever ComfyUI's load state:
    the patcher's backup when a load replaced it (non-dynamic loads write LoRAs into the weights
    and keep the original there; clones share the backup), else the module's current tensor
    (unloaded, lowvram / Dynamic VRAM loads that patch at cast time, or a weight no patch touches)."""
    import comfy.model_patcher as cmp

    backup = getattr(patcher, "backup", {}).get(key)
    if backup is not None:
        return backup.weight
    weight, _set_func, _convert_func = cmp.get_key_weight(patcher.model, key)
    return weight


def patched_weight(patcher, key: str, device, dtype: torch.dtype, dynamic: bool | None = None):
    """The weight of ``key`` as ComfyUI computes it for this patcher (its LoRA / weight patches and
    weight wrappers), on ``device`` in ``dtype``; an alias of the stored weight (no copy) when
    nothing patches it and device and dtype already match.

    The patch arithmetic is ComfyUI's own (``comfy.lora.calculate_weight``), in the order its two
    paths use: a non-dynamic load (``ModelPatcher.patch_weight_to_device``) computes in
    ``lora_compute_dtype`` (float32 on 0.3.75) and rounds stochastically to the stored dtype, seeded
    by the key; Dynamic VRAM (``ModelPatcherDynamic``, 0.33 on NVIDIA) applies the patch at cast
    time in the compute dtype (``LowVramPatch``). ``dynamic=None`` follows ``patcher.is_dynamic()``.
    """
    import comfy.float
    import comfy.lora
    import comfy.model_management as mm
    import comfy.model_patcher as cmp

    base = original_weight(patcher, key)
    _w, set_func, convert_func = cmp.get_key_weight(patcher.model, key)
    patches = patcher.patches.get(key)
    wrappers = getattr(patcher, "weight_wrapper_patches", {}).get(key, [])
    if dynamic is None:
        dynamic = bool(getattr(patcher, "is_dynamic", lambda: False)())
    device = torch.device(device)
    with torch.inference_mode(False), torch.no_grad():
        if not patches:
            if base.device == device and base.dtype == dtype:
                w = _alias(base)
            else:
                w = base.to(device=device, dtype=dtype, copy=True)
        elif dynamic:  # ModelPatcherDynamic: cast to the compute dtype, then patch (LowVramPatch)
            w = base.to(device=device, dtype=dtype, copy=True)
            if convert_func is not None:
                w = convert_func(w, inplace=False)
            w = comfy.lora.calculate_weight(patches, w, key, intermediate_dtype=dtype)
            if set_func is not None:
                w = set_func(w, seed=_string_seed(key), return_weight=True)
        else:  # ModelPatcher.patch_weight_to_device
            inter = getattr(mm, "lora_compute_dtype", None)
            inter = inter(device) if inter is not None else torch.float32
            w = mm.cast_to_device(base, device, inter, copy=True)
            if convert_func is not None:
                w = convert_func(w, inplace=True)
            w = comfy.lora.calculate_weight(patches, w, key)
            if set_func is not None:
                w = set_func(w, seed=_string_seed(key), return_weight=True)
            else:
                w = comfy.float.stochastic_rounding(w, base.dtype, seed=_string_seed(key))
        for fn in wrappers:  # ComfyUI's ops run these after the patches, at cast time
            w = fn(w)
        return w.to(device=device, dtype=dtype)


def frozen_unet_dtype(model) -> torch.dtype:
    """The dtype the frozen UNet computes in: the model's own (its stored weight dtype), or
    ComfyUI's ``manual_cast_dtype`` when the stored one is only for storage (fp8, or fp16/bf16 on a
    device that computes in another dtype)."""
    cast = getattr(model.model, "manual_cast_dtype", None)
    if cast is not None:
        return cast
    dm = model.model.diffusion_model
    for p in dm.parameters():
        if p is not None and p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def frozen_unet_copy(model, device=None, dtype: torch.dtype | None = None):
    """The frozen, differentiable base UNet for training: a fresh ``UNetModel`` of the model's own
    config, built from plain ``torch.nn`` layers, whose weights are the MODEL's weights as the
    user's graph patched them (LoRA loaders etc., :func:`patched_weight`), in the model's own dtype
    (:func:`frozen_unet_dtype`), on ``device``. ``requires_grad`` off, eval mode.

    Nothing is deep-copied: not the ComfyUI module tree (which under Dynamic VRAM carries pinned
    host buffers, virtual allocations and cast-time LoRA patches), and not the weights: an
    unpatched weight already on ``device`` in that dtype is shared with the MODEL (an alias made
    outside inference mode, see :func:`_alias`); only the patched ones are new tensors. The MODEL is
    not loaded or modified by this function."""
    import comfy.model_management as mm

    device = torch.device(device) if device is not None else mm.get_torch_device()
    dtype = dtype or frozen_unet_dtype(model)
    src = model.model.diffusion_model
    cfg = dict(model.model.model_config.unet_config)
    cfg["dtype"] = dtype
    prefix = "diffusion_model."
    with torch.inference_mode(False):
        try:
            unet = type(src)(**cfg, device="meta", operations=_TorchOps)
        except (TypeError, ValueError, RuntimeError) as exc:  # SD1.5 configs always build (check_sd15)
            raise ModelMismatchError("model", f"the UNet could not be rebuilt from its config ({exc})",
                                     "train on an SD1.5 checkpoint loaded with Load Checkpoint") from exc
        sd = {n: patched_weight(model, prefix + n, device, dtype) for n in unet.state_dict()}
        unet.load_state_dict(sd, strict=True, assign=True)
        for name, buf in list(unet.named_buffers()):  # non-persistent buffers: the MODEL's values
            if buf.is_meta:
                owner, _, attr = name.rpartition(".")
                src_buf = src.get_buffer(name)
                to = dtype if src_buf.is_floating_point() else src_buf.dtype
                unet.get_submodule(owner)._buffers[attr] = src_buf.to(device, to, copy=True)
        unet.requires_grad_(False).eval()
    return unet


def checkpointing_pays(device, resolution: int) -> bool:
    """Whether gradient checkpointing of the frozen UNet is worth its recompute: on accelerators,
    whose memory is the limit (issue 14's 512^2 goal is <= 10 GB), always; on the CPU from 256^2
    (measured with benchmarks/bench_train.py, random SD1.5: peak RSS 9173 -> 8491 MiB at 256^2, no
    slower step in that run; at 64^2 the weights dominate the peak)."""
    device = torch.device(device)
    return device.type != "cpu" or int(resolution) >= 256


def _checkpointed(fn, *args, **kwargs):
    """``fn`` under non-reentrant activation checkpointing. ``transformer_options`` dicts are copied
    first: the UNet rewrites ``block`` / ``block_index`` in place while it runs, and the recompute
    in the backward pass must see the values of this layer's forward."""
    from torch.utils.checkpoint import checkpoint

    args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(unet) -> int:
    """Recompute each layer of the UNet's input/middle/output blocks in the backward pass (the
    private copy only). Returns the number of wrapped layers."""
    n = 0
    blocks = list(getattr(unet, "input_blocks", [])) + [getattr(unet, "middle_block", None)] \
        + list(getattr(unet, "output_blocks", []))
    for blk in blocks:
        if blk is None:
            continue
        for layer in blk:
            if any(True for _ in layer.parameters()):
                layer.forward = functools.partial(_checkpointed, layer.forward)
                n += 1
    return n


# --- attention capture ---------------------------------------------------------------------------------
class OriginalAttentionCapture:
    """attn2 replace patch for the original UNet: computes ``softmax(QK^T/sqrt d) V`` explicitly
    (Eq. 13), stores the head-averaged map [B, h*w, tokens] per layer key and returns the output.
    One instance per training run; ``clear()`` before each step."""

    def __init__(self, detach: bool = True):
        self.detach = detach
        self.maps: dict[str, torch.Tensor] = {}
        self.grids: dict[str, tuple[int, int]] = {}

    def clear(self):
        self.maps.clear()
        self.grids.clear()

    def to(self, *args, **kwargs):  # ComfyUI casts patch objects: keep ours as is
        return self

    def __call__(self, q, k, v, extra_options):
        heads = int(extra_options["n_heads"])
        b, nq, c = q.shape
        d = c // heads
        probs = attention_probs(q, k, heads)                         # [B, H, Nq, Nk] float32
        vh = v.reshape(b, v.shape[1], heads, d).transpose(1, 2)
        out = (probs.to(v.dtype) @ vh).transpose(1, 2).reshape(b, nq, heads * d)
        block = extra_options.get("block")
        key = layer_key(block) if block is not None else f"layer_{len(self.maps)}"
        m = probs.mean(dim=1)
        self.maps[key] = m.detach() if self.detach else m
        self.grids[key] = token_grid(nq, extra_options.get("original_shape", (nq, 1))) or (nq, 1)
        return out


def _probs_of(attn, x, context) -> torch.Tensor:
    """Head-averaged cross-attention map of a copy ``CrossAttention`` for inputs ``x``/``context``."""
    q = attn.to_q(x)
    k = attn.to_k(context)
    return attention_probs(q, k, attn.heads).mean(dim=1)


@contextlib.contextmanager
def copy_attention_hooks(adapter, sink: dict):
    """Forward hooks on the copy's four cross-attention layers writing ``sink[level] = map``."""
    copy = adapter.copy
    mods = [lvl.st.transformer_blocks[0].attn2 for lvl in copy.levels]
    mods.append(copy.middle.st.transformer_blocks[0].attn2)
    handles = []
    for level, mod in enumerate(mods):
        def hook(module, args, output, level=level):
            x, context = args[0], (args[1] if len(args) > 1 else args[0])
            sink[level] = _probs_of(module, x, context)
        handles.append(mod.register_forward_hook(hook))
    try:
        yield sink
    finally:
        for h in handles:
            h.remove()


# --- the step function ---------------------------------------------------------------------------------
@dataclass
class StepContext:
    """What :func:`build_step_fn` set up; ``close()`` undoes it (hooks, references)."""

    step_fn: Callable
    patched: object
    patch: object
    capture: OriginalAttentionCapture
    unet: torch.nn.Module
    device: torch.device
    closers: list = field(default_factory=list)

    def close(self):
        for c in reversed(self.closers):
            try:
                c()
            except Exception:  # pragma: no cover - best effort cleanup
                log.exception("P3S: cleanup failed")
        self.closers.clear()
        self.patch.i2 = None
        self.capture.clear()


def _autocast(device: torch.device, precision: str):
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_step_fn(model, adapter, settings: TrainSettings, unet=None, device=None,
                  gradient_checkpointing: bool = False, precision: str = "auto",
                  detach_original: bool = True) -> StepContext:
    """Set up training on a ComfyUI SD1.5 MODEL and return a :class:`StepContext` whose
    ``step_fn(adapter, x0, context, clip_hidden, generator, mask=None) -> (L_LDM, L_ac)`` is the
    loop's step (see the module docstring for what it computes). ``unet``: a frozen non-inference
    copy of the diffusion model (made with :func:`frozen_unet_copy` when None)."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    from .comfy_backend import apply_injector, check_sd15

    check_sd15(model)
    check_eps_prediction(model)
    if precision not in PRECISIONS:
        raise TrainingConfigError("precision", f"{precision!r} is not one of {PRECISIONS}",
                                  "use 'auto' or 'fp32'")
    device = torch.device(device) if device is not None else mm.get_torch_device()
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    blocks = [tuple(e["block"]) for e in LAYER_MAP] if settings.ac_layers == "all" \
        else [LAST_CROSS_ATTENTION]
    taken = [b for b in blocks if b in existing or (b + (0,)) in existing]
    if taken:
        raise ModelMismatchError(
            "model", f"another node already replaces the cross-attention of {taken[0]} (e.g. an "
            "IPAdapter), which the attention consistency loss (Eq. 11-13) must read",
            "train on the MODEL straight from the checkpoint loader (LoRA loaders are fine)")
    if unet is None:
        unet = frozen_unet_copy(model, device)
    unet_dtype = next(unet.parameters()).dtype
    capture = OriginalAttentionCapture(detach=detach_original)
    copy_maps: dict[int, torch.Tensor] = {}
    copy_out: dict = {}

    def feature_hook(out):
        copy_out["attn"] = out.get(ATTN_MAP_KEY)

    patched, patch = apply_injector(model, adapter, None, None, strength=1.0,
                                    apply_to="cond and uncond", feature_hook=feature_hook)
    for blk in blocks:
        patched.set_model_attn2_replace(capture, blk[0], blk[1])
    options = dict(patched.model_options.get("transformer_options", {}))
    options["wrappers"] = pe.merge_nested_dicts(dict(options.get("wrappers", {})), patched.wrappers)
    ms = patched.get_model_object("model_sampling")
    num_t = int(getattr(ms, "num_timesteps", len(ms.sigmas)))
    ctx = StepContext(step_fn=None, patched=patched, patch=patch, capture=capture, unet=unet,
                      device=device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    if settings.ac_layers == "all":
        hooks = copy_attention_hooks(adapter, copy_maps)
        hooks.__enter__()
        ctx.closers.append(lambda: hooks.__exit__(None, None, None))
    level_of = {e["key"]: e["level"] for e in LAYER_MAP}
    bg = float(settings.mask_background_weight)
    run_id = uuid.uuid4()

    def step_fn(adapter_, x0, context, clip_hidden, generator, mask=None, ref_latent=None,
                ref_clip_hidden=None):
        if adapter_ is not adapter:
            raise TrainingConfigError("adapter", "the step function was built for another adapter",
                                      "build the step function with the adapter being trained")
        t = torch.randint(0, num_t, (1,), generator=generator)
        noise = torch.randn(tuple(x0.shape), generator=generator).to(device)
        x0 = x0.to(device)
        sigma = ms.sigma(t.float()).to(device)
        xt = ms.noise_scaling(sigma, noise, x0)
        xc = ms.calculate_input(sigma, xt)
        timestep = ms.timestep(sigma).float()
        capture.clear()
        copy_out.clear()
        copy_maps.clear()
        p = next(adapter.parameters())
        ref_lat, ref_hid = x0, clip_hidden  # the paper: the photo is its own reference I'
        if ref_latent is not None:  # reference_pairing "other photo": fitted to x0's grid
            ref_lat = fit_reference(ref_latent.to(device), tuple(x0.shape[-2:]))
            ref_hid = ref_clip_hidden if ref_clip_hidden is not None else clip_hidden
        with _autocast(device, precision):
            patch.i2 = adapter.encode_reference(ref_lat.to(p.device, p.dtype), ref_hid.to(p.device, p.dtype))
            opts = dict(options)
            opts["cond_or_uncond"] = [0]
            opts["uuids"] = [run_id]
            opts["sigmas"] = sigma.reshape(1)
            eps = unet(xc.to(unet_dtype), timestep, context=context.to(device, unet_dtype),
                       transformer_options=opts)
        patch.i2 = None
        l_ldm = masked_ldm_loss(noise, eps.float(), None if mask is None else mask.to(device), bg)
        if settings.ac_layers == "last":
            m_c, m_o = copy_out.get("attn"), capture.maps.get("output_11")
            if m_c is None or m_o is None:
                raise ModelMismatchError("model", "the last cross-attention map was not captured",
                                         "train on a plain SD1.5 MODEL")
            l_ac = attention_consistency_loss(m_c.float(), m_o.float(), hw_c=tuple(x0.shape[-2:]),
                                              hw_o=capture.grids["output_11"],
                                              reading=settings.ac_reading)
        else:
            parts = []
            for key, m_o in capture.maps.items():
                m_c = copy_maps.get(level_of.get(key, -1))
                if m_c is None:
                    continue
                parts.append(attention_consistency_loss(m_c.float(), m_o.float(),
                                                        reading=settings.ac_reading))
            if len(parts) != len(blocks):
                raise ModelMismatchError("model", f"only {len(parts)} of {len(blocks)} cross-attention "
                                         "maps were captured", "train on a plain SD1.5 MODEL")
            l_ac = torch.stack(parts).mean()
        return l_ldm, l_ac

    ctx.step_fn = step_fn
    return ctx


# --- the whole run -----------------------------------------------------------------------------------
def new_training_adapter(unet, resume=None, seed: int = 0):
    """A fresh adapter initialised from the (frozen copy of the) base UNet, or a private copy of
    ``resume`` (never trained in place: nodes are pure). Outside inference mode, float32, CPU."""
    from .adapter import P3SAdapter, new_adapter

    with torch.inference_mode(False), torch.no_grad():
        if resume is None:
            sd = {k: v.to("cpu") for k, v in unet.state_dict().items()}
            return new_adapter(unet_state_dict=sd, seed=seed, training={"steps": 0})
        adapter = P3SAdapter(resume.config, resume.lam, dict(resume.training_info),
                             resume.encoder.clip_dim, resume.encoder.inner_dim,
                             resume.base_unet_hash)
        adapter.load_state_dict({k: v.detach().to("cpu", torch.float32).clone()
                                 for k, v in resume.state_dict().items()})
        return adapter


def run_training(model, clip, vae, clip_vision, images, prompt: str, settings: TrainSettings,
                 save_path, masks=None, resume=None, gradient_checkpointing: bool | None = None,
                 precision: str = "auto", log_every: int = 0, reproducible: bool = True):
    """Cache inputs, train (:func:`p3s_core.train.train_adapter`) and save atomically to
    ``save_path`` every ``settings.save_every`` steps and at the end.

    Progress: ``comfy.utils.ProgressBar`` +1 per step (with the loss plot as preview); Cancel:
    ``throw_exception_if_processing_interrupted()`` before every step and after it (before any
    save), so a cancelled run writes nothing more and the last completed save stays. Returns
    ``(adapter, TrainResult, start_step)``; the adapter is in eval mode on the offload device.
    ``gradient_checkpointing=None`` turns it on where it pays (:func:`checkpointing_pays`).
    ``reproducible`` (default): on the CPU the steps run on one thread
    (:func:`p3s_core.train.reproducible_threads`), so the same seed writes the same adapter bytes.
    """
    import comfy.model_management as mm
    import comfy.utils

    from .adapter import save_adapter
    from .errors import AdapterFileError
    from .train import plot_losses, reproducible_threads, train_adapter

    settings.validate(prompt)
    device = mm.get_torch_device()
    start_step = int((resume.training_info or {}).get("steps", 0)) if resume is not None else 0
    unet = batches = adapter = ctx = None
    try:
        mm.throw_exception_if_processing_interrupted()
        batches = cache_inputs(model, clip, vae, clip_vision, images, prompt, masks,
                               settings.resolution)
        if device.type != "cpu":  # the frozen copy replaces ComfyUI's loaded models for the run
            mm.unload_all_models()
            mm.soft_empty_cache()
        unet = frozen_unet_copy(model, device)
        if gradient_checkpointing is None:
            gradient_checkpointing = checkpointing_pays(device, settings.resolution)
        adapter = new_training_adapter(unet, resume, settings.seed)
        _warn_if_other_base(adapter, unet)
        with torch.inference_mode(False):
            adapter.to(device)
        info_base = {"prompt": prompt, "images": len(batches), "settings": settings.to_dict(),
                     "gradient_checkpointing": bool(gradient_checkpointing),  # the effective choice
                     "reproducible": bool(reproducible)}
        ctx = build_step_fn(model, adapter, settings, unet=unet, device=device,
                            gradient_checkpointing=gradient_checkpointing, precision=precision)
        local_total = settings.epochs * len(batches)
        every = log_every or max(1, local_total // 20)
        pbar = comfy.utils.ProgressBar(local_total)
        losses: list[float] = []
        parts_ldm: list[float] = []
        parts_ac: list[float] = []

        def on_parts(l_ldm, gamma_l_ac):
            parts_ldm.append(float(l_ldm))
            parts_ac.append(float(gamma_l_ac))

        def step_fn(*args, **kwargs):
            mm.throw_exception_if_processing_interrupted()
            return ctx.step_fn(*args, **kwargs)

        saved: list[int] = []

        def save(step, loss):
            adapter.training_info = dict(info_base, steps=int(step), loss=float(loss),
                                         **loss_parts(parts_ldm, parts_ac))
            try:
                save_adapter(adapter, save_path)  # refuses non-finite weights, writes nothing
            except AdapterFileError as exc:
                if "NaN or infinite" not in exc.problem:
                    raise
                kept = (f"the save of step {saved[-1]} in {save_path} is kept" if saved
                        else f"nothing was saved by this run ({save_path} is unchanged)")
                raise TrainingDivergedError("learning_rate", f"the weights after step {step} are not "
                                            f"finite ({exc.problem}); {kept}",
                                            "train again with a lower learning_rate (paper: 1e-5) or "
                                            "resume from the last good save") from exc
            saved.append(int(step))

        def on_step(step, total, loss):
            losses.append(loss)
            local = step - start_step
            preview = None
            if local % every == 0 or local == local_total:
                log.info("[P3S Trainer] step %d/%d (total %d) loss %.5f = L_LDM %.5f + gamma*L_ac %.5f",
                         local, local_total, step, loss, parts_ldm[-1], parts_ac[-1])
                preview = _preview(plot_losses(losses, 512, 256, start_step,
                                               parts=plot_parts(parts_ldm, parts_ac)))
            pbar.update_absolute(local, local_total, preview)
            mm.throw_exception_if_processing_interrupted()
            if settings.save_every and local % settings.save_every == 0 and local != local_total:
                save(step, loss)

        try:
            adapter.reference = stored_reference(batches)
            with reproducible_threads(device, reproducible):
                result = train_adapter(adapter, batches, step_fn, settings, on_step=on_step,
                                       start_step=start_step, device=device, on_parts=on_parts)
        except TrainingDivergedError as exc:
            kept = (f"the save of step {saved[-1]} in {save_path} is kept" if saved
                    else f"nothing was saved by this run ({save_path} is unchanged)")
            raise TrainingDivergedError(exc.input_name, f"{exc.problem}; {kept}", exc.fix) from exc
        with torch.inference_mode(False):
            adapter.to(mm.unet_offload_device())
        save(result.steps, result.losses[-1] if result.losses else float("nan"))
        return adapter, result, start_step
    finally:
        if ctx is not None:
            ctx.close()
        del ctx, unet, batches
        gc.collect()
        mm.soft_empty_cache()


def stored_reference(batches) -> dict | None:
    """The cleaned training references the adapter file carries (latents I' and CLIP hidden states,
    float32 on the CPU), so generation needs no reference photo; None when their grids differ."""
    lats = [b.latent.detach().to("cpu", torch.float32) for b in batches]
    if any(t.shape != lats[0].shape for t in lats):
        return None
    hids = [b.clip_hidden.detach().to("cpu", torch.float32) for b in batches]
    with torch.inference_mode(False):
        return {"latent": torch.cat(lats).clone(), "clip_hidden": torch.cat(hids).clone()}


def loss_parts(ldm: list[float], weighted_ac: list[float]) -> dict:
    """Adapter metadata of the two parts of Eq. 15: the last step's and the run's means."""
    if not ldm:
        return {}
    return {"loss_ldm": ldm[-1], "loss_gamma_ac": weighted_ac[-1],
            "mean_loss_ldm": sum(ldm) / len(ldm), "mean_loss_gamma_ac": sum(weighted_ac) / len(weighted_ac)}


def plot_parts(ldm: list[float], weighted_ac: list[float]):
    """The loss plot's extra curves: L_LDM (green) and gamma*L_ac (red)."""
    return (("L_LDM", ldm), ("gamma*L_ac", weighted_ac))


def _warn_if_other_base(adapter, unet) -> None:
    """Log a warning when a resumed adapter was trained on another base UNet (it still trains)."""
    from .adapter import unet_fingerprint
    from .copy_unet import ldm_key_map

    if not adapter.base_unet_hash:
        return
    keys = list(ldm_key_map(adapter.copy).values())
    current = unet_fingerprint(unet.state_dict(), keys)
    if current != adapter.base_unet_hash:
        log.warning("[P3S Trainer] the resumed adapter was initialised from another base model "
                    "(%s, this one is %s); training continues on this model",
                    adapter.base_unet_hash, current)


def _preview(img):
    try:
        from PIL import Image

        return ("PNG", Image.fromarray(img), 512)
    except Exception:  # pragma: no cover - previews are optional
        return None


def base_unet_copy_bytes(model) -> int:
    """Bytes the frozen UNet copy takes (its parameters and buffers in their dtypes)."""
    dm = model.model.diffusion_model
    return sum(t.numel() * t.element_size() for t in list(dm.parameters()) + list(dm.buffers()))
