"""The diffusers engine on tiny diffusers UNets (Eq. 6-10): processors, init mapping, training step."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from p3s_core import diffusers_engine as db
from p3s_core.adapter import new_adapter
from p3s_core.copy_unet import CopyUNetConfig
from p3s_core.injection import reference_attention
from p3s_core.schedule import P3SSchedule
from p3s_core.train import TrainSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_sd  # noqa: E402

CFG = CopyUNetConfig.tiny()


def tiny_unet(seed=0):
    """A diffusers UNet with the SD1.5 structure and the tiny copy's widths (32/64/128/128)."""
    return tiny_sd.tiny_unet(seed)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def active_adapter(unet, seed=1):
    adapter = db.new_adapter_for_unet(unet, seed=0, config=CFG, clip_dim=16, encoder_inner_dim=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in adapter.copy.zero_convs.values():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    return adapter.eval().requires_grad_(False)


def inputs(batch=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(500),
            torch.randn(batch, 7, 32, generator=g))


def test_layer_keys_cover_the_16_self_attention_layers(unet):
    names = {n[:-len(".processor")] for n in unet.attn_processors if ".attn1." in n}
    assert set(db.DIFFUSERS_LAYER_KEYS) == names
    assert len(set(db.DIFFUSERS_LAYER_KEYS.values())) == 16


def test_copy_initialised_from_diffusers_matches_diffusers_blocks(unet):
    """The hand-written copy blocks, initialised through the name map, compute what the diffusers
    blocks compute (level 0 from x_t end to end; levels 1-3 block by block)."""
    adapter = db.new_adapter_for_unet(unet, seed=0, config=CFG, clip_dim=16, encoder_inner_dim=8)
    x, t, ctx = inputs()
    seen = {}
    hooks = [unet.down_blocks[0].attentions[0].register_forward_hook(
        lambda m, a, o: seen.__setitem__("l0", o[0] if isinstance(o, tuple) else o.sample))]
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)
        feats = adapter.copy.level_features(x, t.expand(2).float(), ctx)
    for h in hooks:
        h.remove()
    ref = seen["l0"]
    ref = ref if isinstance(ref, torch.Tensor) else ref.sample
    assert torch.allclose(feats[0], ref, atol=1e-5), float((feats[0] - ref).abs().max())
    temb = unet.time_embedding(unet.time_proj(t.expand(2)).float())
    g = torch.Generator().manual_seed(4)
    pairs = [(adapter.copy.levels[1], unet.down_blocks[1], 32), (adapter.copy.levels[2], unet.down_blocks[2], 64),
             (adapter.copy.middle, unet.mid_block, 128)]
    with torch.no_grad():
        for lvl, blk, cin in pairs:
            h = torch.randn(2, cin, 4, 4, generator=g)
            a = lvl.st(lvl.res(h, temb), ctx)
            r = blk.resnets[0](h, temb)
            b = blk.attentions[0](r, encoder_hidden_states=ctx, return_dict=False)[0]
            assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_strength_zero_and_closed_window_are_the_plain_unet_bit_for_bit(unet):
    adapter = active_adapter(unet)
    x, t, ctx = inputs()
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        with db.P3SDiffusersInjector(unet, adapter, strength=0.0):
            off = unet(x, t, encoder_hidden_states=ctx).sample
        late = P3SSchedule(start_percent=0.9, end_percent=1.0)  # t=500 is progress 0.5: off
        with db.P3SDiffusersInjector(unet, adapter, schedule=late):
            outside = unet(x, t, encoder_hidden_states=ctx).sample
        with db.P3SDiffusersInjector(unet, adapter):
            on = unet(x, t, encoder_hidden_states=ctx).sample
        after = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(plain, off) and torch.equal(plain, outside)
    assert (on - plain).abs().max() > 1e-4
    assert torch.equal(plain, after), "removing the injector restores the plain UNet"


def test_processor_is_eq_7_8_with_the_schedule_weight(unet):
    """One layer's processor output equals the explicit Eq. 7-8 with f scaled by eps_t (Eq. 9-10)."""
    adapter = active_adapter(unet)
    x, t, ctx = inputs()
    sched = P3SSchedule()  # paper: eps = 1 - 0.5 (t/T)^2 + 0.2
    inj = db.P3SDiffusersInjector(unet, adapter, schedule=sched, lam=0.3)
    eps_t = 1 - 0.5 * (500 / 999) ** 2 + 0.2
    assert inj.step_weight(500) == pytest.approx(eps_t)
    attn = unet.down_blocks[1].attentions[1].transformer_blocks[0].attn1
    got = {}
    hook = attn.register_forward_hook(lambda m, a, k, o: got.update(z=k.get("hidden_states", a[0] if a else None), out=o),
                                      with_kwargs=True)
    with torch.no_grad(), inj:
        feats = inj.copy_features(x, t, ctx)
        unet(x, t, encoder_hidden_states=ctx)
    hook.remove()
    z = got["z"]
    f = feats["input_5"] * eps_t
    ref = reference_attention(z, f, attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, attn.heads, lam=0.3)
    ref = attn.to_out[0](ref)
    assert torch.allclose(got["out"], ref, atol=1e-5), float((got["out"] - ref).abs().max())


def test_cond_only_touches_only_the_cond_half_of_a_cfg_batch(unet):
    adapter = active_adapter(unet)
    x, t, ctx = inputs(batch=4)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        with db.P3SDiffusersInjector(unet, adapter, apply_to="cond only", cfg_batch=True):
            half = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(half[:2], plain[:2], atol=1e-5)
    assert (half[2:] - plain[2:]).abs().max() > 1e-4


def test_bad_options_raise_typed_errors(unet):
    adapter = active_adapter(unet)
    from p3s_core.errors import P3SError

    with pytest.raises(P3SError, match="apply_to"):
        db.P3SDiffusersInjector(unet, adapter, apply_to="uncond")
    with pytest.raises(P3SError, match="strength"):
        db.P3SDiffusersInjector(unet, adapter, strength=float("nan"))
    with pytest.raises(db.ModelLoadError, match="pickled"):
        db.loading._check_model_path(__file__)


def test_training_step_gives_finite_losses_and_gradients_on_the_adapter_only(unet):
    adapter = db.new_adapter_for_unet(unet, seed=0, config=CFG, clip_dim=16, encoder_inner_dim=8)
    for ac in ("last", "all"):
        step_fn, close = db.build_step_fn(unet, adapter, TrainSettings(ac_layers=ac))
        try:
            adapter.requires_grad_(True)
            g = torch.Generator().manual_seed(0)
            x0 = torch.randn(1, 4, 8, 8)
            l_ldm, l_ac = step_fn(adapter, x0, torch.randn(1, 7, 32), torch.randn(1, 5, 16), g)
            (l_ldm + 0.1 * l_ac).backward()
        finally:
            close()
        assert math.isfinite(float(l_ldm.detach())) and float(l_ac.detach()) > 0
        grads = [p.grad for p in adapter.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(gr).all() for gr in grads)
        # zero convs start at 0 but get gradient through the UNet's attention
        assert adapter.copy.zero_convs["output_11"].weight.grad.abs().sum() > 0
        assert not any(p.requires_grad for p in unet.parameters())
        adapter.zero_grad(set_to_none=True)
    assert all(type(p).__name__ != "P3SAttnProcessor" for p in unet.attn_processors.values())


def test_adapter_whose_header_length_starts_like_a_pickle_still_loads(tmp_path):
    """A safetensors header length with low byte 0x80 (the pickle magic) is a real adapter (found
    when the command line saved one); a real pickle is still refused."""
    import struct

    from p3s_core.adapter import load_adapter, save_adapter
    from p3s_core.errors import AdapterFileError

    adapter = new_adapter(CFG, None, seed=0, clip_dim=16, encoder_inner_dim=8)
    for pad in range(0, 400):
        path = save_adapter(adapter, tmp_path / "a.safetensors", {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    loaded = load_adapter(path)
    assert torch.equal(loaded.copy.conv_in.weight, adapter.copy.conv_in.weight)
    torch.save({"w": torch.zeros(1)}, tmp_path / "p.safetensors", _use_new_zipfile_serialization=False)
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(tmp_path / "p.safetensors")


@pytest.mark.parametrize("cfg", [
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": [0.001 * (i + 1) for i in range(50)], "num_train_timesteps": 50},
])
def test_the_training_noise_schedule_is_the_schedulers_own(cfg):
    """The diffusers training step reads the scheduler's config (its betas as diffusers computes
    them), not SD1.5's scaled-linear betas whatever the config says."""
    from diffusers import DDPMScheduler

    from p3s_core.diffusers_engine.training import training_betas

    theirs = DDPMScheduler(**cfg).betas.double()
    ours = training_betas(cfg)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-8)
    if cfg.get("beta_schedule") == "linear":  # a config the old hard-coded schedule got wrong
        assert not torch.allclose(training_betas({**cfg, "beta_schedule": "scaled_linear"}), theirs)


def test_an_unknown_beta_schedule_is_refused():
    from p3s_core.diffusers_engine.training import training_betas
    from p3s_core.errors import P3SError

    with pytest.raises(P3SError, match="beta_schedule"):
        training_betas({"beta_schedule": "sigmoid"})


# --- the "full" copy layout (issue 22) ---------------------------------------------------------------
def test_full_copy_initialised_from_diffusers_matches_every_block(unet):
    """Each of the full copy's 16 pairs computes what its diffusers ResNet + transformer compute
    (encoder level l pair j <- down_blocks[l] resnets/attentions[j]; decoder level l pair j <-
    up_blocks[3 - l] resnets/attentions[j], at the UNet's input widths), and each copy upsample what
    that block's upsampler does."""
    adapter = db.new_adapter_for_unet(unet, seed=0, config=db.copy_config_for(unet, "full"), clip_dim=16,
                                      encoder_inner_dim=8)
    c = adapter.copy
    dec = c.decoder
    assert c.config.layout == "full" and dec is not None
    _x, t, ctx = inputs()
    temb = unet.time_embedding(unet.time_proj(t.expand(2)).float())
    g = torch.Generator().manual_seed(5)
    # (copy pair, its diffusers block, pair index in the block, input width)
    cases = [(c.levels[0], unet.down_blocks[0], 0, 32), (c.levels_b[0], unet.down_blocks[0], 1, 32),
             (c.levels[1], unet.down_blocks[1], 0, 32), (c.levels_b[1], unet.down_blocks[1], 1, 64),
             (c.levels[2], unet.down_blocks[2], 0, 64), (c.levels_b[2], unet.down_blocks[2], 1, 128)]
    widths = {2: (256, 256, 192), 1: (192, 128, 96), 0: (96, 64, 64)}  # SD1.5's h + skip, tiny widths
    cases += [(dec.levels[lvl][j], unet.up_blocks[3 - lvl], j, widths[lvl][j]) for lvl in (2, 1, 0) for j in range(3)]
    assert len(cases) == 15  # + the middle, checked by test_copy_initialised_from_diffusers_matches_diffusers_blocks
    with torch.no_grad():
        for pair, blk, j, cin in cases:
            h = torch.randn(2, cin, 4, 4, generator=g)
            a = pair.st(pair.res(h, temb), ctx)
            r = blk.resnets[j](h, temb)
            b = blk.attentions[j](r, encoder_hidden_states=ctx, return_dict=False)[0]
            assert torch.allclose(a, b, atol=1e-5), (j, cin, float((a - b).abs().max()))
        for ups_idx, up_src in ((2, unet.up_blocks[0]), (1, unet.up_blocks[1]), (0, unet.up_blocks[2])):
            ch = up_src.upsamplers[0].channels
            u = torch.randn(2, ch, 3, 3, generator=g)
            ua, ub = dec.ups[ups_idx](u, (5, 6)), up_src.upsamplers[0](u, output_size=(5, 6))
            assert ua.shape == (2, ch, 5, 6) and torch.allclose(ua, ub, atol=1e-5), ups_idx


def test_full_adapter_from_diffusers_equals_the_one_from_ldm_names(unet, tmp_path):
    """The diffusers init and the LDM init (ComfyUI's path) of the full copy give the same tensors,
    and that adapter survives a save / load round trip (format 2, copy_layout "full")."""
    from safetensors import safe_open

    from p3s_core.adapter import load_adapter, save_adapter

    cfg = db.copy_config_for(unet, "full")
    a = db.new_adapter_for_unet(unet, seed=0, config=cfg, clip_dim=16, encoder_inner_dim=8)
    ldm = db.ldm_state_from_diffusers(unet.state_dict(), cfg)
    b = new_adapter(cfg, ldm, seed=0, clip_dim=16, encoder_inner_dim=8)
    assert a.base_unet_hash == b.base_unet_hash
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    path = save_adapter(a, tmp_path / "full.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["copy_layout"] == "full"
    c = load_adapter(path)
    assert c.copy_layout == "full" and len(c.copy.feature_transformers()) == 16
    sc = c.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("layout", ["encoder", "full"])
def test_training_step_both_layouts_trains_the_layers_that_feed_the_decoder(unet, layout):
    adapter = db.new_adapter_for_unet(unet, seed=0, config=db.copy_config_for(unet, layout), clip_dim=16,
                                      encoder_inner_dim=8)
    for ac in ("last", "all"):
        step_fn, close = db.build_step_fn(unet, adapter, TrainSettings(ac_layers=ac))
        try:
            adapter.requires_grad_(True)
            g = torch.Generator().manual_seed(0)
            l_ldm, l_ac = step_fn(adapter, torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32), torch.randn(1, 5, 16), g)
            (l_ldm + 0.1 * l_ac).backward()
        finally:
            close()
        assert math.isfinite(float(l_ldm.detach())) and float(l_ac.detach()) > 0
        assert adapter.copy.zero_convs["output_11"].weight.grad.abs().sum() > 0
        # L_ac reaches the transformer that feeds output_11: encoder level 0, or the decoder's last
        # level-0 pair
        st = adapter.copy.decoder.levels[0][2].st if layout == "full" else adapter.copy.levels[0].st
        assert st.transformer_blocks[0].attn2.to_k.weight.grad.abs().sum() > 0
        adapter.zero_grad(set_to_none=True)
