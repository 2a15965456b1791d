"""On the real server: ControlNet and the P3S Condition Injector feed one KSampler; both act."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from p3s_core.adapter import new_adapter, save_adapter
from p3s_core.copy_unet import CopyUNetConfig

ADAPTER = "server_active.safetensors"


@pytest.fixture(scope="module")
def server_files(server):
    adapter = new_adapter(CopyUNetConfig.sd15(), seed=11)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for conv in adapter.copy.zero_convs.values():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.01)
    save_adapter(adapter, server.base / "models" / "p3s" / ADAPTER)
    rng = np.random.default_rng(0)
    ref = (rng.random((80, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(ref).save(server.base / "input" / "p3s_ref.png")
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[16:48, 16:48] = 255
    Image.fromarray(hint).save(server.base / "input" / "p3s_hint.png")
    return server


def graph(controlnet: bool, p3s: bool, prefix: str) -> dict:
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "p3s_random_sd15.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": 5, "steps": 2, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
    if controlnet:
        g["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "p3s_random_controlnet_sd15.safetensors"}}
        g["hint"] = {"class_type": "LoadImage", "inputs": {"image": "p3s_hint.png"}}
        g["apply_cn"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn", 0], "image": ["hint", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        g["sampler"]["inputs"]["positive"] = ["apply_cn", 0]
        g["sampler"]["inputs"]["negative"] = ["apply_cn", 1]
    if p3s:
        g["adapter"] = {"class_type": "P3SAdapterLoader", "inputs": {"adapter_name": ADAPTER}}
        g["clipv"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "p3s_random_clip_vit_l14.safetensors"}}
        g["ref"] = {"class_type": "LoadImage", "inputs": {"image": "p3s_ref.png"}}
        g["sched"] = {"class_type": "P3STimestepWeightScheduler", "inputs": {
            "mode": "paper", "alpha": 0.5, "beta": 0.2, "k": 2.0, "weight": 1.0, "low": 0.2, "high": 1.2,
            "start_percent": 0.0, "end_percent": 1.0, "strength": 1.0}}
        g["inject"] = {"class_type": "P3SConditionInjector", "inputs": {
            "model": ["ckpt", 0], "adapter": ["adapter", 0], "reference": ["ref", 0], "vae": ["ckpt", 2],
            "clip_vision": ["clipv", 0], "lam": 0.2, "strength": 1.0, "apply_to": "cond and uncond",
            "schedule": ["sched", 0]}}
        g["sampler"]["inputs"]["model"] = ["inject", 0]
    return g


def run_png(server, g) -> np.ndarray:
    files = server.output_files(server.run(g, timeout=600))
    assert len(files) == 1
    with Image.open(files[0]) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def test_controlnet_and_p3s_together_both_act(server_files):
    server = server_files
    plain = run_png(server, graph(False, False, "plain"))
    cn = run_png(server, graph(True, False, "cn"))
    p3s = run_png(server, graph(False, True, "p3s"))
    both = run_png(server, graph(True, True, "both"))
    diff = lambda a, b: float(np.abs(a - b).mean())  # noqa: E731
    assert diff(plain, cn) > 1.0       # ControlNet alone changes the image
    assert diff(plain, p3s) > 1.0      # P3S alone changes the image
    assert diff(both, cn) > 1.0        # toggling P3S with ControlNet on
    assert diff(both, p3s) > 1.0       # toggling ControlNet with P3S on
