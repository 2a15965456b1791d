"""The real server survives a bounded stream of bad prompts mixed with good ones (127.0.0.1 only).

Bad prompts are refused at validation (HTTP 400 at POST) or fail inside a P3S node at execution
time with the typed message; good prompts (scheduler curve previews, Point Selector previews, two
tiny 64x64 1-step txt2img runs) still produce their images, and the server answers afterwards.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p3s_core.adapter import new_adapter, save_adapter
from p3s_core.copy_unet import CopyUNetConfig

WAIT_S = 120      # longest wait for one prompt
TOTAL_S = 300     # the whole stream
IMAGE = "p3s_survival.png"
H, W = 96, 160


class _Trap:
    """Unpickling this would create ``marker``: the server must never unpickle the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def files(server, tmp_path_factory):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8)).save(Path(server.base) / "input" / IMAGE)
    folder = Path(server.base) / "models" / "p3s"
    good = save_adapter(new_adapter(CopyUNetConfig.tiny(), seed=2, clip_dim=16, encoder_inner_dim=8),
                        folder / "survival_good.safetensors")
    raw = good.read_bytes()
    (folder / "survival_truncated.safetensors").write_bytes(raw[: len(raw) // 3])
    marker = tmp_path_factory.mktemp("markers") / "unpickled"
    torch.save({"trap": _Trap(marker)}, folder / "survival_pickle.safetensors")
    return {"marker": marker}


# --------------------------------------------------------------------------- graphs (API format)

def scheduler(**over) -> dict:
    inputs = {"mode": "paper", "alpha": 0.5, "beta": 0.2, "k": 2.0, "weight": 1.0, "low": 0.2, "high": 1.2,
              "start_percent": 0.0, "end_percent": 1.0, "strength": 1.0, "custom_values": ""}
    inputs.update(over)
    return {"sched": {"class_type": "P3STimestepWeightScheduler", "inputs": inputs},
            "show": {"class_type": "PreviewImage", "inputs": {"images": ["sched", 1]}}}


def points(**over) -> dict:
    inputs = {"image": ["load", 0], "points_store": ""}
    inputs.update(over)
    return {"load": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
            "pts": {"class_type": "P3SPointSelector", "inputs": inputs},
            "show": {"class_type": "PreviewImage", "inputs": {"images": ["pts", 3]}}}


def loader(name: str) -> dict:
    return {"load": {"class_type": "P3SAdapterLoader", "inputs": {"adapter_name": name}},
            "save": {"class_type": "P3SAdapterSave", "inputs": {"adapter": ["load", 0], "name": "survival_never"}}}


def txt2img(seed: int) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "p3s_random_sd15.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": 1, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"survival_{seed}"}},
    }


GOOD_STATE = json.dumps({"width": W, "height": H, "images": [{"positive": [[40, 30]], "negative": [[120, 60]]}]})
MISSING_ALPHA = scheduler()
del MISSING_ALPHA["sched"]["inputs"]["alpha"]
DANGLING = {"show": {"class_type": "PreviewImage", "inputs": {"images": ["nowhere", 0]}}}

# (label, graph, expectation): "ok" = images; ("400", text in the answer); ("exec", input name, problem text)
STREAM = [
    ("paper curve", scheduler(), "ok"),
    ("unknown node type", {"x": {"class_type": "P3SNoSuchNode", "inputs": {}}}, ("400", "P3SNoSuchNode")),
    ("no point clicked", points(), ("exec", "points_store", "no point was clicked")),
    ("fixed curve", scheduler(mode="fixed", weight=0.7), "ok"),
    ("start >= end", scheduler(start_percent=0.8, end_percent=0.2), ("exec", "start_percent", "is not below end_percent")),
    ("mode not in list", scheduler(mode="banana"), ("400", "value_not_in_list")),
    ("points clicked", points(points_store=GOOD_STATE), "ok"),
    ("point outside image", points(coordinates_positive='[{"x": 999, "y": 5}]'),
     ("exec", "coordinates_positive", "lies outside the 160x96")),
    ("txt2img 1", txt2img(1), "ok"),
    ("strength above max", scheduler(strength=11.0), ("400", "value_bigger_than_max")),
    ("NaN custom weight", scheduler(mode="custom", custom_values="0.5, nan"),
     ("exec", "custom_values", "is not a finite number")),
    ("quadratic increasing", scheduler(mode="quadratic_increasing", low=0.1, high=0.9), "ok"),
    ("NaN strength passes ComfyUI's min/max", scheduler(strength=float("nan")), ("exec", "strength", "not finite")),
    ("missing adapter name", loader("survival_missing.safetensors"), ("400", "adapter_name")),
    ("pickle renamed .safetensors", loader("survival_pickle.safetensors"),
     ("exec", "adapter_name", "pickle / PyTorch checkpoint")),
    ("quadratic decreasing", scheduler(mode="quadratic_decreasing", low=0.3, high=1.5), "ok"),
    ("truncated adapter", loader("survival_truncated.safetensors"), ("exec", "adapter_name", "truncated")),
    ("malformed coordinates", points(coordinates_positive='[{"x": 1,'), ("exec", "coordinates_positive", "not valid JSON")),
    ("missing required input", MISSING_ALPHA, ("400", "required_input_missing")),
    ("custom curve", scheduler(mode="custom", custom_values="0.2, 1.0, 0.4"), "ok"),
    ("link to a missing node", DANGLING, ("400", "nowhere")),
    ("no output node", {"sched": scheduler()["sched"]}, ("400", "prompt_no_outputs")),
    ("negative without positive", points(coordinates_negative='[{"x": 10, "y": 10}]'),
     ("exec", "coordinates_positive", "no positive point")),
    ("txt2img 2", txt2img(2), "ok"),
    ("windowed curve", scheduler(start_percent=0.2, end_percent=0.7, strength=2.0), "ok"),
]


def post_prompt(server, prompt: dict):
    """(HTTP status, answer) of POST /prompt; a 4xx is an answer, not an exception."""
    body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()  # float NaN is sent as the literal NaN, which ComfyUI (Python json) reads
    req = urllib.request.Request(server.url + "/prompt", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def image_files(server, entry: dict) -> list[Path]:
    out = []
    for node_out in entry.get("outputs", {}).values():
        for item in node_out.get("images", []):
            folder = {"output": "output", "temp": "temp"}[item.get("type", "output")]
            out.append(Path(server.base) / folder / item.get("subfolder", "") / item["filename"])
    return out


def test_server_survives_a_stream_of_bad_and_good_prompts(server, files):
    assert server.url.startswith("http://127.0.0.1:")
    assert len(STREAM) >= 20
    assert sum(1 for *_, e in STREAM if e == "ok") >= 8 and sum(1 for *_, e in STREAM if e != "ok") >= 12
    start = time.time()
    report = []
    for label, graph, expect in STREAM:
        status, answer = post_prompt(server, graph)
        if isinstance(expect, tuple) and expect[0] == "400":
            assert 400 <= status < 500, (label, status, answer)
            assert expect[1] in json.dumps(answer), (label, answer)
            report.append((label, status))
            continue
        assert status == 200 and "prompt_id" in answer, (label, status, answer)
        entry = server.wait(answer["prompt_id"], timeout=WAIT_S)
        state = entry["status"]["status_str"]
        if expect == "ok":
            assert state == "success", (label, entry["status"])
            pngs = image_files(server, entry)
            assert pngs, (label, entry.get("outputs"))
            for png in pngs:
                assert png.is_file() and png.stat().st_size > 0, (label, png)
                with Image.open(png) as im:
                    assert im.size[0] >= 64 and im.size[1] >= 64
        else:
            _, input_name, problem = expect
            assert state == "error", (label, entry["status"])
            errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
            assert len(errors) == 1, (label, entry["status"]["messages"])
            msg = errors[0]["exception_message"]
            assert f"P3S: input '{input_name}': " in msg and problem in msg and "Fix: " in msg, (label, msg)
            assert errors[0]["exception_type"].rsplit(".", 1)[-1].endswith("Error"), errors[0]
        report.append((label, state))
        assert time.time() - start < TOTAL_S, f"the stream took too long ({report})"
    # the server is still there, idle, and nothing was unpickled or saved from a refused adapter
    stats = server.get("/system_stats")
    assert "system" in stats and stats["devices"]
    queue = server.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    assert server.proc.poll() is None
    assert not files["marker"].exists(), "the server unpickled a file"
    assert not (Path(server.base) / "models" / "p3s" / "survival_never.safetensors").exists()
    print(f"{len(report)} prompts in {time.time() - start:.1f} s:", report)
    assert len(report) == len(STREAM) and time.time() - start < TOTAL_S
