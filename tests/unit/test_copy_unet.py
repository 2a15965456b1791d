"""Eq. 6: the trainable copy of the simplified UNet (tiny config), checked against plain formulas."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p3s_core.copy_init import count_parameters, init_from_ldm_unet
from p3s_core.copy_unet import (ATTN_MAP_KEY, LAYER_MAP, CopyUNetConfig, Downsample, P3SCopyUNet, ResBlock,
                                SpatialTransformer, layer_key, layer_map, timestep_embedding)
from p3s_core.errors import AdapterFileError, ModelMismatchError

TINY = CopyUNetConfig.tiny()
PREFIX = "model.diffusion_model."


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _silu(x):
    return x / (1.0 + torch.exp(-x))


def _group_norm(x, groups, weight, bias, eps):
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return y * weight[None, :, None, None] + bias[None, :, None, None]


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _attention(x, ctx, attn, heads):
    """Explicit multi-head attention; returns (output, probabilities averaged over heads)."""
    q = x @ attn.to_q.weight.T
    k = ctx @ attn.to_k.weight.T
    v = ctx @ attn.to_v.weight.T
    d = q.shape[-1] // heads
    outs, probs = [], []
    for hd in range(heads):
        sl = slice(hd * d, (hd + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)
        e = torch.exp(logits - logits.max(-1, keepdim=True).values)
        p = e / e.sum(-1, keepdim=True)
        probs.append(p)
        outs.append(p @ v[..., sl])
    out = torch.cat(outs, -1) @ attn.to_out[0].weight.T + attn.to_out[0].bias
    return out, sum(probs) / heads


def _ref_spatial_transformer(st, x, ctx, heads, groups):
    b, c, h, w = x.shape
    y = _group_norm(x, groups, st.norm.weight, st.norm.bias, 1e-6)
    y = torch.einsum("oc,bchw->bohw", st.proj_in.weight[:, :, 0, 0], y) \
        + st.proj_in.bias[None, :, None, None]
    t = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
    blk = st.transformer_blocks[0]
    n1 = _layer_norm(t, blk.norm1.weight, blk.norm1.bias)
    a1, _ = _attention(n1, n1, blk.attn1, heads)
    t = a1 + t
    a2, probs = _attention(_layer_norm(t, blk.norm2.weight, blk.norm2.bias), ctx, blk.attn2, heads)
    t = a2 + t
    n3 = _layer_norm(t, blk.norm3.weight, blk.norm3.bias)
    proj = n3 @ blk.ff.net[0].proj.weight.T + blk.ff.net[0].proj.bias
    half = proj.shape[-1] // 2
    g = proj[..., :half] * _gelu(proj[..., half:])
    t = g @ blk.ff.net[2].weight.T + blk.ff.net[2].bias + t
    y = t.reshape(b, h, w, c).permute(0, 3, 1, 2)
    y = torch.einsum("oc,bchw->bohw", st.proj_out.weight[:, :, 0, 0], y) \
        + st.proj_out.bias[None, :, None, None]
    return x + y, probs


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# --------------------------------------------------------------------------- building blocks


def test_timestep_embedding_matches_ldm_formula():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    dim = 8
    emb = timestep_embedding(t, dim)
    half = dim // 2
    for i, tv in enumerate(t.tolist()):
        for j in range(half):
            f = math.exp(-math.log(10000.0) * j / half)
            assert emb[i, j].item() == pytest.approx(math.cos(tv * f), abs=1e-5)
            assert emb[i, half + j].item() == pytest.approx(math.sin(tv * f), abs=1e-5)


@pytest.mark.parametrize("cin,cout", [(16, 16), (16, 24)])
def test_resblock_matches_reference(cin, cout):
    torch.manual_seed(0)
    rb = ResBlock(cin, 12, cout, groups=8)
    _randomise(rb, 1)
    assert isinstance(rb.skip_connection, nn.Conv2d) == (cin != cout)
    x = torch.randn(2, cin, 5, 3)
    emb = torch.randn(2, 12)
    h = _group_norm(x, 8, rb.in_layers[0].weight, rb.in_layers[0].bias, 1e-5)
    h = F.conv2d(_silu(h), rb.in_layers[2].weight, rb.in_layers[2].bias, padding=1)
    h = h + (_silu(emb) @ rb.emb_layers[1].weight.T + rb.emb_layers[1].bias)[:, :, None, None]
    h = _group_norm(h, 8, rb.out_layers[0].weight, rb.out_layers[0].bias, 1e-5)
    h = F.conv2d(_silu(h), rb.out_layers[3].weight, rb.out_layers[3].bias, padding=1)
    skip = x if cin == cout else F.conv2d(x, rb.skip_connection.weight, rb.skip_connection.bias)
    torch.testing.assert_close(rb(x, emb), skip + h, atol=1e-4, rtol=1e-4)


def test_spatial_transformer_and_attention_map_match_reference():
    torch.manual_seed(0)
    st = SpatialTransformer(16, heads=2, context_dim=6, groups=4)
    _randomise(st, 2)
    x = torch.randn(2, 16, 3, 4)
    ctx = torch.randn(2, 5, 6)
    expected, probs = _ref_spatial_transformer(st, x, ctx, heads=2, groups=4)
    out, amap = st(x, ctx, return_attn=True)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(amap, probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st(x, ctx), expected, atol=1e-4, rtol=1e-4)


def test_downsample_uses_ceil_sizes():
    d = Downsample(8)
    assert tuple(d(torch.zeros(1, 8, 9, 7)).shape[-2:]) == (5, 4)
    assert tuple(d(torch.zeros(1, 8, 8, 8)).shape[-2:]) == (4, 4)


# --------------------------------------------------------------------------- config / layer map


def test_config_json_round_trip_and_validation():
    for cfg in (CopyUNetConfig.sd15(), TINY):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert CopyUNetConfig.from_dict(d) == cfg
    assert CopyUNetConfig.sd15().level_channels == (320, 640, 1280, 1280)
    with pytest.raises(AdapterFileError, match="unknown fields"):
        CopyUNetConfig.from_dict({**TINY.to_dict(), "bogus": 1})
    with pytest.raises(AdapterFileError, match="divisible"):
        CopyUNetConfig(model_channels=36, groups=8, num_heads=2, context_dim=8, time_embed_dim=16)
    with pytest.raises(AdapterFileError, match="3 entries"):
        CopyUNetConfig(channel_mult=(1, 2, 4, 4))


def test_layer_map_covers_the_16_sd15_self_attention_layers():
    expected = ([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)]
                + [("output", i) for i in range(3, 12)])
    assert [tuple(e["block"]) for e in LAYER_MAP] == expected
    assert len({e["key"] for e in LAYER_MAP}) == 16
    widths = {("input", 1): 320, ("input", 2): 320, ("input", 4): 640, ("input", 5): 640,
              ("input", 7): 1280, ("input", 8): 1280, ("middle", 0): 1280}
    widths.update({("output", i): 1280 for i in (3, 4, 5)})
    widths.update({("output", i): 640 for i in (6, 7, 8)})
    widths.update({("output", i): 320 for i in (9, 10, 11)})
    down = {320: 1, 640: 2, 1280: 4}
    for e in LAYER_MAP:
        blk = tuple(e["block"])
        assert e["channels"] == widths[blk]
        assert e["transformer_index"] == 0
        assert e["key"] == f"{blk[0]}_{blk[1]}" == layer_key(blk, 0)
        assert e["downscale"] == (8 if blk[0] == "middle" else down[widths[blk]])
        assert e["level"] == int(math.log2(e["downscale"]))
    assert layer_key(("output", 11), 1) != "output_11"
    assert [e["channels"] for e in layer_map(TINY)][:7] == [32, 32, 64, 64, 128, 128, 128]
    json.dumps(LAYER_MAP)  # JSON-serialisable


# --------------------------------------------------------------------------- the copy


@pytest.fixture(scope="module")
def tiny_copy():
    torch.manual_seed(0)
    return P3SCopyUNet(TINY)


@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_token_counts_match_the_original_levels(tiny_copy, hw):
    h, w = hw
    out = tiny_copy(torch.randn(2, 4, h, w), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 32),
                    torch.randn(2, 4, h, w), return_attn_map=True)
    sizes = [(h, w)]
    for _ in range(3):  # the original UNet: stride-2 conv, padding 1 -> ceil
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    for e in layer_map(TINY):
        lh, lw = sizes[e["level"]]
        assert tuple(out[e["key"]].shape) == (2, lh * lw, e["channels"])
    assert tuple(out[ATTN_MAP_KEY].shape) == (2, h * w, 5)
    torch.testing.assert_close(out[ATTN_MAP_KEY].sum(-1), torch.ones(2, h * w))
    assert set(out) == {e["key"] for e in layer_map(TINY)} | {ATTN_MAP_KEY}


def test_zero_at_init_but_gradients_reach_the_zero_convs():
    torch.manual_seed(0)
    copy = P3SCopyUNet(TINY)
    x, ref = torch.randn(2, 4, 5, 4), torch.randn(2, 4, 5, 4)
    out = copy(x, torch.tensor([3.0, 700.0]), torch.randn(2, 5, 32), ref)
    assert len(out) == 16
    for key, f in out.items():
        assert torch.count_nonzero(f) == 0, key
    loss = sum((f * torch.randn_like(f)).sum() for f in out.values())
    loss.backward()
    for key, conv in copy.zero_convs.items():
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, key
        assert conv.bias.grad.abs().sum() > 0, key
    # the rest of the copy only sees gradient through the (zero) zero-conv weights
    assert torch.count_nonzero(copy.conv_in.weight.grad) == 0


def test_features_are_zero_convs_of_level_outputs_in_token_layout(tiny_copy):
    copy = P3SCopyUNet(TINY)
    copy.load_state_dict(tiny_copy.state_dict())
    _randomise(copy.zero_convs, 5)
    x, ref = torch.randn(1, 4, 6, 5), torch.randn(1, 4, 6, 5)
    t, ctx = torch.tensor([250.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        out = copy(x, t, ctx, ref)
        feats = copy.level_features(x + ref, t, ctx)  # Eq. 6 input is x_t + I''
        for e in layer_map(TINY):
            conv = copy.zero_convs[e["key"]]
            fm = feats[e["level"]][0]
            _, lh, lw = fm.shape
            for y in range(lh):
                for xx in range(lw):
                    expected = conv.weight[:, :, 0, 0] @ fm[:, y, xx] + conv.bias
                    torch.testing.assert_close(out[e["key"]][0, y * lw + xx], expected,
                                               atol=1e-4, rtol=1e-4)
        # a scalar timestep is broadcast to the batch
        out2 = copy(x, torch.tensor(250.0), ctx, ref)
        torch.testing.assert_close(out2["input_1"], out["input_1"])


def test_attention_map_is_level0_attn2_averaged_over_heads(tiny_copy):
    captured = {}
    attn2 = tiny_copy.levels[0].st.transformer_blocks[0].attn2

    def hook(mod, args, kwargs):
        captured["x"], captured["ctx"] = args[0].detach(), args[1].detach()

    handle = attn2.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = tiny_copy(torch.randn(2, 4, 4, 4), torch.tensor([1.0, 2.0]),
                            torch.randn(2, 7, 32), torch.randn(2, 4, 4, 4), return_attn_map=True)
    finally:
        handle.remove()
    _, probs = _attention(captured["x"], captured["ctx"], attn2, TINY.num_heads)
    torch.testing.assert_close(out[ATTN_MAP_KEY], probs, atol=1e-5, rtol=1e-5)


def test_input_errors(tiny_copy):
    with pytest.raises(ModelMismatchError, match="context"):
        tiny_copy(torch.randn(1, 4, 4, 4), torch.tensor([1.0]), torch.randn(1, 5, 768))
    with pytest.raises(ModelMismatchError, match="prepare_reference"):
        tiny_copy(torch.randn(1, 4, 4, 4), torch.tensor([1.0]), torch.randn(1, 5, 32),
                  torch.randn(1, 4, 2, 2))


# --------------------------------------------------------------------------- init from the UNet


def _tiny_ldm_unet(seed=0):
    """A tiny base UNet state dict in LDM key naming, from the building blocks (random weights)."""
    torch.manual_seed(seed)
    c, emb, ctx, g = 32, 128, 32, 8

    def st(ch):
        return SpatialTransformer(ch, 2, ctx, g)

    blocks = {
        "time_embed": nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb)),
        "input_blocks.0.0": nn.Conv2d(4, c, 3, padding=1),
        "input_blocks.1.0": ResBlock(c, emb, c, g), "input_blocks.1.1": st(c),
        "input_blocks.2.0": ResBlock(c, emb, c, g), "input_blocks.2.1": st(c),
        "input_blocks.3.0": Downsample(c),
        "input_blocks.4.0": ResBlock(c, emb, 2 * c, g), "input_blocks.4.1": st(2 * c),
        "input_blocks.5.0": ResBlock(2 * c, emb, 2 * c, g), "input_blocks.5.1": st(2 * c),
        "input_blocks.6.0": Downsample(2 * c),
        "input_blocks.7.0": ResBlock(2 * c, emb, 4 * c, g), "input_blocks.7.1": st(4 * c),
        "input_blocks.8.0": ResBlock(4 * c, emb, 4 * c, g), "input_blocks.8.1": st(4 * c),
        "input_blocks.9.0": Downsample(4 * c),
        "input_blocks.10.0": ResBlock(4 * c, emb, 4 * c, g),
        "middle_block.0": ResBlock(4 * c, emb, 4 * c, g), "middle_block.1": st(4 * c),
        "middle_block.2": ResBlock(4 * c, emb, 4 * c, g),
        "output_blocks.11.0": ResBlock(2 * c, emb, c, g), "output_blocks.11.1": st(c),
        "out.2": nn.Conv2d(c, 4, 3, padding=1),
    }
    sd = {}
    for name, mod in blocks.items():
        _randomise(mod, seed + len(sd))
        for k, v in mod.state_dict().items():
            sd[f"{PREFIX}{name}.{k}"] = v.clone()
    return sd


#: Written out independently of the module: copy prefix -> LDM prefix.
EXPECTED_SOURCES = {
    "time_embed.": "time_embed.", "conv_in.": "input_blocks.0.0.",
    "levels.0.res.": "input_blocks.1.0.", "levels.0.st.": "input_blocks.1.1.",
    "downs.0.op.": "input_blocks.3.0.op.",
    "levels.1.res.": "input_blocks.4.0.", "levels.1.st.": "input_blocks.4.1.",
    "downs.1.op.": "input_blocks.6.0.op.",
    "levels.2.res.": "input_blocks.7.0.", "levels.2.st.": "input_blocks.7.1.",
    "downs.2.op.": "input_blocks.9.0.op.",
    "middle.res.": "middle_block.0.", "middle.st.": "middle_block.1.",
}


@pytest.fixture(scope="module")
def base_sd():
    return _tiny_ldm_unet()


def test_init_from_ldm_unet_copies_exactly_and_keeps_zero_convs(base_sd):
    sd = base_sd
    assert PREFIX + "input_blocks.4.0.skip_connection.weight" in sd
    assert sd[PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 32)
    torch.manual_seed(1)
    copy = P3SCopyUNet(TINY)
    copied = init_from_ldm_unet(copy, sd, prefix=PREFIX)
    own = copy.state_dict()
    checked = 0
    for key, val in own.items():
        if key.startswith("zero_convs."):
            assert torch.count_nonzero(val) == 0
            continue
        src = [PREFIX + ldm + key[len(cp):] for cp, ldm in EXPECTED_SOURCES.items()
               if key.startswith(cp)]
        assert len(src) == 1, key
        assert torch.equal(val, sd[src[0]]), key
        checked += 1
    assert sorted(copied) == sorted(k for k in own if not k.startswith("zero_convs."))
    assert checked == len(copied) > 150
    out = copy(torch.randn(1, 4, 8, 8), torch.tensor([5.0]), torch.randn(1, 5, 32),
               torch.randn(1, 4, 8, 8))
    assert all(torch.count_nonzero(f) == 0 for f in out.values())


def test_init_refuses_a_unet_of_another_family_and_leaves_the_copy_untouched(base_sd):
    torch.manual_seed(2)
    copy = P3SCopyUNet(TINY)
    before = {k: v.clone() for k, v in copy.state_dict().items()}
    sd = dict(base_sd)  # cross-attention context of another width (48) in every transformer
    for k in list(sd):
        if ".attn2.to_k." in k or ".attn2.to_v." in k:
            sd[k] = torch.randn(sd[k].shape[0], 48)
    with pytest.raises(ModelMismatchError, match=r"attn2\.to_k\.weight") as ei:
        init_from_ldm_unet(copy, sd, prefix=PREFIX)
    assert "SD1.5" in str(ei.value)
    sd = dict(base_sd)
    sd[PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(32, 2048)
    with pytest.raises(ModelMismatchError, match="SDXL"):
        init_from_ldm_unet(copy, sd, prefix=PREFIX)
    sd = {k: v for k, v in base_sd.items() if not k.startswith(PREFIX + "middle_block.1.")}
    with pytest.raises(ModelMismatchError, match=r"missing keys.*middle_block\.1\."):
        init_from_ldm_unet(copy, sd, prefix=PREFIX)
    with pytest.raises(ModelMismatchError, match="missing"):
        init_from_ldm_unet(copy, base_sd, prefix="")  # wrong prefix
    for k, v in copy.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_parameter_counts():
    with torch.device("meta"):
        sd15 = P3SCopyUNet(CopyUNetConfig.sd15())
    assert count_parameters(sd15) == 179_614_400  # documented in the module docstring
    expected_zero = sum(c * c + c for c in [e["channels"] for e in LAYER_MAP])
    assert count_parameters(sd15.zero_convs) == expected_zero == 12_402_880
    tiny = P3SCopyUNet(TINY)
    assert count_parameters(tiny) == sum(v.numel() for v in tiny.state_dict().values())
