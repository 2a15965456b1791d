"""The per-token K/V layout of Eq. 7 (interleave_slots, append_kv_slot) used when composing with
other nodes' attention patches."""
from __future__ import annotations

import torch

from p3s_core.injection import append_kv_slot, injected_context_value, interleave_slots


def attend(q, k, v, heads=2):
    b, n, c = q.shape
    d = c // heads
    split = lambda x: x.reshape(x.shape[0], -1, heads, d).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c)


def data(b=2, n=16, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=torch.float64), torch.randn(b, n, c, generator=g,
                                                                               dtype=torch.float64)


def test_interleaving_k_and_v_alike_keeps_the_attention():
    z, f = data()
    ctx, val = injected_context_value(z, f, 0.7, lam=0.2)
    a = attend(z, ctx, val)
    b = attend(z, interleave_slots(ctx, 2), interleave_slots(val, 2))
    assert torch.allclose(a, b, atol=1e-12)
    assert not torch.allclose(a, attend(z, z, z), atol=1e-3)  # the injection does act


def test_folding_interleaved_kv_into_tiles_keeps_each_tokens_feature():
    """A kernel that splits K/V into T contiguous chunks (HyperTile's tiled queries) sees, in chunk i,
    the z tokens of chunk i and exactly their f tokens."""
    z, f = data(b=1, n=16)
    ctx = interleave_slots(torch.cat([z, f], dim=1), 2)
    tiles = 4
    chunks = ctx.reshape(tiles, -1, z.shape[-1])
    for i in range(tiles):
        part = slice(i * 4, (i + 1) * 4)
        assert torch.equal(chunks[i], torch.stack([z[0, part], f[0, part]], dim=1).reshape(8, -1))


def test_append_kv_slot_on_plain_kv_is_eq7():
    z, f = data()
    ctx, val = injected_context_value(z, f, 0.5, lam=0.2)
    c1, v1 = append_kv_slot(z, z, f * 0.5, 0.2, slots=1)
    assert torch.allclose(c1, interleave_slots(ctx, 2)) and torch.allclose(v1, interleave_slots(val, 2))


def test_append_kv_slot_plain_rows_are_the_plain_attention():
    z, f = data()
    plain = torch.tensor([True, False])
    c, v = append_kv_slot(z, z, f, 0.2, slots=1, plain_rows=plain)
    out = attend(z, c, v)
    assert torch.allclose(out[0], attend(z, z, z)[0], atol=1e-12)
    assert not torch.allclose(out[1], attend(z, z, z)[1], atol=1e-3)


def test_second_slot_adds_to_z_part_only():
    z, f = data()
    g = f.flip(1)
    c1, v1 = append_kv_slot(z, z, f, 0.2, slots=1)
    c2, v2 = append_kv_slot(c1, v1, g, 0.2, slots=2)
    c2r, v2r = c2.reshape(2, 16, 3, -1), v2.reshape(2, 16, 3, -1)
    assert torch.equal(c2r[:, :, 0], z) and torch.equal(c2r[:, :, 1], f) and torch.equal(c2r[:, :, 2], g)
    assert torch.allclose(v2r[:, :, 0], z + 0.2 * f + 0.2 * g)
    assert torch.equal(v2r[:, :, 1], f) and torch.equal(v2r[:, :, 2], g)
