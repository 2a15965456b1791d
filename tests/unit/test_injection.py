"""Self-attention injection (Eq. 7-9) against explicit attention written out here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from p3s_core.errors import P3SError
from p3s_core.injection import InjectionInputError, injected_context_value, reference_attention

B, N, C, HEADS = 3, 6, 8, 2


@pytest.fixture()
def setup():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    f = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    wq, wk, wv = (torch.randn(C, C, generator=g, dtype=torch.float64) / math.sqrt(C) for _ in range(3))
    return z, f, wq, wk, wv


def comfy_like_attn1(n, context, value, wq, wk, wv, heads):
    """What ComfyUI's attn1 does after the patch: Q from n, K from context, V from value."""
    q, k, v = n @ wq.t(), context @ wk.t(), value @ wv.t()
    b, nq, inner = q.shape
    d = inner // heads

    def split(x):
        return x.view(b, -1, heads, d).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, nq, inner)


def explicit_eq78(z, f, wq, wk, wv, heads, lam):
    """Eq. 7-8 with numpy loops over batch, head and query token."""
    z, f, wq, wk, wv = (t.detach().numpy() for t in (z, f, wq, wk, wv))
    b, n, c = z.shape
    d = wq.shape[0] // heads
    out = np.zeros((b, n, wq.shape[0]))
    for bi in range(b):
        q = z[bi] @ wq.T
        k = np.concatenate([z[bi], f[bi]], 0) @ wk.T
        v = np.concatenate([z[bi] + lam * f[bi], f[bi]], 0) @ wv.T
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            for i in range(n):
                logits = np.array([q[i, sl] @ k[j, sl] for j in range(k.shape[0])]) / math.sqrt(d)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[bi, i, sl] = p @ v[:, sl]
    return out


def test_reference_attention_is_eq78(setup):
    z, f, wq, wk, wv = setup
    ref = reference_attention(z, f, wq, wk, wv, HEADS, lam=0.2)
    assert ref.shape == (B, N, C)
    np.testing.assert_allclose(ref.numpy(), explicit_eq78(z, f, wq, wk, wv, HEADS, 0.2), atol=1e-10)


def test_reference_attention_without_f_is_plain_self_attention(setup):
    z, _, wq, wk, wv = setup
    plain = comfy_like_attn1(z, z, z, wq, wk, wv, HEADS)
    torch.testing.assert_close(reference_attention(z, None, wq, wk, wv, HEADS), plain)


@pytest.mark.parametrize("weight", [1.0, 0.7, 1.2])
def test_injection_plus_attention_equals_reference(setup, weight):
    z, f, wq, wk, wv = setup
    context, value = injected_context_value(z, f, weight, lam=0.2)
    assert context.shape == value.shape == (B, 2 * N, C)
    # Eq. 9: f is scaled by eps_t, then Eq. 7
    torch.testing.assert_close(context, torch.cat([z, weight * f], 1))
    torch.testing.assert_close(value, torch.cat([z + 0.2 * weight * f, weight * f], 1))
    out = comfy_like_attn1(z, context, value, wq, wk, wv, HEADS)
    torch.testing.assert_close(out, reference_attention(z, weight * f, wq, wk, wv, HEADS, 0.2))
    np.testing.assert_allclose(out.numpy(), explicit_eq78(z, weight * f, wq, wk, wv, HEADS, 0.2),
                               atol=1e-10)
    assert not torch.allclose(out, comfy_like_attn1(z, z, z, wq, wk, wv, HEADS))


def test_lambda_changes_only_the_first_value_half(setup):
    z, f, *_ = setup
    c0, v0 = injected_context_value(z, f, 1.0, lam=0.0)
    c1, v1 = injected_context_value(z, f, 1.0, lam=0.5)
    assert torch.equal(c0, c1)
    assert torch.equal(v0[:, N:], v1[:, N:])
    torch.testing.assert_close(v1[:, :N] - v0[:, :N], 0.5 * f)


@pytest.mark.parametrize("zero", [0.0, 0, torch.tensor(0.0), torch.zeros(B)])
def test_zero_weight_returns_z_itself(setup, zero):
    z, f, wq, wk, wv = setup
    context, value = injected_context_value(z, f, zero)
    assert context is z and value is z
    assert torch.equal(comfy_like_attn1(z, context, value, wq, wk, wv, HEADS),
                       comfy_like_attn1(z, z, z, wq, wk, wv, HEADS))


def test_no_active_row_returns_z_itself(setup):
    z, f, *_ = setup
    context, value = injected_context_value(z, f, 1.0, active=torch.zeros(B, dtype=torch.bool))
    assert context is z and value is z
    context, value = injected_context_value(z, f, torch.tensor([0.0, 1.0, 0.0]),
                                            active=[True, False, True])
    assert context is z and value is z


def test_zero_f_is_not_a_noop_so_skipping_matters(setup):
    """DESIGN: concatenated zero keys add zero-logit tokens; only skipping is exact."""
    z, _, wq, wk, wv = setup
    context, value = injected_context_value(z, torch.zeros_like(z), 1.0)
    assert context is not z
    plain = comfy_like_attn1(z, z, z, wq, wk, wv, HEADS)
    assert not torch.allclose(comfy_like_attn1(z, context, value, wq, wk, wv, HEADS), plain)


def test_duplicated_keys_values_give_plain_attention(setup):
    z, _, wq, wk, wv = setup
    dup = torch.cat([z, z], 1)
    torch.testing.assert_close(comfy_like_attn1(z, dup, dup, wq, wk, wv, HEADS),
                               comfy_like_attn1(z, z, z, wq, wk, wv, HEADS), atol=1e-12, rtol=0)


def test_active_mask_injects_only_selected_rows(setup):
    z, f, wq, wk, wv = setup
    active = torch.tensor([True, False, True])
    context, value = injected_context_value(z, f, 0.9, active=active)
    out = comfy_like_attn1(z.float(), context.float(), value.float(), wq.float(), wk.float(),
                           wv.float(), HEADS)
    plain = comfy_like_attn1(z.float(), z.float(), z.float(), wq.float(), wk.float(), wv.float(),
                             HEADS)
    ref = reference_attention(z, 0.9 * f, wq, wk, wv, HEADS, 0.2).float()
    torch.testing.assert_close(out[1], plain[1], atol=1e-5, rtol=0)  # inactive row: plain attention
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], ref[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], plain[0], atol=1e-3)


def test_per_row_weights(setup):
    z, f, wq, wk, wv = setup
    w = torch.tensor([0.5, 0.0, 1.5])
    context, value = injected_context_value(z.float(), f.float(), w)
    out = comfy_like_attn1(z.float(), context, value, wq.float(), wk.float(), wv.float(), HEADS)
    plain = comfy_like_attn1(z.float(), z.float(), z.float(), wq.float(), wk.float(), wv.float(),
                             HEADS)
    torch.testing.assert_close(out[1], plain[1], atol=1e-5, rtol=0)  # weight 0 row
    for i in (0, 2):
        ref = reference_attention(z[i:i + 1], float(w[i]) * f[i:i + 1], wq, wk, wv, HEADS, 0.2)
        torch.testing.assert_close(out[i], ref[0].float(), atol=1e-5, rtol=1e-5)
    # all rows active with per-row weights: exact formula, no duplication anywhere
    w2 = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    c2, v2 = injected_context_value(z, f, w2)
    torch.testing.assert_close(c2, torch.cat([z, w2.view(B, 1, 1) * f], 1))


def test_f_is_cast_to_z_dtype_and_gradients_reach_f(setup):
    z, f, *_ = setup
    f32 = f.float().requires_grad_(True)
    context, value = injected_context_value(z, f32, 0.5)
    assert context.dtype == value.dtype == torch.float64
    (context.sum() + value.sum()).backward()
    # d/df of sum(eps f) + sum(z + lam eps f) + sum(eps f) = eps * (2 + lam)
    torch.testing.assert_close(f32.grad, torch.full_like(f32, 0.5 * 2.2))


@pytest.mark.parametrize(
    "f_shape",
    [(B + 1, N, C), (1, N, C), (B, N + 2, C), (B, N, C + 1), (B * N, C), (B, N, C, 1)],
)
def test_shape_mismatch_raises(setup, f_shape):
    z, *_ = setup
    with pytest.raises(InjectionInputError) as info:
        injected_context_value(z, torch.zeros(f_shape, dtype=z.dtype), 1.0)
    assert isinstance(info.value, P3SError)
    assert info.value.input_name == "f"
    assert str(tuple(z.shape)) in str(info.value)


def test_bad_weight_and_mask_raise(setup):
    z, f, *_ = setup
    with pytest.raises(InjectionInputError, match="weight"):
        injected_context_value(z, f, torch.ones(B + 1))
    with pytest.raises(InjectionInputError, match="weight"):
        injected_context_value(z, f, float("nan"))
    with pytest.raises(InjectionInputError, match="weight"):
        injected_context_value(z, f, torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(InjectionInputError, match="weight"):
        injected_context_value(z, f, "1.0")  # type: ignore[arg-type]
    with pytest.raises(InjectionInputError, match="active"):
        injected_context_value(z, f, 1.0, active=torch.ones(B - 1, dtype=torch.bool))
    with pytest.raises(InjectionInputError, match="'z'"):
        injected_context_value(z[0], f[0], 1.0)


@pytest.mark.parametrize("weight,active", [(0.7, None), (torch.tensor([0.0, 1.0, 0.5]), None),
                                           (0.9, torch.tensor([True, False, True]))])
def test_interleaved_layout_is_the_interleaved_concatenation_bit_for_bit(setup, weight, active):
    """``interleaved=True`` (what the ComfyUI patch uses, one pass) equals the concatenated Eq. 7
    K/V reordered by :func:`interleave_slots`, exactly; the attention of both layouts agrees."""
    from p3s_core.injection import interleave_slots

    z, f, wq, wk, wv = setup
    c_cat, v_cat = injected_context_value(z, f, weight, lam=0.2, active=active)
    c_int, v_int = injected_context_value(z, f, weight, lam=0.2, active=active, interleaved=True)
    assert c_int.shape == (B, 2 * N, C)
    assert torch.equal(c_int, interleave_slots(c_cat, 2)) and torch.equal(v_int, interleave_slots(v_cat, 2))
    assert torch.equal(c_int[:, 0::2], z)  # slot 0 of every token is that token's own z
    a = comfy_like_attn1(z, c_cat, v_cat, wq, wk, wv, HEADS)
    b = comfy_like_attn1(z, c_int, v_int, wq, wk, wv, HEADS)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
