"""P3S Condition Injector node (paper Eq. 4-10): patch a MODEL with an adapter and a reference."""
from __future__ import annotations

from .common import ADAPTER, CATEGORY, SCHEDULE, check_choice, check_image_batch, check_number

APPLY_TO = ["cond and uncond", "cond only"]


class P3SConditionInjector:
    DESCRIPTION = (
        "Patches the MODEL with a P3S adapter: each sampling step the adapter's trainable copy runs once "
        "on x_t plus the encoded reference (Eq. 4-6) and its features are added to all 16 self-attention "
        "layers of the original UNet (Eq. 7-8), weighted by the schedule (Eq. 9-10). Connect the patched "
        "MODEL to any sampler; ControlNet conditioning works beside it. The input MODEL is not changed. "
        "With a region MASK the subject is injected only there (outside it the model attends as the plain "
        "model): stack two injectors with two regions for two subjects in one image."
    )
    CATEGORY = CATEGORY
    FUNCTION = "inject"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with the subject injected (a patched clone).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 MODEL (any SD1.5 checkpoint or fine-tune)."}),
                "adapter": (ADAPTER, {"tooltip": "The P3S adapter: from P3S Adapter Loader or P3S Trainer."}),
                "reference": ("IMAGE", {"tooltip": "The cleaned reference photo(s) I' (P3S RNGR Mask + Inpaint). Several images are averaged."}),
                "vae": ("VAE", {"tooltip": "The VAE of the checkpoint, to encode the reference (I'_latent, Eq. 4)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14 vision (clip-vit-large-patch14): its last hidden state is c_s of Eq. 5."}),
                "lam": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip": "lambda of Eq. 7: how much of the subject feature is added to the values (paper: 0.2)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01, "tooltip": "Overall weight. 0 = the plain model, bit for bit."}),
                "apply_to": (APPLY_TO, {"default": "cond and uncond", "tooltip": "Which half of the CFG batch receives the subject. 'cond only' strengthens the subject through CFG."}),
            },
            "optional": {
                "schedule": (SCHEDULE, {"tooltip": "Weight over the steps (P3S Timestep Weight Scheduler). Without it: the paper's Eq. 10 curve."}),
                "region": ("MASK", {"tooltip": "Where in the image this subject goes (1 = inside). Tokens outside attend exactly as in the plain model; any size (stretched to the image). From P3S Region, Solid Mask, Mask Composite or Load Image's MASK. Not connected: everywhere; an all-zero mask: the plain model."}),
                "feather": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip": "Soft edge of the region, as a fraction of the mask's shorter side (0 = hard edge). Only used with a region."}),
            },
        }

    def inject(self, model, adapter, reference, vae, clip_vision, lam, strength, apply_to, schedule=None,
               region=None, feather=0.0):
        import torch

        from ..p3s_core import comfy_backend as backend
        from ..p3s_core.errors import ScheduleError
        from ..p3s_core.schedule import P3SSchedule
        from .adapter_nodes import check_adapter

        # --- every input is checked before the VAE / CLIP run -----------------------------------
        backend.check_sd15(model)
        check_adapter(adapter, "adapter")
        check_image_batch(reference, "reference")
        backend.check_vae_sd15(vae)
        backend.check_clip_vit_l(clip_vision)
        lam = check_number(lam, "lam", 0.0, 2.0, "use a lambda between 0 and 2 (paper: 0.2)")
        strength = check_number(strength, "strength", 0.0, 5.0, "use a strength between 0 and 5 (0 = the plain model)")
        check_choice(apply_to, "apply_to", APPLY_TO)
        if schedule is not None and not isinstance(schedule, P3SSchedule):
            raise ScheduleError("schedule", f"expected P3S_SCHEDULE, got a {type(schedule).__name__}",
                                "connect the 'schedule' output of P3S Timestep Weight Scheduler (or leave it empty)")
        schedule = schedule if schedule is not None else P3SSchedule()
        feather = check_number(feather, "feather", 0.0, 0.5, "use a feather between 0 (hard edge) and 0.5")
        if region is not None:  # issue 16: checked (typed RegionError) before any encoding
            from ..p3s_core.region import Region

            region = Region.from_mask(region, feather)
        latent, hidden = backend.encode_reference(model, vae, clip_vision, reference)
        p = next(adapter.parameters())
        with torch.no_grad():
            i2 = adapter.encode_reference(latent.to(p.device, p.dtype), hidden.to(p.device, p.dtype))
        patched, _ = backend.apply_injector(model, adapter, i2, schedule, lam=lam, strength=strength,
                                            apply_to=apply_to, region=region)
        return (patched,)
