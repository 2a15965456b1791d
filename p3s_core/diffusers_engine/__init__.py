"""The diffusers engine: P3S on diffusers (paper Sec. III, Eq. 4-10 at sampling time, Eq. 11-15 in training).

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

Modules: :mod:`.layers` (SD1.5's attention layers in diffusers names, the shape check),
:mod:`.attention` (processors, the injector), :mod:`.loading` (local files
only, LDM <-> diffusers names), :mod:`.pipeline` (reference encoding, :func:`generate`),
:mod:`.training` (the training step). This package is the only code that imports diffusers.
"""
from __future__ import annotations

from .attention import APPLY_TO, COPY_PRECISIONS, CrossAttentionCapture, P3SAttnProcessor, P3SDiffusersInjector
from .layers import DIFFUSERS_LAYER_KEYS, LAST_CROSS_ATTENTION, check_unet_sd15
from .loading import (CONFIG_DIR, ModelLoadError, copy_config_for, find_tokenizer, ldm_state_from_diffusers,
                      load_pipeline, load_unet, new_adapter_for_unet)
from .pipeline import encode_reference, generate
from .training import build_step_fn

__all__ = [
    "APPLY_TO", "CONFIG_DIR", "COPY_PRECISIONS", "DIFFUSERS_LAYER_KEYS", "LAST_CROSS_ATTENTION", "ModelLoadError",
    "P3SAttnProcessor", "CrossAttentionCapture", "P3SDiffusersInjector", "check_unet_sd15", "load_unet",
    "load_pipeline", "find_tokenizer", "ldm_state_from_diffusers", "new_adapter_for_unet", "copy_config_for",
    "encode_reference", "build_step_fn", "generate",
]
