"""Issue 22 in the real ComfyUI: the P3S Trainer with ``copy_layout="full"`` (a copy layer for each
of the UNet's 16 transformers, the decoder fed by the copy's own skips), then that adapter in the
Condition Injector in a KSampler run; a resumed adapter keeps its layout."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

SIZE = 64
PROMPT = "a photo of sks dog"


def _train(comfy, sd15, clip_vision, images, **kw):
    args = dict(model=sd15.model, clip=sd15.clip, vae=sd15.vae, clip_vision=clip_vision, images=images,
                prompt=PROMPT, identifier="sks", epochs=1, learning_rate=1e-5, gamma=0.1, resolution=SIZE,
                seed=0, save_name="p3s_it_full", save_every=0)
    args.update(kw)
    with torch.inference_mode():  # ComfyUI runs nodes like this
        return comfy.node("P3STrainer")().train(**args)


@pytest.fixture(scope="module")
def photo():
    g = torch.Generator().manual_seed(13)
    img = torch.rand(1, SIZE, SIZE, 3, generator=g) * 0.3
    img[:, 16:48, 20:44, :] = torch.tensor([0.2, 0.5, 0.8])
    return img


@pytest.fixture(scope="module")
def full_run(comfy, sd15, clip_vision, photo):
    out = _train(comfy, sd15, clip_vision, photo, copy_layout="full")
    with torch.inference_mode():
        loaded = comfy.node("P3SAdapterLoader")().load("p3s_it_full.safetensors")[0]
    return SimpleNamespace(adapter=out["result"][0], loaded=loaded)


def test_full_layout_trains_the_decoder_from_the_unet_weights_and_saves_it(comfy, sd15, full_run):
    adapter, loaded = full_run.adapter, full_run.loaded
    assert adapter.config.layout == loaded.config.layout == "full"
    assert adapter.training_info["steps"] == 1
    assert [e.get("source") for e in loaded.layer_map].count("decoder") == 9
    assert [e["feature"] for e in loaded.layer_map] == list(range(16))
    assert len(loaded.copy.feature_transformers()) == 16
    base = comfy.core("comfyui_engine").base_unet_state_dict(sd15.model)
    sd = loaded.state_dict()
    # every copy tensor initialised from the real UNet's (the widths are the UNet's: the init checks
    # every shape), then one AdamW step (lr 1e-5) moved it a little
    for copy_key, unet_key in [
            ("copy.levels_b.0.st.transformer_blocks.0.attn1.to_q.weight",
             "input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"),
            ("copy.levels_b.2.res.in_layers.2.weight", "input_blocks.8.0.in_layers.2.weight"),
            ("copy.decoder.levels.0.2.st.transformer_blocks.0.attn2.to_k.weight",
             "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"),
            ("copy.decoder.levels.2.0.res.in_layers.2.weight", "output_blocks.3.0.in_layers.2.weight"),
            ("copy.decoder.levels.1.2.res.in_layers.2.weight", "output_blocks.8.0.in_layers.2.weight")]:
        assert sd[copy_key].shape == base[unet_key].shape, copy_key
        delta = float((sd[copy_key] - base[unet_key].float().cpu()).abs().max())
        assert 0 < delta < 1e-3, (copy_key, delta)
    assert float(sd["copy.zero_convs.output_11.weight"].abs().max()) > 0  # trained, was 0


def test_full_adapter_drives_the_injector_in_a_ksampler_run(comfy, sd15, clip_vision, photo, full_run):
    """All 16 self-attention layers get the extra K/V of the full copy in a real KSampler step."""
    copy_mod = comfy.core("copy_unet")
    out, seen = comfy.injected_layers(sd15, clip_vision, full_run.loaded, photo, PROMPT, SIZE)
    assert torch.isfinite(out).all() and out.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert seen == {e["key"] for e in copy_mod.LAYER_MAP}


def test_a_resumed_adapter_keeps_its_layout(comfy, sd15, clip_vision, photo, full_run):
    out = _train(comfy, sd15, clip_vision, photo, copy_layout="encoder", resume_adapter=full_run.loaded,
                 save_name="p3s_it_full_resumed")
    adapter = out["result"][0]
    assert adapter.config.layout == "full" and adapter.training_info["steps"] == 2
    assert any(k.startswith("copy.decoder.") for k in adapter.state_dict())


def test_all_layer_loss_pairs_each_unet_layer_with_its_own_copy_transformer(comfy, sd15, clip_vision, photo,
                                                                          full_run):
    """ac_layers='all' on the full copy in the real ComfyUI: the 16 copy transformers each give a map,
    and each UNet layer's map is compared with its own copy transformer's (same token grid)."""
    tr, train = comfy.core("comfyui_engine"), comfy.core("train")
    losses, cfg_mod = comfy.core("losses"), comfy.core("copy_config")
    with torch.inference_mode():
        (b,) = tr.cache_inputs(sd15.model, sd15.clip, sd15.vae, clip_vision, photo, PROMPT, resolution=SIZE)
        unet = tr.frozen_unet_copy(sd15.model)
        adapter = tr.new_training_adapter(unet, resume=full_run.loaded)
    assert len(adapter.copy.feature_transformers()) == 16
    ctx = tr.build_step_fn(sd15.model, adapter, train.TrainSettings(ac_layers="all"), unet=unet)
    seen: dict = {}
    try:
        with losses.copy_attention_hooks(adapter, seen), torch.inference_mode(False), torch.no_grad():
            l_ldm, l_ac = ctx.step_fn(adapter, b.latent, b.context, b.clip_hidden, torch.Generator().manual_seed(3))
            maps = dict(ctx.capture.maps)
    finally:
        ctx.close()
    assert sorted(seen) == list(range(16)) and len(maps) == 16
    for e in adapter.layer_map:
        assert seen[cfg_mod.feature_index(e)].shape[1] == maps[e["key"]].shape[1], e["key"]
    assert torch.isfinite(l_ldm) and float(l_ac) > 0
