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

WAIT_S = 120      # longest wait for one prompt (a hang fails instead of blocking the suite)
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
    # the server is still there, idle, and nothing was unpickled or saved from a refused adapter
    stats = server.get("/system_stats")
    assert "system" in stats and stats["devices"]
    queue = server.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    assert server.proc.poll() is None
    assert not files["marker"].exists(), "the server unpickled a file"
    assert not (Path(server.base) / "models" / "p3s" / "survival_never.safetensors").exists()
    print(f"{len(report)} prompts in {time.time() - start:.1f} s:", report)


# =========================================================================== the whole catalogue
# Every row of docs/ERRORS.md whose 'server' column says P3S is sent as an API prompt (cheap: each
# fails before any work) and must come back with its typed message in the execution error; rows
# marked 400 must be refused by ComfyUI's validation. Good prompts run in between. The rows are
# parsed from the catalogue, so a new row without a prompt here (or a prompt for a row that is
# gone) fails the test.

ERRORS_MD = Path(__file__).resolve().parents[2] / "docs" / "ERRORS.md"
CV = "p3s_random_clip_vit_l14.safetensors"
CKPT = "p3s_random_sd15.safetensors"


def catalogue_rows() -> list[dict]:
    """{'input', 'test', 'server'} of every catalogue row (pipes escaped as \\| stay in a cell)."""
    import re

    rows = []
    for line in ERRORS_MD.read_text().splitlines():
        if line.startswith("| ") and "`test_" in line:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append({"input": cells[0].split()[0], "test": cells[-2], "server": cells[-1]})
    return rows


def _image(n: int = 1) -> tuple[dict, list]:
    """Graph nodes giving ``n`` copies of the 160x96 test image, and the IMAGE link."""
    nodes = {"load": {"class_type": "LoadImage", "inputs": {"image": IMAGE}}}
    if n == 1:
        return nodes, ["load", 0]
    nodes["rep"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["load", 0], "amount": n}}
    return nodes, ["rep", 0]


def _special_image(kind: str) -> tuple[dict, list]:
    nodes, ref = _image()
    if kind == "rgba":
        nodes["alpha"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": W, "height": H}}
        nodes["rgba"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ref, "alpha": ["alpha", 0]}}
        return nodes, ["rgba", 0]
    if kind == "tiny":
        nodes["crop"] = {"class_type": "ImageCrop", "inputs": {"image": ref, "width": 8, "height": 8, "x": 0, "y": 0}}
        return nodes, ["crop", 0]
    if kind == "wide":
        return {"wide": {"class_type": "EmptyImage", "inputs": {"width": 8200, "height": 16, "batch_size": 1,
                                                                "color": 0}}}, ["wide", 0]
    if kind == "batch65":
        return _image(65)
    if kind == "bicubic":  # the core 'Upscale Image' with bicubic overshoots 0..1 at the noise's sharp edges
        nodes["up"] = {"class_type": "ImageScale", "inputs": {"image": ref, "upscale_method": "bicubic",
                                                              "width": 2 * W, "height": 2 * H, "crop": "disabled"}}
        return nodes, ["up", 0]
    raise ValueError(kind)


def sel(image=None, **over) -> dict:
    """Point Selector on ``image`` (nodes, link) with its preview as the output."""
    nodes, ref = image or _image()
    inputs = {"image": ref, "points_store": ""}
    inputs.update(over)
    return {**nodes, "pts": {"class_type": "P3SPointSelector", "inputs": inputs},
            "show": {"class_type": "PreviewImage", "inputs": {"images": ["pts", 3]}}}


STATE2 = json.dumps({"width": W, "height": H, "images": [{"positive": [[40, 30]], "negative": [[120, 60]]},
                                                         {"positive": [[50, 40]], "negative": []}]})


def rngr_graph(image=None, points=None, **over) -> dict:
    nodes, ref = image or _image(2)
    g = dict(nodes)
    if points is None:
        g["pts"] = {"class_type": "P3SPointSelector", "inputs": {"image": ["load2", 0], "points_store": STATE2}}
        g["load2"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["loadp", 0], "amount": 2}}
        g["loadp"] = {"class_type": "LoadImage", "inputs": {"image": IMAGE}}
        points = ["pts", 0]
    inputs = {"image": ref, "points": points, "clip_vision": ["cv", 0], "sigma": 0.75, "fill": "flat",
              "remove": "distractor", "grow": 2}
    inputs.update(over)
    g["cv"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CV}}
    g["rngr"] = {"class_type": "P3SRNGRMaskInpaint", "inputs": inputs}
    g["show"] = {"class_type": "PreviewImage", "inputs": {"images": ["rngr", 0]}}
    return g


def injector_graph(image=None, **over) -> dict:
    nodes, ref = image or _image()
    g = txt2img(7)
    g.update(nodes)
    inputs = {"model": ["ckpt", 0], "adapter": ["adapter", 0], "reference": ref, "vae": ["ckpt", 2],
              "clip_vision": ["cv", 0], "lam": 0.2, "strength": 1.0, "apply_to": "cond and uncond"}
    inputs.update(over)
    g["cv"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CV}}
    g["adapter"] = {"class_type": "P3SAdapterLoader", "inputs": {"adapter_name": "survival_good.safetensors"}}
    g["inject"] = {"class_type": "P3SConditionInjector", "inputs": inputs}
    g["sampler"]["inputs"]["model"] = ["inject", 0]
    return g


def without(graph: dict, node: str, *names) -> dict:
    """``graph`` with the inputs ``names`` of ``node`` left unconnected."""
    for name in names:
        del graph[node]["inputs"][name]
    return graph


def region_graph(image=None, **over) -> dict:
    """A P3S Region node whose preview is shown (so it runs), for the region rows."""
    inputs = dict(shape="box", width=64, height=64, left=0.25, top=0.25, right=0.75, bottom=0.75, invert=False)
    nodes = {}
    if image is not None:
        nodes, ref = image
        inputs["image"] = ref
    inputs.update(over)
    return {**nodes, "region": {"class_type": "P3SRegion", "inputs": inputs},
            "show_region": {"class_type": "PreviewImage", "inputs": {"images": ["region", 1]}}}


def save_graph(name: str, adapter=None) -> dict:
    g = {"adapter": {"class_type": "P3SAdapterLoader", "inputs": {"adapter_name": "survival_good.safetensors"}},
         "save": {"class_type": "P3SAdapterSave", "inputs": {"adapter": adapter or ["adapter", 0], "name": name}}}
    if adapter is not None:
        g["ckpt"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}
    return g


def trainer_graph(image=None, **over) -> dict:
    nodes, ref = image or _image(2)
    inputs = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "clip_vision": ["cv", 0], "images": ref,
              "prompt": "a photo of sks dog", "identifier": "sks", "epochs": 1, "learning_rate": 1e-5, "gamma": 0.1,
              "resolution": 64, "seed": 0, "save_name": "survival_never", "save_every": 0}
    inputs.update(over)
    return {**nodes, "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CV}},
            "train": {"class_type": "P3STrainer", "inputs": inputs},
            "show": {"class_type": "PreviewImage", "inputs": {"images": ["train", 2]}}}


def _mask(kind: str) -> dict:
    if kind == "small":
        return {"m": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}}}
    return {"load3": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
            "rep3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["load3", 0], "amount": 3}},
            "m": {"class_type": "ImageToMask", "inputs": {"image": ["rep3", 0], "channel": "red"}}}


def with_nodes(graph: dict, extra: dict) -> dict:
    return {**extra, **graph}


def _bad_names(names) -> list:
    return [(save_graph(n), None) for n in names]


# the problem and the fix of the bicubic rows, as the server must report them
OVERSHOOT = "outside 0..1 (ComfyUI IMAGEs are floats in 0..1). Fix: keep them in 0..1: 'Upscale Image' with 'bicubic'"
ONLY_NEGATIVE = json.dumps({"width": W, "height": H, "images": [{"positive": [], "negative": [[120, 60]]}]})
THREE_IMAGES = json.dumps({"width": W, "height": H, "images": [{"positive": [[1, 1]]}] * 3})

# test name (as in docs/ERRORS.md) -> [(graph, problem text or None)] for 'P3S' rows,
# (graph, text in the 400 answer) for '400' rows.
P3S_PROMPTS = {
    "`test_point_selector_no_point`": [(sel(), "no point was clicked")],
    "`test_point_selector_only_negative_clicks`": [(sel(points_store=ONLY_NEGATIVE), "no positive point on image 0")],
    "`test_point_selector_negative_coordinates_without_positive`": [
        (sel(coordinates_negative='[{"x": 10, "y": 10}]'), "no positive point")],
    "`test_point_selector_point_outside_image[…]` (2)": [
        (sel(coordinates_positive='[{"x": 500, "y": 10}]'), "lies outside the 160x96"),
        (sel(coordinates_positive='[{"x": 10, "y": -3}]'), "lies outside the 160x96")],
    "`test_point_selector_malformed_coordinates`": [(sel(coordinates_positive='[{"x": 12, "y": }'), "not valid JSON")],
    "`test_point_selector_non_finite_coordinate[NaN]`, `[Infinity]`": [
        (sel(coordinates_positive='[{"x": NaN, "y": 5}]'), "not finite"),
        (sel(coordinates_positive='[{"x": Infinity, "y": 5}]'), "not finite")],
    "`test_point_selector_coordinate_not_a_number`": [(sel(coordinates_positive='[{"x": "left", "y": 5}]'),
                                                       "is not a number")],
    "`test_point_selector_point_without_y`": [(sel(coordinates_positive='[{"x": 5}]'), "has no 'y' key")],
    "`test_point_selector_per_image_lists_do_not_match_batch`": [
        (sel(_image(2), coordinates_positive=json.dumps([[{"x": 1, "y": 1}]] * 3)), "3 per-image point lists")],
    "`test_point_selector_too_many_points`": [
        (sel(coordinates_positive=json.dumps([{"x": 5, "y": 5}] * 101)), "101 points for each image")],
    "`test_point_selector_coordinate_text_too_long`": [
        (sel(coordinates_positive=json.dumps([{"x": 5, "y": 5}] * 20_000)), "(at most 200,000)")],
    "`test_point_selector_clicks_for_more_images_than_batch`": [
        (sel(_image(2), points_store=THREE_IMAGES), "points for 3 images but the image batch has 2")],
    "`test_point_selector_corrupt_widget_state`": [(sel(points_store='{"images": ['), "not valid JSON")],
    "`test_point_selector_widget_state_too_long`": [
        (sel(points_store=json.dumps({"images": [{"positive": [[5, 5]] * 30_000}]})), "(at most 200,000)")],
    "`test_point_selector_bad_image[rgba]`": [(sel(_special_image("rgba"), points_store=STATE2), "4 channels (RGBA)")],
    "`test_point_selector_bad_image[tiny_8x8]`": [(sel(_special_image("tiny"), points_store=STATE2),
                                                   "below one CLIP patch")],
    "`test_point_selector_bad_image[batch_too_large]`": [(sel(_special_image("batch65"), points_store=STATE2),
                                                          "the batch has 65 images (at most 64)")],
    "`test_point_selector_bad_image[side_too_large]`": [(sel(_special_image("wide"), points_store=STATE2),
                                                         "(at most 8192 per side)")],
    "`test_image_values_outside_0_1[point_selector-overshoot]`, `[rngr-overshoot]`, `[region-overshoot]`": [
        (sel(_special_image("bicubic"), points_store=STATE2), OVERSHOOT),
        (rngr_graph(_special_image("bicubic")), OVERSHOOT),
        (region_graph(_special_image("bicubic")), OVERSHOOT)],
    "`test_image_values_outside_0_1[injector-overshoot]`": [(injector_graph(_special_image("bicubic")), OVERSHOOT)],
    "`test_image_values_outside_0_1[trainer-overshoot]`": [(trainer_graph(_special_image("bicubic")), OVERSHOOT)],
    "`test_rngr_images_and_points_of_different_lengths`": [(rngr_graph(_image(3)), "2 sets of points for 3 images")],
    "`test_rngr_points_not_from_point_selector`": [(rngr_graph(points='[{"x": 35, "y": 45}]'),
                                                    "expected P3S_POINTS, got a str")],
    "`test_rngr_bad_image`": [(rngr_graph(_special_image("rgba")), "4 channels (RGBA)")],
    "`test_rngr_setting_out_of_range[sigma-nan-…]`": [(rngr_graph(sigma=float("nan")), "not a finite number")],
    "`test_schedule_start_not_below_end[0.8-0.2]`": [(scheduler(start_percent=0.8, end_percent=0.2),
                                                      "is not below end_percent")],
    "`test_schedule_start_not_below_end[0.5-0.5]`": [(scheduler(start_percent=0.5, end_percent=0.5),
                                                      "is not below end_percent")],
    "`test_schedule_bad_custom_values[0.5, nan-…]`": [(scheduler(mode="custom", custom_values="0.5, nan"),
                                                       "is not a finite number")],
    "`test_schedule_bad_custom_values[0.5, inf, 1-…]`": [(scheduler(mode="custom", custom_values="0.5, inf, 1"),
                                                          "is not a finite number")],
    "`test_schedule_bad_custom_values[a, b-…]`": [(scheduler(mode="custom", custom_values="a, b"),
                                                   "is not a list of numbers")],
    "`test_schedule_bad_custom_values[0.4, -0.2-…]`": [(scheduler(mode="custom", custom_values="0.4, -0.2"),
                                                        "is negative")],
    "`test_schedule_bad_custom_values[  -…]`": [(scheduler(mode="custom", custom_values="  "), "the list is empty")],
    "`test_schedule_strength_out_of_range[nan-…]`": [(scheduler(strength=float("nan")), "not finite")],
    "`test_schedule_quadratic_high_below_low`": [(scheduler(mode="quadratic_increasing", low=1.0, high=0.5),
                                                  "below low")],
    "`test_schedule_paper_curve_would_go_negative`": [(scheduler(alpha=3.0, beta=0.2), "(negative)")],
    "`test_injector_setting_out_of_range[lam-nan-…]`": [(injector_graph(lam=float("nan")), "not a finite number")],
    "`test_injector_bad_reference[rgba]`": [(injector_graph(_special_image("rgba")), "4 channels (RGBA)")],
    "`test_injector_adapter_not_an_adapter[p3s_adapter.safetensors]`": [
        (injector_graph(adapter="p3s_adapter.safetensors"), "expected a P3S adapter, got a str")],
    "`test_injector_adapter_not_an_adapter[None]`": [(injector_graph(adapter=None), "got a NoneType")],
    "`test_injector_schedule_not_a_schedule`": [(injector_graph(schedule={"mode": "paper"}), "expected P3S_SCHEDULE")],
    **{f"`test_adapter_loader_refuses_damaged_file[{n}]`": [(loader(n), None)] for n in (
        "bad_truncated.safetensors", "bad_text.safetensors", "bad_pickle_zip.safetensors",
        "bad_pickle_legacy.safetensors", "bad_sdxl_family.safetensors", "bad_newer_format.safetensors",
        "bad_missing_tensor.safetensors", "bad_wrong_shapes.safetensors", "bad_a_lora.safetensors",
        "bad_corrupt_metadata.safetensors", "bad_reference_incomplete.safetensors",
        "bad_reference_shapes.safetensors")},
    "`test_adapter_loader_refuses_non_finite_weights`": [(loader("bad_nan_weights.safetensors"), None)],
    "`test_injector_reference_index_beyond_the_references`": [
        (injector_graph(_image(2), reference_index=2), "2 is not a reference of the 2 given (0..1)")],
    "`test_injector_reference_without_its_encoder[vae]`": [
        (without(injector_graph(), "inject", "vae"), "a reference photo is connected but no VAE")],
    "`test_injector_reference_without_its_encoder[clip_vision]`": [
        (without(injector_graph(), "inject", "clip_vision"), "a reference photo is connected but no CLIP vision")],
    # survival_good.safetensors is an adapter without a stored reference (as saved before issue 12)
    "`test_injector_old_adapter_without_reference`": [
        (without(injector_graph(), "inject", "reference", "vae", "clip_vision"), "this adapter file stores no reference")],
    "`test_injector_bad_region[batch_of_two]`": [
        (with_nodes(injector_graph(region=["m", 0]), _mask("three")), "one region per injector is needed")],
    "`test_injector_feather_out_of_range[nan-…]`": [(injector_graph(feather=float("nan")), "not a finite number")],
    "`test_region_node_empty_box[kw0-right]`": [(region_graph(left=0.8, right=0.2), "is empty or outside the frame")],
    "`test_region_node_empty_box[kw1-bottom]`": [(region_graph(top=0.5, bottom=0.5), "is empty or outside the frame")],
    "`test_region_node_bad_image`": [(region_graph(_special_image("rgba")), "4 channels (RGBA)")],
    "`test_adapter_save_name_with_path[…]` (7)": [
        (save_graph(n), "not a plain file name") for n in ("../escape", "sub/dir/x", "..\\x", ".hidden", "a:b",
                                                           "bad\nname", "   ")],
    "`test_adapter_save_name_invalid_on_windows[…]` (12)": [
        (save_graph(n), p) for n, p in (("con", "reserved device name"), ("NUL.safetensors", "reserved device name"),
                                        ("com1", "reserved device name"), ("Lpt9.tar", "reserved device name"),
                                        ("my_dog.", "ends with a dot"), ("my_dog ", "ends with a space"),
                                        (" my_dog", "starts or ends with a space"), ("a?b", "contains ?"),
                                        ("a<b>", "contains < >"), ('say "hi"', 'contains "'), ("a|b", "contains |"),
                                        ("a*", "contains *"))],
    "`test_adapter_save_name_too_long`": [(save_graph("x" * 240), "at most 200")],
    "`test_trainer_mask_does_not_fit[mask0-…]`": [
        (with_nodes(trainer_graph(mask=["m", 0]), _mask("small")), "differs from the image size")],
    "`test_trainer_mask_does_not_fit[mask1-…]`": [
        (with_nodes(trainer_graph(mask=["m", 0]), _mask("three")), "3 masks for 2 images")],
    "`test_trainer_prompt_too_long`": [(trainer_graph(prompt="a photo of sks dog " * 600), "(at most 10,000)")],
    "`test_trainer_prompt_without_identifier`": [(trainer_graph(prompt="a photo of a dog"),
                                                  "does not contain the identifier")],
    "`test_trainer_learning_rate_not_positive[0.0]`, `[nan]`": [(trainer_graph(learning_rate=float("nan")),
                                                                  "not a finite number > 0")],
    "`test_trainer_save_name_with_path`": [(trainer_graph(save_name="../../outside"), "not a plain file name")],
}

REFUSED_400 = {
    "`test_rngr_setting_out_of_range[sigma--1.0-…]`": (rngr_graph(sigma=-1.0), "value_smaller_than_min"),
    "`test_rngr_setting_out_of_range[grow--2-…]`": (rngr_graph(grow=-2), "value_smaller_than_min"),
    "`test_rngr_setting_out_of_range[fill-lama-…]`": (rngr_graph(fill="lama"), "value_not_in_list"),
    "`test_rngr_setting_out_of_range[remove-everything-…]`": (rngr_graph(remove="everything"), "value_not_in_list"),
    "`test_schedule_unknown_mode`": (scheduler(mode="linear"), "value_not_in_list"),
    "`test_schedule_strength_out_of_range[-0.5-…]`": (scheduler(strength=-0.5), "value_smaller_than_min"),
    "`test_injector_model_input_is_not_a_model`": (injector_graph(model=["ckpt", 1]), "return_type_mismatch"),
    "`test_injector_setting_out_of_range[lam--0.1-…]`": (injector_graph(lam=-0.1), "value_smaller_than_min"),
    "`test_injector_setting_out_of_range[lam-3.0-…]`": (injector_graph(lam=3.0), "value_bigger_than_max"),
    "`test_injector_setting_out_of_range[strength-inf-…]`": (injector_graph(strength=float("inf")),
                                                            "value_bigger_than_max"),
    "`test_injector_setting_out_of_range[strength--1.0-…]`": (injector_graph(strength=-1.0), "value_smaller_than_min"),
    "`test_injector_setting_out_of_range[apply_to-…]`": (injector_graph(apply_to="uncond only"), "value_not_in_list"),
    "`test_adapter_loader_missing_file_lists_folders`": (loader("no_such_adapter.safetensors"), "value_not_in_list"),
    "`test_adapter_loader_name_with_path[…]` (6)": (loader("../escape.safetensors"), "value_not_in_list"),
    "`test_adapter_save_input_is_not_an_adapter`": (save_graph("not_an_adapter", adapter=["ckpt", 0]),
                                                    "return_type_mismatch"),
    "`test_injector_bad_region[image_not_mask]`": (injector_graph(region=["load", 0]), "return_type_mismatch"),
    "`test_injector_feather_out_of_range[0.7-…]`": (injector_graph(feather=0.7), "value_bigger_than_max"),
    "`test_injector_reference_setting_out_of_range[reference_index-64-…]`": (injector_graph(reference_index=64),
                                                                             "value_bigger_than_max"),
    "`test_injector_reference_setting_out_of_range[reference_mode-…]`": (
        injector_graph(reference_mode="average latents"), "value_not_in_list"),
    "`test_injector_reference_setting_out_of_range[level0_keys-…]`": (
        injector_graph(level0_keys="pooled"), "value_not_in_list"),
    "`test_injector_reference_setting_out_of_range[copy_precision-…]`": (
        injector_graph(copy_precision="fp8"), "value_not_in_list"),
    "`test_injector_reference_setting_out_of_range[cross_attention-…]`": (
        injector_graph(cross_attention="on"), "value_not_in_list"),
    "`test_trainer_choice_not_in_list[ac_reading-printed]`": (trainer_graph(ac_reading="printed"), "value_not_in_list"),
    "`test_trainer_choice_not_in_list[reference_pairing-random photo]`": (
        trainer_graph(reference_pairing="random photo"), "value_not_in_list"),
    "`test_trainer_choice_not_in_list[copy_layout-half]`": (trainer_graph(copy_layout="half"), "value_not_in_list"),
    "`test_trainer_choice_not_in_list[enhancement-both]`": (trainer_graph(enhancement="both"), "value_not_in_list"),
    # the P3S Trainer's VALIDATE_INPUTS (it also accepts the true / false of older workflows)
    "`test_trainer_choice_not_in_list[gradient_checkpointing-sometimes]`": (
        trainer_graph(gradient_checkpointing="sometimes"), "custom_validation_failed"),
    "`test_region_node_setting_out_of_range[left-1.5-…]`": (region_graph(left=1.5), "value_bigger_than_max"),
    "`test_region_node_setting_out_of_range[shape-circle-…]`": (region_graph(shape="circle"), "value_not_in_list"),
    "`test_region_node_setting_out_of_range[width-4-…]`": (region_graph(width=4), "value_smaller_than_min"),
}


@pytest.fixture(scope="module")
def catalogue_files(server, files, tmp_path_factory):
    """The damaged adapters of the catalogue, made by the same code as the in-process rows."""
    from p3s_core import safe_io
    from test_bad_inputs import bad_adapter_files

    folder = Path(server.base) / "models" / "p3s"
    markers = tmp_path_factory.mktemp("catalogue_markers")
    return markers, bad_adapter_files(safe_io, folder / "survival_good.safetensors", markers)


def _typed_error(entry: dict) -> dict:
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1, entry["status"]["messages"]
    return errors[0]


def test_every_catalogue_row_a_prompt_can_carry_fails_typed_through_the_server(server, files, catalogue_files):
    markers, damaged = catalogue_files
    rows = catalogue_rows()
    by_kind: dict[str, set] = {"P3S": set(), "400": set()}
    for row in rows:
        if row["server"] in by_kind:
            by_kind[row["server"]].add(row["test"])
        else:
            assert row["server"].startswith("no: "), row
    # the catalogue and this test agree row for row (and so on the count)
    assert set(P3S_PROMPTS) == by_kind["P3S"], (sorted(set(P3S_PROMPTS) ^ by_kind["P3S"]))
    assert set(REFUSED_400) == by_kind["400"], (sorted(set(REFUSED_400) ^ by_kind["400"]))
    import re

    doc = ERRORS_MD.read_text()
    for kind in ("P3S", "400"):  # the counts the page states are the counts sent here
        stated = re.search(rf"\*\*{kind}\*\* \((\d+) rows\)", doc)
        assert stated and int(stated.group(1)) == len(by_kind[kind]), (kind, stated and stated.group(0))
    inputs = {row["test"]: row["input"] for row in rows}
    good = [scheduler(mode="fixed", weight=0.1 * (i + 1)) for i in range(10)]
    sent = {"P3S": 0, "400": 0, "good": 0}

    def run_good():
        graph = good[sent["good"] % len(good)]
        graph = json.loads(json.dumps(graph))
        graph["sched"]["inputs"]["strength"] = 1.0 + sent["good"] / 100  # not cached: really runs
        entry = server.wait(server.queue(graph), timeout=WAIT_S)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert image_files(server, entry)
        sent["good"] += 1

    for key, cases in P3S_PROMPTS.items():
        for graph, problem in cases:
            status, answer = post_prompt(server, graph)
            assert status == 200 and "prompt_id" in answer, (key, status, answer)
            entry = server.wait(answer["prompt_id"], timeout=WAIT_S)
            assert entry["status"]["status_str"] == "error", (key, entry["status"])
            err = _typed_error(entry)
            msg = err["exception_message"]
            if problem is None:  # damaged adapter files: the problem text of the in-process row
                name = graph["load"]["inputs"]["adapter_name"]
                problem = damaged[name][0]
            assert msg.startswith(f"P3S: input '{inputs[key]}': "), (key, msg)
            assert problem in msg and ". Fix: " in msg, (key, problem, msg)
            assert err["exception_type"].rsplit(".", 1)[-1].endswith("Error"), (key, err["exception_type"])
            sent["P3S"] += 1
            if sent["P3S"] % 6 == 0:
                run_good()
    for key, (graph, text) in REFUSED_400.items():
        status, answer = post_prompt(server, graph)
        assert 400 <= status < 500, (key, status, answer)
        assert text in json.dumps(answer), (key, answer)
        sent["400"] += 1
    run_good()
    assert sent["P3S"] >= len(by_kind["P3S"]) and sent["400"] == len(by_kind["400"])
    assert not any(markers.iterdir()), "the server unpickled a file"
    assert not (Path(server.base) / "models" / "p3s" / "survival_never.safetensors").exists()
    queue = server.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == [] and server.proc.poll() is None
    print(f"catalogue through the server: {len(by_kind['P3S'])} rows as {sent['P3S']} prompts with typed errors, "
          f"{sent['400']} refused by ComfyUI, {sent['good']} good prompts in between")
