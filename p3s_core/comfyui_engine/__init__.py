"""The ComfyUI engine: the only code that imports ComfyUI (lazily, inside functions, so importing the
pack costs little at start-up).

Modules: :mod:`.checks` (SD1.5 / VAE / CLIP ViT-L/14 / eps checks), :mod:`.reference` (the reference
photo's latent and CLIP patch tokens), :mod:`.adapter_loading` (the adapter beside the UNet in
ComfyUI's model management), :mod:`.injector` (the Condition Injector's patch, Eq. 6-10),
:mod:`.attention_route` (the kernel of the extended self-attention), :mod:`.region_patch` (regional
injection), :mod:`.training_inputs`, :mod:`.frozen_unet`, :mod:`.training_step` and
:mod:`.training` (the P3S Trainer, Eq. 11-15).

Every ComfyUI API this pack relies on, all present in 0.3.75 and 0.33 (look here when upstream changes):
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
- ``comfy.ops.manual_cast`` (``Linear``, ``Conv2d``, ``GroupNorm``, ``LayerNorm``: torch.nn
  subclasses with torch.nn's constructor arguments, no weight init, ``comfy_cast_weights``: weight
  and bias cast to the input's dtype and device per call) for the adapter's twin
  (:func:`.adapter_loading.comfy_twin`), whose parameters come from ``load_state_dict(assign=True)``;
  ``ModelPatcher.load(device, lowvram_model_memory=...)`` casting the layers that do not fit per call
  (``comfy_cast_weights`` set, weights left on the offload device);
- the DIFFUSION_MODEL wrapper's ``x`` in the UNet's compute dtype (``BaseModel._apply_model`` casts
  it to ``manual_cast_dtype`` or the weights' dtype): the copy's default compute dtype;
- ``VAE.encode``, ``model.model.process_latent_in``, ``CLIPVision.encode_image``;
- ``transformer_options["optimized_attention_override"]`` called as ``fn(func, q, k, v, heads,
  **kwargs)`` by ComfyUI's ``wrap_attn`` around every attention kernel (``func`` the kernel it
  picked, ``__name__`` ``attention_sub_quad`` for its CPU default), and
  ``comfy.ldm.modules.attention.attention_pytorch`` (its PyTorch SDPA kernel), used by
  :class:`.attention_route.ExtendedAttentionRoute`.

Regional injection (issue 16, math in ``region.py``) also relies on, in both versions:
- ``ModelPatcher.set_model_attn1_output_patch(fn)`` (a chained list) with ``fn(n, extra_options)``
  called right after self-attention, ``extra_options`` being the very dict the attn1 patches of the
  same ``BasicTransformerBlock.forward`` call received (so the attn1 patch can hand data to it);
- ``executor.class_obj`` of the DIFFUSION_MODEL wrapper being the ``UNetModel``, whose
  ``input_blocks[i]`` / ``middle_block`` / ``output_blocks[i]`` hold a ``SpatialTransformer`` with
  ``transformer_blocks[block_index].attn1`` (a ``CrossAttention``);

Training (:mod:`.training_inputs`, :mod:`.frozen_unet`, :mod:`.training_step`, :mod:`.training`) also relies on:
- ``comfy.model_management``: ``get_torch_device``, ``unet_offload_device``, ``unload_all_models``,
  ``throw_exception_if_processing_interrupted``, ``soft_empty_cache``, ``cast_to_device``,
  ``lora_compute_dtype`` (0.33 only; float32 otherwise);
- weight patches (:func:`.frozen_unet.patched_weight`): ``ModelPatcher.patches`` / ``.backup`` /
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
"""
from __future__ import annotations

from .adapter_loading import adapter_patcher, adapter_patcher_class, base_unet_state_dict, comfy_operations, comfy_twin
from .attention_route import ExtendedAttentionRoute, describe_patch
from .checks import CLIP_VIT_L, check_clip_vit_l, check_eps_prediction, check_sd15, check_vae_sd15
from .frozen_unet import (base_unet_copy_bytes, checkpointing_pays, enable_gradient_checkpointing, frozen_unet_copy,
                          frozen_unet_dtype, original_weight, patched_weight)
from .injector import APPLY_TO, COPY_PRECISIONS, CROSS_ATTENTION, KV_SLOTS, LEVEL0_KEYS, P3SInjectorPatch, apply_injector
from .reference import clip_patch_tokens, encode_reference, letterboxed_batch
from .training import loss_parts, new_training_adapter, plot_parts, run_training, stored_reference
from .training_inputs import cache_inputs, encode_prompt
from .training_step import LAST_CROSS_ATTENTION, PRECISIONS, OriginalAttentionCapture, StepContext, build_step_fn

__all__ = [
    "APPLY_TO", "CLIP_VIT_L", "COPY_PRECISIONS", "CROSS_ATTENTION", "KV_SLOTS", "LAST_CROSS_ATTENTION", "LEVEL0_KEYS", "PRECISIONS",
    "ExtendedAttentionRoute", "OriginalAttentionCapture", "P3SInjectorPatch", "StepContext",
    "adapter_patcher", "adapter_patcher_class", "apply_injector", "base_unet_copy_bytes", "base_unet_state_dict",
    "build_step_fn", "cache_inputs", "check_clip_vit_l", "check_eps_prediction", "check_sd15", "check_vae_sd15",
    "checkpointing_pays", "clip_patch_tokens", "comfy_operations", "comfy_twin", "describe_patch", "enable_gradient_checkpointing", "encode_prompt",
    "encode_reference", "frozen_unet_copy", "frozen_unet_dtype", "letterboxed_batch", "loss_parts",
    "new_training_adapter", "original_weight", "patched_weight", "plot_parts", "run_training", "stored_reference",
]
