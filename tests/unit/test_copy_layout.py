"""Issue 22: the copy layouts. "full" is one copy layer (one ResNet block + one transformer) for each
of the 16 UNet transformers: two per encoder level, the middle, three per decoder level (the decoder
fed by the copy's own skips), so each of the 16 UNet self-attention layers reads its OWN copy layer;
"encoder" (format-1 adapters) stays exactly as it was."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from p3s_core.adapter import load_adapter, new_adapter, save_adapter
from p3s_core.cli.main import build_parser
from p3s_core.copy_config import (COPY_LAYOUTS, DEFAULT_COPY_LAYOUT, check_copy_layout, feature_index,
                                  num_features)
from p3s_core.copy_init import count_parameters, init_from_ldm_unet, ldm_key_map
from p3s_core.copy_unet import ATTN_MAP_KEY, CopyUNetConfig, P3SCopyUNet, layer_map
from p3s_core.errors import AdapterFileError, TrainingConfigError

TINY = CopyUNetConfig.tiny()
FULL = CopyUNetConfig.tiny("full")
ENC = dict(clip_dim=16, encoder_inner_dim=8)

#: The format-1 config JSON of the tiny copy, written out (no "layout" key).
FORMAT1_TINY = {"in_channels": 4, "model_channels": 32, "channel_mult": [1, 2, 4], "context_dim": 32,
                "num_heads": 2, "time_embed_dim": 128, "groups": 8, "dropout": 0.0}

#: Written out independently of the module: every "full" copy prefix -> its LDM prefix (SD1.5
#: input_blocks / middle_block / output_blocks), the encoder's second pairs and the decoder's 9 pairs.
EXPECTED_FULL_SOURCES = {
    "time_embed.": "time_embed.", "conv_in.": "input_blocks.0.0.",
    "levels.0.res.": "input_blocks.1.0.", "levels.0.st.": "input_blocks.1.1.",
    "levels_b.0.res.": "input_blocks.2.0.", "levels_b.0.st.": "input_blocks.2.1.",
    "downs.0.": "input_blocks.3.0.",
    "levels.1.res.": "input_blocks.4.0.", "levels.1.st.": "input_blocks.4.1.",
    "levels_b.1.res.": "input_blocks.5.0.", "levels_b.1.st.": "input_blocks.5.1.",
    "downs.1.": "input_blocks.6.0.",
    "levels.2.res.": "input_blocks.7.0.", "levels.2.st.": "input_blocks.7.1.",
    "levels_b.2.res.": "input_blocks.8.0.", "levels_b.2.st.": "input_blocks.8.1.",
    "downs.2.": "input_blocks.9.0.",
    "middle.res.": "middle_block.0.", "middle.st.": "middle_block.1.",
    "decoder.ups.2.": "output_blocks.2.1.",
    "decoder.levels.2.0.res.": "output_blocks.3.0.", "decoder.levels.2.0.st.": "output_blocks.3.1.",
    "decoder.levels.2.1.res.": "output_blocks.4.0.", "decoder.levels.2.1.st.": "output_blocks.4.1.",
    "decoder.levels.2.2.res.": "output_blocks.5.0.", "decoder.levels.2.2.st.": "output_blocks.5.1.",
    "decoder.ups.1.": "output_blocks.5.2.",
    "decoder.levels.1.0.res.": "output_blocks.6.0.", "decoder.levels.1.0.st.": "output_blocks.6.1.",
    "decoder.levels.1.1.res.": "output_blocks.7.0.", "decoder.levels.1.1.st.": "output_blocks.7.1.",
    "decoder.levels.1.2.res.": "output_blocks.8.0.", "decoder.levels.1.2.st.": "output_blocks.8.1.",
    "decoder.ups.0.": "output_blocks.8.2.",
    "decoder.levels.0.0.res.": "output_blocks.9.0.", "decoder.levels.0.0.st.": "output_blocks.9.1.",
    "decoder.levels.0.1.res.": "output_blocks.10.0.", "decoder.levels.0.1.st.": "output_blocks.10.1.",
    "decoder.levels.0.2.res.": "output_blocks.11.0.", "decoder.levels.0.2.st.": "output_blocks.11.1.",
}

#: Written out: layer-map key -> the copy module (pair) that is its own copy layer in "full".
OWN_PAIR = {
    "input_1": "levels.0", "input_2": "levels_b.0", "input_4": "levels.1", "input_5": "levels_b.1",
    "input_7": "levels.2", "input_8": "levels_b.2", "middle_0": "middle",
    "output_3": "decoder.levels.2.0", "output_4": "decoder.levels.2.1", "output_5": "decoder.levels.2.2",
    "output_6": "decoder.levels.1.0", "output_7": "decoder.levels.1.1", "output_8": "decoder.levels.1.2",
    "output_9": "decoder.levels.0.0", "output_10": "decoder.levels.0.1", "output_11": "decoder.levels.0.2",
}

#: SD1.5 ``output_blocks.N.0.in_layers.2.weight`` input widths (h + skip), read off the SD1.5 UNet.
SD15_DECODER_IN = {3: 2560, 4: 2560, 5: 1920, 6: 1920, 7: 1280, 8: 960, 9: 960, 10: 640, 11: 640}


def _randomise(module, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def _close(a, b, rel=1e-4):
    """Equal within float rounding relative to the tensor's scale (deep random nets reach ~1e2)."""
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rel * float(b.abs().max()), float((a - b).abs().max())


def _inputs(b=2, h=9, w=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, h, w, generator=g), torch.tensor([10.0, 500.0])[:b],
            torch.randn(b, 5, 32, generator=g), torch.randn(b, 4, h, w, generator=g))


@pytest.fixture(scope="module")
def full_copy():
    return _randomise(P3SCopyUNet(FULL), 1).eval()


# --------------------------------------------------------------------------- config / layer map


def test_encoder_layout_config_and_layer_map_are_the_format1_ones():
    assert TINY.layout == "encoder" == DEFAULT_COPY_LAYOUT
    assert TINY.to_dict() == FORMAT1_TINY
    assert CopyUNetConfig.from_dict(FORMAT1_TINY) == TINY
    assert all("source" not in e for e in layer_map(TINY))
    assert [feature_index(e) for e in layer_map(TINY)] == [e["level"] for e in layer_map(TINY)]
    assert num_features(TINY) == 4
    with torch.device("meta"):
        enc = P3SCopyUNet(CopyUNetConfig.sd15())
    assert enc.decoder is None
    assert not any(k.startswith("decoder.") for k in enc.state_dict())
    assert count_parameters(enc) == 179_614_400


def test_full_layout_config_round_trip_and_layer_map():
    d = json.loads(json.dumps(FULL.to_dict()))
    assert d == {**FORMAT1_TINY, "layout": "full"}
    assert CopyUNetConfig.from_dict(d) == FULL != TINY
    lm = layer_map(FULL)
    dec = [e["key"] for e in lm if e.get("source") == "decoder"]
    assert dec == [f"output_{i}" for i in range(3, 12)]
    # the entries keep the level / width of the encoder layout; only "feature" / "source" are added
    for a, b in zip(lm, layer_map(TINY)):
        assert {k: v for k, v in a.items() if k not in ("source", "feature")} == b
    # each of the 16 layers reads its own copy feature: its position in the layer map
    assert [feature_index(e) for e in lm] == list(range(16))
    assert len({feature_index(e) for e in lm}) == 16 == num_features(FULL)


def test_bad_layouts_are_typed_errors():
    with pytest.raises(AdapterFileError, match="layout 'half'"):
        CopyUNetConfig(layout="half")
    with pytest.raises(AdapterFileError, match="layout"):
        CopyUNetConfig.from_dict({**FORMAT1_TINY, "layout": 2})
    with pytest.raises(TrainingConfigError, match="copy_layout") as ei:
        check_copy_layout("decoder")
    assert "'encoder'" in str(ei.value)
    assert check_copy_layout("full") == "full"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "photos", "--out", "a.safetensors", "--model", "m",
                                   "--clip-vision", "c", "--copy-layout", "half"])


def test_cli_takes_the_copy_layout():
    args = build_parser().parse_args(["train", "photos", "--out", "a.safetensors", "--model", "m",
                                      "--clip-vision", "c", "--copy-layout", "full"])
    assert isinstance(args, argparse.Namespace) and args.copy_layout == "full"
    args = build_parser().parse_args(["train", "photos", "--out", "a.safetensors", "--model", "m",
                                      "--clip-vision", "c"])
    assert args.copy_layout == DEFAULT_COPY_LAYOUT


# --------------------------------------------------------------------------- the full copy


def test_full_copy_has_the_documented_parameter_count():
    with torch.device("meta"):
        full = P3SCopyUNet(CopyUNetConfig.sd15("full"))
    assert count_parameters(full) == 631_001_600
    assert sum(p.numel() for p in full.zero_convs.parameters()) == 12_402_880
    sts = full.feature_transformers()
    assert len(sts) == 16 == len({id(st) for st in sts})
    modules = dict(full.named_modules())
    for e, st in zip(layer_map(CopyUNetConfig.sd15("full")), sts):
        assert st is modules[OWN_PAIR[e["key"]] + ".st"], e["key"]
        assert st.proj_in.weight.shape[0] == e["channels"], e["key"]


def test_full_decoder_input_widths_are_the_sd15_unets():
    with torch.device("meta"):
        full = P3SCopyUNet(CopyUNetConfig.sd15("full"))
    modules = dict(full.named_modules())
    for n, cin in SD15_DECODER_IN.items():
        pair = OWN_PAIR[f"output_{n}"]
        assert modules[pair + ".res"].in_layers[2].weight.shape[1] == cin, n


@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_full_copy_gives_16_features_of_the_original_layer_sizes(full_copy, hw):
    x, t, ctx, ref = _inputs(h=hw[0], w=hw[1])
    with torch.no_grad():
        _randomise(full_copy.zero_convs, 5)
        out = full_copy(x, t, ctx, ref, return_attn_map=True)
        feats = full_copy.level_features(x, t, ctx, ref)
    sizes = [hw]
    for _ in range(3):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    assert len(feats) == 16
    for e in layer_map(FULL):
        lh, lw = sizes[e["level"]]
        assert out[e["key"]].shape == (2, lh * lw, e["channels"]), e["key"]
        f = feats[feature_index(e)]
        z = full_copy.zero_convs[e["key"]]
        with torch.no_grad():
            expected = F.conv2d(f, z.weight, z.bias).flatten(2).transpose(1, 2)
        _close(out[e["key"]], expected)
    # no two layers read the same feature
    for i in range(16):
        for j in range(i):
            if feats[i].shape == feats[j].shape:
                assert not torch.allclose(feats[i], feats[j], atol=1e-3), (i, j)
    assert out[ATTN_MAP_KEY].shape == (2, hw[0] * hw[1], 5)


def test_each_layer_reads_its_own_copy_layer():
    """With non-zero zero convs, changing the transformer of layer k's own copy pair changes layer k's
    feature and no feature of a layer that runs before it (e.g. output_11 <- decoder level 0's third
    pair, input_2 <- level 0's second encoder pair, not input_1)."""
    copy = _randomise(P3SCopyUNet(FULL), 4).eval()
    x, t, ctx, ref = _inputs(h=9, w=7)
    keys = [e["key"] for e in layer_map(FULL)]
    with torch.no_grad():
        base = copy(x, t, ctx, ref)
        for k, key in enumerate(keys):
            st = dict(copy.named_modules())[OWN_PAIR[key] + ".st"]
            old = st.proj_out.weight.clone()
            st.proj_out.weight.add_(0.5)
            out = copy(x, t, ctx, ref)
            st.proj_out.weight.copy_(old)
            assert not torch.allclose(out[key], base[key], atol=1e-4), key
            for earlier in keys[:k]:
                assert torch.equal(out[earlier], base[earlier]), (key, earlier)
        # and a ResBlock: decoder level 0's third pair drives output_11 only
        res = copy.decoder.levels[0][2].res
        res.in_layers[2].weight.mul_(-1.0)
        out = copy(x, t, ctx, ref)
    assert not torch.allclose(out["output_11"], base["output_11"], atol=1e-4)
    assert all(torch.equal(out[k], base[k]) for k in keys[:-1])


def test_decoder_is_upsample_concat_skip_resblock_transformer(full_copy):
    """Every copy pair, recomputed by hand with the copy's OWN skip stack (LDM order: h, skip)."""
    x, t, ctx, ref = _inputs()
    with torch.no_grad():
        feats, amap = full_copy.level_features(x, t, ctx, ref, return_attn_map=True)
        from p3s_core.copy_unet import timestep_embedding

        c = full_copy
        emb = c.time_embed(timestep_embedding(t, FULL.model_channels))
        h = c.conv_in(x + ref)
        skips, mine = [h], []
        for lvl in range(3):
            for pair in (c.levels[lvl], c.levels_b[lvl]):
                h = pair.st(pair.res(h, emb), ctx)
                mine.append(h)
                skips.append(h)
            h = c.downs[lvl](h)
            if lvl < 2:
                skips.append(h)
        assert [s.shape[1] for s in skips] == [32, 32, 32, 32, 64, 64, 64, 128, 128]
        h = c.middle.st(c.middle.res(h, emb), ctx)
        mine.append(h)
        for lvl in (2, 1, 0):
            h = c.decoder.ups[lvl].conv(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
            for pair in c.decoder.levels[lvl]:
                h, m = pair.st(pair.res(torch.cat([h, skips.pop()], 1), emb), ctx, return_attn=True)
                mine.append(h)
        assert not skips
        for i, (a, b) in enumerate(zip(feats, mine)):
            _close(a, b)
        _close(amap, m)  # decoder level 0's third pair feeds output_11


@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_full_copy_shares_cfg_rows_exactly(hw):
    copy = _randomise(P3SCopyUNet(FULL, enhancement="cross"), 2).eval()
    x, t, ctx, ref = _inputs(h=hw[0], w=hw[1])
    x, ref, t = torch.cat([x[:1], x[:1]]), torch.cat([ref[:1], ref[:1]]), torch.tensor([7.0, 7.0])
    with torch.no_grad():
        copy.share_cfg_rows = True
        a = copy(x, t, ctx, ref, return_attn_map=True)
        copy.share_cfg_rows = False
        b = copy(x, t, ctx, ref, return_attn_map=True)
        copy.share_cfg_rows = True
    assert len(b) == 2 * 16 + 1
    for k in b:
        _close(a[k], b[k])


def _tiny_ldm_state(copy, prefix="model.diffusion_model.", seed=0):
    """A random LDM state dict holding exactly the tensors the copy reads, in LDM names."""
    g = torch.Generator().manual_seed(seed)
    own = copy.state_dict()
    return {prefix + lk: torch.randn(own[ck].shape, generator=g) for ck, lk in ldm_key_map(copy).items()}


def test_full_init_copies_every_pair_from_its_unet_layer_and_keeps_zero_convs():
    copy = P3SCopyUNet(FULL)
    assert dict(ldm_prefixes()) == EXPECTED_FULL_SOURCES
    sd = _tiny_ldm_state(copy)
    copied = init_from_ldm_unet(copy, sd, prefix="model.diffusion_model.")
    checked = 0
    for key, val in copy.state_dict().items():
        if key.startswith("zero_convs."):
            assert torch.count_nonzero(val) == 0
            continue
        src = [p + key[len(cp):] for cp, p in EXPECTED_FULL_SOURCES.items() if key.startswith(cp)]
        assert len(src) == 1, key
        assert torch.equal(val, sd["model.diffusion_model." + src[0]]), key
        checked += 1
    assert checked == len(copied) == sum(1 for k in copy.state_dict() if not k.startswith("zero_convs."))
    # every one of the 16 UNet transformers and of its ResBlocks has a copy
    blocks = {k.split(".transformer_blocks")[0] for k in ldm_key_map(copy).values() if ".transformer_blocks." in k}
    assert blocks == {f"input_blocks.{n}.1" for n in (1, 2, 4, 5, 7, 8)} | {"middle_block.1"} | {
        f"output_blocks.{n}.1" for n in range(3, 12)}
    assert copy.decoder.levels[2][0].res.in_layers[2].weight.shape[1] == 2 * FULL.level_channels[2]
    assert copy.decoder.levels[0][2].res.in_layers[2].weight.shape[1] == 2 * FULL.model_channels
    sd.pop("model.diffusion_model.output_blocks.11.1.proj_out.weight")
    with pytest.raises(Exception, match=r"output_blocks\.11\.1"):
        init_from_ldm_unet(P3SCopyUNet(FULL), sd, prefix="model.diffusion_model.")


def ldm_prefixes():
    from p3s_core.copy_init import _LDM_PREFIXES

    return [(cp, lp) for cp, lp in _LDM_PREFIXES]


@pytest.mark.parametrize("layout", COPY_LAYOUTS)
def test_adapter_round_trip_keeps_the_layout(layout, tmp_path):
    a = new_adapter(CopyUNetConfig.tiny(layout), seed=3, **ENC)
    _randomise(a.copy.zero_convs, 9)
    path = save_adapter(a, tmp_path / f"{layout}.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    cfg = json.loads(meta["config"])
    assert ("layout" in cfg) == (layout == "full")
    assert json.loads(meta["layer_map"]) == layer_map(CopyUNetConfig.tiny(layout))
    assert any(k.startswith("copy.decoder.") for k in keys) == (layout == "full")
    b = load_adapter(path)
    assert b.config.layout == layout
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    x, t, ctx, ref = _inputs()
    with torch.no_grad():
        oa, ob = a.copy(x, t, ctx, ref), b.copy(x, t, ctx, ref)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def _seven_layer_map():
    """The layer map of the unreleased 7-transformer "full" copy (decoder entries marked, no "feature")."""
    return [{**e, "source": "decoder"} if e["block"][0] == "output" else e for e in layer_map(TINY)]


@pytest.mark.parametrize("stored", ["encoder", "seven"])
def test_a_full_file_whose_layer_map_is_not_the_16_layer_one_is_refused(tmp_path, stored):
    from safetensors.torch import load_file, save_file

    path = save_adapter(new_adapter(FULL, seed=3, **ENC), tmp_path / "f.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta["layer_map"] = json.dumps(layer_map(TINY) if stored == "encoder" else _seven_layer_map())
    save_file(load_file(str(path)), str(tmp_path / "g.safetensors"), metadata=meta)
    with pytest.raises(AdapterFileError, match="layer_map|layer map"):
        load_adapter(tmp_path / "g.safetensors")


def test_fingerprint_of_the_full_copys_largest_tensor():
    """output_blocks.3.0's first conv (1280 x 2560 x 3 x 3 = 29,491,200 values, past float32's exact
    integers) fingerprints; its last value is among the sampled ones."""
    from p3s_core.adapter import unet_fingerprint

    t = torch.zeros(1280, 2560, 3, 3, dtype=torch.float16)
    a = unet_fingerprint({"w": t})
    t.view(-1)[-1] = 1.0
    assert unet_fingerprint({"w": t}) != a
