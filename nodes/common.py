"""Shared bits of the node classes: category, custom type names, IMAGE/MASK conversions."""
from __future__ import annotations

CATEGORY = "P3S"

# Custom types passed between nodes (plain documented dataclasses in p3s_core).
POINTS = "P3S_POINTS"        # p3s_core.points.P3SPoints
ADAPTER = "P3S_ADAPTER"      # p3s_core.adapter.P3SAdapter
SCHEDULE = "P3S_SCHEDULE"    # p3s_core.schedule.P3SSchedule


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
