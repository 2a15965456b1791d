"""RNGR masks from points: paper Sec. III-A, Eq. 1-3.

Input is a grid of CLIP ViT-L/14 patch features (``[G, G, D]``, G = 16 at 224 px), so this module
is independent of CLIP and of ComfyUI. The pipeline:

1. :func:`letterbox` (:mod:`p3s_core.letterbox`) the whole reference image into the square CLIP input (pad, never crop, so a
   point anywhere in the image has a patch) and keep the geometry in a :class:`Letterbox`.
2. Eq. 1, :func:`similarity_map`: cosine similarity of the patch under each point to every patch
   (``M_P`` for positive points, ``M_N`` for negative ones).
3. Eq. 2, :func:`subject_mask`: ``Otsu(Gaussian(M_P * (1 - M_N)))`` at image resolution, keeping
   only the connected component(s) under the positive point(s). :func:`distractor_mask` runs the
   same pipeline with the roles swapped, giving the look-alike distractor's region.
4. Eq. 3, :func:`inpaint` (:mod:`p3s_core.inpainting`): fill the distractor's region with content that is not the subject.

:func:`rngr_mask` runs 2-3 for one image and returns an :class:`RNGRResult`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from skimage import filters, measure

from .errors import ImageInputError, ModelMismatchError, PointsError, RNGRSettingsError
from .inpainting import INPAINT_MODES, inpaint
from .letterbox import Letterbox, _to_numpy, letterbox
from .points import ImagePoints

__all__ = [
    "RNGRSettingsError",
    "Letterbox",
    "letterbox",
    "patch_grid",
    "similarity_map",
    "combine_maps",
    "smooth_to_image",
    "otsu_foreground",
    "keep_components",
    "grow_mask",
    "subject_mask",
    "distractor_mask",
    "RNGRResult",
    "rngr_mask",
    "INPAINT_MODES",
    "inpaint",
]


def patch_grid(patch_tokens: Any) -> np.ndarray:
    """Patch features as a float64 ``[G, G, D]`` array.

    Accepts ``[G, G, D]``, ``[G*G, D]``, or ``[G*G + 1, D]`` with a leading CLS token (dropped; only
    when ``G*G + 1`` is not itself a square), as a torch tensor or numpy array.
    """
    t = _to_numpy(patch_tokens, "patch_tokens")
    if t.ndim == 2:
        n = t.shape[0]
        g = int(round(math.sqrt(n)))
        if g * g != n:
            g = int(round(math.sqrt(n - 1))) if n > 1 else 0
            if g * g != n - 1 or g == 0:
                raise ModelMismatchError(
                    "patch_tokens", f"{n} tokens are not a square patch grid (with or without CLS)",
                    "use a ViT CLIP vision model (ViT-L/14: 257 tokens = CLS + 16 x 16 patches)")
            t = t[1:]
        t = t.reshape(g, g, t.shape[-1])
    if t.ndim != 3 or t.shape[0] != t.shape[1] or t.shape[0] < 1 or t.shape[2] < 1:
        raise ModelMismatchError("patch_tokens", f"expected patch features [G, G, D], got shape "
                                 f"{tuple(t.shape)}", "pass the patch tokens of a ViT CLIP vision model")
    t = t.astype(np.float64, copy=False)
    if not np.all(np.isfinite(t)):
        raise ModelMismatchError("patch_tokens", "the CLIP patch features contain NaN or infinite values",
                                 "run the CLIP vision model in fp32 (or bf16) instead of fp16")
    return t


def similarity_map(patch_tokens: Any, points_rc: Sequence[tuple[int, int]]) -> np.ndarray:
    """Eq. 1: ``M[i, j] = cos(patch[r, c], patch[i, j])`` for the patch ``(r, c)`` under a point.

    Several points of one kind are combined by the element-wise MAX over points: a patch belongs to
    the marked kind if it resembles ANY marked part (a click on the head and one on the tail should
    each cover their own part, which a mean would dilute). No points -> all zeros (so for negative
    points ``1 - M_N`` is 1 everywhere and Eq. 2 reduces to the positive map). A zero feature
    vector has similarity 0 to everything. Returns float64 ``[G, G]``.
    """
    t = patch_grid(patch_tokens)
    g, _, d = t.shape
    if not points_rc:
        return np.zeros((g, g), dtype=np.float64)
    flat = t.reshape(g * g, d)
    scale = np.abs(flat).max(axis=1, keepdims=True)  # pre-scale: no overflow in the norm
    flat = np.divide(flat, scale, out=np.zeros_like(flat), where=scale > 0)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 1e-12)
    idx = []
    for r, c in points_rc:
        if not (0 <= int(r) < g and 0 <= int(c) < g):
            raise PointsError("points", f"patch ({r}, {c}) is outside the {g} x {g} patch grid",
                              "map image points with Letterbox.image_to_patch")
        idx.append(int(r) * g + int(c))
    sims = np.einsum("kd,nd->kn", unit[idx], unit)  # not a BLAS call: see grid_to_image
    return np.clip(sims.max(axis=0), -1.0, 1.0).reshape(g, g)


# ============================================================================ Eq. 2
def combine_maps(m_pos: np.ndarray, m_neg: np.ndarray) -> np.ndarray:
    """Eq. 2 inner term ``S = M_P * (1 - M_N)``.

    Decision: both maps are clipped to ``[0, 1]`` first. A negative cosine means "unrelated", the
    same as 0; unclipped, ``1 - M_N`` could reach 2 and boost background far from the distractor
    above the subject itself. After clipping ``S`` lies in ``[0, 1]``.
    """
    return np.clip(m_pos, 0.0, 1.0) * (1.0 - np.clip(m_neg, 0.0, 1.0))


def smooth_to_image(s_grid: np.ndarray, box: Letterbox, sigma: float,
                    image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Eq. 2 ``Psi``: Gaussian smoothing of the patch map, then upsampling to the image.

    Decisions: the Gaussian (``skimage.filters.gaussian``, ``sigma`` in PATCH units, edges
    replicated) acts on the patch grid, as in the paper, but only on the patches that overlap the
    image, so the grey padding never bleeds in; the result is then brought to image resolution with
    :meth:`Letterbox.grid_to_image`. ``sigma = 0`` skips smoothing.
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise RNGRSettingsError("sigma", f"Gaussian sigma must be a finite number >= 0, got {sigma!r}",
                                "use about 1 (patches); 0 turns smoothing off")
    s = np.asarray(s_grid, dtype=np.float64).copy()
    g = s.shape[0]
    if sigma > 0:
        r0, r1, c0, c1 = box.valid_patches(g)
        s[r0:r1 + 1, c0:c1 + 1] = filters.gaussian(s[r0:r1 + 1, c0:c1 + 1], sigma=float(sigma),
                                                   mode="nearest", preserve_range=True)
    h, w = image_hw if image_hw is not None else (box.src_h, box.src_w)
    return box.grid_to_image(s, h, w)


def otsu_foreground(heat: np.ndarray) -> tuple[np.ndarray, float]:
    """Eq. 2 ``Otsu``: ``heat > threshold_otsu(heat)`` over the image-resolution map.

    Decision: the threshold is computed on exactly the map that is thresholded (image resolution,
    padding excluded), so threshold and mask agree. A constant map has no threshold: it is all
    foreground if its value is > 0, else empty (also when its spread is below float precision, where
    a histogram cannot be built). Returns ``(mask, threshold)``.
    """
    lo, hi = float(heat.min()), float(heat.max())
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):
        return np.full(heat.shape, hi > 0, dtype=bool), hi
    thr = float(filters.threshold_otsu(heat))
    return heat > thr, thr


def keep_components(fg: np.ndarray, points_xy: Sequence[tuple[float, float]],
                    search_radius: int = 0) -> np.ndarray:
    """Eq. 2 "remove outliers that are not connected to the specified points".

    Keeps the 8-connected components (``skimage.measure.label``, connectivity 2) that contain a
    point's pixel ``(floor(x), floor(y))`` (clamped into the image). Decision: if a point's own
    pixel is background (it can sit on a thin edge the smoothing eroded), the component of the
    nearest foreground pixel within ``search_radius`` pixels is kept instead; otherwise that point
    keeps nothing.
    """
    h, w = fg.shape
    if not points_xy or not fg.any():
        return np.zeros_like(fg, dtype=bool)
    labels = measure.label(fg, connectivity=2)
    keep = set()
    for x, y in points_xy:
        px = min(max(int(math.floor(x)), 0), w - 1)
        py = min(max(int(math.floor(y)), 0), h - 1)
        lab = labels[py, px]
        if lab == 0 and search_radius > 0:
            y0, y1 = max(0, py - search_radius), min(h, py + search_radius + 1)
            x0, x1 = max(0, px - search_radius), min(w, px + search_radius + 1)
            win = labels[y0:y1, x0:x1]
            ys, xs = np.nonzero(win)
            if ys.size:
                d2 = (ys + y0 - py) ** 2 + (xs + x0 - px) ** 2
                k = int(np.argmin(d2))
                if d2[k] <= search_radius ** 2:
                    lab = win[ys[k], xs[k]]
        if lab:
            keep.add(int(lab))
    if not keep:
        return np.zeros_like(fg, dtype=bool)
    return np.isin(labels, sorted(keep))


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow (``pixels > 0``) or shrink (``pixels < 0``) a bool mask by a disk of that radius.

    Same result as ``skimage.morphology.binary_dilation(mask, disk(pixels))``. Speed: up to a
    radius of 16 the disk is taken row by row (a 1-D maximum filter per half-width, shifted and
    OR-ed: a few passes over the mask); larger radii use a Euclidean distance transform, which
    costs the same for any radius.
    """
    if not isinstance(pixels, (int, np.integer)) or isinstance(pixels, bool):
        raise RNGRSettingsError("grow", f"grow must be a whole number of pixels, got {pixels!r}",
                                "use e.g. 8 to grow the mask, -4 to shrink it, 0 to keep it")
    m = np.asarray(mask, dtype=bool)
    if pixels == 0 or not m.any():
        return m.copy()
    if pixels > 0:
        if m.all():
            return m.copy()
        if pixels <= _DISK_ROWS_MAX:
            return _dilate_disk(m, int(pixels))
        return ndimage.distance_transform_edt(~m) <= pixels
    if m.all():
        return m.copy()
    if -pixels <= _DISK_ROWS_MAX:
        return ~_dilate_disk(~m, int(-pixels))
    return ndimage.distance_transform_edt(m) > -pixels


_DISK_ROWS_MAX = 16


def _dilate_disk(m: np.ndarray, r: int) -> np.ndarray:
    """Dilation by the disk ``dx^2 + dy^2 <= r^2`` (nothing outside the image counts): for each
    row offset ``dy`` the half-width is ``isqrt(r^2 - dy^2)``; a 1-D maximum filter of that width,
    shifted by ``dy``. Exact (integer arithmetic), equal to ``distance_transform_edt(~m) <= r``."""
    h, w = m.shape
    out = np.zeros_like(m)
    rows: dict[int, np.ndarray] = {}
    for dy in range(-r, r + 1):
        if abs(dy) >= h:
            continue
        half = math.isqrt(r * r - dy * dy)
        if half not in rows:
            rows[half] = ndimage.maximum_filter1d(m, size=2 * half + 1, axis=1, mode="constant", cval=0)
        src = rows[half]
        if dy >= 0:
            out[dy:] |= src[:h - dy]
        else:
            out[:h + dy] |= src[-dy:]
    return out


def _patch_radius(box: Letterbox, grid: int, image_hw: tuple[int, int]) -> int:
    p = box.size / grid
    h, w = image_hw
    return int(math.ceil(max(p * w / box.new_w, p * h / box.new_h)))


def _mask_pipeline(m_keep: np.ndarray, m_suppress: np.ndarray, sigma: float,
                   points_xy: Sequence[tuple[float, float]], box: Letterbox,
                   image_hw: tuple[int, int] | None, grow: int,
                   keep_connected: bool) -> tuple[np.ndarray, np.ndarray, float]:
    hw = image_hw if image_hw is not None else (box.src_h, box.src_w)
    s = combine_maps(m_keep, m_suppress)
    heat = smooth_to_image(s, box, sigma, hw)
    fg, thr = otsu_foreground(heat)
    if keep_connected:
        fg = keep_components(fg, points_xy, _patch_radius(box, s.shape[0], hw))
    return grow_mask(fg, grow), heat, thr


def subject_mask(M_P: np.ndarray, M_N: np.ndarray, sigma: float,
                 positive_xy: Sequence[tuple[float, float]], box: Letterbox,
                 image_hw: tuple[int, int] | None = None, grow: int = 0,
                 keep_connected: bool = True) -> np.ndarray:
    """Eq. 2: ``Mask = Otsu(Psi(M_P * (1 - M_N)))`` -> bool ``[H, W]`` subject mask.

    ``M_P`` / ``M_N`` are the ``[G, G]`` maps of Eq. 1 computed on the letterboxed image ``box``;
    ``positive_xy`` are the positive points in pixels of the ``image_hw`` output (default: the
    letterbox's source size), used to keep only their connected components (``keep_connected``;
    turn it off to see the raw Otsu foreground). See :func:`combine_maps`,
    :func:`smooth_to_image`, :func:`otsu_foreground`, :func:`keep_components` for the decisions;
    ``grow`` then dilates (> 0) or erodes (< 0) the mask by that many pixels.
    """
    if keep_connected and not positive_xy:
        raise PointsError("points", "no positive point for the subject mask",
                          "click at least one positive point on the subject")
    return _mask_pipeline(M_P, M_N, sigma, positive_xy, box, image_hw, grow, keep_connected)[0]


def distractor_mask(M_P: np.ndarray, M_N: np.ndarray, sigma: float,
                    negative_xy: Sequence[tuple[float, float]], box: Letterbox,
                    image_hw: tuple[int, int] | None = None, grow: int = 0,
                    keep_connected: bool = True) -> np.ndarray:
    """Eq. 2 with the roles swapped: ``Otsu(Psi(M_N * (1 - M_P)))`` kept at the negative points,
    i.e. the region of the look-alike distractor that Eq. 3 fills. Empty without negative points."""
    hw = image_hw if image_hw is not None else (box.src_h, box.src_w)
    if not negative_xy:
        return np.zeros(hw, dtype=bool)
    return _mask_pipeline(M_N, M_P, sigma, negative_xy, box, image_hw, grow, keep_connected)[0]


@dataclass
class RNGRResult:
    """Masks of one image. ``subject_mask`` / ``distractor_mask``: bool ``[H, W]``; ``heat``:
    float32 ``[H, W]`` in 0..1, the smoothed ``S = M_P * (1 - M_N)`` (absolute, not
    renormalised); ``M_P`` / ``M_N``: the ``[G, G]`` maps of Eq. 1; thresholds: the Otsu values
    (``distractor_threshold`` is None without negative points)."""

    subject_mask: np.ndarray
    distractor_mask: np.ndarray
    heat: np.ndarray
    M_P: np.ndarray
    M_N: np.ndarray
    subject_threshold: float = float("nan")
    distractor_threshold: float | None = None


def rngr_mask(patch_tokens: Any, letterbox: Letterbox, image_points: ImagePoints,
              image_hw: tuple[int, int] | None = None, sigma: float = 1.0, grow: int = 0,
              protect_subject: bool = True) -> RNGRResult:
    """Eq. 1-2 for one image: subject and distractor masks from its patch features and points.

    ``patch_tokens`` are the CLIP patch features of the letterboxed image described by
    ``letterbox``; ``image_points`` are pixels of an image of ``image_hw = (H, W)`` (default: the
    letterbox's source size; another size is mapped per axis). ``grow`` applies to both masks.
    Decision (``protect_subject``): where both masks claim a pixel the subject wins: the
    distractor mask never covers the (un-grown) subject mask, so Eq. 3 never paints over the
    clicked subject.
    """
    tokens = patch_grid(patch_tokens)
    g = tokens.shape[0]
    if image_hw is None:
        h, w = letterbox.src_h, letterbox.src_w
    else:
        h, w = int(image_hw[0]), int(image_hw[1])
        if h < 1 or w < 1:
            raise ImageInputError("image", f"image size {h}x{w} is empty", "pass a non-empty image")
    if not image_points.positive:
        raise PointsError("points", "no positive point on this image",
                          "click at least one positive point on the subject")
    sx, sy = letterbox.src_w / w, letterbox.src_h / h

    def to_rc(pts: Sequence[tuple[float, float]], kind: str) -> list[tuple[int, int]]:
        out = []
        for x, y in pts:
            if not (math.isfinite(x) and math.isfinite(y) and 0 <= x <= w and 0 <= y <= h):
                raise PointsError("points", f"{kind} point (x={x}, y={y}) lies outside the {w}x{h} image",
                                  f"use pixel coordinates with 0 <= x <= {w} and 0 <= y <= {h}")
            out.append(letterbox.image_to_patch(min(x * sx, letterbox.src_w),
                                                min(y * sy, letterbox.src_h), g))
        return out

    pos_rc, neg_rc = to_rc(image_points.positive, "positive"), to_rc(image_points.negative, "negative")
    m_p = similarity_map(tokens, pos_rc)
    m_n = similarity_map(tokens, neg_rc)
    subj_core, heat, thr = _mask_pipeline(m_p, m_n, sigma, image_points.positive, letterbox,
                                          (h, w), 0, True)
    subj = grow_mask(subj_core, grow)
    if image_points.negative:
        distr, _, dthr = _mask_pipeline(m_n, m_p, sigma, image_points.negative, letterbox,
                                        (h, w), grow, True)
        if protect_subject:
            distr = distr & ~subj_core
    else:
        distr, dthr = np.zeros((h, w), dtype=bool), None
    return RNGRResult(subject_mask=subj, distractor_mask=distr,
                      heat=np.clip(heat, 0.0, 1.0).astype(np.float32), M_P=m_p, M_N=m_n,
                      subject_threshold=thr, distractor_threshold=dthr)
