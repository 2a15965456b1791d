"""Eq. 3 of the paper (Sec. III-A): inpaint the distractor's region with content that is not the
subject. Fills: biharmonic (scikit-image), blur, flat, none."""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import transform
from skimage.restoration import inpaint_biharmonic

from .errors import ImageInputError, RNGRSettingsError
from .letterbox import _check_image, _to_numpy

INPAINT_MODES = ("biharmonic", "blur", "flat", "none")


# ============================================================================ Eq. 3
def _downscale_known(image: np.ndarray, known: np.ndarray, work_size: int
                     ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Image and known-pixel weight at a reduced size (long side <= ``work_size``), averaging
    only known pixels (normalised), so masked content never leaks into the low-res image."""
    h, w = known.shape
    s = min(1.0, work_size / max(h, w))
    hw = (max(1, int(round(h * s))), max(1, int(round(w * s))))
    k = known.astype(np.float64)
    if hw == (h, w):
        return image.astype(np.float64) * k[..., None], k, hw
    num = transform.resize(image.astype(np.float64) * k[..., None], hw + (image.shape[2],), order=1,
                           anti_aliasing=True, preserve_range=True)
    den = transform.resize(k, hw, order=1, anti_aliasing=True, preserve_range=True)
    return num, den, hw


def _upscale(fill: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if fill.shape[:2] == hw:
        return fill
    return transform.resize(fill, hw + (fill.shape[2],), order=1, preserve_range=True)


def _mean_colour(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    if not known.any():
        return np.full((image.shape[2],), 0.5)
    return image[known].astype(np.float64).mean(axis=0)


def _blur_fill(image: np.ndarray, known: np.ndarray, work_size: int) -> np.ndarray:
    """Normalised convolution: ``G * (I * K) / G * K`` with K the known pixels, at low resolution,
    with a Gaussian of 1/16 of the long side; where even that sees no known pixel, wider Gaussians,
    then the mean colour of the known pixels."""
    num, den, hw = _downscale_known(image, known, work_size)
    base = max(hw) / 16.0
    fill = np.empty(num.shape, dtype=np.float64)
    todo = np.ones(hw, dtype=bool)
    for sigma in (base, 4 * base, 16 * base):
        n = ndimage.gaussian_filter(num, sigma=(sigma, sigma, 0), mode="nearest")
        d = ndimage.gaussian_filter(den, sigma=sigma, mode="nearest")
        ok = todo & (d > 1e-3)
        fill[ok] = n[ok] / d[ok, None]
        todo &= ~ok
        if not todo.any():
            break
    if todo.any():
        fill[todo] = _mean_colour(image, known)
    return _upscale(fill, known.shape)


def _biharmonic_fill(image: np.ndarray, mask: np.ndarray, known: np.ndarray,
                     work_size: int) -> np.ndarray:
    """``skimage.restoration.inpaint_biharmonic`` at a long side <= ``work_size`` (it solves a
    sparse system over the masked pixels and gets slow for big masks), upscaled and pasted back.
    A low-res pixel that any masked pixel touches is treated as unknown."""
    if not known.any():
        return np.broadcast_to(_mean_colour(image, known), image.shape).copy()
    num, den, hw = _downscale_known(image, known, work_size)
    small_mask = den < 0.999
    small = num / np.maximum(den, 1e-6)[..., None]
    small[small_mask] = 0.0
    if small_mask.all():
        return np.broadcast_to(_mean_colour(image, known), image.shape).copy()
    filled = inpaint_biharmonic(small, small_mask, channel_axis=-1)
    return _upscale(np.asarray(filled, dtype=np.float64), mask.shape)


def inpaint(image: np.ndarray, mask: np.ndarray, mode: str = "biharmonic",
            work_size: int = 256) -> np.ndarray:
    """Eq. 3: ``I' = inpainting(I, Mask)`` - fill the masked region (the distractor).

    The paper: "the masked area can be filled with any content as long as it is not similar to the
    target subject". Modes:

    * ``"biharmonic"``: ``skimage.restoration.inpaint_biharmonic`` (smooth continuation of the
      surroundings), computed at a long side <= ``work_size`` for speed and pasted back;
    * ``"blur"``: a heavily blurred version of the surroundings (normalised convolution of the
      non-masked pixels only, so the old content does not show through);
    * ``"flat"``: the mean colour of the non-masked pixels (grey 0.5 if everything is masked);
    * ``"none"``: the image unchanged (use the MASK output with a real inpainting model).

    Pixels outside the mask are returned bit-exact; the result has the input's dtype and shape.
    """
    if mode not in INPAINT_MODES:
        raise RNGRSettingsError("inpaint_mode", f"unknown inpaint mode {mode!r}",
                                f"use one of {', '.join(INPAINT_MODES)}")
    if not isinstance(work_size, int) or work_size < 8:
        raise RNGRSettingsError("work_size", f"work_size must be an integer >= 8, got {work_size!r}",
                                "use 256")
    img = _check_image(image)
    m = _to_numpy(mask, "mask")
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != img.shape[:2]:
        raise ImageInputError("mask", f"mask shape {tuple(m.shape)} does not match the image's "
                              f"{img.shape[0]}x{img.shape[1]}", "pass a mask of the image's size")
    m = m.astype(bool) if m.dtype == bool else (np.nan_to_num(m.astype(np.float64)) > 0.5)
    out = img.copy()
    if mode == "none" or not m.any():
        return out
    known = ~m
    if mode == "flat":
        fill = np.broadcast_to(_mean_colour(img, known), img.shape)
    elif mode == "blur":
        fill = _blur_fill(img, known, work_size)
    else:
        fill = _biharmonic_fill(img, m, known, work_size)
    out[m] = np.clip(fill[m], 0.0, 1.0).astype(img.dtype)
    return out
