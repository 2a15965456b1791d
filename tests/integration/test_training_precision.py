"""Training precision through the real ComfyUI (issue 21.3): with the frozen UNet in fp16 (what
``--fp16-unet`` gives on a GPU that computes in fp16) the step runs through ComfyUI's patch with
dynamic loss scaling, finite, and the adapter learns; the precision reaches the adapter's metadata and
the Trainer node's progress text; with bf16 no scaling is needed."""
from __future__ import annotations

import math

import pytest
import torch


def _batch(seed=4):
    g = torch.Generator().manual_seed(seed)
    return {"latent": torch.randn(1, 4, 8, 8, generator=g), "context": torch.randn(1, 77, 768, generator=g),
                   "clip_hidden": torch.randn(1, 257, 1024, generator=g)}


@pytest.mark.parametrize("dtype, scaling", [(torch.float16, True), (torch.bfloat16, False)])
def test_a_half_precision_unet_trains_through_comfyuis_patch(comfy, sd15, dtype, scaling):
    engine, train = comfy.core("comfyui_engine"), comfy.core("train")
    b = _batch()
    unet = engine.frozen_unet_copy(sd15.model, torch.device("cpu"), dtype=dtype)
    assert next(unet.parameters()).dtype == dtype
    adapter = engine.new_training_adapter(unet, seed=0)
    with torch.inference_mode(False), torch.no_grad():
        before = {k: v.clone() for k, v in adapter.state_dict().items()}
    settings = train.TrainSettings(epochs=3, lr=1e-4, cond_dropout=0.0, weight_decay=0.0)
    ctx = engine.build_step_fn(sd15.model, adapter, settings, unet=unet, device=torch.device("cpu"))
    try:
        assert ctx.precision.loss_scaling is scaling
        batches = [train.TrainBatch(latent=b["latent"], context=b["context"], uncond=torch.zeros_like(b["context"]),
                                    clip_hidden=b["clip_hidden"])]
        result = train.train_adapter(adapter, batches, ctx.step_fn, settings, precision=ctx.precision)
    finally:
        ctx.close()
    assert result.precision == ("fp32, dynamic loss scaling" if scaling else "fp32")
    assert result.steps == 3 and all(math.isfinite(v) for v in result.losses)
    assert result.skipped_steps < 3  # at most the scaler's first calibration steps are skipped
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("copy.zero_convs") for k in changed)  # the zero convs learned


def test_the_trainer_node_reports_its_precision(comfy, sd15, clip_vision):
    g = torch.Generator().manual_seed(2)
    images = torch.rand(1, 64, 64, 3, generator=g)
    with torch.inference_mode():
        out = comfy.node("P3STrainer")().train(
            model=sd15.model, clip=sd15.clip, vae=sd15.vae, clip_vision=clip_vision, images=images,
            prompt="a photo of sks dog", identifier="sks", epochs=1, learning_rate=1e-5, gamma=0.1,
            resolution=64, seed=0, save_name="p3s_it_precision", save_every=0)
    info = out["result"][0].training_info
    assert info["precision"] == "fp32" and info["skipped_steps"] == 0  # the CPU: fp32, no scaling
    assert "; precision fp32" in out["ui"]["text"][0]
    folder = comfy.folder_paths.get_folder_paths("p3s")[0]
    saved = comfy.core("adapter").load_adapter(f"{folder}/p3s_it_precision.safetensors")
    assert saved.training_info["precision"] == "fp32"
