"""The diffusers engine: one training step (Eq. 11-15) on a diffusers UNet."""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import torch

from ..copy_unet import ATTN_MAP_KEY, feature_index
from ..errors import ModelMismatchError, TrainingConfigError
from ..losses import copy_attention_hooks
from ..precision import TrainingPrecision
from .attention import CrossAttentionCapture, P3SDiffusersInjector
from .layers import _ATTN2_KEYS, LAST_CROSS_ATTENTION
from .loading import CONFIG_DIR


#: the noise schedules a diffusers scheduler config can name (``beta_schedule``)
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


def training_betas(cfg: Mapping[str, Any]) -> torch.Tensor:
    """The training noise schedule (float64 betas) a diffusers scheduler config describes:
    ``trained_betas`` when given, else ``beta_schedule`` from ``beta_start`` to ``beta_end`` over
    ``num_train_timesteps`` (SD1.5: scaled_linear 0.00085..0.012). The same betas diffusers' own
    schedulers compute, so x_t matches the model's training."""
    n_t = int(cfg.get("num_train_timesteps", 1000))
    trained = cfg.get("trained_betas")
    if trained is not None:
        return torch.tensor(list(trained), dtype=torch.float64)
    kind = cfg.get("beta_schedule", "scaled_linear")
    start, end = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    if kind == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, n_t, dtype=torch.float64) ** 2
    if kind == "linear":
        return torch.linspace(start, end, n_t, dtype=torch.float64)
    if kind == "squaredcos_cap_v2":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / n_t) / abar(i / n_t), 0.999) for i in range(n_t)],
                            dtype=torch.float64)
    raise ModelMismatchError("model", f"the scheduler's beta_schedule {kind!r} is not one of {BETA_SCHEDULES}",
                             "train with the SD1.5 scheduler config (scaled_linear)")


def build_step_fn(unet, adapter, settings, scheduler_config: Mapping[str, Any] | None = None,
                  device=None, detach_original: bool = True, precision=None):
    """The training step of :func:`p3s_core.train.train_adapter` on a diffusers UNet:
    ``step_fn(adapter, x0, context, clip_hidden, generator, mask=None, ref_latent=None,
    ref_clip_hidden=None) -> (L_LDM, L_ac)`` (``ref_*``: ``reference_pairing="other photo"``).

    Same draws and maths as the ComfyUI trainer (``comfyui_engine.training_step.build_step_fn``): ``t ~
    U{0..999}`` then ``noise ~ N(0, I)`` from the generator, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t)
    noise`` (ComfyUI's ``calculate_input(noise_scaling(...))`` in VP form), I'' from the encoder
    (Eq. 4-5), the UNet with the P3S processors at weight 1 (Eq. 6-8), L_LDM = (masked) MSE on eps
    (Eq. 14) and L_ac (Eq. 11-13) between the copy's level-0 cross-attention map and the original
    UNet's last cross-attention layer (``ac_layers='all'``: all 16, averaged). The forward runs in
    ``precision.autocast()`` (a :class:`~p3s_core.precision.TrainingPrecision`; none when None).
    Returns ``(step_fn, close)``."""
    from ..losses import attention_consistency_loss
    from ..train import masked_ldm_loss

    pred = getattr(unet.config, "prediction_type", None)
    if scheduler_config is not None and scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise ModelMismatchError("model", "the scheduler predicts "
                                 f"{scheduler_config.get('prediction_type')} (not epsilon)",
                                 "train on an eps-prediction SD1.5 model")
    del pred
    cfg = dict(scheduler_config or json.loads((CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text()))
    betas = training_betas(cfg)
    n_t = int(betas.shape[0])
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    unet_dtype = next(unet.parameters()).dtype
    precision = precision or TrainingPrecision()
    maps: dict[str, torch.Tensor] = {}
    copy_out: dict = {}
    feature_of = {e["key"]: feature_index(e) for e in adapter.layer_map}
    names = list(_ATTN2_KEYS) if settings.ac_layers == "all" else [LAST_CROSS_ATTENTION]
    copy_maps: dict[int, torch.Tensor] = {}

    def feature_hook(out):
        copy_out["attn"] = out.get(ATTN_MAP_KEY)

    inj = P3SDiffusersInjector(unet, adapter, None, None, strength=1.0,
                               feature_hook=feature_hook)
    inj.extra_processors = {n: CrossAttentionCapture(_ATTN2_KEYS[n], maps, detach_original)
                            for n in names}
    inj.install()
    closers = [inj.remove]
    if settings.ac_layers == "all":
        hooks = copy_attention_hooks(adapter, copy_maps)
        hooks.__enter__()
        closers.append(lambda: hooks.__exit__(None, None, None))
    bg = float(settings.mask_background_weight)

    def step_fn(adapter_, x0, context, clip_hidden, generator, mask=None, ref_latent=None,
                ref_clip_hidden=None):
        if adapter_ is not adapter:
            raise TrainingConfigError("adapter", "the step function was built for another adapter",
                                      "build the step function with the adapter being trained")
        t = torch.randint(0, n_t, (1,), generator=generator)
        noise = torch.randn(tuple(x0.shape), generator=generator).to(device)
        x0 = x0.to(device)
        a = alphas_cumprod[t].to(device)
        xt = (a.sqrt().float() * x0 + (1 - a).sqrt().float() * noise)
        maps.clear()
        copy_out.clear()
        copy_maps.clear()
        p = next(adapter.parameters())
        ref_lat, ref_hid = x0, clip_hidden  # the paper: the photo is its own reference I'
        if ref_latent is not None:  # reference_pairing "other photo", as the ComfyUI step
            from ..encoder import fit_reference

            ref_lat = fit_reference(ref_latent.to(device), tuple(x0.shape[-2:]))
            ref_hid = ref_clip_hidden if ref_clip_hidden is not None else clip_hidden
        inj.i2 = adapter.encode_reference(ref_lat.to(p.device, p.dtype), ref_hid.to(p.device, p.dtype))
        try:
            with precision.autocast():
                eps = unet(xt.to(unet_dtype), t.to(device),
                           encoder_hidden_states=context.to(device, unet_dtype), return_dict=False)[0]
        finally:
            inj.i2 = None
        l_ldm = masked_ldm_loss(noise, eps.float(), None if mask is None else mask.to(device), bg)
        if settings.ac_layers == "last":
            m_c, m_o = copy_out.get("attn"), maps.get("output_11")
            if m_c is None or m_o is None:
                raise ModelMismatchError("model", "the last cross-attention map was not captured",
                                         "train on a plain SD1.5 UNet")
            h, w = x0.shape[-2:]
            from ..injection import token_grid

            l_ac = attention_consistency_loss(m_c.float(), m_o.float(), hw_c=(h, w),
                                              hw_o=token_grid(m_o.shape[1], (h, w)))
        else:
            parts = [attention_consistency_loss(copy_maps[feature_of[k]].float(), m.float())
                     for k, m in maps.items() if feature_of.get(k) in copy_maps]
            if len(parts) != len(names):
                raise ModelMismatchError("model", f"only {len(parts)} of {len(names)} cross-"
                                         "attention maps were captured", "train on a plain SD1.5 UNet")
            l_ac = torch.stack(parts).mean()
        return l_ldm, l_ac

    def close():
        for c in reversed(closers):
            c()

    return step_fn, close


# --- generation --------------------------------------------------------------------------------------
