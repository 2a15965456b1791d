"""Training losses (Eq. 11-15) against numpy / loop reference formulas written out here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from p3s_core.errors import P3SError, TrainingConfigError
from p3s_core.losses import (
    LossInputError,
    attention_consistency_loss,
    attention_probs,
    ldm_loss,
    total_loss,
)


def softmax_rows(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def probs_loops(q, k, heads):
    q, k = q.numpy().astype(np.float64), k.numpy().astype(np.float64)
    b, nq, c = q.shape
    nk = k.shape[1]
    d = c // heads
    out = np.zeros((b, heads, nq, nk))
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            for i in range(nq):
                logits = np.array([np.dot(q[bi, i, sl], k[bi, j, sl]) for j in range(nk)])
                out[bi, h, i] = softmax_rows(logits / math.sqrt(d))
    return out


def lac_numpy(mc, mo, reading="mass"):
    mc, mo = np.asarray(mc, np.float64), np.asarray(mo, np.float64)
    sq = ((mc - mo) ** 2).sum()
    if reading == "literal":
        sq = sq / mc.size
    avg = (mc.sum() + mo.sum()) / 2
    return sq / avg


def test_attention_probs_matches_loops():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 8, generator=g)
    k = torch.randn(2, 3, 8, generator=g)
    p = attention_probs(q, k, heads=2)
    assert p.shape == (2, 2, 5, 3)
    np.testing.assert_allclose(p.numpy(), probs_loops(q, k, 2), atol=1e-6)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 5))


def test_attention_probs_half_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 4, generator=g).half()
    k = torch.randn(1, 3, 4, generator=g).half()
    p = attention_probs(q, k, heads=1)
    assert p.dtype == torch.float32
    np.testing.assert_allclose(p.numpy(), probs_loops(q.float(), k.float(), 1), atol=1e-6)


def test_attention_probs_rejects_bad_inputs():
    q = torch.zeros(1, 4, 6)
    with pytest.raises(LossInputError, match="heads"):
        attention_probs(q, torch.zeros(1, 3, 6), heads=4)
    with pytest.raises(LossInputError, match="'k'"):
        attention_probs(q, torch.zeros(2, 3, 6), heads=2)
    with pytest.raises(LossInputError, match="'q'"):
        attention_probs(torch.zeros(4, 6), torch.zeros(1, 3, 6), heads=2)


def test_attention_consistency_loss_matches_eq11_12():
    g = torch.Generator().manual_seed(3)
    mc = torch.softmax(torch.randn(2, 2, 6, 4, generator=g), -1)
    mo = torch.softmax(torch.randn(2, 2, 6, 4, generator=g), -1)
    loss = attention_consistency_loss(mc, mo)
    assert loss.dim() == 0
    assert float(loss) == pytest.approx(lac_numpy(mc, mo), rel=1e-6)
    # avg sums the whole tensor: softmax rows sum to 1, so avg = number of rows and the default
    # ("mass") loss is the mean per-query squared distance between the two distributions
    rows = 2 * 2 * 6
    per_query = float(((mc - mo) ** 2).sum(-1).mean())
    assert float(loss) == pytest.approx(per_query, rel=1e-6)
    # the literal reading (MSE / avg) is that divided by the element count once more
    literal = attention_consistency_loss(mc, mo, reading="literal")
    assert float(literal) == pytest.approx(lac_numpy(mc, mo, "literal"), rel=1e-6)
    mse = float(((mc - mo) ** 2).mean())
    assert float(literal) == pytest.approx(mse / rows, rel=1e-6)
    assert float(literal) == pytest.approx(float(loss) / mc.numel(), rel=1e-6)


def test_default_reading_does_not_shrink_with_resolution_but_literal_does():
    """At 512^2 (4096 queries, 77 tokens) the literal reading is ~1e-9: no effect (issue 12)."""
    g = torch.Generator().manual_seed(8)
    vals = {}
    for nq in (64, 4096):
        mc = torch.softmax(torch.randn(1, nq, 77, generator=g), -1)
        mo = torch.softmax(torch.randn(1, nq, 77, generator=g), -1)
        vals[nq] = (float(attention_consistency_loss(mc, mo)),
                    float(attention_consistency_loss(mc, mo, reading="literal")))
    assert vals[4096][0] == pytest.approx(vals[64][0], rel=0.1)   # resolution-independent
    assert 1e-3 < vals[4096][0] < 1.0
    # the literal reading is divided by Nq * Nk once more: ~1e-7 even for unrelated maps, and it
    # shrinks with the resolution (64x more queries -> 64x smaller)
    assert vals[4096][1] < 1e-6 and vals[64][1] / vals[4096][1] == pytest.approx(64, rel=0.1)
    with pytest.raises(LossInputError, match="reading"):
        attention_consistency_loss(mc, mo, reading="paper")


def test_attention_consistency_loss_on_non_normalised_maps_and_zero():
    mc = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mo = torch.tensor([[0.0, 2.0], [5.0, 4.0]])
    # summed squares = 1 + 0 + 4 + 0 = 5, MSE = 5 / 4 = 1.25 ; avg = (10 + 11) / 2 = 10.5
    assert float(attention_consistency_loss(mc, mo)) == pytest.approx(5 / 10.5)
    assert float(attention_consistency_loss(mc, mo, reading="literal")) == pytest.approx(1.25 / 10.5)
    assert float(attention_consistency_loss(mo, mo)) == 0.0
    # all-zero maps: avg clamped by eps, no NaN
    z = torch.zeros(2, 2)
    assert float(attention_consistency_loss(z, z)) == 0.0


def test_gradient_flows_to_m_c():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 2, 4, 3, generator=g, requires_grad=True)
    mc = torch.softmax(logits, -1)
    mo = torch.softmax(torch.randn(1, 2, 4, 3, generator=g), -1)
    loss = attention_consistency_loss(mc, mo)
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    # gradient w.r.t. the map itself against the closed form of mse / avg
    mc2 = mc.detach().clone().requires_grad_(True)
    attention_consistency_loss(mc2, mo, reading="literal").backward()
    n = mc2.numel()
    avg = (mc2.detach().sum() + mo.sum()) / 2
    mse = ((mc2.detach() - mo) ** 2).mean()
    expected = (2 * (mc2.detach() - mo) / n) / avg - mse / avg ** 2 * 0.5
    torch.testing.assert_close(mc2.grad, expected, atol=1e-7, rtol=1e-5)


def test_resizing_m_c_to_m_o_grid():
    g = torch.Generator().manual_seed(5)
    nk = 3
    mc = torch.softmax(torch.randn(1, 2, 2 * 2, nk, generator=g), -1)  # 2x2 grid
    mo = torch.softmax(torch.randn(1, 2, 4 * 4, nk, generator=g), -1)  # 4x4 grid
    loss = attention_consistency_loss(mc, mo, hw_c=(2, 2), hw_o=(4, 4))
    # reference: bilinear (half-pixel centres, edge clamp) upsampling written out by hand
    src = mc.numpy().reshape(1, 2, 2, 2, nk)
    up = np.zeros((1, 2, 4, 4, nk))
    for y in range(4):
        for x in range(4):
            sy = min(max((y + 0.5) * 2 / 4 - 0.5, 0.0), 1.0)
            sx = min(max((x + 0.5) * 2 / 4 - 0.5, 0.0), 1.0)
            y0, x0 = int(math.floor(sy)), int(math.floor(sx))
            y1, x1 = min(y0 + 1, 1), min(x0 + 1, 1)
            wy, wx = sy - y0, sx - x0
            up[:, :, y, x] = ((1 - wy) * (1 - wx) * src[:, :, y0, x0] + (1 - wy) * wx * src[:, :, y0, x1]
                              + wy * (1 - wx) * src[:, :, y1, x0] + wy * wx * src[:, :, y1, x1])
    up = up.reshape(1, 2, 16, nk)
    np.testing.assert_allclose(up.sum(-1), 1.0, atol=1e-6)  # resized rows are still distributions
    assert float(loss) == pytest.approx(lac_numpy(up, mo.numpy()), rel=1e-5)
    # same grid: no resize, plain loss
    assert float(attention_consistency_loss(mo, mo, hw_c=(4, 4), hw_o=(4, 4))) == 0.0


def test_consistency_loss_shape_errors():
    a = torch.zeros(1, 2, 4, 3)
    with pytest.raises(LossInputError) as info:
        attention_consistency_loss(a, torch.zeros(1, 2, 16, 3))
    assert info.value.input_name == "m_c" and isinstance(info.value, P3SError)
    with pytest.raises(LossInputError, match="hw_c/hw_o"):
        attention_consistency_loss(a, a, hw_c=(2, 2))
    with pytest.raises(LossInputError, match="hw_c"):
        attention_consistency_loss(a, torch.zeros(1, 2, 16, 3), hw_c=(3, 3), hw_o=(4, 4))
    with pytest.raises(LossInputError, match="m_c"):  # heads differ: cannot be resized away
        attention_consistency_loss(torch.zeros(1, 1, 4, 3), torch.zeros(1, 2, 16, 3),
                                   hw_c=(2, 2), hw_o=(4, 4))
    with pytest.raises(LossInputError, match="m_o"):
        attention_consistency_loss(a, torch.zeros(3))


def test_ldm_loss_is_mean_squared_error():
    noise = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    pred = torch.tensor([[0.0, -1.0], [0.5, 2.0]])
    # (1 + 1 + 0 + 4) / 4
    assert float(ldm_loss(noise, pred)) == pytest.approx(1.5)
    g = torch.Generator().manual_seed(6)
    n, p = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    ref = sum((float(a) - float(b)) ** 2 for a, b in zip(n.flatten(), p.flatten())) / n.numel()
    assert float(ldm_loss(n, p)) == pytest.approx(ref, rel=1e-6)
    assert ldm_loss(n.half(), p.half()).dtype == torch.float32
    with pytest.raises(LossInputError, match="noise_pred"):
        ldm_loss(n, p[:1])  # must not broadcast


def test_total_loss_eq15():
    l_ldm, l_ac = torch.tensor(0.3), torch.tensor(2.0)
    assert float(total_loss(l_ldm, l_ac)) == pytest.approx(0.3 + 0.1 * 2.0)
    assert float(total_loss(l_ldm, l_ac, gamma=0.0)) == pytest.approx(0.3)
    assert float(total_loss(l_ldm, l_ac, gamma=0.5)) == pytest.approx(1.3)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(TrainingConfigError, match="gamma"):
            total_loss(l_ldm, l_ac, gamma=bad)
