"""Cross-attention enhancement (paper Fig. 3, issue 22) and adapter format 2, on tiny models.

The format-1 fixture ``tests/data/adapter_v1_tiny.safetensors`` and its expected outputs were
written by the pack before format 2 (``scripts/make_v1_fixture.py`` run on main 2b11c9f): loading it
now must give those outputs bit for bit.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from p3s_core import diffusers_engine as db
from p3s_core.adapter import FORMAT_VERSION, P3SAdapter, load_adapter, new_adapter, save_adapter
from p3s_core.copy_unet import CopyUNetConfig, cross_key
from p3s_core.errors import AdapterFileError, P3SError
from p3s_core.injection import InjectionInputError, enhanced_cross_output
from p3s_core.schedule import P3SSchedule
from p3s_core.train import TrainSettings

DATA = Path(__file__).resolve().parents[1] / "data"
V1 = DATA / "adapter_v1_tiny.safetensors"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import make_v1_fixture as fixture  # noqa: E402  (the fixture's own UNet and inputs)

ENC = dict(clip_dim=16, encoder_inner_dim=8)


@pytest.fixture(scope="module")
def unet():
    torch.set_num_threads(1)  # as when the fixture was written
    return fixture.tiny_unet()


def acting(adapter, seed=3, cross_scale=0.3):
    """``adapter`` with every zero conv (self and cross) set to random values: a trained adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in adapter.copy.zero_convs.values():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        for lin in getattr(adapter.copy, "cross_zero_convs", {}).values():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * cross_scale)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * cross_scale)
    return adapter.eval().requires_grad_(False)


def cross_adapter(unet, **kw):
    kw.setdefault("enhancement", "cross")  # opt-in (the default is "self")
    return db.new_adapter_for_unet(unet, seed=0, config=db.copy_config_for(unet), **ENC, **kw)


def run_unet(unet, adapter, **kw):
    inp = fixture.fixture_inputs()
    with torch.no_grad(), db.P3SDiffusersInjector(unet, adapter, **kw):
        return unet(inp["x"], inp["t"][0], encoder_hidden_states=inp["ctx"]).sample


# --- format: version 1 loads as today, both versions are written --------------------------------------
def test_a_format_1_file_loads_as_self_attention_only_and_gives_its_outputs(unet):
    """The outputs stored when the fixture was written (the pack before format 2, an AMD EPYC CPU).
    Bit for bit on that CPU; another CPU's kernels differ in the last bits (an Intel Xeon: up to
    1e-6 on values of order 1), so the comparison has a tolerance far below any change of behaviour
    (a behaviour change, such as a cross path that acts, moves them by far more)."""
    with safe_open(str(V1), "pt") as f:
        assert f.metadata()["p3s_format_version"] == "1" and "enhancement" not in f.metadata()
    adapter = load_adapter(V1)
    assert adapter.enhancement == "self" and adapter.copy_layout == "encoder"
    assert not hasattr(adapter.copy, "cross_zero_convs")
    expected = load_file(str(DATA / "adapter_v1_tiny_expected.safetensors"))
    got = fixture.expected_outputs(adapter, unet)
    assert set(got) == set(expected)  # no cross feature appears for a format-1 adapter
    for k in expected:
        assert got[k].shape == expected[k].shape and torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-5), k


def test_format_2_records_the_enhancement_and_layout_and_format_1_can_still_be_written(tmp_path, unet):
    old = load_adapter(V1)
    v2 = load_adapter(save_adapter(old, tmp_path / "self.safetensors"))
    v1 = load_adapter(save_adapter(old, tmp_path / "again_v1.safetensors", version=1))
    with safe_open(str(tmp_path / "self.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["p3s_format_version"] == str(FORMAT_VERSION) == "2"
    assert (meta["enhancement"], meta["copy_layout"]) == ("self", "encoder")
    with safe_open(str(tmp_path / "again_v1.safetensors"), "pt") as f:
        assert f.metadata()["p3s_format_version"] == "1" and "enhancement" not in f.metadata()
    for a in (v1, v2):
        assert a.enhancement == "self"
        assert all(torch.equal(t, old.state_dict()[k]) for k, t in a.state_dict().items())
    cross = acting(cross_adapter(unet))
    back = load_adapter(save_adapter(cross, tmp_path / "cross.safetensors"))
    assert back.enhancement == "cross"
    assert set(back.state_dict()) == set(cross.state_dict())
    assert "copy.cross_zero_convs.output_11.weight" in back.state_dict()
    assert all(torch.equal(t, cross.state_dict()[k]) for k, t in back.state_dict().items())
    with pytest.raises(AdapterFileError, match="format 1 holds only 'self'"):
        save_adapter(cross, tmp_path / "no.safetensors", version=1)


def _with_meta(src: Path, dst: Path, **update) -> Path:
    from p3s_core.safe_io import atomic_save_safetensors

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    meta.update(update)
    return atomic_save_safetensors(load_file(str(src)), dst, meta)


def test_bad_enhancement_or_layout_metadata_is_refused(tmp_path):
    good = save_adapter(new_adapter(CopyUNetConfig.tiny(), seed=0, enhancement="cross", **ENC),
                        tmp_path / "good.safetensors")
    with pytest.raises(AdapterFileError, match="'enhancement' is 'both'"):
        load_adapter(_with_meta(good, tmp_path / "e.safetensors", enhancement="both"))
    with pytest.raises(AdapterFileError, match="update the pack"):
        load_adapter(_with_meta(good, tmp_path / "l.safetensors", copy_layout="full-v9"))
    # a "self" label on a file holding the cross zero convs: its tensors do not match
    with pytest.raises(AdapterFileError, match="unexpected tensors: copy.cross_zero_convs"):
        load_adapter(_with_meta(good, tmp_path / "s.safetensors", enhancement="self"))
    with pytest.raises(AdapterFileError, match="enhancement"):
        new_adapter(CopyUNetConfig.tiny(), seed=0, enhancement="cross+self", **ENC)
    with pytest.raises(P3SError, match="enhancement"):
        TrainSettings(enhancement="both").validate()


# --- the zero convolutions ------------------------------------------------------------------------
def test_the_enhancement_is_the_default_and_an_exact_no_op_at_init(unet):
    cross = cross_adapter(unet)
    selfonly = cross_adapter(unet, enhancement="self")
    assert cross.enhancement == "cross" and selfonly.enhancement == "self"
    assert db.new_adapter_for_unet(unet, seed=0, config=db.copy_config_for(unet), **ENC).enhancement == "cross"
    assert TrainSettings().enhancement == "cross"
    assert set(cross.copy.cross_zero_convs) == {e["key"] for e in cross.layer_map}
    assert all(torch.equal(t, cross.state_dict()[k]) for k, t in selfonly.state_dict().items())
    inp = fixture.fixture_inputs()
    with torch.no_grad():
        feats = cross.copy(inp["x"], inp["t"], inp["ctx"])
    assert all(float(feats[cross_key(e["key"])].abs().max()) == 0.0 for e in cross.layer_map)
    # self zero convs trained, cross ones still zero: the UNet output is the self-only one bit for bit
    acting(cross, cross_scale=0.0)
    acting(selfonly)
    assert torch.equal(run_unet(unet, cross), run_unet(unet, selfonly))


def test_the_cross_feature_is_the_zero_conv_of_the_copys_attn2_output(unet):
    adapter = acting(cross_adapter(unet))
    inp = fixture.fixture_inputs()
    seen = []
    blk = adapter.copy.levels[1].st.transformer_blocks[0].attn2
    hook = blk.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        feats = adapter.copy(inp["x"], inp["t"], inp["ctx"])
        no_cross = adapter.copy(inp["x"], inp["t"], inp["ctx"], cross=False)
    hook.remove()
    lin = adapter.copy.cross_zero_convs["input_4"]
    assert torch.equal(feats[cross_key("input_4")], lin(seen[0]))
    assert torch.equal(feats[cross_key("output_8")], adapter.copy.cross_zero_convs["output_8"](seen[0]))
    assert not any(k.startswith("cross:") for k in no_cross)
    assert all(torch.equal(no_cross[k], feats[k]) for k in no_cross)


def test_the_enhancement_is_weighted_by_eps_t_per_row_and_limited_to_the_region():
    g = torch.Generator().manual_seed(0)
    out, f = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    assert enhanced_cross_output(out, f, 0.0) is out
    assert torch.allclose(enhanced_cross_output(out, f, 0.7) - out, 0.7 * f, atol=1e-6)
    rows = torch.tensor([0.5, 0.0, 2.0])
    got = enhanced_cross_output(out, f, rows)
    assert torch.equal(got[1], out[1])
    assert torch.allclose(got[2] - out[2], 2.0 * f[2], atol=1e-6)
    got = enhanced_cross_output(out, f, 1.0, active=[True, False, True])
    assert torch.equal(got[1], out[1]) and not torch.equal(got[0], out[0])
    assert enhanced_cross_output(out, f, 1.0, active=[False] * 3) is out
    tw = torch.zeros(16)
    tw[:4], tw[4:6] = 1.0, 0.5
    got = enhanced_cross_output(out, f, 0.8, token_weights=tw)
    assert torch.equal(got[:, 6:], out[:, 6:])  # outside the region: the plain output bit for bit
    assert torch.allclose(got[:, :4] - out[:, :4], 0.8 * f[:, :4], atol=1e-6)
    assert torch.allclose(got[:, 4:6] - out[:, 4:6], 0.4 * f[:, 4:6], atol=1e-6)
    with pytest.raises(InjectionInputError, match="does not match"):
        enhanced_cross_output(out, f[:, :8], 1.0)
    with pytest.raises(InjectionInputError, match="region weights"):
        enhanced_cross_output(out, f, 1.0, token_weights=torch.ones(9))


def test_diffusers_attn2_gets_eps_t_times_the_cross_feature_and_off_is_the_self_only_unet(unet):
    adapter = acting(cross_adapter(unet))
    inp = fixture.fixture_inputs()
    sched = P3SSchedule()
    inj = db.P3SDiffusersInjector(unet, adapter, schedule=sched)
    eps_t = inj.step_weight(500)
    attn2 = unet.up_blocks[2].attentions[1].transformer_blocks[0].attn2  # output_7
    with torch.no_grad(), inj:
        feats = inj.copy_features(inp["x"], inp["t"][0], inp["ctx"])
        on = unet(inp["x"], inp["t"][0], encoder_hidden_states=inp["ctx"]).sample
    with torch.no_grad(), db.P3SDiffusersInjector(unet, adapter, schedule=sched, cross_attention="off"):
        off = unet(inp["x"], inp["t"][0], encoder_hidden_states=inp["ctx"]).sample
    # one attn2 processor on one input: the plain output plus eps_t times the cross feature
    z = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))  # level 1: 4x4 tokens
    proc = unet.attn_processors["up_blocks.2.attentions.1.transformer_blocks.0.attn2.processor"]
    with torch.no_grad():
        plain = proc(attn2, z, encoder_hidden_states=inp["ctx"])
    with torch.no_grad(), inj:
        inj.bank = {"features": feats, "weight": eps_t, "lam": inj.lam, "active": None}
        enhanced = unet.attn_processors["up_blocks.2.attentions.1.transformer_blocks.0.attn2.processor"](
            attn2, z, encoder_hidden_states=inp["ctx"])
        inj.bank = None
    assert torch.allclose(enhanced - plain, eps_t * feats[cross_key("output_7")], atol=1e-6)
    assert (on - off).abs().max() > 1e-4  # the enhancement moves the prediction
    selfonly = P3SAdapter(adapter.config, adapter.lam, None, 16, 8)
    selfonly.load_state_dict({k: v for k, v in adapter.state_dict().items() if "cross_zero" not in k})
    assert torch.equal(off, run_unet(unet, selfonly.eval(), schedule=sched))
    with pytest.raises(P3SError, match="cross_attention"):
        db.P3SDiffusersInjector(unet, adapter, cross_attention="on")


def test_training_gives_the_cross_zero_convs_gradients_through_l_ldm(unet):
    adapter = cross_adapter(unet)
    step_fn, close = db.build_step_fn(unet, adapter, TrainSettings(gamma=0.0))
    try:
        adapter.requires_grad_(True)
        l_ldm, _ = step_fn(adapter, torch.randn(1, 4, 8, 8), torch.randn(1, 7, 16), torch.randn(1, 5, 16),
                           torch.Generator().manual_seed(0))
        l_ldm.backward()
    finally:
        close()
    grads = {k: lin.weight.grad for k, lin in adapter.copy.cross_zero_convs.items()}
    assert all(gr is not None and float(gr.abs().sum()) > 0 for gr in grads.values()), \
        [k for k, gr in grads.items() if gr is None or float(gr.abs().sum()) == 0]
    assert not any(p.requires_grad for p in unet.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_enhancement_runs_beside_a_half_precision_unet(unet, dtype):
    adapter = acting(cross_adapter(unet))
    half = fixture.tiny_unet().to(dtype)
    inp = fixture.fixture_inputs()
    with torch.no_grad():
        with db.P3SDiffusersInjector(half, adapter):
            on = half(inp["x"].to(dtype), inp["t"][0], encoder_hidden_states=inp["ctx"].to(dtype)).sample
        with db.P3SDiffusersInjector(half, adapter, cross_attention="off"):
            off = half(inp["x"].to(dtype), inp["t"][0], encoder_hidden_states=inp["ctx"].to(dtype)).sample
    assert on.dtype == dtype and bool(torch.isfinite(on).all())
    assert float((on.float() - off.float()).abs().max()) > 1e-3
    full = run_unet(unet, adapter)
    assert float((on.float() - full).abs().max()) < 0.05 * float(full.abs().max())


def test_metadata_json_of_a_cross_file_names_the_cross_zero_convs_in_no_layer_map_change(tmp_path, unet):
    """The layer map is the same for both enhancements: the cross zero convs are keyed by it."""
    a = save_adapter(cross_adapter(unet), tmp_path / "c.safetensors")
    b = save_adapter(cross_adapter(unet, enhancement="self"), tmp_path / "s.safetensors")
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        ma, mb = fa.metadata(), fb.metadata()
        keys = set(fa.keys()) - set(fb.keys())
    assert json.loads(ma["layer_map"]) == json.loads(mb["layer_map"])
    assert keys == {f"copy.cross_zero_convs.{e['key']}.{p}" for e in json.loads(ma["layer_map"])
                    for p in ("weight", "bias")}


def test_the_comfyui_attn2_output_patch_adds_eps_t_g_to_active_rows_inside_the_region():
    """The ComfyUI engine's attn2 output patch on hand-made per-step banks (pure torch: the patch
    imports no ComfyUI; tests/integration/test_cross_attention.py runs it in the real ComfyUI)."""
    from p3s_core.comfyui_engine.injector import P3SInjectorPatch, _Bank
    from p3s_core.comfyui_engine.region_patch import RegionRun
    from p3s_core.region import Region

    adapter = new_adapter(CopyUNetConfig.tiny(), seed=0, enhancement="cross", **ENC)
    patch = P3SInjectorPatch(adapter, None, None)
    assert patch.cross and not P3SInjectorPatch(adapter, None, None, cross_attention="off").cross
    assert not P3SInjectorPatch(new_adapter(CopyUNetConfig.tiny(), seed=0, enhancement="self", **ENC), None, None).cross
    gen = torch.Generator().manual_seed(0)
    g, out = torch.randn(2, 64, 32, generator=gen), torch.randn(2, 64, 32, generator=gen)
    bank = _Bank(features={cross_key("input_1"): g}, weight=0.5, active=torch.tensor([True, False]), lam=0.2)
    opts = {patch.key: bank, "block": ("input", 1), "block_index": 0, "original_shape": [2, 4, 8, 8]}
    got = patch.cross_output(out, opts)
    assert torch.allclose(got[0] - out[0], 0.5 * g[0], atol=1e-6) and torch.equal(got[1], out[1])
    assert patch.cross_output(out, {**opts, "block": ("input", 2)}) is out  # no feature for that layer
    assert patch.cross_output(out, {k: v for k, v in opts.items() if k != patch.key}) is out  # no bank
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    bank.active, bank.region = None, RegionRun(Region.from_mask(mask), None)
    got = patch.cross_output(out, opts).reshape(2, 8, 8, 32)
    plain, add = out.reshape(2, 8, 8, 32), 0.5 * g.reshape(2, 8, 8, 32)
    assert torch.equal(got[:, :, 4:], plain[:, :, 4:])
    assert torch.allclose(got[:, :, :4] - plain[:, :, :4], add[:, :, :4], atol=1e-6)
