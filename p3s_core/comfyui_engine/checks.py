"""The ComfyUI engine: refuse models P3S cannot use (SD1.5 UNet, its VAE, CLIP ViT-L/14, eps-prediction),
before any work, with errors that name the input and the fix."""
from __future__ import annotations

from ..errors import ModelMismatchError

CLIP_VIT_L = {"hidden": 1024, "patch": 14, "image_size": 224, "tokens": 257}


# --- model checks ------------------------------------------------------------------------------
def check_sd15(model, input_name: str = "model") -> None:
    """Refuse anything that is not an SD1.5-family UNet (320 channels, context 768, no ADM)."""
    cfg = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None)
    if cfg is None:
        raise ModelMismatchError(input_name, "this is not a ComfyUI MODEL with a UNet",
                                 "connect the MODEL output of a Load Checkpoint node with an SD1.5 checkpoint")
    ctx, ch, adm = cfg.get("context_dim"), cfg.get("model_channels"), cfg.get("adm_in_channels")
    if ctx != 768 or ch != 320 or adm is not None or cfg.get("use_linear_in_transformer"):
        family = {2048: "SDXL", 1024: "SD2.x", 4096: "a DiT (Flux/SD3)"}.get(ctx, "not SD1.5")
        if cfg.get("image_model"):
            family = f"a {cfg['image_model']} model"
        raise ModelMismatchError(
            input_name,
            f"the model is {family} (context_dim={ctx}, model_channels={ch}); P3S adapters are made for SD1.5",
            "load an SD1.5 checkpoint (or an SD1.5 fine-tune) and connect its MODEL here")
    in_ch = cfg.get("in_channels", 4)
    if in_ch != 4:
        # The copy runs on the UNet input x_t; an inpainting / instruct UNet gets x_t plus extra
        # channels there, which the 4-channel copy cannot take (it would fail mid-sampling).
        raise ModelMismatchError(
            input_name,
            f"the UNet takes {in_ch} input channels (an SD1.5 inpainting or instruct-pix2pix model); "
            "P3S adapters work on the 4-channel SD1.5 UNet",
            "connect the MODEL of a regular (non-inpainting) SD1.5 checkpoint")


def check_vae_sd15(vae, input_name: str = "vae") -> None:
    """Refuse a VAE whose latents are not SD1.5's 4-channel, 8x latents (e.g. an SD3/Flux VAE)."""
    if not (callable(getattr(vae, "encode", None)) and callable(getattr(vae, "decode", None))
            and getattr(vae, "first_stage_model", None) is not None):
        raise ModelMismatchError(input_name, f"this is not a usable ComfyUI VAE (got a {type(vae).__name__})",
                                 "connect the VAE output of the SD1.5 checkpoint's Load Checkpoint node")
    channels = getattr(vae, "latent_channels", 4)
    ratio = getattr(vae, "downscale_ratio", 8)
    if channels != 4 or ratio != 8:
        raise ModelMismatchError(
            input_name,
            f"the VAE makes {channels}-channel latents at 1/{ratio} scale; SD1.5 uses 4 channels at 1/8 "
            "(is it an SD3 / Flux / video VAE?)",
            "connect the VAE of the SD1.5 checkpoint (Load Checkpoint's VAE output)")


def check_clip_vit_l(clip_vision, input_name: str = "clip_vision") -> None:
    """Refuse CLIP vision models other than ViT-L/14 at 224 (the paper's encoder, Sec. IV-A)."""
    model = getattr(clip_vision, "model", None)
    emb = getattr(getattr(getattr(model, "vision_model", None), "embeddings", None), "patch_embedding", None)
    w = getattr(emb, "weight", None)
    size = getattr(clip_vision, "image_size", None)
    if w is None or tuple(w.shape[:1]) != (CLIP_VIT_L["hidden"],) or w.shape[-1] != CLIP_VIT_L["patch"] \
            or size != CLIP_VIT_L["image_size"]:
        found = "unknown" if w is None else f"width {w.shape[0]}, patch {w.shape[-1]}, image {size}"
        raise ModelMismatchError(
            input_name, f"the CLIP vision model is not OpenAI CLIP ViT-L/14 ({found})",
            "load clip-vit-large-patch14 (ViT-L/14, 224 px) with a Load CLIP Vision node")


def check_eps_prediction(model) -> None:
    """Refuse models that do not predict noise (v-prediction, EDM, flow): Eq. 14 compares eps."""
    import comfy.model_sampling as cms

    ms = model.get_model_object("model_sampling")
    if isinstance(ms, cms.V_PREDICTION) or not isinstance(ms, cms.EPS):
        raise ModelMismatchError(
            "model", f"the model's parameterisation is {type(ms).__name__} (not eps-prediction); "
            "the P3S Trainer implements the paper's noise-prediction loss (Eq. 14)",
            "train on an eps-prediction SD1.5 checkpoint (the standard SD1.5 and its fine-tunes)")
