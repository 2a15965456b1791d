"""The foundation: the pack loads in the real ComfyUI, the random models load through the real loader
nodes, the real server serves the pack and its JS, and txt2img runs through the server."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "tests" / "data" / "smoke_txt2img.json"


def pack_node_names() -> set[str]:
    """The node names the pack declares, read from its source (independent of any loader)."""
    text = (REPO / "nodes" / "__init__.py").read_text()
    start = text.index("NODE_CLASS_MAPPINGS = {")
    block = text[start:text.index("}", start)]
    return {line.split('"')[1] for line in block.splitlines() if line.strip().startswith('"')}


def test_pack_loads_through_comfyui_loader(comfy):
    names = pack_node_names()
    assert len(names) >= 1
    for name in names:
        assert name in comfy.nodes.NODE_CLASS_MAPPINGS, name
        assert comfy.nodes.NODE_CLASS_MAPPINGS[name].CATEGORY.startswith("P3S")
    assert comfy.nodes.EXTENSION_WEB_DIRS[harness.PACK_LINK_NAME].endswith("web/js")


def test_p3s_models_folder_registered(comfy):
    paths, exts = comfy.folder_paths.folder_names_and_paths["p3s"]
    assert paths[0] == str(comfy.base / "models" / "p3s")
    assert exts == {".safetensors"}  # never offer pickles
    (Path(paths[0]) / "listed.safetensors").write_bytes(b"x")
    (Path(paths[0]) / "ignored.ckpt").write_bytes(b"x")
    comfy.folder_paths.filename_list_cache.clear()
    listed = comfy.folder_paths.get_filename_list("p3s")
    assert "listed.safetensors" in listed and "ignored.ckpt" not in listed


def test_random_sd15_loads_as_sd15(comfy, sd15):
    import comfy.supported_models as sm

    assert isinstance(sd15.model.model.model_config, sm.SD15)
    unet = sd15.model.model.diffusion_model
    assert unet.model_channels == 320
    n_attn1 = sum(1 for name, _ in unet.named_modules() if name.endswith("attn1"))
    assert n_attn1 == 16
    for p in list(unet.parameters())[:50]:
        assert torch.isfinite(p.detach()).all()


def test_random_clip_vision_loads_as_vit_l14(comfy, clip_vision):
    with torch.inference_mode():
        out = clip_vision.encode_image(torch.rand(1, 224, 224, 3), crop=False)
    assert tuple(out["last_hidden_state"].shape) == (1, 257, 1024)
    assert tuple(out["image_embeds"].shape) == (1, 768)
    assert torch.isfinite(out["last_hidden_state"]).all()


def test_random_controlnet_loads_through_loader_node(comfy):
    import comfy.controlnet as cnet

    with torch.inference_mode():
        cn = comfy.node("ControlNetLoader")().load_controlnet("p3s_random_controlnet_sd15.safetensors")[0]
    assert isinstance(cn, cnet.ControlNet)
    assert cn.control_model.model_channels == 320


@pytest.mark.slow
def test_random_models_are_seeded_and_cached():
    manifest = json.loads((harness.random_models_dir() / "manifest.json").read_text())
    names = {Path(f["path"]).name for f in manifest["files"].values()}
    assert {"p3s_random_sd15.safetensors", "p3s_random_clip_vit_l14.safetensors",
            "p3s_random_controlnet_sd15.safetensors"} <= names


def test_server_loads_pack_and_lists_every_node(server):
    log = server.log()
    failures = [line for line in log.splitlines() if "Cannot import" in line or "IMPORT FAILED" in line]
    assert not [line for line in failures if harness.PACK_LINK_NAME in line], failures
    assert harness.PACK_LINK_NAME in log  # ComfyUI's "Import times for custom nodes" lists the pack
    info = server.get("/object_info")
    for name in pack_node_names():
        assert name in info, name
        assert info[name]["python_module"].startswith("custom_nodes.")


def test_server_serves_pack_js(server):
    extensions = server.get("/extensions")
    ours = [e for e in extensions if e.startswith(f"/extensions/{harness.PACK_LINK_NAME}/")]
    assert any(e.endswith("p3s.js") for e in ours), extensions


def test_pack_js_runs_in_real_frontend(page):
    page.wait_for_function("() => window.__p3s && window.__p3s.loaded === true", timeout=60_000)
    assert page.evaluate("() => window.__p3s.version") == "0.2.0"
    assert not [e for e in page.errors if "p3s" in e.lower()], page.errors


def test_txt2img_runs_through_real_server(server):
    workflow = json.loads(SMOKE.read_text())
    prompt = harness.ui_to_api(workflow, server.get("/object_info"))
    entry = server.run(prompt, timeout=300)
    files = server.output_files(entry)
    assert len(files) == 1 and files[0].exists()
    from PIL import Image

    with Image.open(files[0]) as im:
        assert im.size == (64, 64)


@pytest.mark.slow
@pytest.mark.server
def test_run_command_runs_smoke_workflow(tmp_path):
    """The README's run command with a workflow: runs it headless and prints the written file."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "run.py"), "--workflow", str(SMOKE),
                           "--port", "0", "--base", str(tmp_path / "base")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM-WEIGHT" in proc.stderr  # says loudly that the images are noise
    printed = [Path(line) for line in proc.stdout.splitlines() if line.strip()]
    assert printed and all(p.exists() and p.suffix == ".png" for p in printed), proc.stdout


@pytest.mark.slow
@pytest.mark.comfy
def test_pack_import_is_lazy():
    """Importing the pack (as ComfyUI does) pulls in none of the heavy libraries."""
    code = f"""
import sys, asyncio
sys.path.insert(0, {str(harness.comfyui_dir())!r})
import comfy.cli_args; comfy.cli_args.args.cpu = True
import folder_paths, utils.extra_config, nodes
before = set(sys.modules)
ok = asyncio.run(nodes.load_custom_node({str(REPO)!r}))
heavy = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('skimage', 'diffusers', 'transformers', 'scipy'))
print('OK' if ok else 'FAIL', heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().startswith("OK"), proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip() == "OK []", proc.stdout
