"""Shared bits of the node classes: category, custom type names, IMAGE/MASK conversions, and the
input checks every node runs before doing any work (so a bad input gives one sentence naming the
input and the fix, never a traceback from deep inside the core or ComfyUI)."""
from __future__ import annotations

import math
import numbers

from ..p3s_core.errors import ImageInputError, P3SError

CATEGORY = "P3S"

# Custom types passed between nodes (plain documented dataclasses in p3s_core).
POINTS = "P3S_POINTS"        # p3s_core.points.P3SPoints
ADAPTER = "P3S_ADAPTER"      # p3s_core.adapter.P3SAdapter
SCHEDULE = "P3S_SCHEDULE"    # p3s_core.schedule.P3SSchedule

#: Smallest reference side: one CLIP ViT-L/14 patch.
MIN_IMAGE_SIDE = 14
#: Largest side and batch the P3S nodes take (a 48 MP photo is 8000x6000; a subject needs 3-5
#: reference photos): above these the per-pixel work (fill, previews, encoding) would explode.
MAX_IMAGE_SIDE = 8192
MAX_BATCH = 64
#: How far an IMAGE value may stray outside 0..1 (float rounding) before the image is refused.
IMAGE_VALUE_MARGIN = 1e-3
#: Longest text a P3S text input takes (a prompt is at most a few hundred characters).
MAX_TEXT_CHARS = 10_000


class SettingError(P3SError):
    """A widget value (number or choice) that is not finite, out of its range or unknown.

    The editor's widgets enforce their limits, but the API, a hand-edited workflow or another
    node's output can send anything (ComfyUI's own min/max check lets NaN through)."""


def check_image_batch(image, input_name: str = "image"):
    """A ComfyUI IMAGE batch: a float tensor [B,H,W,3], B >= 1, at least one CLIP patch, finite, in 0..1.

    Returns the shape ``(B, H, W, 3)``. Decision: RGBA and grayscale are refused with the fix, not
    silently converted: the alpha channel of a cut-out subject usually matters to the user, and
    the core node that drops it ('Split Image with Alpha') also gives its mask.
    """
    import torch

    if not isinstance(image, torch.Tensor):
        raise ImageInputError(input_name, f"expected an IMAGE (a tensor [B,H,W,3]), got a {type(image).__name__}",
                              "connect an IMAGE output (Load Image, or any node whose output is IMAGE)")
    shape = tuple(image.shape)
    if image.ndim == 4 and shape[0] == 0:
        raise ImageInputError(input_name, "the IMAGE batch is empty (0 images)",
                              "connect at least one image (check the node feeding it, e.g. a filter that dropped every image)")
    if image.ndim != 4:
        raise ImageInputError(input_name, f"expected an IMAGE batch [B,H,W,3], got shape {shape}",
                              "connect a Load Image node (or any node with an IMAGE output)")
    channels = shape[3]
    if channels != 3 and shape[1] in (1, 3, 4) and channels > 4:
        raise ImageInputError(input_name, f"the tensor {shape} looks channels-first [B,C,H,W]; ComfyUI images are [B,H,W,C]",
                              "connect a standard ComfyUI IMAGE output (or move the channel axis last)")
    if channels == 4:
        raise ImageInputError(input_name, "the images have 4 channels (RGBA); 3 (RGB) are needed",
                              "drop the alpha channel with the core node 'Split Image with Alpha' (its IMAGE output is RGB)")
    if channels == 1:
        raise ImageInputError(input_name, "the images have 1 channel (grayscale); 3 (RGB) are needed",
                              "convert them to RGB first (Load Image always gives RGB; 'Convert Mask to Image' turns a mask into RGB)")
    if channels != 3:
        raise ImageInputError(input_name, f"the images have {channels} channels; 3 (RGB) are needed",
                              "connect an RGB IMAGE (Load Image gives RGB)")
    if shape[1] < MIN_IMAGE_SIDE or shape[2] < MIN_IMAGE_SIDE:
        raise ImageInputError(input_name, f"the images are {shape[2]}x{shape[1]} pixels, below one CLIP patch",
                              "use reference photos of at least 64x64 pixels")
    if shape[0] > MAX_BATCH:
        raise ImageInputError(input_name, f"the batch has {shape[0]:,} images (at most {MAX_BATCH})",
                              f"use at most {MAX_BATCH} reference images (3-5 photos of the subject are enough)")
    if shape[1] > MAX_IMAGE_SIDE or shape[2] > MAX_IMAGE_SIDE:
        raise ImageInputError(input_name, f"the images are {shape[2]}x{shape[1]} pixels (at most {MAX_IMAGE_SIDE} "
                              "per side)", "scale them down first (core node 'Upscale Image' with a smaller size)")
    if not image.is_floating_point():
        raise ImageInputError(input_name, f"the IMAGE has dtype {image.dtype}; ComfyUI images are floats in 0..1",
                              "connect a standard IMAGE output (e.g. Load Image), or convert the values to float 0..1")
    if not bool(torch.isfinite(image).all()):
        raise ImageInputError(input_name, "the images contain NaN or infinite values",
                              "check the node that produced them (e.g. a VAE Decode that overflowed in fp16; try --fp32-vae)")
    check_image_values(image, input_name)
    return shape


def check_image_values(image, input_name: str = "image") -> None:
    """ComfyUI IMAGE values are floats in 0..1: refuse anything outside (beyond IMAGE_VALUE_MARGIN).

    Decision: refused, never clamped or rescaled silently. 0..255 floats (some loaders give them)
    would otherwise be clipped to a white image, -1..1 values to a dark one, and the subject learnt
    or injected from that. The fix names the likely cause from the range seen.
    """
    lo, hi = (float(v) for v in image.aminmax())
    if lo >= -IMAGE_VALUE_MARGIN and hi <= 1.0 + IMAGE_VALUE_MARGIN:
        return
    span = f"the pixel values span {lo:.4g}..{hi:.4g}, outside 0..1 (ComfyUI IMAGEs are floats in 0..1)"
    if lo >= -IMAGE_VALUE_MARGIN and 2.0 < hi <= 255.0 + IMAGE_VALUE_MARGIN:
        fix = ("divide the values by 255 (they look like 8-bit 0..255 values: the node that made them did not "
               "scale them; Load Image gives 0..1)")
    elif -1.0 - IMAGE_VALUE_MARGIN <= lo < -0.5 and hi <= 1.0 + IMAGE_VALUE_MARGIN:
        fix = "map them to 0..1 with (x + 1) / 2 (they look like -1..1 values)"
    elif -0.5 <= lo and hi <= 1.5:
        fix = ("keep them in 0..1: 'Upscale Image' with 'bicubic' overshoots at sharp edges, so pick 'bilinear', "
               "'area' or 'lanczos' there (or clamp the values to 0..1)")
    else:
        fix = "scale the values into 0..1 (divide 0..255 values by 255, map -1..1 values with (x + 1) / 2)"
    raise ImageInputError(input_name, span, fix)


def check_text(value, input_name: str, max_chars: int = MAX_TEXT_CHARS, fix: str | None = None) -> str:
    """A string of at most ``max_chars`` characters (checked before any parsing)."""
    if not isinstance(value, str):
        raise SettingError(input_name, f"expected text, got a {type(value).__name__}", fix or "enter text")
    if len(value) > max_chars:
        raise SettingError(input_name, f"the text is {len(value):,} characters long (at most {max_chars:,})",
                           fix or f"shorten it to at most {max_chars:,} characters")
    return value


def check_number(value, input_name: str, low: float, high: float, fix: str | None = None) -> float:
    """A finite real number in ``[low, high]`` (bools and strings refused), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingError(input_name, f"{value!r} is not a number", fix or f"enter a number between {low:g} and {high:g}")
    v = float(value)
    if not math.isfinite(v):
        raise SettingError(input_name, f"{value!r} is not a finite number", fix or f"enter a number between {low:g} and {high:g}")
    if not low <= v <= high:
        raise SettingError(input_name, f"{v:g} is outside [{low:g}, {high:g}]", fix or f"enter a number between {low:g} and {high:g}")
    return v


def check_int(value, input_name: str, low: int, high: int, fix: str | None = None) -> int:
    """A whole number in ``[low, high]`` (a float with a fraction, a bool or NaN is refused)."""
    v = check_number(value, input_name, low, high, fix)
    if not float(v).is_integer():
        raise SettingError(input_name, f"{value!r} is not a whole number", fix or f"enter a whole number between {low} and {high}")
    return int(v)


def check_choice(value, input_name: str, choices) -> str:
    """One of ``choices`` (a combo widget's list)."""
    if not isinstance(value, str) or value not in choices:
        raise SettingError(input_name, f"{value!r} is not one of the options",
                           f"use one of: {', '.join(repr(c) for c in choices)}")
    return value


def image_to_numpy(image, index: int):
    """One image of a ComfyUI IMAGE batch ([B,H,W,C] float 0..1) as an HxWx3 float32 array."""
    return image[index, :, :, :3].detach().float().cpu().numpy()


def numpy_to_image(arrays):
    """A list of HxWx3 float arrays (0..1) -> a ComfyUI IMAGE batch."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in arrays])).clamp(0, 1)


def numpy_to_mask(arrays):
    """A list of HxW arrays (bool or 0..1) -> a ComfyUI MASK batch [B,H,W] float."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]))
