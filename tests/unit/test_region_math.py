"""p3s_core.region: mask checks, feathering, token weights, the per-token blend and the region shapes."""
from __future__ import annotations

import math

import pytest
import torch

from p3s_core import region as R
from p3s_core.previews import region_preview
from p3s_core.errors import ImageInputError


def test_check_accepts_comfy_masks_and_returns_hw_float():
    m = torch.zeros(1, 30, 50)
    m[:, :, :25] = 1
    out = R.check_region_mask(m)
    assert out.shape == (30, 50) and out.dtype == torch.float32 and float(out.sum()) == 30 * 25
    assert R.check_region_mask(torch.ones(7, 9, dtype=torch.bool)).sum() == 63


@pytest.mark.parametrize("bad, problem", [
    (torch.rand(1, 32, 32, 3), "IMAGE-shaped"),
    (torch.rand(2, 32, 32), "batch of 2 masks"),
    (torch.rand(32), "expected a MASK"),
    (torch.zeros(1, 0, 5), "expected a MASK"),
    (torch.full((1, 4, 4), float("nan")), "NaN"),
    (torch.full((1, 4, 4), 2.0), "outside 0..1"),
    (torch.full((1, 4, 4), -0.5), "outside 0..1"),
    (torch.ones(1, 4, 4, dtype=torch.int64), "dtype"),
    ([[0, 1]], "got a list"),
])
def test_check_refuses_the_wrong_kind_of_mask(bad, problem):
    with pytest.raises(R.RegionError) as info:
        R.check_region_mask(bad, "region")
    assert isinstance(info.value, ImageInputError) and info.value.input_name == "region"
    assert problem in str(info.value) and "Fix:" in str(info.value)


def test_token_weights_are_the_footprint_means():
    m = torch.zeros(64, 64)
    m[:, :32] = 1
    for grid in [(64, 64), (8, 8), (2, 2), (4, 8)]:
        w = R.token_weights(m, grid).view(*grid)
        assert torch.equal(w[:, : grid[1] // 2], torch.ones(grid[0], grid[1] // 2))
        assert torch.equal(w[:, grid[1] // 2:], torch.zeros(grid[0], grid[1] - grid[1] // 2))
    assert torch.allclose(R.token_weights(m, (1, 1)), torch.tensor([0.5]))
    # a tiny mask is stretched (nearest-like) onto a finer grid; any aspect is stretched
    small = torch.tensor([[1.0, 0.0]])
    assert torch.equal(R.token_weights(small, (2, 4)).view(2, 4), torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0.0]]))


def test_feather_keeps_far_tokens_exact_and_softens_the_edge():
    m = R.make_region("left half", 100, 60)[0]
    assert R.feather_mask(m, 0.0) is m
    f = R.feather_mask(m, 0.1)  # radius = 0.1 * 60 = 6 px
    assert torch.equal(f[:, :44], torch.ones(60, 44)) and torch.equal(f[:, 57:], torch.zeros(60, 43))
    band = f[:, 44:56]
    assert bool(((band > 0) & (band < 1)).any()) and bool((band[:, 1:] <= band[:, :-1]).all())  # monotone edge
    with pytest.raises(R.RegionError):
        R.feather_mask(m, 0.7)
    with pytest.raises(R.RegionError):
        R.feather_mask(m, float("nan"))


def test_blend_tokens_exact_at_the_ends_and_linear_between():
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(2, 6, 4, generator=g)
    inj = torch.randn(2, 3, 4, generator=g)
    index = torch.tensor([0, 2, 5])
    w = torch.tensor([1.0, 0.25, 1.0])
    out = R.blend_tokens(plain, inj, index, w)
    assert torch.equal(out[:, 0], inj[:, 0]) and torch.equal(out[:, 5], inj[:, 2])
    assert torch.equal(out[:, [1, 3, 4]], plain[:, [1, 3, 4]])
    assert torch.allclose(out[:, 2], 0.75 * plain[:, 2] + 0.25 * inj[:, 1], atol=1e-6)
    assert not torch.equal(out, plain) and plain.shape == out.shape
    rows = torch.tensor([False, True])
    part = R.blend_tokens(plain, inj[1:], index, w, rows)
    assert torch.equal(part[0], plain[0]) and torch.equal(part[1, 5], inj[1, 2])


@pytest.mark.parametrize("shape, inside", [
    ("left half", (slice(None), slice(0, 40))), ("right half", (slice(None), slice(40, 80))),
    ("top half", (slice(0, 30), slice(None))), ("bottom half", (slice(30, 60), slice(None))),
    ("box", (slice(15, 45), slice(20, 60))), ("everything", (slice(None), slice(None))),
])
def test_make_region_shapes(shape, inside):
    m = R.make_region(shape, 80, 60)
    assert m.shape == (1, 60, 80)
    expect = torch.zeros(60, 80)
    expect[inside] = 1
    assert torch.equal(m[0], expect)
    assert torch.equal(R.make_region(shape, 80, 60, invert=True)[0], 1 - expect)


def test_make_region_refuses_an_empty_box():
    with pytest.raises(R.RegionError) as info:
        R.make_region("box", 64, 64, (0.6, 0.1, 0.4, 0.9))
    assert info.value.input_name == "right"
    with pytest.raises(R.RegionError) as info:
        R.make_region("box", 64, 64, (0.1, 0.5, 0.9, 0.5))
    assert info.value.input_name == "bottom"


def test_region_object_and_preview():
    reg = R.Region.from_mask(R.make_region("right half", 32, 32), feather=0.0)
    assert not reg.empty and R.Region.from_mask(torch.zeros(1, 8, 8)).empty
    assert torch.equal(reg.weights((2, 2)), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert reg.weights((2, 2)) is reg.weights((2, 2))  # cached derived constant
    prev = region_preview(reg.mask[None])
    assert prev.shape == (1, 32, 32, 3) and float(prev[0, 0, 31, 1]) > float(prev[0, 0, 0, 1])
    img = torch.rand(1, 40, 20, 3)
    assert region_preview(reg.mask[None], img).shape == (1, 40, 20, 3)
    assert math.isclose(R.MAX_FEATHER, 0.5)
