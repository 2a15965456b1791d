"""The UI-format -> API-format converter used by the run command."""
import json
from pathlib import Path

import pytest

import harness

SMOKE = Path(__file__).resolve().parents[1] / "data" / "smoke_txt2img.json"

OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors"]]}}},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}}},
    "EmptyLatentImage": {"input": {"required": {"width": ["INT", {}], "height": ["INT", {}], "batch_size": ["INT", {}]}}},
    "KSampler": {"input": {"required": {
        "model": ["MODEL"], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
        "cfg": ["FLOAT", {}], "sampler_name": [["euler", "ddim"]], "scheduler": [["normal"]],
        "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
        "denoise": ["FLOAT", {}]}}},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}}},
}


def test_smoke_workflow_converts():
    api = harness.ui_to_api(json.loads(SMOKE.read_text()), OBJECT_INFO)
    assert "8" not in api  # the Note is dropped
    ks = api["5"]["inputs"]
    assert ks["seed"] == 42 and ks["steps"] == 2 and ks["cfg"] == 7.5  # "fixed" control value skipped
    assert ks["sampler_name"] == "ddim" and ks["scheduler"] == "normal" and ks["denoise"] == 1.0
    assert ks["model"] == ["1", 0] and ks["positive"] == ["2", 0] and ks["latent_image"] == ["4", 0]
    assert api["2"]["inputs"] == {"text": "a photo of a dog", "clip": ["1", 1]}
    assert api["6"]["inputs"] == {"samples": ["5", 0], "vae": ["1", 2]}
    assert api["7"]["inputs"]["filename_prefix"] == "p3s_smoke"


def test_unknown_node_type_is_named():
    wf = json.loads(SMOKE.read_text())
    wf["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(harness.HarnessError, match="NoSuchNode"):
        harness.ui_to_api(wf, OBJECT_INFO)


def test_bypassed_nodes_are_left_out():
    wf = json.loads(SMOKE.read_text())
    wf["nodes"][6]["mode"] = 4
    assert "7" not in harness.ui_to_api(wf, OBJECT_INFO)
