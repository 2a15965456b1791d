"""Each speed-up of the sampling path computes what the straightforward code computes (issue 14).

- the copy (Eq. 6) shares its context-free start between the equal rows of a CFG batch;
- the 16 zero convs run as linear maps on the level's tokens;
- with ``cond only`` the copy runs on the active rows only;
- the extended self-attention of Eq. 7-8 can go through PyTorch's fused SDPA kernel.

All compared against the plain computation within float32 rounding (tiny models, no ComfyUI).
"""
from __future__ import annotations

import math

import pytest
import torch

from p3s_core.adapter import new_adapter
from p3s_core.comfyui_engine import P3SInjectorPatch
from p3s_core.copy_unet import ATTN_MAP_KEY, CopyUNetConfig, P3SCopyUNet, distinct_rows
from p3s_core.injection import injected_context_value

TINY = CopyUNetConfig.tiny()
ATOL, RTOL = 2e-5, 1e-4


def _copy(seed=0):
    torch.manual_seed(seed)
    copy = P3SCopyUNet(TINY).eval()
    with torch.no_grad():
        for conv in copy.zero_convs.values():  # a trained-looking copy, not the all-zero init
            conv.weight.normal_(0, 0.2)
            conv.bias.normal_(0, 0.2)
    return copy


def _cfg_batch(b_half=1, hw=(16, 12), seed=1):
    """A CFG batch as ComfyUI builds it: the same x_t and t in both halves, two text contexts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b_half, 4, *hw, generator=g)
    ref = torch.randn(1, 4, *hw, generator=g).expand(2 * b_half, -1, -1, -1)
    t = torch.full((2 * b_half,), 500.0)
    ctx = torch.randn(2 * b_half, 7, TINY.context_dim, generator=g)
    return torch.cat([x, x]), t, ctx, ref.contiguous()


def _straightforward(copy, x, t, ctx, ref, return_attn_map=False):
    """The copy without the speed-ups: every row on its own, zero convs as 1x1 convs."""
    copy.share_cfg_rows = False
    try:
        res = copy.level_features(x, t, ctx, ref, return_attn_map)
    finally:
        copy.share_cfg_rows = True
    feats, amap = res if return_attn_map else (res, None)
    out = {e["key"]: copy.zero_convs[e["key"]](feats[e["level"]]).flatten(2).transpose(1, 2)
           for e in copy.layer_map}
    if return_attn_map:
        out[ATTN_MAP_KEY] = amap
    return out


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=k)


@pytest.mark.parametrize("b_half", [1, 2])
@pytest.mark.parametrize("attn_map", [False, True])
def test_copy_with_shared_cfg_rows_equals_the_straightforward_copy(b_half, attn_map):
    copy = _copy()
    x, t, ctx, ref = _cfg_batch(b_half)
    with torch.no_grad():
        fast = copy(x, t, ctx, ref, return_attn_map=attn_map)
        slow = _straightforward(copy, x, t, ctx, ref, return_attn_map=attn_map)
    _assert_same(fast, slow)
    # the halves differ (the text context reaches every level): sharing did not copy one onto the other
    assert not torch.allclose(fast["input_1"][:b_half], fast["input_1"][b_half:], atol=1e-3)


def test_copy_gradients_are_unchanged_by_row_sharing():
    x, t, ctx, ref = _cfg_batch(1)
    grads = []
    for share in (True, False):
        copy = _copy()
        copy.share_cfg_rows = share
        out = copy(x, t, ctx, ref)
        sum(f.square().mean() for f in out.values()).backward()
        grads.append({n: p.grad.clone() for n, p in copy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-3, msg=n)


def test_distinct_rows_groups_bit_identical_rows_only():
    a, b = torch.randn(4, 3, 3), torch.randn(4, 3, 3)
    t = torch.tensor([10.0, 10.0, 10.0, 20.0])
    firsts, inv = distinct_rows(torch.stack([a, b, a, a]), t)
    assert firsts.tolist() == [0, 1, 3] and inv.tolist() == [0, 1, 0, 2]  # row 3 has another t
    assert distinct_rows(torch.stack([a, b]), t[:2]) is None
    nudged = a.clone()
    nudged[0, 0, 0] = torch.nextafter(nudged[0, 0, 0], torch.tensor(math.inf))
    assert distinct_rows(torch.stack([a, nudged]), t[:2]) is None
    assert distinct_rows(a[None], t[:1]) is None


def test_copy_on_active_rows_only_gives_the_same_active_features():
    """``cond only``: the copy skips the uncond rows; the cond rows' features are the same."""
    adapter = new_adapter(TINY, seed=0, clip_dim=32).eval()
    with torch.no_grad():
        for conv in adapter.copy.zero_convs.values():
            conv.weight.normal_(0, 0.2)
    x, t, ctx, _ = _cfg_batch(1)
    i2 = torch.randn(1, 4, 8, 6)
    patch = P3SInjectorPatch(adapter, i2, None, comfy_ops=False, apply_to="cond only")
    active = patch._active_rows(2, [0, 1])
    assert active.tolist() == [True, False]
    with torch.no_grad():
        fast = patch.copy_features(x, t, ctx, active)
        full = patch.copy_features(x, t, ctx, None)
    for k in full:
        torch.testing.assert_close(fast[k][:1], full[k][:1], atol=ATOL, rtol=RTOL, msg=k)
        assert fast[k].shape == full[k].shape and not fast[k][1:].any()
    # the attention sees exactly what it saw before: inactive rows attend to [z, z] either way
    z = torch.randn(2, fast["input_1"].shape[1], fast["input_1"].shape[2])
    for a, b in zip(injected_context_value(z, fast["input_1"], 0.7, 0.2, active),
                    injected_context_value(z, full["input_1"], 0.7, 0.2, active)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


# --- RNGR (Eq. 1-2) -------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(512, 512), (300, 700), (1000, 37), (513, 1025), (230, 100)])
def test_letterbox_resize_equals_skimage_resize(hw):
    import numpy as np
    from skimage import transform

    from p3s_core import rngr

    img = np.random.default_rng(sum(hw)).random(hw + (3,)).astype(np.float32)
    sq, box = rngr.letterbox(img, size=224)
    ref = transform.resize(img, (box.new_h, box.new_w, 3), order=1, mode="edge",
                           anti_aliasing=(box.new_h < hw[0] or box.new_w < hw[1]), preserve_range=True)
    ours = sq[box.top:box.top + box.new_h, box.left:box.left + box.new_w]
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("r", [1, 2, 4, 7, 16, 17, 30])
def test_grow_mask_equals_the_distance_transform(r):
    import numpy as np
    from scipy import ndimage

    from p3s_core.rngr import grow_mask

    rng = np.random.default_rng(r)
    m = ndimage.binary_opening(rng.random((97, 131)) > 0.6)
    assert m.any() and not m.all()
    assert np.array_equal(grow_mask(m, r), ndimage.distance_transform_edt(~m) <= r)
    assert np.array_equal(grow_mask(m, -r), ndimage.distance_transform_edt(m) > r)


def test_grid_to_image_equals_the_dense_separable_product():
    import numpy as np

    from p3s_core import rngr

    rng = np.random.default_rng(0)
    for hw in [(512, 512), (200, 320), (37, 1000), (5, 5)]:
        _, lb = rngr.letterbox(np.zeros(hw + (3,), np.float32))
        m = rng.random((16, 16))
        r0, r1, c0, c1 = lb.valid_patches(16)
        wy = lb._axis_weights(hw[0], lb.src_h, lb.new_h, lb.top, 16, r0, r1)
        wx = lb._axis_weights(hw[1], lb.src_w, lb.new_w, lb.left, 16, c0, c1)
        np.testing.assert_allclose(lb.grid_to_image(m), wy @ m @ wx.T, atol=1e-12, rtol=0)
