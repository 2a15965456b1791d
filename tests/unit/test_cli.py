"""``p3s`` command line on tiny random-weight models saved as local diffusers / transformers folders."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_sd  # noqa: E402

from p3s_core import cli  # noqa: E402
from p3s_core.adapter import load_adapter, save_adapter  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    m = tiny_sd.build(root)
    tiny_sd.photos(root / "photos")
    m["photos"] = root / "photos"
    return m


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _models_args(models):
    return ["--model", str(models["model"]), "--clip-vision", str(models["clip_vision"]), "--device", "cpu"]


def test_help_shows_the_paper_defaults(capsys):
    for cmd, expect in (("train", ["60", "1e-05", "0.1", "sks"]), ("generate", ["50", "7.5", "paper"]),
                        ("eval", ["CLIP ViT-B/32", "DINOv2"]), ("mask", ["0.75", "biharmonic"]),
                        ("train-many", ["accelerate", "{identifier}"])):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        text = capsys.readouterr().out
        for e in expect:
            assert e in text, (cmd, e)
    r = subprocess.run([sys.executable, "-m", "p3s", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "train-many" in r.stdout and "generate" in r.stdout


def test_bad_input_is_a_typed_error_before_any_work(models, tmp_path, capsys):
    out = tmp_path / "o" / "a.safetensors"
    rc = cli.main(["train", str(models["photos"]), "--out", str(out), "--prompt", "a photo of a dog",
                   *_models_args(models)])
    err = capsys.readouterr().err
    assert rc == 2 and "input 'prompt'" in err and "Fix:" in err and "sks" in err
    assert not out.parent.exists(), "nothing is written on bad input"
    rc = cli.main(["train", str(tmp_path / "nope"), "--out", str(out), *_models_args(models)])
    assert rc == 2 and "input 'photos'" in capsys.readouterr().err
    rc = cli.main(["train", str(models["photos"]), "--out", str(out), "--model", str(tmp_path / "x.ckpt"),
                   "--clip-vision", str(models["clip_vision"]), "--epochs", "1", "--resolution", "64"])
    assert rc == 2 and "input 'model'" in capsys.readouterr().err
    rc = cli.main(["generate", "--adapter", str(tmp_path / "none.safetensors"), "--reference",
                   str(models["photos"]), "--out", str(tmp_path / "g"), "--prompt", "x", *_models_args(models)])
    assert rc == 2 and "Fix:" in capsys.readouterr().err


def test_train_writes_an_adapter_and_a_config_that_repeats_the_run(models, tmp_path, capsys):
    out = tmp_path / "run1" / "dog.safetensors"
    args = ["train", str(models["photos"]), "--out", str(out), "--epochs", "1", "--resolution", "64",
            "--seed", "3", "--threads", "1", *_models_args(models)]
    assert cli.main(args) == 0
    said = capsys.readouterr().out  # the defaults with 3 photos: another photo as the reference
    assert "reference pairing other photo; adapter saved to" in said and "one photo" not in said
    adapter = load_adapter(out)
    assert adapter.training_info["steps"] == 3 and adapter.training_info["engine"] == "diffusers"
    assert adapter.config.model_channels == 32 and adapter.encoder.clip_dim == 16
    cfg = json.loads((out.parent / "p3s_train.json").read_text())
    assert cfg["command"] == "train" and cfg["args"]["seed"] == 3 and cfg["args"]["epochs"] == 1
    # repeat from the config file, to another place: the same bytes (CPU, same seed, 1 thread)
    out2 = tmp_path / "run2" / "dog.safetensors"
    assert cli.main(["train", "--config", str(out.parent / "p3s_train.json"), "--out", str(out2)]) == 0
    assert out2.read_bytes() == out.read_bytes()
    # the training moved the adapter away from its initialisation
    from p3s_core import diffusers_engine as db

    unet = db.load_unet(models["model"])
    init = db.new_adapter_for_unet(unet, seed=3, config=db.copy_config_for(unet), clip_dim=16)
    trained = adapter.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in init.state_dict().items())


def _save_active_adapter(models, path, seed):
    """An adapter for the tiny UNet whose zero convs are non-zero (P3S acts), saved to ``path``."""
    from p3s_core import diffusers_engine as db

    unet = db.load_unet(models["model"])
    adapter = db.new_adapter_for_unet(unet, seed=0, config=db.copy_config_for(unet), clip_dim=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in adapter.copy.zero_convs.values():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
    save_adapter(adapter, path)


def test_generate_writes_images_and_strength_zero_is_the_plain_pipeline(models, tmp_path):
    from p3s_core import diffusers_engine as db

    _save_active_adapter(models, tmp_path / "a.safetensors", seed=1)
    base = ["generate", "--adapter", str(tmp_path / "a.safetensors"), "--reference", str(models["photos"]),
            "--prompt", "a sks dog in the snow", "--prompt", "a red sks dog", "--steps", "2", "--size", "64",
            *_models_args(models)]
    assert cli.main(base + ["--out", str(tmp_path / "on")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "off"), "--strength", "0"]) == 0
    assert json.loads((tmp_path / "on" / "prompts.json").read_text())[1] == "a red sks dog"
    on = [np.asarray(Image.open(tmp_path / "on" / str(i) / "00.png")) for i in range(2)]
    off = [np.asarray(Image.open(tmp_path / "off" / str(i) / "00.png")) for i in range(2)]
    assert on[0].shape == (64, 64, 3)
    assert any(not np.array_equal(a, b) for a, b in zip(on, off)), "P3S changes the images"
    pipe = db.load_pipeline(models["model"])
    plain = pipe(prompt="a sks dog in the snow", num_inference_steps=2, guidance_scale=7.5, height=64,
                 width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(plain), off[0]), "strength 0 is the plain diffusers pipeline"
    cfg = json.loads((tmp_path / "on" / "p3s_generate.json").read_text())
    assert cfg["args"]["steps"] == 2 and cfg["args"]["cfg"] == 7.5


def test_mask_writes_cleaned_photos_and_masks(models, tmp_path, capsys):
    pts = {p.name: {"positive": [[32, 30]], "negative": [[5, 5]]} for p in models["photos"].iterdir()}
    (tmp_path / "points.json").write_text(json.dumps(pts))
    out = tmp_path / "clean"
    rc = cli.main(["mask", str(models["photos"]), "--points", str(tmp_path / "points.json"),
                   "--clip-vision", str(models["clip_vision"]), "--out", str(out), "--device", "cpu",
                   "--fill", "flat"])
    assert rc == 0, capsys.readouterr().err
    for p in models["photos"].iterdir():
        cleaned = np.asarray(Image.open(out / p.name))
        mask = np.asarray(Image.open(out / f"{p.stem}_mask.png"))
        assert cleaned.shape == (64, 64, 3) and mask.shape == (64, 64, 3)
        assert set(np.unique(mask)) <= {0, 255}
        assert mask[30, 32, 0] == 255, "the clicked subject pixel is in the subject mask"
    assert (out / "p3s_mask.json").is_file()
    bad = {"photo_0.png": {"positive": []}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    rc = cli.main(["mask", str(models["photos"]), "--points", str(tmp_path / "bad.json"),
                   "--clip-vision", str(models["clip_vision"]), "--out", str(tmp_path / "c2")])
    assert rc == 2 and "input 'points'" in capsys.readouterr().err and not (tmp_path / "c2").exists()


def test_generate_with_a_controlnet_pipeline(models, tmp_path):
    """StableDiffusionControlNetPipeline + P3S: the ControlNet path runs and P3S still changes it."""
    from diffusers import ControlNetModel

    from p3s_core import diffusers_engine as db

    unet = db.load_unet(models["model"])
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).save_pretrained(tmp_path / "cn")
    _save_active_adapter(models, tmp_path / "a.safetensors", seed=2)
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))).save(tmp_path / "edge.png")
    base = ["generate", "--adapter", str(tmp_path / "a.safetensors"), "--reference", str(models["photos"]),
            "--prompt", "a sks dog", "--steps", "2", "--size", "64", "--controlnet", str(tmp_path / "cn"),
            "--control-image", str(tmp_path / "edge.png"), *_models_args(models)]
    assert cli.main(base + ["--out", str(tmp_path / "on")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "off"), "--strength", "0"]) == 0
    on = np.asarray(Image.open(tmp_path / "on" / "0" / "00.png"))
    off = np.asarray(Image.open(tmp_path / "off" / "0" / "00.png"))
    assert on.shape == (64, 64, 3) and not np.array_equal(on, off)
    assert cli.main(base[:-len(_models_args(models)) - 4] + [*_models_args(models), "--out", str(tmp_path / "x"),
                    "--controlnet", str(tmp_path / "cn")]) == 2  # a ControlNet without its image


def test_the_node_path_never_imports_diffusers_or_transformers():
    """ComfyUI users do not pay for diffusers: every p3s_core module the nodes import loads
    without importing diffusers or transformers."""
    import re

    mods = set()
    for f in (REPO / "nodes").glob("*.py"):
        text = f.read_text()
        mods |= set(re.findall(r"p3s_core\.(\w+)", text)) | set(re.findall(r"p3s_core import (\w+)", text))
        for line in re.findall(r"from \.\.p3s_core import \(?([\w, ]+)", text):
            mods |= {m.strip() for m in line.split(",") if m.strip()}
    mods = sorted(m for m in mods if (REPO / "p3s_core" / f"{m}.py").exists()
                  or (REPO / "p3s_core" / m / "__init__.py").exists())
    assert "comfyui_engine" in mods and "adapter" in mods
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module('p3s_core.' + m)\n"
            "bad = [m for m in ('diffusers', 'transformers', 'accelerate') if m in sys.modules]\n"
            "print('BAD', bad)\nraise SystemExit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_generate_uses_the_chosen_reference_and_never_stretches(models, tmp_path):
    """``--reference-index k`` generates exactly what a run with photo k alone as reference does (no
    stretch to the first photo's grid, photo k really used); 'average copy features' differs from both."""
    import shutil

    _save_active_adapter(models, tmp_path / "a.safetensors", seed=3)
    refs = tmp_path / "refs"
    refs.mkdir()
    wide = np.asarray(Image.open(sorted(models["photos"].iterdir())[1]).convert("RGB").resize((96, 64)))
    Image.open(sorted(models["photos"].iterdir())[0]).convert("RGB").save(refs / "0.png")
    Image.fromarray(wide).save(refs / "1.png")  # another aspect ratio than the first
    only = tmp_path / "only1"
    only.mkdir()
    shutil.copy(refs / "1.png", only / "1.png")

    def run(ref_dir, out, *extra):
        assert cli.main(["generate", "--adapter", str(tmp_path / "a.safetensors"), "--reference", str(ref_dir),
                         "--prompt", "a sks dog", "--steps", "2", "--size", "64", "--out", str(tmp_path / out),
                         *extra, *_models_args(models)]) == 0
        return np.asarray(Image.open(tmp_path / out / "0" / "00.png"))

    second = run(refs, "second", "--reference-index", "1")
    assert np.array_equal(second, run(only, "alone"))
    first = run(refs, "first")
    assert not np.array_equal(first, second)
    avg = run(refs, "avg", "--reference-mode", "average copy features")
    assert not np.array_equal(avg, first) and not np.array_equal(avg, second)
    assert cli.main(["generate", "--adapter", str(tmp_path / "a.safetensors"), "--reference", str(refs),
                     "--prompt", "x", "--out", str(tmp_path / "bad"), "--reference-index", "2",
                     *_models_args(models)]) == 2


def test_train_with_one_photo_says_the_enhancement_fell_back_to_its_own_photo(models, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    first = sorted(models["photos"].iterdir())[0]
    (one / first.name).write_bytes(first.read_bytes())
    out = tmp_path / "one.safetensors"
    assert cli.main(["train", str(one), "--out", str(out), "--epochs", "1", "--resolution", "64", "--threads", "1",
                     *_models_args(models)]) == 0
    said = capsys.readouterr().out
    assert "reference pairing self; adapter saved to" in said and "(one photo: " in said
    assert "two or more photos" in said and load_adapter(out).training_info["reference_pairing"] == "self"
