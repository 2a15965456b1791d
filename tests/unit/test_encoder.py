"""Eq. 4-5: the RNGR encoder, checked against an explicit per-pixel softmax attention."""
from __future__ import annotations

import math

import pytest
import torch

from p3s_core.encoder import RNGREncoder, prepare_reference
from p3s_core.errors import ImageInputError

C, CLIP, D = 4, 6, 3


def _reference(enc: RNGREncoder, lat: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """I'' = I' + softmax(W_Q Z(I') (W_K c_s)^T / sqrt d) W_V c_s, one pixel at a time."""
    wz, bz = enc.zero_conv.weight[:, :, 0, 0], enc.zero_conv.bias
    wq, wk, wv = enc.to_q.weight, enc.to_k.weight, enc.to_v.weight
    n, c, h, w = lat.shape
    out = lat.clone()
    for i in range(n):
        keys = [wk @ cs[i, s] for s in range(cs.shape[1])]
        vals = [wv @ cs[i, s] for s in range(cs.shape[1])]
        for y in range(h):
            for x in range(w):
                q = wq @ (wz @ lat[i, :, y, x] + bz)
                logits = [float(q @ k) / math.sqrt(enc.inner_dim) for k in keys]
                m = max(logits)
                ex = [math.exp(v - m) for v in logits]
                tot = sum(ex)
                out[i, :, y, x] += sum((e / tot) * v for e, v in zip(ex, vals))
    return out


@pytest.fixture
def enc():
    torch.manual_seed(0)
    return RNGREncoder(latent_channels=C, clip_dim=CLIP, inner_dim=D)


def test_default_dimensions_and_zero_init():
    e = RNGREncoder()
    assert tuple(e.to_q.weight.shape) == (64, 4)
    assert tuple(e.to_k.weight.shape) == (64, 1024)
    assert tuple(e.to_v.weight.shape) == (4, 1024)  # W_V maps CLIP width -> latent channels
    assert torch.count_nonzero(e.zero_conv.weight) == 0
    assert torch.count_nonzero(e.zero_conv.bias) == 0


def test_at_init_query_is_zero_so_attention_is_uniform(enc):
    lat, cs = torch.randn(2, C, 3, 2), torch.randn(2, 5, CLIP)
    with torch.no_grad():
        out = enc(lat, cs)
    for i in range(2):
        mean_v = sum(enc.to_v.weight @ cs[i, s] for s in range(5)) / 5
        torch.testing.assert_close(out[i], lat[i] + mean_v[:, None, None], atol=1e-5, rtol=1e-5)


def test_matches_explicit_attention_with_trained_zero_conv(enc):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        enc.zero_conv.weight.copy_(torch.randn(enc.zero_conv.weight.shape, generator=g))
        enc.zero_conv.bias.copy_(torch.randn(C, generator=g))
        enc.to_q.weight.mul_(4.0)  # sharpen the softmax so a wrong axis would show
    lat, cs = torch.randn(2, C, 3, 2), torch.randn(2, 5, CLIP)
    with torch.no_grad():
        torch.testing.assert_close(enc(lat, cs), _reference(enc, lat, cs), atol=1e-5, rtol=1e-5)
        # one CLIP encoding may be shared by several latents
        shared = enc(lat, cs[:1])
        torch.testing.assert_close(shared, _reference(enc, lat, cs[:1].expand(2, -1, -1)),
                                   atol=1e-5, rtol=1e-5)


def test_gradient_reaches_the_zero_conv(enc):
    lat, cs = torch.randn(1, C, 3, 3), torch.randn(1, 5, CLIP)
    (enc(lat, cs) * torch.randn(1, C, 3, 3)).sum().backward()
    assert enc.zero_conv.weight.grad.abs().sum() > 0
    assert enc.zero_conv.bias.grad.abs().sum() > 0
    assert enc.to_v.weight.grad.abs().sum() > 0


def test_input_errors(enc):
    with pytest.raises(ImageInputError, match="reference latent"):
        enc(torch.randn(1, 3, 4, 4), torch.randn(1, 5, CLIP))
    with pytest.raises(ImageInputError, match="ViT-L/14"):
        enc(torch.randn(1, C, 4, 4), torch.randn(1, 5, CLIP + 1))
    with pytest.raises(ImageInputError, match="2 CLIP encodings for 3"):
        enc(torch.randn(3, C, 4, 4), torch.randn(2, 5, CLIP))


def test_prepare_reference_uses_exactly_the_chosen_reference():
    """Several references are never averaged in latent space (issue 12): index picks one."""
    i2 = torch.randn(3, C, 4, 5)
    for index in range(3):
        out = prepare_reference(i2, batch=2, size=(4, 5), index=index)
        assert tuple(out.shape) == (2, C, 4, 5)
        assert torch.equal(out[0], i2[index]) and torch.equal(out[1], i2[index])
    assert torch.equal(prepare_reference(i2, 1, (4, 5))[0], i2[0])  # default: the first
    with pytest.raises(ImageInputError):
        prepare_reference(torch.randn(0, C, 4, 4), 1, (4, 4))
    with pytest.raises(ImageInputError, match="reference_index") as err:
        prepare_reference(i2, 1, (4, 5), index=3)
    assert "0 to 2" in str(err.value)


def _bilinear(img, oh, ow):
    """Half-pixel-centre bilinear resize of a [h, w] array (align_corners=False)."""
    h, w = img.shape
    out = torch.zeros(oh, ow)
    for y in range(oh):
        sy = max((y + 0.5) * h / oh - 0.5, 0.0)
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(ow):
            sx = max((x + 0.5) * w / ow - 0.5, 0.0)
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bot * fy
    return out


def test_prepare_reference_resizes_bilinearly_to_the_latent_size():
    i2 = torch.randn(2, C, 2, 3)
    out = prepare_reference(i2, batch=3, size=(4, 6), index=1)  # same aspect: a plain resize
    assert tuple(out.shape) == (3, C, 4, 6)
    for c in range(C):
        expected = _bilinear(i2[1, c], 4, 6)
        for b in range(3):
            torch.testing.assert_close(out[b, c], expected, atol=1e-5, rtol=1e-5)


def test_fit_keeps_the_aspect_ratio_scale_then_centre_crop():
    """A 512x384 reference (latent 48x64) at 512^2 (64x64) is scaled by 4/3 and centre-cropped,
    never stretched: a disc stays a disc."""
    from p3s_core.encoder import aspects_differ, fit_reference, fitted_size

    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    disc = (((ys - 23.5) ** 2 + (xs - 31.5) ** 2) <= 15.0 ** 2).float()
    ref = disc.expand(1, C, 48, 64).clone()
    out = fit_reference(ref, (64, 64))
    assert tuple(out.shape) == (1, C, 64, 64)
    assert fitted_size((48, 64), (64, 64)) == (64, 85)
    m = out[0, 0] > 0.5
    rows = torch.nonzero(m.any(1)).flatten()
    cols = torch.nonzero(m.any(0)).flatten()
    height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    assert abs(height - width) <= 1 and abs(height - 40) <= 2, (height, width)  # 30 px * 4/3
    # a stretch would have made it an ellipse 40 high, 30 wide
    stretched = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[0, 0] > 0.5
    sc = torch.nonzero(stretched.any(0)).flatten()
    assert abs(int(sc[-1] - sc[0] + 1) - 30) <= 1
    # centre crop: the disc stays centred
    assert abs(float(rows.float().mean()) - 31.5) <= 1 and abs(float(cols.float().mean()) - 31.5) <= 1
    assert aspects_differ((48, 64), (64, 64)) and not aspects_differ((48, 64), (96, 128))
    # a portrait reference in a landscape grid is scaled by its width and cropped top/bottom
    assert tuple(fit_reference(torch.randn(2, C, 10, 5), (4, 8)).shape) == (2, C, 4, 8)
