"""The Trainer stops cleanly: Cancel through the real server's ``POST /interrupt`` in the middle of
training (two images per epoch), and a loss that turns non-finite in the real training loop. Either
way the last completed save stays intact and no half-written file is left behind.

Kept cheap: 64x64 photos, resolution 64, a few steps of the random SD1.5.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p3s_core.adapter import load_adapter
from p3s_core.safe_io import read_safetensors_header

PHOTO = "p3s_reliability_photo.png"


def _steps_in(path: Path) -> int:
    meta, _ = read_safetensors_header(path)
    return int(json.loads(meta["training"])["steps"])


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_cancel_through_the_server_stops_within_one_step_and_keeps_the_last_save(server):
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(Path(server.base) / "input" / PHOTO)
    folder = Path(server.base) / "models" / "p3s"
    target = folder / "reliability_cancel.safetensors"
    epochs, images = 4, 2
    graph = {
        "load": {"class_type": "LoadImage", "inputs": {"image": PHOTO}},
        "two": {"class_type": "RepeatImageBatch", "inputs": {"image": ["load", 0], "amount": images}},
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "p3s_random_sd15.safetensors"}},
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "p3s_random_clip_vit_l14.safetensors"}},
        "train": {"class_type": "P3STrainer", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "clip_vision": ["cv", 0],
            "images": ["two", 0], "prompt": "a photo of sks dog", "identifier": "sks", "epochs": epochs,
            "learning_rate": 1e-5, "gamma": 0.1, "resolution": 64, "seed": 0, "save_name": "reliability_cancel",
            "save_every": 1}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["train", 2]}},
    }
    prompt_id = server.queue(graph)
    deadline = time.time() + 600
    while not target.exists():  # the save of step 1: step 2 (of image 2 in epoch 1) is now running
        assert time.time() < deadline, "no save of step 1 within 600 s:\n" + server.log()[-3000:]
        hist = server.get(f"/history/{prompt_id}")
        assert prompt_id not in hist, ("the run ended before its first save", hist.get(prompt_id, {}).get("status"))
        time.sleep(0.2)
    at_cancel = _steps_in(target)
    server.post("/interrupt", {})  # what the queue's Cancel button sends
    entry = server.wait(prompt_id, timeout=600)
    assert entry["status"]["status_str"] == "error", entry["status"]
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, kinds
    kept = _steps_in(target)
    assert at_cancel <= kept <= at_cancel + 1 < epochs * images, (at_cancel, kept)  # within one step
    adapter = load_adapter(target)  # complete, valid, finite
    assert adapter.training_info["steps"] == kept and adapter.training_info["images"] == images
    assert _tmp_files(folder) == []
    # the server goes on serving
    ok = server.run({"sched": {"class_type": "P3STimestepWeightScheduler", "inputs": {
        "mode": "fixed", "alpha": 0.5, "beta": 0.2, "k": 2.0, "weight": 0.9, "low": 0.2, "high": 1.2,
        "start_percent": 0.0, "end_percent": 1.0, "strength": 1.0, "custom_values": ""}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["sched", 1]}}}, timeout=120)
    assert ok["status"]["status_str"] == "success"


def test_a_loss_turning_non_finite_stops_the_real_loop_and_keeps_the_last_save(comfy, sd15, clip_vision,
                                                                               monkeypatch):
    """The real training loop; only the step's loss is poisoned at step 2 (what a diverging run gives)."""
    errors = comfy.core("errors")
    tr = comfy.core("comfyui_engine")
    folder = Path(comfy.folder_paths.get_folder_paths("p3s")[0])
    target = folder / "reliability_nan.safetensors"
    if target.exists():
        target.unlink()
    real_build = tr.build_step_fn
    calls = []

    def build(*args, **kwargs):
        ctx = real_build(*args, **kwargs)
        real_step = ctx.step_fn

        def step(*a, **k):
            l_ldm, l_ac = real_step(*a, **k)
            calls.append(1)
            return (l_ldm * float("nan"), l_ac) if len(calls) == 2 else (l_ldm, l_ac)

        ctx.step_fn = step
        return ctx

    monkeypatch.setattr(comfy.core("comfyui_engine.training"), "build_step_fn", build)
    g = torch.Generator().manual_seed(5)
    photos = torch.rand(2, 64, 64, 3, generator=g)
    with pytest.raises(errors.TrainingDivergedError) as err:
        with torch.inference_mode():
            comfy.node("P3STrainer")().train(
                model=sd15.model, clip=sd15.clip, vae=sd15.vae, clip_vision=clip_vision, images=photos,
                prompt="a photo of sks dog", identifier="sks", epochs=2, learning_rate=1e-5, gamma=0.1,
                resolution=64, seed=0, save_name="reliability_nan", save_every=1)
    msg = str(err.value)
    assert len(calls) == 2, calls  # stopped at the poisoned step, no further step ran
    assert "the save of step 1" in msg and "is kept" in msg and "Fix: " in msg, msg
    kept = load_adapter(target)
    assert kept.training_info["steps"] == 1
    assert all(bool(torch.isfinite(t).all()) for t in kept.state_dict().values())
    assert _tmp_files(folder) == []
