"""P3S Condition Injector node (paper Eq. 4-10): patch a MODEL with an adapter and a reference."""
from __future__ import annotations

from .common import ADAPTER, CATEGORY, SCHEDULE, check_choice, check_image_batch, check_int, check_number

APPLY_TO = ["cond and uncond", "cond only"]
REFERENCE_MODES = ["one reference", "average copy features"]  # = p3s_core.encoder.REFERENCE_MODES
LEVEL0_KEYS = ["all (exact)", "pooled 2x2 (faster)"]  # = p3s_core.comfyui_engine.LEVEL0_KEYS
COPY_PRECISIONS = ["same as the UNet", "fp32"]  # = p3s_core.comfyui_engine.COPY_PRECISIONS
CROSS_ATTENTION = ["as the adapter holds", "off"]  # = p3s_core.comfyui_engine.CROSS_ATTENTION


class P3SConditionInjector:
    DESCRIPTION = (
        "Patches the MODEL with a P3S adapter: each sampling step the adapter's trainable copy runs once "
        "on x_t plus the encoded reference (Eq. 4-6; by default the cleaned photo stored in the adapter, one "
        "reference per generation, fitted to the image's aspect ratio without stretching) and its features are added to all 16 self-attention "
        "layers of the original UNet (Eq. 7-8) and, for adapters trained with it, its cross-attention outputs to the matching cross-attention layers through zero convolutions (Fig. 3), weighted by the schedule (Eq. 9-10). Connect the patched "
        "MODEL to any sampler; ControlNet conditioning works beside it. The input MODEL is not changed. "
        "With a region MASK the subject is injected only there (outside it the model attends as the plain "
        "model): stack two injectors with two regions for two subjects in one image."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["subject", "personalize", "dreambooth", "subject driven", "inject subject", "apply subject", "reference"]  # the words users type in the node search
    FUNCTION = "inject"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with the subject injected (a patched clone).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 MODEL (any SD1.5 checkpoint or fine-tune)."}),
                "adapter": (ADAPTER, {"tooltip": "The P3S adapter: from P3S Adapter Loader or P3S Trainer. It carries the cleaned reference(s) it was trained on."}),
                "lam": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip": "lambda of Eq. 7: how much of the subject feature is added to the values (paper: 0.2)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01, "tooltip": "Overall weight. 0 = the plain model, bit for bit."}),
                "apply_to": (APPLY_TO, {"advanced": True, "default": "cond and uncond", "tooltip": "Which half of the CFG batch receives the subject. 'cond only' strengthens the subject through CFG."}),
            },
            "optional": {
                "schedule": (SCHEDULE, {"tooltip": "Weight over the steps (P3S Timestep Weight Scheduler). Without it: the paper's Eq. 10 curve."}),
                "reference": ("IMAGE", {"tooltip": "Optional: cleaned reference photo(s) I' (P3S RNGR Mask + Inpaint) to use instead of the ones stored in the adapter. Needs vae and clip_vision."}),
                "vae": ("VAE", {"tooltip": "Only with 'reference': the checkpoint's VAE, to encode it (I'_latent, Eq. 4)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "Only with 'reference': CLIP ViT-L/14 vision (clip-vit-large-patch14); its last hidden state is c_s of Eq. 5."}),
                "reference_index": ("INT", {"advanced": True, "default": 0, "min": 0, "max": 63, "tooltip": "Which reference feeds the copy (0 = the first). Training fed the copy one photo at a time; several references are never averaged into one latent."}),
                "reference_mode": (list(REFERENCE_MODES), {"advanced": True, "default": REFERENCE_MODES[0], "tooltip": "'one reference': the reference at reference_index. 'average copy features': the copy runs once per reference and its features are averaged (N times the copy's cost per step)."}),
                "region": ("MASK", {"tooltip": "Where in the image this subject goes (1 = inside). Tokens outside attend exactly as in the plain model; any size (stretched to the image). From P3S Region, Solid Mask, Mask Composite or Load Image's MASK. Not connected: everywhere; an all-zero mask: the plain model."}),
                "feather": ("FLOAT", {"advanced": True, "default": 0.0, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip": "Soft edge of the region, as a fraction of the mask's shorter side (0 = hard edge). Only used with a region."}),
                "level0_keys": (list(LEVEL0_KEYS), {"advanced": True, "default": LEVEL0_KEYS[0], "tooltip": "Speed/accuracy (not in the paper). 'all (exact)': Eq. 7 as written. 'pooled 2x2 (faster)': in the 5 highest-resolution self-attention layers the subject's extra keys are averaged over 2x2 tokens (a quarter as many), which removes three quarters of their extra attention cost (at 512 px about 1.22x a plain step instead of 1.33x on the benchmark CPU) and moves the result by about an eighth of P3S's own effect; not used beside HyperTile, ToMe or a second injector. The README gives the measurements."}),
                "copy_precision": (list(COPY_PRECISIONS), {"advanced": True, "default": COPY_PRECISIONS[0], "tooltip": "Advanced. The dtype the adapter's copy and encoder compute in. 'same as the UNet': the UNet's compute dtype (fp16 or bf16 on most GPUs, fp32 on a CPU), cast layer by layer as ComfyUI does for its own models. 'fp32': always fp32 (slower on GPUs; for comparison, or if half precision misbehaves). The README gives the measured difference."}),
                "cross_attention": (list(CROSS_ATTENTION), {"advanced": True, "default": CROSS_ATTENTION[0], "tooltip": "The cross-attention enhancement (paper Fig. 3): the copy's cross-attention outputs, through the adapter's zero convolutions and weighted by the schedule, are added to the matching cross-attention outputs of the model. 'as the adapter holds': on for adapters trained with 'self + cross attention (paper)', nothing for self-attention-only adapters (and files saved before it existed). 'off': the self-attention injection only."}),
            },
        }

    def inject(self, model, adapter, reference=None, vae=None, clip_vision=None, lam=0.2, strength=1.0,
               apply_to="cond and uncond", schedule=None, reference_index=0, reference_mode=REFERENCE_MODES[0],
               region=None, feather=0.0, level0_keys=LEVEL0_KEYS[0], copy_precision=COPY_PRECISIONS[0],
               cross_attention=CROSS_ATTENTION[0]):
        from ..p3s_core import comfyui_engine as engine
        from ..p3s_core.encoder import check_reference_index
        from ..p3s_core.errors import ImageInputError, ModelMismatchError, ScheduleError
        from ..p3s_core.schedule import P3SSchedule
        from .adapter_nodes import check_adapter

        # --- every input is checked before the VAE / CLIP run -----------------------------------
        engine.check_sd15(model)
        check_adapter(adapter, "adapter")
        if reference is not None:
            check_image_batch(reference, "reference")
            if vae is None:
                raise ModelMismatchError("vae", "a reference photo is connected but no VAE to encode it",
                                         "connect the checkpoint's VAE (or disconnect 'reference' to use the adapter's stored one)")
            if clip_vision is None:
                raise ModelMismatchError("clip_vision", "a reference photo is connected but no CLIP vision model",
                                         "connect a Load CLIP Vision node with clip-vit-large-patch14 (or disconnect 'reference')")
            engine.check_vae_sd15(vae)
            engine.check_clip_vit_l(clip_vision)
            count = int(reference.shape[0])
        else:
            stored = getattr(adapter, "reference", None)
            if stored is None:
                raise ImageInputError(
                    "reference", "this adapter file stores no reference (it was saved before adapters carried "
                    "their cleaned photos)", "connect the cleaned reference photo with vae and clip_vision, "
                    "or re-train the adapter with this version of the P3S Trainer")
            count = int(stored["latent"].shape[0])
        lam = check_number(lam, "lam", 0.0, 2.0, "use a lambda between 0 and 2 (paper: 0.2)")
        strength = check_number(strength, "strength", 0.0, 5.0, "use a strength between 0 and 5 (0 = the plain model)")
        check_choice(apply_to, "apply_to", APPLY_TO)
        check_choice(reference_mode, "reference_mode", list(REFERENCE_MODES))
        check_choice(level0_keys, "level0_keys", list(LEVEL0_KEYS))
        check_choice(copy_precision, "copy_precision", list(COPY_PRECISIONS))
        check_choice(cross_attention, "cross_attention", list(CROSS_ATTENTION))
        reference_index = check_int(reference_index, "reference_index", 0, 63,
                                    f"pick a reference index from 0 to {count - 1}")
        check_reference_index(reference_index, count)
        if schedule is not None and not isinstance(schedule, P3SSchedule):
            raise ScheduleError("schedule", f"expected P3S_SCHEDULE, got a {type(schedule).__name__}",
                                "connect the 'schedule' output of P3S Timestep Weight Scheduler (or leave it empty)")
        schedule = schedule if schedule is not None else P3SSchedule()
        feather = check_number(feather, "feather", 0.0, 0.5, "use a feather between 0 (hard edge) and 0.5")
        if region is not None:  # issue 16: checked (typed RegionError) before any encoding
            from ..p3s_core.region import Region

            region = Region.from_mask(region, feather)
        if reference is not None:
            latent, hidden = engine.encode_reference(model, vae, clip_vision, reference)
        else:
            latent, hidden = stored["latent"], stored["clip_hidden"]
        # I'' (Eq. 4-5) is encoded at each step, on the UNet's device in the copy's dtype
        patched, _ = engine.apply_injector(model, adapter, None, schedule, lam=lam, strength=strength,
                                            apply_to=apply_to, reference_index=int(reference_index),
                                            reference_mode=reference_mode, region=region,
                                            level0_keys=level0_keys, reference=(latent.detach(), hidden.detach()),
                                            copy_precision=copy_precision, cross_attention=cross_attention)
        return (patched,)
