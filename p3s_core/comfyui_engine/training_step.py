"""The ComfyUI engine: one P3S training step (paper Sec. III-B Eq. 11-15, IV-A).

How one training step runs (:func:`build_step_fn`):

1. ``t ~ U{0..999}``, ``noise ~ N(0, I)`` from the training generator; ``sigma =
   model_sampling.sigma(t)``; ``x_t = model_sampling.noise_scaling(sigma, noise, x0)``.
2. ``I'' = adapter.encode_reference(x0, clip_hidden)`` (Eq. 4-5, the encoder trains); with
   ``reference_pairing="other photo"`` the loop passes another photo (``ref_latent``, flipped at
   random, fitted to x0's grid without stretching) and its CLIP hidden states instead.
3. The frozen base UNet runs on ``calculate_input(sigma, x_t)`` at ``timestep(sigma)`` through the
   P3S patch (:func:`~.injector.apply_injector`, weight 1, strength 1): the copy runs
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
  is compared with the cross-attention map of the copy layer that feeds it (the layer map's
  :func:`~p3s_core.copy_config.feature_index`: the level with the same resolution, on the decoder
  side the copy's decoder in the "full" layout), and the 16 losses are averaged.
* Precision (:mod:`p3s_core.precision`): bf16 autocast on GPUs that have it; fp16 autocast with
  fp32 master weights and dynamic loss scaling on fp16-only GPUs; TF32 matmuls where available. ``gradient_checkpointing``
  recomputes the frozen UNet's blocks in the backward pass; by default (None) it is on where it
  pays (:func:`~.frozen_unet.checkpointing_pays`: on GPUs, and on the CPU from 256^2).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..copy_unet import ATTN_MAP_KEY, LAYER_MAP, feature_index, layer_key
from ..encoder import fit_reference
from ..errors import ModelMismatchError, TrainingConfigError
from ..injection import token_grid
from ..losses import attention_consistency_loss, attention_probs, copy_attention_hooks
from ..precision import PRECISIONS, TrainingPrecision, resolve_precision
from ..train import TrainSettings, masked_ldm_loss
from .checks import check_eps_prediction
from .frozen_unet import enable_gradient_checkpointing, frozen_unet_copy

log = logging.getLogger("P3S")

LAST_CROSS_ATTENTION = ("output", 11)


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
    precision: TrainingPrecision = field(default_factory=TrainingPrecision)
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


def build_step_fn(model, adapter, settings: TrainSettings, unet=None, device=None,
                  gradient_checkpointing: bool = False, precision: str | TrainingPrecision = "auto",
                  detach_original: bool = True) -> StepContext:
    """Set up training on a ComfyUI SD1.5 MODEL and return a :class:`StepContext` whose
    ``step_fn(adapter, x0, context, clip_hidden, generator, mask=None) -> (L_LDM, L_ac)`` is the
    loop's step (see the module docstring for what it computes). ``unet``: a frozen non-inference
    copy of the diffusion model (made with :func:`frozen_unet_copy` when None). ``precision``: a
    :data:`~p3s_core.precision.PRECISIONS` choice resolved for the device and the UNet's dtype, or a
    resolved :class:`~p3s_core.precision.TrainingPrecision` (kept as ``StepContext.precision``)."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    from .checks import check_sd15
    from .injector import apply_injector

    check_sd15(model)
    check_eps_prediction(model)
    if not isinstance(precision, TrainingPrecision) and precision not in PRECISIONS:
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
    if not isinstance(precision, TrainingPrecision):
        precision = resolve_precision(device, precision, unet_dtype)
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
                      device=device, precision=precision)
    if gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    if settings.ac_layers == "all":
        hooks = copy_attention_hooks(adapter, copy_maps)
        hooks.__enter__()
        ctx.closers.append(lambda: hooks.__exit__(None, None, None))
    feature_of = {e["key"]: feature_index(e) for e in adapter.layer_map}
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
        with precision.autocast():
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
                m_c = copy_maps.get(feature_of.get(key, -1))
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
