"""The ComfyUI engine: what P3S training reads once (frozen encoders): resized photos, their VAE
latents and CLIP hidden states, the prompt's encodings and the masks."""
from __future__ import annotations

import math

import torch

from ..errors import ImageInputError
from ..train import TrainBatch, resized_size


# --- inputs ------------------------------------------------------------------------------------------
def _resize_image(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[1,H,W,C] IMAGE -> [1,h,w,C] (ComfyUI's common_upscale, bilinear, no crop)."""
    import comfy.utils

    if tuple(image.shape[1:3]) == (h, w):
        return image
    x = image.movedim(-1, 1)
    x = comfy.utils.common_upscale(x, w, h, "bilinear", "disabled")
    return x.movedim(1, -1).clamp(0, 1)


def encode_prompt(clip, prompt: str) -> torch.Tensor:
    """The CLIPTextEncode conditioning tensor [1, 77*k, 768] of ``prompt``."""
    tokens = clip.tokenize(prompt)
    cond, _pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond


def cache_inputs(model, clip, vae, clip_vision, images: torch.Tensor, prompt: str,
                 masks: torch.Tensor | None = None, resolution: int = 512) -> list[TrainBatch]:
    """Encode everything training needs once (frozen encoders): one :class:`TrainBatch` per image.

    Per image: resized so the short side is ``resolution`` (:func:`resized_size`), the VAE latent
    after ``process_latent_in`` and the CLIP ViT-L/14 last hidden state
    (:func:`.reference.encode_reference`), the prompt's and the empty prompt's text
    encodings, and the subject mask (one mask for all images or one per image) at latent size.
    Tensors are made outside inference mode, on the CPU (intermediate device), in float32.
    """
    import comfy.model_management as mm

    from .reference import encode_reference

    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise ImageInputError("images", "no training images", "connect 3-5 photos of the subject")
    cpu = mm.intermediate_device()
    raw = []
    with torch.no_grad():  # the encoders are frozen; ComfyUI's own mode (inference) is kept here
        context = encode_prompt(clip, prompt)
        uncond = encode_prompt(clip, "")
        for i in range(images.shape[0]):
            img = images[i:i + 1, :, :, :3].float()
            h, w = resized_size(int(img.shape[1]), int(img.shape[2]), int(resolution))
            latent, hidden = encode_reference(model, vae, clip_vision, _resize_image(img, h, w))
            mask = None
            if masks is not None:
                m = masks[i if masks.shape[0] > 1 else 0].float().reshape(1, 1, *masks.shape[-2:])
                mask = torch.nn.functional.interpolate(m.to(cpu), size=tuple(latent.shape[-2:]),
                                                       mode="area").clamp(0, 1)
            raw.append((latent, hidden, mask))
    with torch.inference_mode(False):  # normal tensors: autograd may save them
        def normal(t):
            return None if t is None else t.to(cpu, torch.float32).clone()

        context, uncond = normal(context), normal(uncond)
        if uncond.shape[1] != context.shape[1]:  # long prompts: repeat the empty one like CFG does
            reps = math.ceil(context.shape[1] / uncond.shape[1])
            uncond = uncond.repeat(1, reps, 1)[:, :context.shape[1]].clone()
        batches = [TrainBatch(latent=normal(lat), context=context, uncond=uncond,
                              clip_hidden=normal(hid), mask=normal(m)) for lat, hid, m in raw]
    return batches
