"""The diffusers engine: the reference encoding (Eq. 4-5 inputs) and sampling with the adapter
injected (:func:`generate`)."""
from __future__ import annotations

import torch

from .attention import P3SDiffusersInjector


def encode_reference(vae, clip_vision, images: torch.Tensor, adapter=None):
    """(I' latent [N,4,h,w] scaled like the UNet's latents, CLIP ViT-L/14 last hidden states
    [N,257,1024]) of RGB images [N,H,W,3] in [0, 1]; with ``adapter`` returns I'' (Eq. 4-5) instead.
    ``clip_vision`` is a transformers ``CLIPVisionModel(WithProjection)``; images are letterboxed to
    224 (never cropped) and normalised with OpenAI CLIP's mean/std."""
    from ..letterbox import letterbox

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

def generate(pipe, adapter, i2, prompts, negative_prompt: str = "", steps: int = 50,
             guidance_scale: float = 7.5, schedule=None, lam: float | None = None,
             strength: float = 1.0, apply_to: str = "cond and uncond", seed: int = 0,
             height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
             control_image=None, progress: bool = True, reference_index: int = 0,
             reference_mode: str = "one reference", copy_precision: str = "same as the UNet"):
    """Images (a list of PIL images per prompt) from ``pipe`` with P3S (DDIM 50, CFG 7.5 by
    default). One ``torch.Generator`` seeded with ``seed + prompt index`` per prompt. ``i2``: the
    references' I'' [N, 4, h, w]; ``reference_index`` / ``reference_mode`` as on the Condition Injector;
    ``copy_precision``: see :class:`P3SDiffusersInjector`."""
    pipe.set_progress_bar_config(disable=not progress)
    n_t = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    out = []
    with P3SDiffusersInjector(pipe.unet, adapter, i2, schedule, lam=lam, strength=strength,
                              apply_to=apply_to, num_train_timesteps=n_t,
                              cfg_batch=guidance_scale > 1.0, reference_index=reference_index,
                              reference_mode=reference_mode, copy_precision=copy_precision):
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
