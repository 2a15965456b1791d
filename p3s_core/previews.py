"""Previews the nodes and the command line draw (never a node's own job): clicked points, the RNGR
heat map with the masks' outlines (Eq. 2), the Eq. 10 schedule curve, the loss curve of training and
a region. Pure numpy / torch / PIL / scipy; no engine."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .errors import ScheduleError
from .schedule import P3SSchedule

POS_COLOR = (0.1, 0.9, 0.2)


NEG_COLOR = (0.95, 0.15, 0.15)


def draw_points(rgb, image_points, radius: int):
    """The image with positive (green) and negative (red) points drawn as rings."""
    import numpy as np

    out = np.array(rgb, dtype=np.float32, copy=True)
    h, w = out.shape[:2]
    r = int(np.ceil(radius)) + 1
    for pts, color in ((image_points.positive, POS_COLOR), (image_points.negative, NEG_COLOR)):
        for x, y in pts:  # only the window around the point: cost per point is O(radius^2)
            x0, x1 = max(0, int(x) - r), min(w, int(x) + r + 1)
            y0, y1 = max(0, int(y) - r), min(h, int(y) + r + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            d = np.hypot(xx - x, yy - y)
            win = out[y0:y1, x0:x1]
            win[d <= radius] = color
            win[d <= radius * 0.45] = (1.0, 1.0, 1.0)
    return out


def mask_outline(mask):
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=2)


def rngr_preview(rgb, result, image_points):
    """Heat map of Eq. 2's smoothed map over the photo, subject outline green, distractor red."""
    import numpy as np

    heat = result.heat
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-6)
    warm = np.stack([heat, heat * 0.55, 1.0 - heat], axis=-1)
    out = 0.55 * rgb + 0.45 * warm
    out[mask_outline(result.subject_mask)] = (0.1, 1.0, 0.2)
    out[mask_outline(result.distractor_mask)] = (1.0, 0.2, 0.2)
    radius = max(3, round(min(rgb.shape[:2]) / 60))
    return draw_points(out, image_points, radius)


# ---------------------------------------------------------------------- plotting
def plot_curve(schedule: P3SSchedule, width: int = 512, height: int = 256) -> np.ndarray:
    """Draw the schedule as an RGB ``uint8`` array ``[height, width, 3]`` (PIL, no matplotlib).

    x axis: denoising progress (left = first step, ``t/T = 1``; right = end, ``t/T = 0``);
    y axis: weight ``eps_t``. The active window is shaded; outside it the weight is 0.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not isinstance(schedule, P3SSchedule):
        raise ScheduleError("schedule", f"expected a P3SSchedule, got {type(schedule).__name__}",
                            "connect a P3S Timestep Weight Scheduler output")
    width, height = int(width), int(height)
    if width < 96 or height < 64 or width > 4096 or height > 4096:
        raise ScheduleError("width/height", f"{width}x{height} is outside 96x64 .. 4096x4096",
                            "use a plot size such as 512x256")
    img = Image.new("RGB", (width, height), (32, 32, 36))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    left, right, top, bottom = 40, width - 12, 18, height - 30
    samples = schedule.sample_curve(max(2, right - left + 1))
    y_max = max(1.0, max(w for _, w in samples)) * 1.1

    def px(p: float) -> float:
        return left + p * (right - left)

    def py(w: float) -> float:
        return bottom - (w / y_max) * (bottom - top)

    # window shading
    draw.rectangle([px(float(schedule.start_percent)), top, px(float(schedule.end_percent)), bottom],
                   fill=(44, 62, 80))
    # grid at weight 0.5 steps and axes
    step = 0.5 if y_max <= 3 else float(10 ** math.floor(math.log10(y_max)))
    g = step
    while g < y_max:
        draw.line([left, py(g), right, py(g)], fill=(60, 60, 66))
        draw.text((2, py(g) - 6), f"{g:.1f}", fill=(170, 170, 170), font=font)
        g += step
    draw.line([left, top, left, bottom], fill=(200, 200, 200))
    draw.line([left, bottom, right, bottom], fill=(200, 200, 200))
    draw.text((2, bottom - 6), "0", fill=(170, 170, 170), font=font)
    # the curve
    pts = [(px(p), py(w)) for p, w in samples]
    draw.line(pts, fill=(255, 170, 40), width=2)
    # labels
    draw.text((left, bottom + 4), "t/T=1", fill=(220, 220, 220), font=font)
    draw.text((right - 30, bottom + 4), "t/T=0", fill=(220, 220, 220), font=font)
    draw.text(((left + right) // 2 - 40, bottom + 14), "denoising progress ->", fill=(170, 170, 170),
              font=font)
    draw.text((left + 4, 2), f"weight ({schedule.mode}, x{float(schedule.strength):g})",
              fill=(220, 220, 220), font=font)
    return np.asarray(img, dtype=np.uint8).copy()


def plot_losses(losses: Sequence[float], width: int = 512, height: int = 256,
                start_step: int = 0, title: str = "P3S training loss",
                parts: Sequence[tuple[str, Sequence[float]]] = ()) -> np.ndarray:
    """Draw the loss per step (and a moving average) as an RGB ``uint8`` array [height, width, 3].

    Uses PIL only. x axis: global step (``start_step + 1`` ..), y axis: loss from 0 to the maximum.
    ``parts``: extra ``(label, values)`` curves on the same axes (e.g. ``L_LDM`` and
    ``gamma*L_ac``), drawn in green and red with their labels and last values in the legend.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = max(96, int(width)), max(64, int(height))
    img = Image.new("RGB", (width, height), (32, 32, 36))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, width - 12, 18, height - 24
    vals = [float(v) for v in losses if math.isfinite(float(v))]
    draw.line([left, top, left, bottom], fill=(200, 200, 200))
    draw.line([left, bottom, right, bottom], fill=(200, 200, 200))
    draw.text((left + 4, 2), title, fill=(220, 220, 220), font=font)
    if not vals:
        draw.text((left + 8, (top + bottom) // 2), "no steps", fill=(170, 170, 170), font=font)
        return np.asarray(img, dtype=np.uint8).copy()
    y_max = max(vals) * 1.1 or 1.0

    def px(i: int) -> float:
        return left + (i / max(1, len(vals) - 1)) * (right - left)

    def py(v: float) -> float:
        return bottom - (v / y_max) * (bottom - top)

    for frac in (0.25, 0.5, 0.75):
        g = y_max * frac
        draw.line([left, py(g), right, py(g)], fill=(60, 60, 66))
        draw.text((2, py(g) - 6), f"{g:.3g}", fill=(170, 170, 170), font=font)
    pts = [(px(i), py(v)) for i, v in enumerate(vals)]
    if len(pts) == 1:
        draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(120, 160, 220))
    else:
        draw.line(pts, fill=(120, 160, 220), width=1)
        k = max(1, len(vals) // 20)
        avg = np.convolve(np.asarray(vals), np.ones(k) / k, mode="valid")
        off = (k - 1) / 2
        draw.line([(px(i + off), py(v)) for i, v in enumerate(avg)] if len(avg) > 1 else pts,
                  fill=(255, 170, 40), width=2)
    colours = [(110, 210, 120), (235, 90, 90), (200, 120, 230)]
    legend_y = top + 2
    for (label, series), colour in zip(parts, colours):
        pv = [float(v) if math.isfinite(float(v)) else 0.0 for v in series][:len(vals)]
        if not pv:
            continue
        ppts = [(px(i), py(min(max(v, 0.0), y_max))) for i, v in enumerate(pv)]
        if len(ppts) > 1:
            draw.line(ppts, fill=colour, width=1)
        draw.text((right - 150, legend_y), f"{label} {pv[-1]:.3g}", fill=colour, font=font)
        legend_y += 12
    draw.text((left, bottom + 6), f"step {start_step + 1}", fill=(220, 220, 220), font=font)
    end = f"step {start_step + len(vals)}  loss {vals[-1]:.4g}"
    draw.text((max(left + 60, right - 6 * len(end)), bottom + 6), end, fill=(220, 220, 220), font=font)
    return np.asarray(img, dtype=np.uint8).copy()


def region_preview(mask: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
    """An IMAGE ``[1, H, W, 3]`` showing the region: the image (or mid grey) with the inside tinted
    green and the outside darkened; the mask is stretched to the image as the injector stretches it."""
    m = mask.reshape(1, 1, mask.shape[-2], mask.shape[-1]).float()
    if image is None:
        base = torch.full((1, mask.shape[-2], mask.shape[-1], 3), 0.5)
    else:
        base = image[:1, :, :, :3].float().cpu()
        m = torch.nn.functional.interpolate(m, size=base.shape[1:3], mode="bilinear", align_corners=False)
    w = m[:, 0, :, :, None].clamp(0, 1)
    green = torch.tensor([0.2, 0.9, 0.3])
    inside = 0.55 * base + 0.45 * green
    outside = 0.35 * base
    return (w * inside + (1 - w) * outside).clamp(0, 1)
