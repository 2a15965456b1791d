"""The ComfyUI engine: the reference photo as P3S reads it (Eq. 4-5 inputs): the VAE latent and the
CLIP ViT-L/14 patch tokens of the letterboxed (never cropped) image."""
from __future__ import annotations

import torch

from .checks import CLIP_VIT_L


# --- reference encoding ------------------------------------------------------------------------
def clip_patch_tokens(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """CLIP ViT-L/14 last hidden states [N, 257, 1024] of already-square 224x224 IMAGE tensors."""
    import comfy.model_management as mm

    out = clip_vision.encode_image(images, crop=False)
    return out["last_hidden_state"].to(mm.intermediate_device()).float()


def letterboxed_batch(images: torch.Tensor):
    """Letterbox each image to a 224 square (no crop, Eq. 1 must see the whole image)."""
    from ..letterbox import letterbox

    squares, boxes = [], []
    for i in range(images.shape[0]):
        sq, box = letterbox(images[i, :, :, :3].float().cpu().numpy(), size=CLIP_VIT_L["image_size"])
        squares.append(torch.from_numpy(sq))
        boxes.append(box)
    return torch.stack(squares), boxes


def encode_reference(model, vae, clip_vision, images: torch.Tensor):
    """(I'_latent in the model's latent space [N,4,h,w], CLIP last hidden state [N,257,1024])."""
    rgb = images[..., :3]  # the nodes have checked the batch (nodes/common.py check_image_batch)
    latent = vae.encode(rgb)
    latent = model.model.process_latent_in(latent).float()
    squares, _ = letterboxed_batch(rgb)
    hidden = clip_patch_tokens(clip_vision, squares)
    return latent, hidden
