"""The diffusers engine: attention processors (Eq. 7-8), the copy run per UNet call (Eq. 6), the
Eq. 9-10 weight, and DIFFUSERS_LAYER_KEYS."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import ModelMismatchError, P3SError
from ..copy_unet import cross_key
from ..injection import DEFAULT_LAMBDA, enhanced_cross_output, injected_context_value
from .layers import _ATTN2_KEYS, DIFFUSERS_LAYER_KEYS, check_unet_sd15

APPLY_TO = ("cond and uncond", "cond only")
#: The cross-attention enhancement (issue 22), as the Condition Injector's ``cross_attention``.
CROSS_ATTENTION = ("as the adapter holds", "off")
#: The copy's compute dtype, as the Condition Injector's ``copy_precision``: the UNet's dtype (default)
#: or fp32; "fp16" / "bf16" force one (e.g. to measure them beside an fp32 UNet).
COPY_PRECISIONS = ("same as the UNet", "fp32")
_FORCED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- attention processors ------------------------------------------------------------------------
def _sdpa_out(attn, query_in, key_in, value_in, residual, probs: bool = False):
    """Projections, multi-head attention and output projection of a diffusers ``Attention``.
    With ``probs`` the softmax is explicit and its head average [B, Nq, Nk] is returned too."""
    b = query_in.shape[0]
    q, k, v = attn.to_q(query_in), attn.to_k(key_in), attn.to_v(value_in)
    d = k.shape[-1] // attn.heads

    def split(t):
        return t.view(b, -1, attn.heads, d).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    m = None
    if probs:
        p = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)
        out = p.to(v.dtype) @ v
        m = p.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    out = out / attn.rescale_output_factor
    return out, m


def _check_plain(attn) -> None:
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None \
            or attn.norm_k is not None:
        raise ModelMismatchError("unet", "an attention layer has extra norms (not an SD1.5 UNet)",
                                 "load an SD1.5 UNet (or an SD1.5 fine-tune)")


class P3SAttnProcessor:
    """Eq. 7-8 on one diffusers self-attention layer: ``softmax(W_Q z (W_K [z, f])^T / sqrt d)
    W_V [z + lam f, f]`` with ``f`` scaled by the step's Eq. 9-10 weight. Without features for this
    call (weight 0, outside the window, no injector running) it is the plain attention."""

    def __init__(self, injector: "P3SDiffusersInjector", key: str, base):
        self.injector, self.key, self.base = injector, key, base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        bank = self.injector.bank
        f = None if bank is None or encoder_hidden_states is not None else bank["features"].get(self.key)
        if f is None or hidden_states.ndim != 3 or attention_mask is not None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                             *args, **kwargs)
        _check_plain(attn)
        z = hidden_states
        if f.shape[0] != z.shape[0]:
            raise ModelMismatchError("unet", f"the UNet batch changed inside self-attention "
                                     f"({f.shape[0]} -> {z.shape[0]} rows)",
                                     "run P3S on a plain SD1.5 UNet")
        context, value = injected_context_value(z, f, bank["weight"], bank["lam"], bank["active"])
        if context is z and value is z:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                             *args, **kwargs)
        out, _ = _sdpa_out(attn, z, context, value, z)
        return out


class P3SCrossProcessor:
    """The cross-attention enhancement on one diffusers cross-attention (attn2) layer (Fig. 3,
    :func:`~p3s_core.injection.enhanced_cross_output`): the wrapped processor's output (the plain
    one, or training's :class:`CrossAttentionCapture`) plus eps_t times the copy's cross feature."""

    def __init__(self, injector: "P3SDiffusersInjector", key: str, base):
        self.injector, self.key, self.base = injector, key, base

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.base(attn, hidden_states, *args, **kwargs)
        bank = self.injector.bank
        g = None if bank is None else bank["features"].get(cross_key(self.key))
        if g is None or out.ndim != 3:
            return out
        if g.shape[0] != out.shape[0]:
            raise ModelMismatchError("unet", f"the UNet batch changed inside cross-attention "
                                     f"({g.shape[0]} -> {out.shape[0]} rows)", "run P3S on a plain SD1.5 UNet")
        return enhanced_cross_output(out, g, bank["weight"], bank["active"])


class CrossAttentionCapture:
    """Processor for the original UNet's cross-attention layers during training: the attention with
    an explicit softmax (Eq. 13), storing the head-averaged map [B, h*w, tokens] under its key."""

    def __init__(self, key: str, sink: dict, detach: bool = True):
        self.key, self.sink, self.detach = key, sink, detach

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        _check_plain(attn)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out, m = _sdpa_out(attn, hidden_states, ctx, ctx, hidden_states, probs=True)
        self.sink[self.key] = m.detach() if self.detach else m
        return out


# --- the injector --------------------------------------------------------------------------------
def _unet_call_inputs(args, kwargs):
    sample = args[0] if len(args) > 0 else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    ehs = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
    return sample, timestep, ehs


class P3SDiffusersInjector:
    """Installs P3S on a diffusers SD1.5 UNet (the Condition Injector of the nodes, for diffusers).

    ``with P3SDiffusersInjector(unet, adapter, i2, schedule, ...):`` every UNet call runs the copy
    once on ``x_t + I''`` (Eq. 6; ``i2`` = I'' from :func:`encode_reference`, None = no reference)
    and injects its 16 features (Eq. 7-8) with weight ``schedule(t) * strength`` (Eq. 9-10; no
    schedule = ``strength``). ``lam`` defaults to the adapter's. ``feature_hook(out)`` sees the
    copy's output (training reads the attention map there).

    ``copy_precision`` (:data:`COPY_PRECISIONS`): without a ``feature_hook`` the copy (and I'' when
    given in another dtype) computes in the UNet's dtype by default, or in fp32, on the sample's
    device: it runs as the adapter's :class:`~p3s_core.operations.CastOps` twin (same parameters,
    weights cast per layer), so an fp32 adapter beside an fp16 UNet computes in fp16 with no second
    copy of its weights. With a ``feature_hook`` (training) the adapter's own layers run on its
    parameters' device and dtype.
    """

    def __init__(self, unet, adapter, i2: torch.Tensor | None = None, schedule=None,
                 lam: float | None = None, strength: float = 1.0,
                 apply_to: str = "cond and uncond", num_train_timesteps: int = 1000,
                 cfg_batch: bool = False, feature_hook: Callable | None = None,
                 reference_index: int = 0, reference_mode: str = "one reference",
                 copy_precision: str = COPY_PRECISIONS[0], cross_attention: str = CROSS_ATTENTION[0]):
        from ..encoder import REFERENCE_MODES, check_reference_index

        if cross_attention not in CROSS_ATTENTION:
            raise P3SError("cross_attention", f"{cross_attention!r} is not one of {CROSS_ATTENTION}",
                           "use 'as the adapter holds' (default) or 'off'")
        if reference_mode not in REFERENCE_MODES:
            raise P3SError("reference_mode", f"{reference_mode!r} is not one of {REFERENCE_MODES}",
                           "use 'one reference' (default) or 'average copy features'")
        if i2 is not None:
            check_reference_index(reference_index, int(i2.shape[0]))
        if apply_to not in APPLY_TO:
            raise P3SError("apply_to", f"{apply_to!r} is not one of {APPLY_TO}",
                           "use 'cond and uncond' (default) or 'cond only'")
        if copy_precision not in COPY_PRECISIONS and copy_precision not in _FORCED_DTYPES:
            raise P3SError("copy_precision", f"{copy_precision!r} is not one of {COPY_PRECISIONS}",
                           "use 'same as the UNet' (default) or 'fp32'")
        if not (isinstance(strength, (int, float)) and math.isfinite(float(strength))
                and float(strength) >= 0):
            raise P3SError("strength", f"{strength!r} is not a finite number >= 0",
                           "use 1.0 (the paper) or 0 to switch P3S off")
        lam = getattr(adapter, "lam", DEFAULT_LAMBDA) if lam is None else lam
        if not math.isfinite(float(lam)):
            raise P3SError("lambda", f"{lam!r} is not finite", "use 0.2 (paper)")
        check_unet_sd15(unet)
        self.unet, self.adapter, self.i2, self.schedule = unet, adapter, i2, schedule
        self.lam, self.strength, self.apply_to = float(lam), float(strength), apply_to
        self.num_timesteps = int(num_train_timesteps)
        self.cfg_batch = cfg_batch
        self.feature_hook = feature_hook
        self.reference_index, self.reference_mode = int(reference_index), reference_mode
        self.copy_precision = copy_precision
        #: issue 22: the cross-attention enhancement runs (the adapter has it and it is not off)
        self.cross = cross_attention == CROSS_ATTENTION[0] and getattr(adapter, "enhancement", "self") == "cross"
        self._twin = None
        self.bank: dict | None = None
        self._saved = None
        self._handles: list = []
        self.extra_processors: dict[str, Any] = {}

    # weight of one call ----------------------------------------------------------------------
    def step_weight(self, timestep: float) -> float:
        """Eq. 9-10 weight times strength; 0 outside the schedule's start/end window."""
        if self.strength == 0.0:
            return 0.0
        if self.schedule is None:
            return self.strength
        from ..schedule import timestep_to_t_over_T

        top = self.num_timesteps - 1
        t = min(max(float(timestep), 0.0), float(top))
        t_start = (1.0 - float(self.schedule.start_percent)) * top
        t_end = (1.0 - float(self.schedule.end_percent)) * top
        if not (t_end - 1e-6 <= t <= t_start + 1e-6):
            return 0.0
        return float(self.schedule.curve(timestep_to_t_over_T(t, self.num_timesteps))) * self.strength

    def _active(self, batch: int):
        if self.apply_to == "cond and uncond" or not self.cfg_batch:
            return None
        half = batch // 2
        return torch.tensor([False] * half + [True] * (batch - half))

    def compute_dtype(self, sample_dtype: torch.dtype) -> torch.dtype:
        """The copy's dtype (see :data:`COPY_PRECISIONS`): the UNet's unless fp32 (or a forced one)."""
        if self.copy_precision in _FORCED_DTYPES:
            return _FORCED_DTYPES[self.copy_precision]
        dt = getattr(self.unet, "dtype", None) or sample_dtype
        return dt if dt in (torch.float16, torch.bfloat16, torch.float32) else torch.float32

    def copy_features(self, sample, timestep, context):
        """Eq. 6 once per UNet call: the copy on ``x_t + I''``, I'' fitted to x_t's grid without
        stretching. As the Condition Injector: ``reference_mode`` "one reference" uses reference
        ``reference_index``; "average copy features" runs the copy once per reference and averages."""
        from ..encoder import prepare_reference
        from ..operations import CastOps

        if self.feature_hook is None:  # inference: the CastOps twin, in the compute dtype
            if self._twin is None:
                self._twin = self.adapter.with_operations(CastOps)
            net, dev, dt, t_dt = self._twin, sample.device, self.compute_dtype(sample.dtype), torch.float32
        else:  # training: the adapter's own layers, device and dtype
            p = next(self.adapter.parameters())
            net, dev, dt = self.adapter, p.device, p.dtype
            t_dt = dt
        ts = torch.as_tensor(timestep, device=dev).reshape(-1).to(t_dt)
        xs, cs = sample.to(dev, dt), context.to(dev, dt)
        want_map = self.feature_hook is not None
        if self.i2 is None:
            out = net.copy(xs, ts, cs, None, return_attn_map=want_map, dtype=dt, cross=self.cross)
        else:
            i2 = self.i2.to(dev, dt)
            indices = [self.reference_index] if self.reference_mode == "one reference" else range(int(i2.shape[0]))
            outs = [net.copy(xs, ts, cs, prepare_reference(i2, sample.shape[0], tuple(sample.shape[-2:]), index=k),
                             return_attn_map=want_map, dtype=dt, cross=self.cross) for k in indices]
            out = outs[0] if len(outs) == 1 else {key: sum(o[key] for o in outs) / len(outs) for key in outs[0]}
        if self.feature_hook is not None:
            self.feature_hook(out)
        return out

    def _pre(self, module, args, kwargs):
        sample, timestep, ehs = _unet_call_inputs(args, kwargs)
        t = float(torch.as_tensor(timestep).float().max())
        weight = self.step_weight(t)
        self.bank = None
        if weight == 0.0:
            return None
        active = self._active(sample.shape[0])
        feats = self.copy_features(sample, timestep, ehs)
        self.bank = {"features": feats, "weight": weight, "lam": self.lam, "active": active}
        return None

    def _post(self, module, args, kwargs, output):
        self.bank = None
        return None

    # install / remove --------------------------------------------------------------------------
    def install(self) -> "P3SDiffusersInjector":
        if self._saved is not None:
            return self
        saved = dict(self.unet.attn_processors)
        procs = {}
        for name, proc in saved.items():
            mod = name[: -len(".processor")]
            if mod in DIFFUSERS_LAYER_KEYS:
                procs[name] = P3SAttnProcessor(self, DIFFUSERS_LAYER_KEYS[mod], proc)
            else:
                procs[name] = self.extra_processors.get(mod, proc)
            if self.cross and mod in _ATTN2_KEYS:
                procs[name] = P3SCrossProcessor(self, _ATTN2_KEYS[mod], procs[name])
        self.unet.set_attn_processor(procs)
        self._saved = saved
        self._handles = [self.unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.unet.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None
        self.bank = None

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()
