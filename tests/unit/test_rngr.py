"""RNGR (paper Eq. 1-3): letterbox geometry, similarity maps, Otsu masks, distractor, inpainting.

Every equation is compared with a plain reference written here, and the acceptance scenario (two
look-alike objects; a negative point separates them) runs on synthetic patch features.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import filters, measure
from skimage.morphology import dilation, disk, erosion
from skimage.restoration import inpaint_biharmonic

from p3s_core.errors import ImageInputError, ModelMismatchError, P3SError, PointsError
from p3s_core.points import ImagePoints
from p3s_core.rngr import (
    RNGRResult,
    RNGRSettingsError,
    combine_maps,
    distractor_mask,
    grow_mask,
    inpaint,
    keep_components,
    letterbox,
    otsu_foreground,
    patch_grid,
    rngr_mask,
    similarity_map,
    smooth_to_image,
    subject_mask,
)

G = 16
P = 224 / G  # 14 px patches


# ============================================================================ letterbox
def test_letterbox_wide_image_geometry_and_pixels():
    img = np.full((224, 448, 3), 0.2, dtype=np.float32)
    sq, lb = letterbox(img)
    assert sq.shape == (224, 224, 3) and sq.dtype == np.float32
    # by hand: scale 224/448 = 0.5 -> 224 x 112, centred vertically: (224 - 112) / 2 = 56 rows above
    assert (lb.new_w, lb.new_h, lb.left, lb.top) == (224, 112, 0, 56)
    assert np.allclose(sq[56:168], 0.2) and np.allclose(sq[:56], 0.5) and np.allclose(sq[168:], 0.5)
    # pixel (0, 0) -> square (0, 56) -> patch row 56 // 14 = 4, col 0
    assert lb.image_to_patch(0, 0) == (4, 0)
    # centre (224, 112) -> square (112, 112) -> patch (8, 8)
    assert lb.image_to_patch(224, 112) == (8, 8)
    # last pixel (447.5, 223.5) -> square (223.75, 167.75) -> patch (11, 15)
    assert lb.image_to_patch(447.5, 223.5) == (11, 15)
    # far edge (448, 224) is in the image (closed bound) -> clamped to the last image patch (11, 15)
    assert lb.image_to_patch(448, 224) == (11, 15)
    # x = 28 -> square 14 -> col 1; y = 27.9 -> square 69.95 -> row 4; y = 28 -> square 70 -> row 5
    assert lb.image_to_patch(28, 27.9) == (4, 1)
    assert lb.image_to_patch(28, 28) == (5, 1)
    assert lb.valid_patches() == (4, 11, 0, 15)


def test_letterbox_content_keeps_the_pattern_and_never_crops():
    img = np.zeros((200, 320, 3), dtype=np.float32)
    img[:, 160:] = 1.0  # right half white
    img[:10, :, 1] = 1.0  # green band on the top edge
    sq, lb = letterbox(img, fill=0.25)
    # by hand: 0.7 scale -> 224 x 140, top pad (224 - 140) // 2 = 42
    assert (lb.new_w, lb.new_h, lb.top, lb.left) == (224, 140, 42, 0)
    assert np.allclose(sq[:42], 0.25) and np.allclose(sq[182:], 0.25)
    assert sq[120, 20, 0] < 0.05 and sq[120, 200, 0] > 0.95
    assert sq[43, 100, 1] > 0.9  # the top edge band survives: nothing was cropped


def test_non_square_corners_map_inside_image_patches():
    for w, h in [(320, 200), (200, 320), (500, 37), (1, 1), (224, 224)]:
        _, lb = letterbox(np.zeros((h, w, 3), np.float32))
        r0, r1, c0, c1 = lb.valid_patches()
        p = 224 / 16
        # reference: patches overlapping the pasted image, from the geometry by hand
        assert r0 == math.floor(lb.top / p) and r1 == math.ceil((lb.top + lb.new_h) / p) - 1
        assert c0 == math.floor(lb.left / p) and c1 == math.ceil((lb.left + lb.new_w) / p) - 1
        for x, y in [(0, 0), (w, 0), (0, h), (w, h), (w / 2, h / 2)]:
            r, c = lb.image_to_patch(x, y)
            assert r0 <= r <= r1 and c0 <= c <= c1
        # the full extent is covered: the corners reach the first and last image patches
        assert lb.image_to_patch(0, 0) == (r0, c0) and lb.image_to_patch(w, h) == (r1, c1)


def test_portrait_image_is_padded_left_right():
    _, lb = letterbox(np.zeros((320, 200, 3), np.float32))
    assert (lb.new_w, lb.new_h, lb.left, lb.top) == (140, 224, 42, 0)
    assert lb.image_to_patch(0, 0) == (0, 3)  # square x 42 -> col 3


def test_image_to_patch_rejects_outside_points():
    _, lb = letterbox(np.zeros((10, 20, 3), np.float32))
    with pytest.raises(PointsError, match="outside"):
        lb.image_to_patch(21, 3)
    with pytest.raises(PointsError):
        lb.image_to_patch(float("nan"), 3)


def test_grid_to_image_bilinear_ramp_and_crops_padding():
    _, lb = letterbox(np.zeros((200, 320, 3), np.float32))
    r0, r1, c0, c1 = lb.valid_patches()
    rows, cols = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
    m = 2.0 * rows + 3.0 * cols
    m[:r0] = 1000.0  # padding-only rows must never leak into the image
    m[r1 + 1:] = -1000.0
    out = lb.grid_to_image(m, 50, 80)
    assert out.shape == (50, 80)
    # reference: each output pixel centre mapped into the grid (patch centres at integers),
    # clamped to the image's patch centres; bilinear reproduces a linear ramp exactly
    ref = np.zeros((50, 80))
    for i in range(50):
        for j in range(80):
            y = (i + 0.5) * 200 / 50
            x = (j + 0.5) * 320 / 80
            gr = min(max((lb.top + y * lb.new_h / 200) / P - 0.5, r0), r1)
            gc = min(max((lb.left + x * lb.new_w / 320) / P - 0.5, c0), c1)
            ref[i, j] = 2.0 * gr + 3.0 * gc
    assert np.allclose(out, ref, atol=1e-9)
    assert out.max() < 100 and out.min() > -100


def test_grid_to_image_matches_resize_crop_resize_inside():
    from skimage.transform import resize

    _, lb = letterbox(np.zeros((224, 448, 3), np.float32))
    rng = np.random.default_rng(3)
    m = filters.gaussian(rng.random((G, G)), sigma=2.0)
    ours = lb.grid_to_image(m, 224, 448)
    sq = resize(m, (224, 224), order=1, mode="edge")
    ref = resize(sq[lb.top:lb.top + lb.new_h, :], (224, 448), order=1, mode="edge")
    # away from the image border (where ours holds the edge patch value) the two agree
    assert np.abs(ours[20:-20, 20:-20] - ref[20:-20, 20:-20]).max() < 2e-3


# ============================================================================ Eq. 1
def _cos_ref(tok, points_rc):
    g = tok.shape[0]
    out = np.full((g, g), -np.inf)
    for (r, c) in points_rc:
        a = tok[r, c]
        for i in range(g):
            for j in range(g):
                b = tok[i, j]
                na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
                cos = sum(u * v for u, v in zip(a, b)) / (na * nb)
                out[i, j] = max(out[i, j], cos)
    return out


def test_similarity_map_matches_loop_cosine_with_max():
    rng = np.random.default_rng(0)
    tok = rng.normal(size=(6, 6, 5))
    pts = [(1, 2), (4, 4)]
    ours = similarity_map(tok, pts)
    assert ours.shape == (6, 6)
    assert np.allclose(ours, _cos_ref(tok, pts), atol=1e-12)
    assert ours[1, 2] == pytest.approx(1.0) and ours[4, 4] == pytest.approx(1.0)
    # torch input, token-list layouts and CLS drop give the same map
    t = torch.tensor(tok, dtype=torch.float32)
    assert np.allclose(similarity_map(t, pts), ours, atol=1e-6)
    flat = tok.reshape(36, 5)
    assert np.allclose(similarity_map(flat, pts), ours)
    with_cls = np.concatenate([rng.normal(size=(1, 5)), flat])
    assert np.allclose(similarity_map(with_cls, pts), ours)


def test_similarity_map_no_points_is_zero_and_zero_vectors_are_zero():
    tok = np.ones((4, 4, 3))
    tok[0, 0] = 0.0
    assert np.array_equal(similarity_map(tok, []), np.zeros((4, 4)))
    m = similarity_map(tok, [(1, 1)])
    assert m[0, 0] == 0.0 and np.allclose(m[1:, 1:], 1.0)


def test_similarity_map_errors():
    with pytest.raises(ModelMismatchError, match="patch_tokens"):
        patch_grid(np.zeros((7, 4)))  # neither square nor square + CLS... 7 = 6 + 1? no: 6 not square
    with pytest.raises(ModelMismatchError, match="NaN"):
        similarity_map(np.full((2, 2, 3), np.nan), [(0, 0)])
    with pytest.raises(PointsError):
        similarity_map(np.ones((2, 2, 3)), [(2, 0)])


# ============================================================================ Eq. 2
def test_combine_maps_reference():
    rng = np.random.default_rng(1)
    mp, mn = rng.uniform(-1, 1, (5, 5)), rng.uniform(-1, 1, (5, 5))
    ref = np.empty((5, 5))
    for i in range(5):
        for j in range(5):
            p = min(max(mp[i, j], 0.0), 1.0)
            n = min(max(mn[i, j], 0.0), 1.0)
            ref[i, j] = p * (1.0 - n)
    assert np.allclose(combine_maps(mp, mn), ref)
    assert np.allclose(combine_maps(mp, np.zeros((5, 5))), np.clip(mp, 0, 1))


def _reference_pipeline(mp, mn, lb, sigma, points, hw):
    """Eq. 2 written out: S, Gaussian on the image's patches, upsample, Otsu, components."""
    s = np.clip(mp, 0, 1) * (1 - np.clip(mn, 0, 1))
    r0, r1, c0, c1 = lb.valid_patches(s.shape[0])
    sm = s.copy()
    sm[r0:r1 + 1, c0:c1 + 1] = filters.gaussian(s[r0:r1 + 1, c0:c1 + 1], sigma=sigma, mode="nearest")
    heat = lb.grid_to_image(sm, *hw)
    thr = filters.threshold_otsu(heat)
    fg = heat > thr
    lab = measure.label(fg, connectivity=2)
    keep = {lab[int(y), int(x)] for x, y in points} - {0}
    return np.isin(lab, list(keep)), heat, thr


def test_subject_mask_equals_reference_formula():
    rng = np.random.default_rng(5)
    tok = rng.normal(size=(G, G, 8))
    tok[3:9, 2:7] += 3.0 * np.array([1, 0, 0, 0, 0, 0, 0, 0])
    _, lb = letterbox(np.zeros((200, 320, 3), np.float32))
    pos, neg = [(60.0, 80.0)], [(250.0, 150.0)]
    pos_rc = [lb.image_to_patch(*p) for p in pos]
    neg_rc = [lb.image_to_patch(*p) for p in neg]
    mp, mn = similarity_map(tok, pos_rc), similarity_map(tok, neg_rc)
    ref_mask, ref_heat, ref_thr = _reference_pipeline(mp, mn, lb, 1.0, pos, (200, 320))
    ours = subject_mask(mp, mn, 1.0, pos, lb)
    assert ours.dtype == bool and ours.shape == (200, 320)
    assert np.array_equal(ours, ref_mask) and ours.any()
    heat = smooth_to_image(combine_maps(mp, mn), lb, 1.0)
    assert np.allclose(heat, ref_heat)
    fg, thr = otsu_foreground(heat)
    assert thr == pytest.approx(ref_thr) and np.array_equal(fg, heat > ref_thr)
    res = rngr_mask(tok, lb, ImagePoints(pos, neg))
    assert isinstance(res, RNGRResult)
    assert np.array_equal(res.subject_mask, ref_mask)
    assert res.subject_threshold == pytest.approx(ref_thr)
    assert np.allclose(res.heat, np.clip(ref_heat, 0, 1), atol=1e-6) and res.heat.dtype == np.float32
    assert np.allclose(res.M_P, mp) and np.allclose(res.M_N, mn)
    # distractor = the same pipeline with roles swapped, then the subject is protected
    ref_d, _, ref_dthr = _reference_pipeline(mn, mp, lb, 1.0, neg, (200, 320))
    assert res.distractor_threshold == pytest.approx(ref_dthr)
    assert np.array_equal(res.distractor_mask, ref_d & ~ref_mask)
    assert np.array_equal(distractor_mask(mp, mn, 1.0, neg, lb), ref_d)


def test_keep_components_reference_and_fallback():
    fg = np.zeros((30, 30), bool)
    fg[2:8, 2:8] = True  # component 1
    fg[20:25, 20:25] = True  # component 2
    fg[8, 8] = True  # diagonal touch: 8-connected to component 1
    assert np.array_equal(keep_components(fg, [(3.5, 3.5)]), fg & (np.arange(30)[:, None] < 10))
    both = keep_components(fg, [(3, 3), (22, 22)])
    assert np.array_equal(both, fg)
    # a point on background: kept only through the search radius
    assert not keep_components(fg, [(12.0, 12.0)]).any()
    near = keep_components(fg, [(11.0, 11.0)], search_radius=4)  # nearest fg (8, 8) at distance 4.2
    assert not near.any()
    near = keep_components(fg, [(10.0, 10.0)], search_radius=4)  # (8, 8) at distance 2.8
    assert near[3, 3] and not near[22, 22]
    assert not keep_components(fg, []).any()


def test_otsu_constant_map():
    m, thr = otsu_foreground(np.full((4, 5), 0.3))
    assert m.all() and thr == 0.3
    m, _ = otsu_foreground(np.zeros((4, 5)))
    assert not m.any()


def test_grow_matches_disk_dilation_and_erosion():
    rng = np.random.default_rng(2)
    m = np.zeros((60, 70), bool)
    m[20:35, 25:40] = True
    m[rng.random(m.shape) > 0.995] = True
    for r in (1, 3, 6):
        assert np.array_equal(grow_mask(m, r), dilation(m, disk(r)))
    inner = np.zeros((60, 70), bool)
    inner[15:45, 15:50] = True
    inner[30:34, 30:34] = False
    for r in (1, 2, 4):
        assert np.array_equal(grow_mask(inner, -r), erosion(inner, disk(r)))
    assert np.array_equal(grow_mask(m, 0), m)
    assert not grow_mask(np.zeros((5, 5), bool), 3).any()
    assert grow_mask(np.ones((5, 5), bool), 3).all()
    with pytest.raises(RNGRSettingsError, match="grow"):
        grow_mask(m, 1.5)  # type: ignore[arg-type]


# ============================================================================ acceptance scenario
def _scene(a_cells, b_cells, seed=0, d=64, inst=0.5, noise=0.2):
    """Synthetic CLIP patch features: background ~ one direction, objects A and B ~ a shared
    "dog" direction plus a smaller instance-specific direction; all directions orthonormal."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, 4)))
    bg, dog, ia, ib = q.T
    tok = np.tile(bg, (G, G, 1))
    for r, c in a_cells:
        tok[r, c] = dog + inst * ia
    for r, c in b_cells:
        tok[r, c] = dog + inst * ib
    return tok + noise * rng.normal(size=tok.shape) / math.sqrt(d)


def _truth(lb, cells, h, w):
    """Image-resolution truth: pixels whose centre falls in one of the object's patches."""
    cells = set(cells)
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            out[y, x] = lb.image_to_patch(x + 0.5, y + 0.5) in cells
    return out


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _centre_xy(lb, cells):
    r = np.mean([c[0] for c in cells])
    c = np.mean([c[1] for c in cells])
    u, v = (c + 0.5) * P, (r + 0.5) * P
    return ((u - lb.left) * lb.src_w / lb.new_w, (v - lb.top) * lb.src_h / lb.new_h)


H, W = 200, 320  # letterboxed: image patches are rows 3..12, all 16 columns
A_CELLS = [(r, c) for r in range(4, 11) for c in range(0, 7)]  # 7 x 7 patches
B_SEP = [(r, c) for r in range(5, 10) for c in range(10, 15)]  # 5 x 5, three columns away
B_TOUCH = [(r, c) for r in range(5, 10) for c in range(7, 12)]  # 5 x 5, sharing A's right edge


@pytest.fixture(scope="module")
def lb320():
    return letterbox(np.zeros((H, W, 3), np.float32))[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_negative_point_separates_lookalike(lb320, seed):
    tok = _scene(A_CELLS, B_SEP, seed=seed)
    pa, pb = _centre_xy(lb320, A_CELLS), _centre_xy(lb320, B_SEP)
    ta, tb = _truth(lb320, A_CELLS, H, W), _truth(lb320, B_SEP, H, W)
    res = rngr_mask(tok, lb320, ImagePoints([pa], [pb]))
    assert res.subject_mask.shape == (H, W) and res.subject_mask.dtype == bool
    assert _iou(res.subject_mask, ta) >= 0.9
    assert (res.subject_mask & tb).sum() == 0
    # even before the component step, the Otsu foreground excludes B
    fg = subject_mask(res.M_P, res.M_N, 1.0, [pa], lb320, keep_connected=False)
    assert (fg & tb).sum() / tb.sum() < 0.05
    # the distractor mask is B's region and spares A
    assert _iou(res.distractor_mask, tb) >= 0.75
    assert (res.distractor_mask & ta).sum() == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_without_negative_point_lookalikes_merge(lb320, seed):
    """Why negative points exist. A and B are apart here, so "merge" is judged on the Otsu
    foreground BEFORE the connected-component step (which would drop B only because it is
    separate)."""
    tok = _scene(A_CELLS, B_SEP, seed=seed)
    pa = _centre_xy(lb320, A_CELLS)
    tb = _truth(lb320, B_SEP, H, W)
    res = rngr_mask(tok, lb320, ImagePoints([pa], []))
    fg = subject_mask(res.M_P, res.M_N, 1.0, [pa], lb320, keep_connected=False)
    assert (fg & tb).sum() / tb.sum() > 0.6
    assert not res.distractor_mask.any() and res.distractor_threshold is None
    assert np.array_equal(res.M_N, np.zeros((G, G)))


def test_touching_lookalikes_merge_without_negative_and_split_with_it(lb320):
    tok = _scene(A_CELLS, B_TOUCH, seed=3)
    pa, pb = _centre_xy(lb320, A_CELLS), _centre_xy(lb320, B_TOUCH)
    ta, tb = _truth(lb320, A_CELLS, H, W), _truth(lb320, B_TOUCH, H, W)
    merged = rngr_mask(tok, lb320, ImagePoints([pa], [])).subject_mask
    assert (merged & tb).sum() / tb.sum() > 0.6  # final mask (after components) covers B too
    split = rngr_mask(tok, lb320, ImagePoints([pa], [pb])).subject_mask
    assert (split & tb).sum() / tb.sum() < 0.1
    assert (split & ta).sum() / ta.sum() > 0.8


def test_rngr_options_grow_protect_and_other_output_size(lb320):
    tok = _scene(A_CELLS, B_TOUCH, seed=4)
    pa, pb = _centre_xy(lb320, A_CELLS), _centre_xy(lb320, B_TOUCH)
    base = rngr_mask(tok, lb320, ImagePoints([pa], [pb]))
    grown = rngr_mask(tok, lb320, ImagePoints([pa], [pb]), grow=6)
    assert np.array_equal(grown.subject_mask, grow_mask(base.subject_mask, 6))
    assert grown.distractor_mask.sum() > base.distractor_mask.sum()
    assert not (grown.distractor_mask & base.subject_mask).any()  # subject protected
    unprot = rngr_mask(tok, lb320, ImagePoints([pa], [pb]), grow=6, protect_subject=False)
    assert (unprot.distractor_mask & base.subject_mask).any()
    # half-size output: points given in that size, masks at that size, same content
    half = rngr_mask(tok, lb320, ImagePoints([(pa[0] / 2, pa[1] / 2)], [(pb[0] / 2, pb[1] / 2)]),
                     image_hw=(H // 2, W // 2))
    assert half.subject_mask.shape == (H // 2, W // 2)
    assert np.array_equal(half.M_P, base.M_P)
    assert _iou(half.subject_mask, base.subject_mask[::2, ::2]) > 0.95


def test_rngr_errors(lb320):
    tok = _scene(A_CELLS, B_SEP)
    with pytest.raises(PointsError, match="positive"):
        rngr_mask(tok, lb320, ImagePoints([], [(10.0, 10.0)]))
    with pytest.raises(PointsError, match="outside"):
        rngr_mask(tok, lb320, ImagePoints([(W + 1.0, 3.0)], []))
    with pytest.raises(RNGRSettingsError, match="sigma"):
        rngr_mask(tok, lb320, ImagePoints([(3.0, 3.0)], []), sigma=-1.0)
    with pytest.raises(PointsError):
        subject_mask(np.zeros((G, G)), np.zeros((G, G)), 1.0, [], lb320)
    assert not distractor_mask(np.zeros((G, G)), np.zeros((G, G)), 1.0, [], lb320).any()


# ============================================================================ Eq. 3
def _photo(h=48, w=64):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([0.2 + 0.3 * xx / w, 0.6 - 0.2 * yy / h, np.full((h, w), 0.4)], -1)
    img = img.astype(np.float32)
    mask = np.zeros((h, w), bool)
    mask[h // 4: h // 2 + 4, w // 3: w // 3 + 14] = True
    img[mask] = (0.95, 0.05, 0.05)  # the red distractor
    return img, mask


@pytest.mark.parametrize("mode", ["biharmonic", "blur", "flat", "none"])
def test_inpaint_outside_unchanged(mode):
    img, mask = _photo()
    out = inpaint(img, mask, mode)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert np.array_equal(out[~mask], img[~mask])
    assert np.isfinite(out).all()
    red = np.array([0.95, 0.05, 0.05])
    if mode == "none":
        assert np.array_equal(out, img)
    else:
        dist = np.linalg.norm(out[mask] - red, axis=-1)
        assert dist.min() > 0.4  # nothing of the red object is left


def test_inpaint_flat_is_mean_of_outside():
    img, mask = _photo()
    out = inpaint(img, mask, "flat")
    ref = [sum(float(v) for v in img[..., c][~mask]) / (~mask).sum() for c in range(3)]
    assert np.allclose(out[mask], np.array(ref, np.float32), atol=1e-6)


def test_inpaint_blur_follows_surroundings():
    img, mask = _photo()
    out = inpaint(img, mask, "blur")
    # the fill is a blend of nearby background colours: inside the range of the outside pixels
    lo, hi = img[~mask].min(axis=0), img[~mask].max(axis=0)
    assert (out[mask] >= lo - 1e-3).all() and (out[mask] <= hi + 1e-3).all()
    # and it is not flat: the left/right edges of the hole follow the horizontal red gradient
    ys, xs = np.nonzero(mask)
    left = out[ys[xs == xs.min()], xs.min(), 0].mean()
    right = out[ys[xs == xs.max()], xs.max(), 0].mean()
    assert right > left


def test_inpaint_biharmonic_matches_skimage_when_small():
    img, mask = _photo()
    out = inpaint(img, mask, "biharmonic", work_size=256)  # no downscale at 64 px
    ref = inpaint_biharmonic(img.astype(np.float64), mask, channel_axis=-1)
    assert np.allclose(out[mask], np.clip(ref[mask], 0, 1), atol=1e-5)


def test_inpaint_large_image_works_at_reduced_size():
    img, mask = _photo(300, 400)
    out = inpaint(img, mask, "biharmonic", work_size=64)
    assert np.array_equal(out[~mask], img[~mask])
    assert np.linalg.norm(out[mask] - np.array([0.95, 0.05, 0.05]), axis=-1).min() > 0.4
    blur = inpaint(img, mask, "blur", work_size=64)
    assert np.array_equal(blur[~mask], img[~mask])


def test_inpaint_edge_cases_and_errors():
    img, mask = _photo()
    assert np.array_equal(inpaint(img, np.zeros_like(mask), "flat"), img)
    full = np.ones_like(mask)
    for mode in ("flat", "blur", "biharmonic"):
        out = inpaint(img, full, mode)
        assert np.allclose(out, 0.5)  # nothing known: neutral grey
    # float masks threshold at 0.5; [H, W, 1] masks accepted
    assert np.array_equal(inpaint(img, mask.astype(np.float32)[..., None], "flat"), inpaint(img, mask, "flat"))
    with pytest.raises(RNGRSettingsError, match="inpaint_mode") as ei:
        inpaint(img, mask, "telea")
    assert isinstance(ei.value, P3SError)
    with pytest.raises(ImageInputError, match="mask"):
        inpaint(img, mask[:10], "flat")
    with pytest.raises(ImageInputError, match="image"):
        inpaint(img[..., 0], mask, "flat")
