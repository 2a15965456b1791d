"""Issue 22: the copy layouts. "full" adds a decoder half (one ResNet block + one transformer per
level, fed by the copy's own skips) so each of the 16 UNet self-attention layers reads a copy layer
of its own half; "encoder" (format-1 adapters) stays exactly as it was."""
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

#: Written out independently of the module: decoder copy prefix -> LDM prefix (SD1.5 output_blocks).
EXPECTED_DECODER_SOURCES = {
    "decoder.ups.2.": "output_blocks.2.1.", "decoder.levels.2.res.": "output_blocks.3.0.",
    "decoder.levels.2.st.": "output_blocks.3.1.", "decoder.ups.1.": "output_blocks.5.2.",
    "decoder.levels.1.res.": "output_blocks.6.0.", "decoder.levels.1.st.": "output_blocks.6.1.",
    "decoder.ups.0.": "output_blocks.8.2.", "decoder.levels.0.res.": "output_blocks.9.0.",
    "decoder.levels.0.st.": "output_blocks.9.1.",
}


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
    # the decoder entries keep the level / width of the encoder layout; only "source" is added
    for a, b in zip(lm, layer_map(TINY)):
        assert {k: v for k, v in a.items() if k != "source"} == b
    idx = {e["key"]: feature_index(e) for e in lm}
    assert idx["input_1"] == 0 and idx["input_8"] == 2 and idx["middle_0"] == 3
    assert [idx[f"output_{i}"] for i in (3, 6, 9)] == [4, 5, 6]
    assert num_features(FULL) == 7


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
    assert count_parameters(full) == 329_664_000
    assert len(full.feature_transformers()) == 7


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
    assert len(feats) == 7
    for e in layer_map(FULL):
        lh, lw = sizes[e["level"]]
        assert out[e["key"]].shape == (2, lh * lw, e["channels"]), e["key"]
        f = feats[feature_index(e)]
        z = full_copy.zero_convs[e["key"]]
        expected = F.conv2d(f, z.weight, z.bias).flatten(2).transpose(1, 2)
        _close(out[e["key"]], expected)
    # the decoder-side layers read the decoder, not the encoder feature of their level
    assert not torch.allclose(feats[6], feats[0], atol=1e-3)
    assert out[ATTN_MAP_KEY].shape == (2, hw[0] * hw[1], 5)


def test_decoder_is_upsample_concat_skip_resblock_transformer(full_copy):
    """Each decoder level, recomputed by hand from the copy's OWN encoder skips (LDM order: h, skip)."""
    x, t, ctx, ref = _inputs()
    with torch.no_grad():
        feats, amap = full_copy.level_features(x, t, ctx, ref, return_attn_map=True)
        from p3s_core.copy_unet import timestep_embedding

        emb = full_copy.time_embed(timestep_embedding(t, FULL.model_channels))
        dec = full_copy.decoder
        h = feats[3]
        for lvl, fi in ((2, 4), (1, 5), (0, 6)):
            skip = feats[lvl]
            up = dec.ups[lvl].conv(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            r = dec.levels[lvl].res(torch.cat([up, skip], 1), emb)
            h, m = dec.levels[lvl].st(r, ctx, return_attn=True)
            _close(feats[fi], h)
        _close(amap, m)  # decoder level 0 feeds output_11


def test_full_copy_shares_cfg_rows_exactly(full_copy):
    x, t, ctx, ref = _inputs()
    x, ref, t = torch.cat([x[:1], x[:1]]), torch.cat([ref[:1], ref[:1]]), torch.tensor([7.0, 7.0])
    with torch.no_grad():
        full_copy.share_cfg_rows = True
        a = full_copy(x, t, ctx, ref, return_attn_map=True)
        full_copy.share_cfg_rows = False
        b = full_copy(x, t, ctx, ref, return_attn_map=True)
        full_copy.share_cfg_rows = True
    for k in b:
        _close(a[k], b[k])


def _tiny_ldm_state(copy, prefix="model.diffusion_model.", seed=0):
    """A random LDM state dict holding exactly the tensors the copy reads, in LDM names."""
    g = torch.Generator().manual_seed(seed)
    own = copy.state_dict()
    return {prefix + lk: torch.randn(own[ck].shape, generator=g) for ck, lk in ldm_key_map(copy).items()}


def test_full_init_copies_the_decoder_from_output_blocks_and_keeps_zero_convs():
    copy = P3SCopyUNet(FULL)
    sd = _tiny_ldm_state(copy)
    init_from_ldm_unet(copy, sd, prefix="model.diffusion_model.")
    checked = 0
    for key, val in copy.state_dict().items():
        if key.startswith("zero_convs."):
            assert torch.count_nonzero(val) == 0
        elif key.startswith("decoder."):
            src = [p + key[len(cp):] for cp, p in EXPECTED_DECODER_SOURCES.items() if key.startswith(cp)]
            assert len(src) == 1, key
            assert torch.equal(val, sd["model.diffusion_model." + src[0]]), key
            checked += 1
    assert checked == sum(1 for k in copy.state_dict() if k.startswith("decoder.")) > 100
    # the decoder's input widths are the UNet's (h + skip), e.g. output_blocks.3.0 reads 2 x level 2
    assert copy.decoder.levels[2].res.in_layers[2].weight.shape[1] == 2 * FULL.level_channels[2]
    assert copy.decoder.levels[0].res.in_layers[2].weight.shape[1] == sum(FULL.level_channels[:2])
    sd.pop("model.diffusion_model.output_blocks.9.1.proj_out.weight")
    with pytest.raises(Exception, match=r"output_blocks\.9\.1"):
        init_from_ldm_unet(P3SCopyUNet(FULL), sd, prefix="model.diffusion_model.")


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


def test_a_full_file_whose_layer_map_says_encoder_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_adapter(new_adapter(FULL, seed=3, **ENC), tmp_path / "f.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta["layer_map"] = json.dumps(layer_map(TINY))
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
