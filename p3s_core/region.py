"""Regional injection: Eq. 7-8 for the query tokens inside a region, the plain self-attention outside.

Two selected subjects in one image: each P3S injector gets a region (a mask). For a query token
``i`` with region weight ``w_i`` (the share of the token's footprint that lies in the mask)

    out_i = w_i * A_inj(z)_i + (1 - w_i) * A(z)_i

where ``A(z) = softmax(W_Q z (W_K z)^T / sqrt d) W_V z`` is the plain self-attention and
``A_inj`` is Eq. 7-8 (``K' = W_K [z, f]``, ``V' = W_V [z + lam f, f]``, ``f`` scaled by Eq. 9's
``eps_t``). ``w_i = 0`` gives the plain model's attention output, ``w_i = 1`` the P3S one; a hard
mask only has edge tokens in between, ``feather`` widens that soft band on purpose.

Why this form (and not a key mask): a region is per *query*, but ComfyUI's attn1 patch can change
only the keys/values every query shares. A bias of -inf on the ``f`` keys for outside queries would
still not give the plain model there, because Eq. 7 also changes the values of the ``z`` tokens
(``z + lam f``): an exact key mask would need ``K = [z, f, z]`` (three times the keys) and an
attention-mask hook, which ComfyUI offers only as the single ``optimized_attention_override`` slot
(owned by attention-backend nodes, and reshaped in 0.33). So the model computes its own plain
attention for every query, untouched (outside tokens are the plain model's output bit for bit), and
the pack computes ``A_inj`` for the inside queries only, with the layer's own attention module (its
projections, LoRA-patched weights and attention function), and writes it over those tokens after
the attention (the ``attn1_output_patch``). Cost per layer: ``N^2 + 2 a N^2`` attention
(``a`` = the region's share of the tokens) against ``2 N^2`` for the unmasked injector, plus the
K/V projections of ``[z, f]``.

Stacked injectors: each writes its own region in chain order, so disjoint regions each get only
their own subject; where regions overlap, the later injector's result replaces (soft: blends over)
the earlier one's. An unmasked injector chained *before* a regional one acts everywhere (its
``f`` is part of the keys the regional one extends); chain regional injectors after unmasked ones.

This module is pure torch (the ComfyUI plumbing is in ``comfyui_engine/region_patch.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ImageInputError

__all__ = ["RegionError", "Region", "check_region_mask", "feather_mask", "token_weights", "blend_tokens",
           "MAX_FEATHER"]

#: The largest ``feather`` (a fraction of the mask's shorter side).
MAX_FEATHER = 0.5


class RegionError(ImageInputError):
    """A region MASK of the wrong kind (an IMAGE, a batch of masks, values outside 0..1, NaN, ...)."""


def check_region_mask(mask, input_name: str = "region") -> torch.Tensor:
    """A ComfyUI MASK ``[1, H, W]`` (or ``[H, W]``) of finite values in 0..1 -> float32 ``[H, W]`` (CPU).

    Refuses, with the fix: IMAGEs (``[B, H, W, C]``), batches of several masks (one region per
    injector), empty tensors, non-finite values and values outside 0..1 (a mask that is really a
    depth map or a latent). A bool mask is taken as 0/1.
    """
    if not isinstance(mask, torch.Tensor):
        raise RegionError(input_name, f"expected a MASK (a tensor [1,H,W]), got a {type(mask).__name__}",
                          "connect a MASK output (P3S Region, Solid Mask, Mask Composite, or Load Image's MASK)")
    shape = tuple(mask.shape)
    if mask.ndim == 4:
        raise RegionError(input_name, f"this is an IMAGE-shaped tensor {shape}, not a MASK [1,H,W]",
                          "convert it with the core node 'Convert Image to Mask' (or use Load Image's MASK output)")
    if mask.ndim not in (2, 3) or mask.numel() == 0:
        raise RegionError(input_name, f"expected a MASK [1,H,W], got shape {shape}",
                          "connect a MASK output (P3S Region, Solid Mask, Mask Composite, or Load Image's MASK)")
    if mask.ndim == 3 and shape[0] != 1:
        raise RegionError(input_name, f"the MASK is a batch of {shape[0]} masks; one region per injector is needed",
                          "pick one mask (e.g. with the core node 'MaskComposite' or an image-batch selector), "
                          "or use one P3S Condition Injector per region")
    m = mask.reshape(shape[-2], shape[-1])
    if m.dtype == torch.bool:
        m = m.float()
    if not m.is_floating_point():
        raise RegionError(input_name, f"the MASK has dtype {m.dtype}; masks are floats in 0..1",
                          "connect a standard MASK output or convert the values to float 0..1")
    m = m.detach().float().cpu()
    if not bool(torch.isfinite(m).all()):
        raise RegionError(input_name, "the MASK contains NaN or infinite values",
                          "check the node that produced it")
    lo, hi = float(m.min()), float(m.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise RegionError(input_name, f"the MASK values span {lo:g}..{hi:g}, outside 0..1",
                          "connect a MASK (0 = outside the region, 1 = inside), not an image channel or a depth map")
    return m.clamp(0.0, 1.0).contiguous()


def feather_mask(mask: torch.Tensor, feather: float) -> torch.Tensor:
    """Soften the region's edge: a Gaussian blur with sigma = ``feather`` x the mask's shorter side / 3,
    truncated at 3 sigma (so pixels farther than ``feather`` x shorter side from the region stay exactly
    0 and their tokens exactly the plain model). ``feather = 0`` returns ``mask`` itself."""
    f = float(feather)
    if not math.isfinite(f) or f < 0 or f > MAX_FEATHER:
        raise RegionError("feather", f"{feather!r} is outside [0, {MAX_FEATHER:g}]",
                          "use a feather between 0 (hard edge) and 0.5 (a fraction of the mask's shorter side)")
    if f == 0.0:
        return mask
    h, w = mask.shape
    sigma = f * min(h, w) / 3.0
    radius = int(math.ceil(3 * sigma))
    if radius < 1:
        return mask
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).float()
    img = mask[None, None]
    # separable; the frame's edge pixels continue outwards (a region touching the border stays 1 there)
    pad = torch.nn.functional.pad
    img = torch.nn.functional.conv2d(pad(img, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    img = torch.nn.functional.conv2d(pad(img, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    out = img[0, 0]
    out = torch.where(out < 1e-6, torch.zeros_like(out), out)  # float dust: far outside stays exactly 0
    out = torch.where(out > 1 - 1e-6, torch.ones_like(out), out)  # and far inside exactly 1
    return out.clamp(0.0, 1.0)


def token_weights(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-token region weight ``w`` (flattened row-major like the UNet's tokens, ``[h*w]``): the mean of
    the mask over each token's footprint (area resampling; the mask is stretched to the latent's
    aspect, as ComfyUI's own masks are). Tokens wholly outside get exactly 0, wholly inside exactly 1."""
    h, w = int(grid[0]), int(grid[1])
    m = torch.nn.functional.adaptive_avg_pool2d(mask[None, None].float(), (h, w))[0, 0]
    return m.clamp(0.0, 1.0).flatten()


def blend_tokens(plain: torch.Tensor, injected: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """``plain`` [B, N, C] with its tokens ``index`` (in the batch rows ``rows``, None = all) replaced by
    ``w * injected + (1 - w) * plain`` (``injected`` [b, K, C], ``weight`` [K]); ``w = 1`` copies the
    injected value exactly. Returns a new tensor; ``plain`` is not changed."""
    out = plain.clone()
    sel = out[:, index] if rows is None else out[rows][:, index]
    w = weight.to(device=out.device, dtype=out.dtype).view(1, -1, 1)
    mixed = torch.where(w >= 1, injected.to(out.dtype), torch.lerp(sel, injected.to(out.dtype), w))
    if rows is None:
        out[:, index] = mixed
    else:
        r = rows.nonzero().flatten()
        out[r.view(-1, 1), index.view(1, -1)] = mixed
    return out


@dataclass
class Region:
    """One injector's region: the checked, feathered mask ``[H, W]`` (CPU float32) and its per-grid
    token weights (derived constants, cached per grid/device/dtype; no per-run state)."""
    mask: torch.Tensor
    feather: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_mask(cls, mask, feather: float = 0.0, input_name: str = "region") -> "Region":
        m = check_region_mask(mask, input_name)
        return cls(mask=feather_mask(m, feather), feather=float(feather))

    @property
    def empty(self) -> bool:
        """True when no token of any grid can be inside (the injector is then the plain model)."""
        return not bool((self.mask > 0).any())

    def weights(self, grid, device=None, dtype=torch.float32) -> torch.Tensor:
        key = (tuple(grid), str(device), dtype)
        w = self._cache.get(key)
        if w is None:
            w = token_weights(self.mask, grid).to(device=device, dtype=dtype)
            self._cache[key] = w
        return w


#: Shapes the P3S Region node makes.
SHAPES = ("left half", "right half", "top half", "bottom half", "box", "everything")


def make_region(shape: str, width: int, height: int, box=(0.25, 0.25, 0.75, 0.75), invert: bool = False) -> torch.Tensor:
    """A hard region MASK ``[1, height, width]``: one half of the frame, a box given as fractions
    ``(left, top, right, bottom)`` of the width/height, or everything; ``invert`` swaps in and out."""
    if shape not in SHAPES:
        raise RegionError("shape", f"{shape!r} is not one of the shapes", f"use one of: {', '.join(SHAPES)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if shape == "box":
        for lo, hi, name in ((x0, x1, "right"), (y0, y1, "bottom")):
            if not 0.0 <= lo < hi <= 1.0:
                raise RegionError(name, f"the box ({x0:g}, {y0:g}) - ({x1:g}, {y1:g}) is empty or outside the frame",
                                  "use 0 <= left < right <= 1 and 0 <= top < bottom <= 1 (fractions of the width / height)")
    x0, y0, x1, y1 = {"left half": (0, 0, 0.5, 1), "right half": (0.5, 0, 1, 1), "top half": (0, 0, 1, 0.5),
                      "bottom half": (0, 0.5, 1, 1), "everything": (0, 0, 1, 1)}.get(shape, (x0, y0, x1, y1))
    m = torch.zeros(1, int(height), int(width))
    m[:, round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = 1.0
    return 1.0 - m if invert else m


