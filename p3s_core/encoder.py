"""RNGR encoder (paper Sec. III-A, Eq. 4-5): the cleaned reference latent attends to CLIP image tokens.

    I'' = I' + Softmax(Q K^T / sqrt(d)) V,   Q = W_Q Z(I'),  K = W_K c_s,  V = W_V c_s     (4)-(5)

``I'`` is the VAE latent of the inpainted reference (Eq. 3) and ``c_s`` the last hidden state of the
CLIP image encoder (ViT-L/14: [N, 257, 1024], class token included). ``I''`` is added to the noisy
latent ``x_t`` as the input of the trainable copy (Eq. 6).

Decisions where the paper is vague:

* Single head; every latent pixel is one query token (h*w queries of ``latent_channels`` values).
* ``Z`` is a 1x1 conv latent->latent with weight and bias initialised to zero (as the paper says),
  ``W_Q``/``W_K``/``W_V`` are bias-free linear maps with PyTorch's default init.
  ``d = inner_dim`` (64 by default) is the query/key width.
* ``W_V`` maps ``clip_dim -> latent_channels`` so that the attention output has the latent's
  channels and can be added to ``I'`` pixel by pixel.
* Consequence of the zero-initialised ``Z``: at initialisation ``Q = 0``, the softmax is uniform and
  ``I'' = I' + mean_s(W_V c_s)`` (one constant vector per image); the query path learns from there.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ImageInputError
from .operations import check_operations

__all__ = ["RNGREncoder", "prepare_reference", "fit_reference", "fitted_size", "aspects_differ",
           "check_reference_index", "REFERENCE_MODES"]


class RNGREncoder(nn.Module):
    """Eq. 4-5: ``forward(ref_latent [N,C,h,w], clip_hidden [N,S,clip_dim]) -> I'' [N,C,h,w]``.

    Submodules (tensor names in the adapter file): ``zero_conv`` (Z), ``to_q`` (W_Q),
    ``to_k`` (W_K), ``to_v`` (W_V). ``operations``: the layer family (:mod:`.operations`; None =
    ``torch.nn``).
    """

    def __init__(self, latent_channels: int = 4, clip_dim: int = 1024, inner_dim: int = 64, operations=None):
        super().__init__()
        ops = check_operations(operations)
        self.latent_channels = int(latent_channels)
        self.clip_dim = int(clip_dim)
        self.inner_dim = int(inner_dim)
        self.zero_conv = ops.Conv2d(self.latent_channels, self.latent_channels, kernel_size=1)
        nn.init.zeros_(self.zero_conv.weight)
        nn.init.zeros_(self.zero_conv.bias)
        self.to_q = ops.Linear(self.latent_channels, self.inner_dim, bias=False)
        self.to_k = ops.Linear(self.clip_dim, self.inner_dim, bias=False)
        self.to_v = ops.Linear(self.clip_dim, self.latent_channels, bias=False)

    def config(self) -> dict:
        """JSON-serialisable constructor arguments."""
        return {"latent_channels": self.latent_channels, "clip_dim": self.clip_dim,
                "inner_dim": self.inner_dim}

    def forward(self, ref_latent: torch.Tensor, clip_hidden: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """Return ``I'' = I' + softmax(W_Q Z(I') (W_K c_s)^T / sqrt(d)) W_V c_s`` (Eq. 4-5).

        ``clip_hidden`` may have batch 1 (one set of CLIP tokens shared by all latents). ``dtype``:
        the compute dtype (None = the weights'; another one needs a casting layer family); the
        result has ``ref_latent``'s dtype.
        """
        if ref_latent.ndim != 4 or ref_latent.shape[1] != self.latent_channels:
            raise ImageInputError(
                "reference latent", f"expected [N, {self.latent_channels}, h, w], got "
                f"{tuple(ref_latent.shape)}", "encode the reference image with the SD1.5 VAE")
        if clip_hidden.ndim != 3 or clip_hidden.shape[-1] != self.clip_dim:
            raise ImageInputError(
                "clip_vision_output", f"expected CLIP image hidden states [N, tokens, "
                f"{self.clip_dim}], got {tuple(clip_hidden.shape)}",
                "use the CLIP ViT-L/14 vision model (last_hidden_state, 1024 wide)")
        n, c, h, w = ref_latent.shape
        if clip_hidden.shape[0] not in (1, n):
            raise ImageInputError(
                "clip_vision_output", f"{clip_hidden.shape[0]} CLIP encodings for {n} reference "
                "latents", "encode the same reference images with CLIP vision and the VAE")
        dtype = dtype or self.to_k.weight.dtype
        clip_hidden = clip_hidden.to(dtype=dtype).expand(n, -1, -1)
        z = self.zero_conv(ref_latent.to(dtype))
        q = self.to_q(z.flatten(2).transpose(1, 2))              # [N, h*w, d]
        k = self.to_k(clip_hidden)                               # [N, S, d]
        v = self.to_v(clip_hidden)                               # [N, S, C]
        attn = torch.softmax((q @ k.transpose(1, 2)).float() / math.sqrt(self.inner_dim), dim=-1).to(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(n, c, h, w)
        return ref_latent + out.to(ref_latent.dtype)


#: How a batch of references feeds the copy at sampling (see :func:`prepare_reference`).
REFERENCE_MODES = ("one reference", "average copy features")


def fitted_size(ref_hw: Sequence[int], size: Sequence[int]) -> tuple[int, int]:
    """(h, w) of a reference grid ``ref_hw`` scaled uniformly so that it covers ``size``."""
    rh, rw = int(ref_hw[0]), int(ref_hw[1])
    h, w = int(size[0]), int(size[1])
    scale = max(h / rh, w / rw)
    return max(h, int(round(rh * scale))), max(w, int(round(rw * scale)))


def aspects_differ(ref_hw: Sequence[int], size: Sequence[int], tolerance: float = 0.02) -> bool:
    """True when the reference grid's aspect ratio differs from ``size``'s by more than ``tolerance``."""
    ra = float(ref_hw[1]) / float(ref_hw[0])
    ga = float(size[1]) / float(size[0])
    return abs(math.log(ra / ga)) > math.log1p(tolerance)


def fit_reference(i2: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Fit ``I''`` [N,C,h',w'] to the latent grid ``size = (h, w)`` without distortion.

    Decision (the copy is pixel-aligned with ``x_t``, Eq. 6): the reference is scaled by one factor
    (bilinear, ``align_corners=False``) until it covers the grid (its short side relative to the
    grid decides, as the Trainer's "short side = resolution"), then the overflow of the other side
    is cut evenly from both ends (centre crop). Never stretched; same aspect: a plain resize.
    """
    if i2.ndim != 4 or i2.shape[0] < 1:
        raise ImageInputError("reference", f"expected [N, C, h, w] with N >= 1, got "
                              f"{tuple(i2.shape)}", "pass at least one encoded reference image")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ImageInputError("latent", f"invalid size {(h, w)}", "sample with a non-empty latent")
    if tuple(i2.shape[-2:]) == (h, w):
        return i2
    fh, fw = fitted_size(i2.shape[-2:], (h, w))
    if (fh, fw) != tuple(i2.shape[-2:]):
        i2 = F.interpolate(i2, size=(fh, fw), mode="bilinear", align_corners=False)
    top, left = (fh - h) // 2, (fw - w) // 2
    return i2[:, :, top:top + h, left:left + w]


def check_reference_index(index: int, count: int, input_name: str = "reference_index") -> int:
    """``index`` as an int in ``[0, count)``, else :class:`ImageInputError` naming ``input_name``."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ImageInputError(input_name, f"{index!r} is not a reference of the {count} given "
                              f"(0..{count - 1})", f"pick a reference index from 0 to {count - 1}")
    return index


def prepare_reference(i2: torch.Tensor, batch: int, size: Sequence[int], index: int = 0) -> torch.Tensor:
    """The input of Eq. 6 from ``I''`` [N,C,h',w']: reference ``index`` fitted to ``x_t``'s grid
    ``size = (h, w)`` (:func:`fit_reference`, no stretching) and repeated for the ``batch``.

    Decision: one reference per generation (a training step feeds the copy one photo, the target or
    another photo, so it has never seen an average of several unaligned photos); several references are *not* averaged in
    latent space. To use several at once, run the copy once per reference and average its
    features (the Condition Injector's "average copy features" mode).
    """
    if i2.ndim != 4 or i2.shape[0] < 1:
        raise ImageInputError("reference", f"expected [N, C, h, w] with N >= 1, got "
                              f"{tuple(i2.shape)}", "pass at least one encoded reference image")
    h, w = int(size[0]), int(size[1])
    if batch < 1 or h < 1 or w < 1:
        raise ImageInputError("latent", f"invalid batch {batch} / size {(h, w)}",
                              "sample with a non-empty latent batch")
    index = check_reference_index(index, int(i2.shape[0]))
    one = fit_reference(i2[index:index + 1], (h, w))
    return one.expand(batch, -1, -1, -1).contiguous()
