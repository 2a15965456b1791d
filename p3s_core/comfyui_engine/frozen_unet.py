"""The ComfyUI engine: the frozen, differentiable base UNet of training, built from the MODEL as the
user's graph patched it (never a deep copy), and gradient checkpointing."""
from __future__ import annotations

import functools

import torch

from ..errors import ModelMismatchError


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


def base_unet_copy_bytes(model) -> int:
    """Bytes the frozen UNet copy takes (its parameters and buffers in their dtypes)."""
    dm = model.model.diffusion_model
    return sum(t.numel() * t.element_size() for t in list(dm.parameters()) + list(dm.buffers()))
