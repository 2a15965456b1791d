"""Point Selector -> RNGR Mask + Inpaint in the real ComfyUI with the random CLIP ViT-L/14 (Eq. 1-3)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

H, W = 96, 160  # non-square: letterboxed, never cropped


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, H, W, 3, generator=g) * 0.2 + 0.4
    img[0, 20:70, 10:60] = torch.tensor([0.9, 0.6, 0.2])   # subject
    # the distractor: same shape and size, another colour. With the random-weight CLIP of the tests a
    # same-coloured look-alike has the same features as the subject (M_P = M_N: nothing to tell
    # apart); a real CLIP tells look-alikes apart by what they are, which random weights cannot
    img[0, 20:70, 100:150] = torch.tensor([0.15, 0.35, 0.9])
    img[1, 30:80, 40:100] = torch.tensor([0.9, 0.6, 0.2])
    return img


STATE = {"width": W, "height": H, "images": [
    {"positive": [[35, 45]], "negative": [[125, 45]]},
    {"positive": [[70, 55]], "negative": []},
]}


def select(comfy, batch, **kw):
    with torch.inference_mode():
        return comfy.node("P3SPointSelector")().select(batch, **kw)


def test_point_selector_outputs(comfy, batch):
    out = select(comfy, batch, points_store=json.dumps(STATE))
    points, pos, neg, preview = out["result"]
    assert len(points) == 2 and points.for_image(0).negative == [(125.0, 45.0)]
    assert json.loads(pos) == [{"x": 35, "y": 45}] and json.loads(neg) == [{"x": 125, "y": 45}]
    assert preview.shape == (2, H, W, 3) and preview.dtype == torch.float32
    assert torch.allclose(preview[0, 45, 35], torch.ones(3))  # white centre of the positive ring
    assert preview[0, 45, 125 + 3, 0] > 0.9 and preview[0, 45, 125 + 3, 1] < 0.2  # red ring
    assert len(out["ui"]["p3s_images"]) == 2 and out["ui"]["p3s_images"][0]["type"] == "temp"


def test_point_selector_accepts_sam2_strings(comfy, batch):
    out = select(comfy, batch, points_store="", coordinates_positive="[{'x': 0.25, 'y': 0.5}]",
                 coordinates_negative='[{"x": 120, "y": 40}]')
    points = out["result"][0]
    assert points.for_image(1).positive == [(40.0, 48.0)]  # normalised 0-1 -> pixels, applies to all
    assert points.for_image(0).negative == [(120.0, 40.0)]


def test_rngr_node_shapes_ranges_dtypes(comfy, batch, clip_vision):
    points = select(comfy, batch, points_store=json.dumps(STATE))["result"][0]
    with torch.inference_mode():
        cleaned, subject, removed, preview = comfy.node("P3SRNGRMaskInpaint")().run(
            batch, points, clip_vision, sigma=0.75, fill="flat", remove="distractor", grow=2)
    assert cleaned.shape == (2, H, W, 3) and preview.shape == (2, H, W, 3)
    assert subject.shape == (2, H, W) and removed.shape == (2, H, W)
    for t in (cleaned, subject, removed, preview):
        assert t.dtype == torch.float32 and torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    assert set(torch.unique(subject).tolist()) <= {0.0, 1.0}
    assert subject[1, 55, 70] == 1.0  # no negative point: the clicked pixel's patch peaks (cos 1)
    assert removed[1].sum() == 0  # no negative point on image 1: nothing removed
    keep = removed[0] == 0
    assert torch.equal(cleaned[0][keep], batch[0][keep])  # outside the filled region: unchanged
    # image 0 has a negative point on the look-alike: it must be removed there, and only there
    assert removed[0, 45, 125] == 1.0, "the distractor under the negative point was not removed"
    assert subject[0, 45, 35] == 1.0 and removed[0, 45, 35] == 0  # the subject is kept, never filled
    assert not torch.allclose(cleaned[0, 45, 125], batch[0, 45, 125], atol=0.05)  # filled with something else
    assert float(removed[0, :, 80:].mean()) > float(removed[0, :, :80].mean())  # on the distractor's side


def test_points_map_to_the_right_clip_patches(comfy, batch, clip_vision):
    """Eq. 1 through the real CLIP: the similarity map peaks (cosine 1) at the patch under the point."""
    backend = comfy.core("comfyui_engine")
    rngr = comfy.core("rngr")
    with torch.inference_mode():
        squares, boxes = backend.letterboxed_batch(batch)
        tokens = backend.clip_patch_tokens(clip_vision, squares).numpy()
    assert squares.shape == (2, 224, 224, 3)
    for x, y in [(0, 0), (159, 95), (35, 45), (125, 45), (80, 10)]:
        r, c = boxes[0].image_to_patch(x, y)
        # hand-computed: scale 224/160 = 1.4, image height 96*1.4 = 134.4 -> pad top (224-134)//2 = 45
        assert c == int(x * 1.4 // 14) and r == int((45 + y * 1.4) // 14)
        m = rngr.similarity_map(tokens[0], [(r, c)])
        assert np.unravel_index(np.argmax(m), m.shape) == (r, c)
        assert m[r, c] == pytest.approx(1.0, abs=1e-4)


def test_rngr_refuses_mismatched_points(comfy, batch, clip_vision):
    errors = comfy.core("errors")
    three = dict(STATE, images=STATE["images"] + [{"positive": [[1, 1]], "negative": []}])
    with pytest.raises(errors.PointsError, match="points_store"):
        select(comfy, batch, points_store=json.dumps(three))
    with pytest.raises(errors.PointsError, match="no point was clicked"):
        select(comfy, batch, points_store="")
