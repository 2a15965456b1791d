"""The shipped workflows: valid against the real node definitions, listed as templates, and run end
to end through the real frontend (its own graph-to-prompt conversion) and the real server."""
from __future__ import annotations

import copy
import json
import math
import re
import time
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
ORDER = ["p3s_select_and_train", "p3s_generate", "p3s_generate_controlnet", "p3s_clicks_to_images",
         "p3s_two_subjects"]
TWO_SUBJECTS = "p3s_two_subjects"  # run by its own test below (issue 16)
SECOND_ADAPTER = "p3s_example_cat.safetensors"  # the two-subjects workflow's second adapter
DOCS = REPO / "docs" / "images"
TRAINED_ADAPTER = "p3s_example_dog.safetensors"

# What the test lowers so a workflow runs on the CPU with random weights: (node type, widget, value).
LOWER = [("EmptyLatentImage", "width", 64), ("EmptyLatentImage", "height", 64), ("KSampler", "steps", 2),
         ("P3STrainer", "epochs", 1), ("P3STrainer", "resolution", 64), ("P3SRNGRMaskInpaint", "fill", "flat")]
# What the as-shipped server run lowers: the training length, the two resolutions and the sampling steps;
# everything else (the fill, the points and masks, every option) is the shipped workflow's.
AS_SHIPPED_LOWER = {("P3STrainer", "epochs"): 1, ("P3STrainer", "resolution"): 64, ("EmptyLatentImage", "width"): 64,
                    ("EmptyLatentImage", "height"): 64, ("KSampler", "steps"): 2}


def test_the_shipped_workflows_exist():
    assert [p.stem for p in WORKFLOWS] == sorted(ORDER)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_node_definitions(server, path):
    """Every node type exists and every widget value is accepted by the server's own validation."""
    wf = json.loads(path.read_text())
    info = server.get("/object_info")
    for node in wf["nodes"]:
        assert node["type"] in info or node["type"] == "Note", node["type"]
    prompt = harness.ui_to_api(wf, info)
    for nid, entry in prompt.items():
        spec = info[entry["class_type"]]["input"]
        allowed = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, value in entry["inputs"].items():
            assert name in allowed, (path.stem, entry["class_type"], name)
            kind = allowed[name][0]
            if (entry["class_type"], name) == ("P3SAdapterLoader", "adapter_name"):
                # written by p3s_select_and_train's trainer (the second: its run with another save_name)
                assert value in ((TRAINED_ADAPTER, SECOND_ADAPTER) if path.stem == TWO_SUBJECTS else (TRAINED_ADAPTER,))
            elif isinstance(kind, list) and not isinstance(value, list):
                assert value in kind, (path.stem, entry["class_type"], name, value)
        if entry["class_type"] == "P3STrainer":
            assert entry["inputs"]["save_name"] + ".safetensors" == TRAINED_ADAPTER
        required = set(spec.get("required", {}))
        assert required <= set(entry["inputs"]), (path.stem, entry["class_type"], required - set(entry["inputs"]))


def test_workflows_are_listed_as_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates[harness.PACK_LINK_NAME]) == sorted(ORDER)


def _load(page, wf):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    page.wait_for_timeout(500)
    missing = page.evaluate("() => window.app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    assert missing == []


def _lower(page):
    for type_, widget, value in LOWER:
        page.evaluate("""([t, w, v]) => { for (const n of window.app.graph._nodes.filter(n => n.type === t)) {
            const x = n.widgets.find(x => x.name === w); x.value = v; } }""", [type_, widget, value])


def _screenshot(page, path):
    """A picture for the README: the whole graph in view (below the frontend's news banner)."""
    page.evaluate("""() => { const c = window.app.extensionManager && window.app.extensionManager.command;
        if (c) return c.execute("Comfy.Canvas.FitView"); window.app.canvas.ds.reset(); }""")
    page.wait_for_timeout(800)
    size = page.viewport_size
    page.screenshot(path=str(path), clip={"x": 0, "y": 40, "width": size["width"], "height": size["height"] - 40})


def _queue_and_wait(page, server, timeout=900):
    before = set(server.get("/history", timeout=120))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            new = [k for k in server.get("/history", timeout=120) if k not in before]
        except TimeoutError:  # a server busy training on the CPU answers slowly
            continue
        if new:
            entry = server.wait(new[0], timeout=max(1, deadline - time.time()))
            return entry
        time.sleep(0.5)
    raise AssertionError("the frontend queued nothing")


def test_workflows_run_end_to_end_from_the_frontend(page, server):
    for name in [n for n in ORDER if n != TWO_SUBJECTS]:
        wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        _load(page, wf)
        DOCS.mkdir(parents=True, exist_ok=True)
        if name == "p3s_generate":
            _screenshot(page, DOCS / "generate_workflow.png")
        _lower(page)
        entry = _queue_and_wait(page, server)
        assert entry["status"]["status_str"] == "success", (name, entry["status"].get("messages"))
        if name == "p3s_select_and_train":  # the Point Selector beside its RNGR mask preview, after the run
            page.wait_for_timeout(1500)
            _screenshot(page, DOCS / "select_and_train.png")
        if name in ("p3s_select_and_train", "p3s_clicks_to_images"):
            assert (server.base / "models" / "p3s" / TRAINED_ADAPTER).exists()
        if name != "p3s_select_and_train":
            files = server.output_files(entry)
            assert files and all(f.exists() and f.suffix == ".png" for f in files), (name, entry["outputs"])
    assert not [e for e in page.errors if "p3s" in e.lower()], page.errors


def test_two_subjects_workflow_runs_from_the_frontend(page, server):
    """Issue 16's workflow: two adapters, two P3S Regions, one prompt; loaded, queued from the page, run.
    Its adapters: the one p3s_select_and_train writes (trained here if this server has none yet), and
    a copy of it under the second name standing in for the second subject's training run."""
    import shutil

    adapters = server.base / "models" / "p3s"
    if not (adapters / TRAINED_ADAPTER).exists():
        _load(page, json.loads((REPO / "workflows" / "p3s_select_and_train.json").read_text()))
        _lower(page)
        entry = _queue_and_wait(page, server)
        assert entry["status"]["status_str"] == "success", entry["status"].get("messages")
    shutil.copyfile(adapters / TRAINED_ADAPTER, adapters / SECOND_ADAPTER)
    wf = json.loads((REPO / "workflows" / f"{TWO_SUBJECTS}.json").read_text())
    types = [n["type"] for n in wf["nodes"]]
    assert types.count("P3SConditionInjector") == 2 and types.count("P3SRegion") == 2
    assert types.count("P3SAdapterLoader") == 2
    _load(page, wf)
    DOCS.mkdir(parents=True, exist_ok=True)
    _lower(page)
    entry = _queue_and_wait(page, server)
    assert entry["status"]["status_str"] == "success", entry["status"].get("messages")
    files = server.output_files(entry)
    assert files and all(f.exists() and f.suffix == ".png" for f in files), entry["outputs"]
    previews = [o for o in entry["outputs"].values() if o.get("images") and o["images"][0].get("type") == "temp"]
    assert len(previews) == 2  # the two region previews
    page.wait_for_timeout(1500)
    _screenshot(page, DOCS / "two_subjects_workflow.png")
    assert not [e for e in page.errors if "p3s" in e.lower()], page.errors


def test_clicks_to_images_runs_through_the_server_as_shipped(server):
    """p3s_clicks_to_images (clicks -> RNGR mask + fill -> P3S Trainer -> Condition Injector -> KSampler ->
    Save Image) queued on the real server with only epochs, resolutions and steps lowered: the fill
    (biharmonic), points, mask settings and trainer options run as shipped. The adapter it writes and
    the image it saves are produced and finite."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    wf = json.loads((REPO / "workflows" / "p3s_clicks_to_images.json").read_text())
    shipped = harness.ui_to_api(wf, server.get("/object_info"))
    prompt = copy.deepcopy(shipped)
    lowered = set()
    for entry in prompt.values():
        for name in entry["inputs"]:
            if (entry["class_type"], name) in AS_SHIPPED_LOWER:
                entry["inputs"][name] = AS_SHIPPED_LOWER[(entry["class_type"], name)]
                lowered.add((entry["class_type"], name))
    assert lowered == set(AS_SHIPPED_LOWER)
    (rngr,) = [e["inputs"] for e in shipped.values() if e["class_type"] == "P3SRNGRMaskInpaint"]
    assert rngr["fill"] == "biharmonic"  # the shipped fill is the one that runs
    adapter = server.base / "models" / "p3s" / TRAINED_ADAPTER
    adapter.unlink(missing_ok=True)  # so the file checked below is this run's
    entry = server.run(prompt, timeout=900)
    ids = {e["class_type"]: nid for nid, e in prompt.items() if e["class_type"] in ("P3STrainer", "SaveImage")}
    text = entry["outputs"][ids["P3STrainer"]]["text"][0]
    loss = re.search(r"last loss ([-+0-9.eEinfa]+)", text)
    assert loss and math.isfinite(float(loss.group(1))), text
    tensors = load_file(str(adapter))
    assert tensors and all(bool(t.isfinite().all()) for t in tensors.values())
    files = server.output_files(entry)
    assert len(files) == 1 and files[0].suffix == ".png", entry["outputs"]
    image = np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.float32)
    assert image.shape == (64, 64, 3)
    assert image.std() > 1.0  # a NaN latent decodes to one flat colour
    # every image node showed its picture: the RNGR preview, the loss plot, the schedule plot, the image
    shown = {nid for nid, out in entry["outputs"].items() if out.get("images")}
    wanted = {nid for nid, e in prompt.items() if e["class_type"] in ("PreviewImage", "SaveImage")}
    assert len(wanted) == 4 and wanted <= shown, (wanted, entry["outputs"].keys())
