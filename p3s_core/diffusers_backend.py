"""P3S on diffusers (paper Sec. III, Eq. 4-10 at sampling time, Eq. 11-15 in training).

The same adapter files and the same pure-torch modules as the ComfyUI nodes: the trainable copy
(:class:`~p3s_core.copy_unet.P3SCopyUNet`, Eq. 6) runs once per UNet call and its features join the
16 self-attention layers through :class:`P3SAttnProcessor` (Eq. 7-8, via
:func:`~p3s_core.injection.injected_context_value`), scaled by the Eq. 9-10 weight of
:class:`~p3s_core.schedule.P3SSchedule`. Options are those of the Condition Injector: ``strength``,
``lam``, ``apply_to`` (cond and uncond / cond only) and the schedule with its start/end window.

diffusers is imported lazily, inside functions: this module is never imported by ``nodes/`` (ComfyUI
users do not pay for diffusers at start-up). No hub access: every ``from_pretrained`` /
``from_single_file`` passes ``local_files_only=True``; single-file SD1.5 checkpoints use the small
diffusers configs shipped in ``p3s_core/configs/sd15`` (the CLIP tokenizer's vocabulary is the one
large file not shipped: it is taken from a diffusers folder, ``--tokenizer`` or ComfyUI's
``comfy/sd1_tokenizer``).

diffusers APIs used (0.30 .. 0.42): ``UNet2DConditionModel`` / ``ControlNetModel`` /
``StableDiffusionPipeline`` / ``StableDiffusionControlNetPipeline`` ``.from_pretrained`` and
``.from_single_file(config=...)``, ``unet.attn_processors`` / ``set_attn_processor``, the processor
call ``(attn, hidden_states, encoder_hidden_states, attention_mask, temb)`` and ``Attention``'s
``to_q/to_k/to_v/to_out/heads``, ``DDIMScheduler.from_config``.

Decisions:

* The copy's blocks stay the hand-written LDM blocks of ``copy_unet.py`` for both engines: the copy
  is engine-independent (it only takes ``x_t, t, c`` and returns features), the adapter files keep
  their LDM tensor names, and the nodes never need diffusers. Initialising a new adapter from a
  diffusers UNet maps the 13 copied sub-modules' names (:func:`ldm_state_from_diffusers`).
* The per-call features live on a :class:`P3SDiffusersInjector` (a forward pre-hook on the UNet
  computes them, a forward hook drops them), so the processors are stateless apart from their
  layer key.
* ``apply_to="cond only"``: diffusers' CFG batch is ``[uncond, cond]``; :func:`generate` tells the
  injector (``cfg_batch=True``). With ``cfg_batch=False`` every row is a cond row.
* Window: ComfyUI switches a step on when ``sigma_end <= sigma <= sigma_start`` with
  ``sigma_x = percent_to_sigma(x)``; sigma grows with the timestep, so the same test here is
  ``(1 - end) * 999 <= t <= (1 - start) * 999`` (both ends included).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from .copy_unet import ATTN_MAP_KEY, LAYER_MAP
from .errors import ModelMismatchError, P3SError, TrainingConfigError
from .injection import DEFAULT_LAMBDA, injected_context_value

log = logging.getLogger("P3S")

__all__ = [
    "CONFIG_DIR",
    "DIFFUSERS_LAYER_KEYS",
    "LAST_CROSS_ATTENTION",
    "ModelLoadError",
    "P3SAttnProcessor",
    "CrossAttentionCapture",
    "P3SDiffusersInjector",
    "load_unet",
    "load_pipeline",
    "find_tokenizer",
    "ldm_state_from_diffusers",
    "new_adapter_for_unet",
    "copy_config_for",
    "encode_reference",
    "build_step_fn",
    "generate",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"
APPLY_TO = ("cond and uncond", "cond only")


class ModelLoadError(P3SError):
    """A model path that cannot be loaded (missing, a pickle, not SD1.5, no tokenizer)."""


def _diffusers_layer_keys() -> dict[str, str]:
    """``{diffusers attn1 module name: P3S layer key}`` for the 16 SD1.5 self-attention layers."""
    out = {}
    for i, (blk, key_ids) in enumerate([(0, (1, 2)), (1, (4, 5)), (2, (7, 8))]):
        for j, k in enumerate(key_ids):
            out[f"down_blocks.{blk}.attentions.{j}.transformer_blocks.0.attn1"] = f"input_{k}"
    out["mid_block.attentions.0.transformer_blocks.0.attn1"] = "middle_0"
    for up, first in ((1, 3), (2, 6), (3, 9)):
        for j in range(3):
            out[f"up_blocks.{up}.attentions.{j}.transformer_blocks.0.attn1"] = f"output_{first + j}"
    return out


#: diffusers attn1 name -> P3S layer-map key (``input_1`` .. ``output_11``, ``middle_0``).
DIFFUSERS_LAYER_KEYS: dict[str, str] = _diffusers_layer_keys()
#: The original UNet's last cross-attention layer (``output_blocks.11`` in LDM names), for L_ac.
LAST_CROSS_ATTENTION = "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
_ATTN2_KEYS = {k.replace("attn1", "attn2"): v for k, v in DIFFUSERS_LAYER_KEYS.items()}
assert set(DIFFUSERS_LAYER_KEYS.values()) == {e["key"] for e in LAYER_MAP}


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
    """

    def __init__(self, unet, adapter, i2: torch.Tensor | None = None, schedule=None,
                 lam: float | None = None, strength: float = 1.0,
                 apply_to: str = "cond and uncond", num_train_timesteps: int = 1000,
                 cfg_batch: bool = False, feature_hook: Callable | None = None):
        if apply_to not in APPLY_TO:
            raise P3SError("apply_to", f"{apply_to!r} is not one of {APPLY_TO}",
                           "use 'cond and uncond' (default) or 'cond only'")
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
        from .schedule import timestep_to_t_over_T

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

    def copy_features(self, sample, timestep, context):
        """Eq. 6 once per UNet call: the copy on ``x_t + I''`` (I'' resized and batched)."""
        from .encoder import prepare_reference

        p = next(self.adapter.parameters())
        dev, dt = p.device, p.dtype
        ref = None
        if self.i2 is not None:
            ref = prepare_reference(self.i2.to(dev, dt), sample.shape[0], tuple(sample.shape[-2:]))
        ts = torch.as_tensor(timestep, device=dev).reshape(-1).to(dt)
        out = self.adapter.copy(sample.to(dev, dt), ts, context.to(dev, dt), ref,
                                return_attn_map=self.feature_hook is not None)
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
            elif mod in self.extra_processors:
                procs[name] = self.extra_processors[mod]
            else:
                procs[name] = proc
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


# --- checks and loading ---------------------------------------------------------------------------
def check_unet_sd15(unet, input_name: str = "unet") -> None:
    """Refuse a diffusers UNet that is not SD1.5-shaped (widths 320.., context 768, 4 channels)."""
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(unet, "set_attn_processor"):
        raise ModelMismatchError(input_name, f"this is not a diffusers UNet2DConditionModel "
                                 f"(got {type(unet).__name__})", "load an SD1.5 UNet with diffusers")
    ctx = cfg.get("cross_attention_dim") if hasattr(cfg, "get") else getattr(cfg, "cross_attention_dim")
    names = {n[: -len(".processor")] for n in unet.attn_processors}
    missing = [n for n in DIFFUSERS_LAYER_KEYS if n not in names]
    if missing or int(getattr(cfg, "in_channels", 4)) != 4 or getattr(cfg, "addition_embed_type", None):
        raise ModelMismatchError(
            input_name, f"the UNet is not SD1.5-shaped (context {ctx}, in_channels "
            f"{getattr(cfg, 'in_channels', '?')}, {len(missing)} of the 16 self-attention layers "
            "missing); P3S adapters are made for SD1.5", "load an SD1.5 model (or an SD1.5 fine-tune)")


def _check_model_path(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelLoadError("model", f"{p} does not exist",
                             "pass a local diffusers SD1.5 folder or a .safetensors checkpoint")
    if p.is_file() and p.suffix.lower() != ".safetensors":
        raise ModelLoadError("model", f"{p.name} is not a .safetensors file (pickled .ckpt/.bin "
                             "checkpoints are never loaded)", "convert it to .safetensors first")
    return p


def _subdir(p: Path, name: str) -> dict:
    return {"subfolder": name} if (p / name).is_dir() else {}


def load_unet(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """A diffusers SD1.5 UNet from a local diffusers folder (``unet/`` inside or the UNet folder
    itself) or a single-file LDM checkpoint (.safetensors, converted with the shipped config)."""
    from diffusers import UNet2DConditionModel

    p = _check_model_path(path)
    if p.is_dir():
        unet = UNet2DConditionModel.from_pretrained(str(p), local_files_only=True,
                                                    torch_dtype=dtype, **_subdir(p, "unet"))
    else:
        unet = UNet2DConditionModel.from_single_file(str(p), config=str(CONFIG_DIR),
                                                     subfolder="unet", local_files_only=True,
                                                     torch_dtype=dtype)
    unet = unet.to(device).eval().requires_grad_(False)
    check_unet_sd15(unet, "model")
    return unet


def find_tokenizer(explicit=None, model_dir: Path | None = None) -> Path:
    """The CLIP tokenizer folder (vocab.json + merges.txt): ``explicit``, the diffusers folder's
    ``tokenizer/``, ``$P3S_TOKENIZER``, or ComfyUI's ``comfy/sd1_tokenizer`` (``$P3S_COMFYUI``)."""
    cands = []
    if explicit:
        cands.append(Path(explicit))
    if model_dir is not None:
        cands.append(model_dir / "tokenizer")
    if os.environ.get("P3S_TOKENIZER"):
        cands.append(Path(os.environ["P3S_TOKENIZER"]))
    if os.environ.get("P3S_COMFYUI"):
        cands.append(Path(os.environ["P3S_COMFYUI"]) / "comfy" / "sd1_tokenizer")
    for c in cands:
        if (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
            return c
    if explicit:
        raise ModelLoadError("tokenizer", f"{explicit} has no vocab.json + merges.txt",
                             "point --tokenizer at a CLIP tokenizer folder (e.g. ComfyUI's "
                             "comfy/sd1_tokenizer or a diffusers SD1.5 folder's tokenizer/)")
    raise ModelLoadError("tokenizer", "no CLIP tokenizer found for the single-file checkpoint",
                         "pass --tokenizer DIR (a folder with vocab.json and merges.txt, e.g. "
                         "ComfyUI's comfy/sd1_tokenizer) or set P3S_TOKENIZER")


@contextlib.contextmanager
def _config_dir_with_tokenizer(tokenizer: Path):
    """The shipped SD1.5 config folder plus the tokenizer's vocabulary, in a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="p3s_sd15_cfg_"))
    try:
        shutil.copytree(CONFIG_DIR, tmp / "sd15")
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tokenizer / name, tmp / "sd15" / "tokenizer" / name)
        yield tmp / "sd15"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_pipeline(path, controlnet=None, tokenizer=None, dtype: torch.dtype = torch.float32,
                  device="cpu", scheduler: str = "ddim"):
    """A ``StableDiffusionPipeline`` (or ``StableDiffusionControlNetPipeline`` with ``controlnet``,
    a local folder or .safetensors) from local files only; the scheduler is DDIM by default."""
    import diffusers
    from diffusers import (ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                           StableDiffusionPipeline)

    p = _check_model_path(path)
    cn = None
    if controlnet is not None:
        cp = _check_model_path(controlnet)
        if cp.is_dir():
            cn = ControlNetModel.from_pretrained(str(cp), local_files_only=True, torch_dtype=dtype)
        else:
            cn = ControlNetModel.from_single_file(str(cp), config=str(CONFIG_DIR / "controlnet"),
                                                  local_files_only=True, torch_dtype=dtype)
    cls = StableDiffusionControlNetPipeline if cn is not None else StableDiffusionPipeline
    extra = {"controlnet": cn} if cn is not None else {}
    diffusers.utils.logging.disable_progress_bar()
    if p.is_dir():
        pipe = cls.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **extra)
    else:
        tok = find_tokenizer(tokenizer)
        with _config_dir_with_tokenizer(tok) as cfg:
            pipe = cls.from_single_file(str(p), config=str(cfg), local_files_only=True,
                                        torch_dtype=dtype, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False,
                                        **extra)
    diffusers.utils.logging.enable_progress_bar()
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    check_unet_sd15(pipe.unet, "model")
    pipe.unet.requires_grad_(False)
    return pipe.to(device)


# --- adapter init from a diffusers UNet ------------------------------------------------------------
_RES = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
        "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
_LDM_TO_DIFFUSERS = [
    ("time_embed.0.", "time_embedding.linear_1.", None),
    ("time_embed.2.", "time_embedding.linear_2.", None),
    ("input_blocks.0.0.", "conv_in.", None),
    ("input_blocks.1.0.", "down_blocks.0.resnets.0.", _RES),
    ("input_blocks.1.1.", "down_blocks.0.attentions.0.", None),
    ("input_blocks.3.0.op.", "down_blocks.0.downsamplers.0.conv.", None),
    ("input_blocks.4.0.", "down_blocks.1.resnets.0.", _RES),
    ("input_blocks.4.1.", "down_blocks.1.attentions.0.", None),
    ("input_blocks.6.0.op.", "down_blocks.1.downsamplers.0.conv.", None),
    ("input_blocks.7.0.", "down_blocks.2.resnets.0.", _RES),
    ("input_blocks.7.1.", "down_blocks.2.attentions.0.", None),
    ("input_blocks.9.0.op.", "down_blocks.2.downsamplers.0.conv.", None),
    ("middle_block.0.", "mid_block.resnets.0.", _RES),
    ("middle_block.1.", "mid_block.attentions.0.", None),
]


def _ldm_to_diffusers_key(ldm_key: str) -> str:
    for lp, dp, sub in _LDM_TO_DIFFUSERS:
        if ldm_key.startswith(lp):
            rest = ldm_key[len(lp):]
            if sub:
                for a, b in sub.items():
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
            return dp + rest
    raise KeyError(ldm_key)


def ldm_state_from_diffusers(unet_state: Mapping[str, torch.Tensor], config=None) -> dict:
    """The LDM-named base-UNet tensors the copy is initialised from (ControlNet-style), taken from a
    diffusers UNet state dict; a missing key raises :class:`ModelMismatchError`."""
    from .copy_unet import CopyUNetConfig, P3SCopyUNet, ldm_key_map

    with torch.device("meta"):
        copy = P3SCopyUNet(config or CopyUNetConfig.sd15())
    out, missing = {}, []
    for lk in ldm_key_map(copy).values():
        dk = _ldm_to_diffusers_key(lk)
        if dk not in unet_state:
            missing.append(dk)
        else:
            out[lk] = unet_state[dk]
    if missing:
        raise ModelMismatchError("unet", f"the diffusers UNet lacks {len(missing)} tensors the P3S "
                                 f"copy needs, e.g. {', '.join(missing[:3])}",
                                 "load an SD1.5 UNet (or an SD1.5 fine-tune)")
    return out


def copy_config_for(unet):
    """The :class:`~p3s_core.copy_unet.CopyUNetConfig` matching a diffusers UNet's widths (SD1.5:
    ``CopyUNetConfig.sd15()``; tiny test UNets: their own widths)."""
    from .copy_unet import CopyUNetConfig

    c = unet.config
    b = list(c.block_out_channels)
    heads = c.attention_head_dim if isinstance(c.attention_head_dim, int) else c.attention_head_dim[0]
    return CopyUNetConfig(in_channels=int(c.in_channels), model_channels=int(b[0]),
                          channel_mult=tuple(int(x // b[0]) for x in b[:3]),
                          context_dim=int(c.cross_attention_dim), num_heads=int(heads),
                          time_embed_dim=4 * int(b[0]), groups=int(c.norm_num_groups))


def new_adapter_for_unet(unet, seed: int = 0, config=None, **kwargs):
    """A fresh adapter whose copy is initialised from a diffusers UNet (same as the nodes' init
    from the LDM weights; the same base gives the same ``base_unet_hash``)."""
    from .adapter import new_adapter

    sd = {k: v.detach().to("cpu", torch.float32)
          for k, v in ldm_state_from_diffusers(unet.state_dict(), config).items()}
    return new_adapter(config, sd, seed=seed, **kwargs)


# --- reference encoding ------------------------------------------------------------------------------
def encode_reference(vae, clip_vision, images: torch.Tensor, adapter=None):
    """(I' latent [N,4,h,w] scaled like the UNet's latents, CLIP ViT-L/14 last hidden states
    [N,257,1024]) of RGB images [N,H,W,3] in [0, 1]; with ``adapter`` returns I'' (Eq. 4-5) instead.
    ``clip_vision`` is a transformers ``CLIPVisionModel(WithProjection)``; images are letterboxed to
    224 (never cropped) and normalised with OpenAI CLIP's mean/std."""
    from .rngr import letterbox

    dev = next(vae.parameters()).device
    x = images[..., :3].permute(0, 3, 1, 2).to(dev, vae.dtype) * 2 - 1
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean * float(vae.config.scaling_factor)
        sq = []
        for i in range(images.shape[0]):
            s, _ = letterbox(images[i, :, :, :3].float().cpu().numpy(), size=224)
            sq.append(torch.from_numpy(s))
        pix = torch.stack(sq).permute(0, 3, 1, 2)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        cdev = next(clip_vision.parameters()).device
        hidden = clip_vision(pixel_values=((pix - mean) / std).to(cdev, clip_vision.dtype)
                             ).last_hidden_state.float().cpu()
    lat = lat.float().cpu()
    if adapter is None:
        return lat, hidden
    p = next(adapter.parameters())
    with torch.no_grad():
        return adapter.encode_reference(lat.to(p.device, p.dtype), hidden.to(p.device, p.dtype))


# --- training step ---------------------------------------------------------------------------------
def build_step_fn(unet, adapter, settings, scheduler_config: Mapping[str, Any] | None = None,
                  device=None, detach_original: bool = True):
    """The training step of :func:`p3s_core.train.train_adapter` on a diffusers UNet:
    ``step_fn(adapter, x0, context, clip_hidden, generator, mask=None) -> (L_LDM, L_ac)``.

    Same draws and maths as the ComfyUI trainer (``comfy_backend_train.build_step_fn``): ``t ~
    U{0..999}`` then ``noise ~ N(0, I)`` from the generator, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t)
    noise`` (ComfyUI's ``calculate_input(noise_scaling(...))`` in VP form), I'' from the encoder
    (Eq. 4-5), the UNet with the P3S processors at weight 1 (Eq. 6-8), L_LDM = (masked) MSE on eps
    (Eq. 14) and L_ac (Eq. 11-13) between the copy's level-0 cross-attention map and the original
    UNet's last cross-attention layer (``ac_layers='all'``: all 16, averaged). Returns
    ``(step_fn, close)``."""
    from .losses import attention_consistency_loss
    from .train import masked_ldm_loss

    pred = getattr(unet.config, "prediction_type", None)
    if scheduler_config is not None and scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise ModelMismatchError("model", "the scheduler predicts "
                                 f"{scheduler_config.get('prediction_type')} (not epsilon)",
                                 "train on an eps-prediction SD1.5 model")
    del pred
    cfg = dict(scheduler_config or json.loads((CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text()))
    n_t = int(cfg.get("num_train_timesteps", 1000))
    betas = torch.linspace(float(cfg.get("beta_start", 0.00085)) ** 0.5,
                           float(cfg.get("beta_end", 0.012)) ** 0.5, n_t, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    unet_dtype = next(unet.parameters()).dtype
    maps: dict[str, torch.Tensor] = {}
    copy_out: dict = {}
    level_of = {e["key"]: e["level"] for e in LAYER_MAP}
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
        from .comfy_backend_train import copy_attention_hooks  # pure torch at call time

        hooks = copy_attention_hooks(adapter, copy_maps)
        hooks.__enter__()
        closers.append(lambda: hooks.__exit__(None, None, None))
    bg = float(settings.mask_background_weight)

    def step_fn(adapter_, x0, context, clip_hidden, generator, mask=None):
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
        inj.i2 = adapter.encode_reference(x0.to(p.device, p.dtype), clip_hidden.to(p.device, p.dtype))
        try:
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
            from .comfy_backend import token_grid

            l_ac = attention_consistency_loss(m_c.float(), m_o.float(), hw_c=(h, w),
                                              hw_o=token_grid(m_o.shape[1], (h, w)))
        else:
            parts = [attention_consistency_loss(copy_maps[level_of[k]].float(), m.float())
                     for k, m in maps.items() if level_of.get(k) in copy_maps]
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
def generate(pipe, adapter, i2, prompts, negative_prompt: str = "", steps: int = 50,
             guidance_scale: float = 7.5, schedule=None, lam: float | None = None,
             strength: float = 1.0, apply_to: str = "cond and uncond", seed: int = 0,
             height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
             control_image=None, progress: bool = True):
    """Images (a list of PIL images per prompt) from ``pipe`` with P3S (DDIM 50, CFG 7.5 by
    default). One ``torch.Generator`` seeded with ``seed + prompt index`` per prompt."""
    pipe.set_progress_bar_config(disable=not progress)
    n_t = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    out = []
    with P3SDiffusersInjector(pipe.unet, adapter, i2, schedule, lam=lam, strength=strength,
                              apply_to=apply_to, num_train_timesteps=n_t,
                              cfg_batch=guidance_scale > 1.0):
        for i, prompt in enumerate(prompts):
            g = torch.Generator().manual_seed(int(seed) + i)
            kw = dict(prompt=prompt, negative_prompt=negative_prompt or None,
                      num_inference_steps=int(steps), guidance_scale=float(guidance_scale),
                      height=int(height), width=int(width),
                      num_images_per_prompt=int(num_images_per_prompt), generator=g)
            if control_image is not None:
                kw["image"] = control_image
            out.append(pipe(**kw).images)
    return out
