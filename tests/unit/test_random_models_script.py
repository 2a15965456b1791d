"""Fast checks of scripts/make_random_models.py (no full-size model is generated here).

The full-size files are loaded through ComfyUI's real loaders by the slow/comfy tests; these tests
check the pieces: the streamed safetensors writer, the per-tensor values, the init classification,
the CLIP layouts, the manifest and the CLI, each against an independent reference.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_random_models.py"


def _load_script():
    name = "p3s_make_random_models_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


mrm = _load_script()
TS = mrm.TensorSpec


def _tiny_specs():
    return [
        TS("b.weight", (7, 5), np.dtype(np.float16), "uniform", 0.02),
        TS("a.norm.weight", (5,), np.dtype(np.float16), "ones"),
        TS("a.norm.bias", (5,), np.dtype(np.float16), "zeros"),
        TS("c.position_ids", (1, 9), np.dtype(np.int64), "arange"),
        TS("d.zero_conv.weight", (3, 2, 1, 1), np.dtype(np.float16), "uniform", 0.005),
    ]


def _parse_header(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("ascii"))
    return raw, n, header


def test_import_is_light():
    # importing the script (as the tests and setup tools do) must not load torch, transformers or ComfyUI
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(_SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m; spec.loader.exec_module(m)\n"
        "print(sorted(n for n in ('torch', 'transformers', 'comfy', 'diffusers') if n in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert callable(mrm.main)


def test_tensor_seed_depends_on_every_part():
    base = mrm.tensor_seed(0, "sd15", "k")
    assert base == mrm.tensor_seed(0, "sd15", "k")
    assert len({base, mrm.tensor_seed(1, "sd15", "k"), mrm.tensor_seed(0, "controlnet", "k"),
                mrm.tensor_seed(0, "sd15", "k2")}) == 4
    ref = hashlib.sha256(f"p3s-random-models/v{mrm.GENERATOR_VERSION}/0/sd15/k".encode()).digest()
    assert base == int.from_bytes(ref[:16], "little")


def test_make_values_uniform_matches_reference_and_stats():
    spec = TS("w", (200, 300), np.dtype(np.float16), "uniform", 0.02)
    v = mrm.make_values(spec, 3, "m")
    assert v.dtype == np.float16 and v.shape == (200, 300)
    # independent reference: same PCG64 stream, explicit affine map, fp16 rounding
    rng = np.random.Generator(np.random.PCG64(mrm.tensor_seed(3, "m", "w")))
    a = 0.02 * math.sqrt(3.0)
    u = rng.random(60000, dtype=np.float32).astype(np.float64)
    ref = (u * 2 * a - a).astype(np.float16).reshape(200, 300)
    # within one fp16 rounding step (the script computes in float32, the reference in float64)
    np.testing.assert_allclose(v.astype(np.float32), ref.astype(np.float32), rtol=1e-3, atol=1e-7)
    f = v.astype(np.float64)
    assert abs(f.mean()) < 1e-3
    assert abs(f.std() - 0.02) < 1e-3
    assert np.abs(f).max() <= a * 1.001
    # same seed -> same bytes; another seed -> different values
    assert mrm.make_values(spec, 3, "m").tobytes() == v.tobytes()
    assert mrm.make_values(spec, 4, "m").tobytes() != v.tobytes()


def test_make_values_constant_inits():
    ones = mrm.make_values(TS("n", (4,), np.dtype(np.float16), "ones"), 0, "m")
    zeros = mrm.make_values(TS("b", (2, 3), np.dtype(np.float16), "zeros"), 0, "m")
    ids = mrm.make_values(TS("p", (1, 77), np.dtype(np.int64), "arange"), 0, "m")
    assert ones.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert zeros.tolist() == [[0.0] * 3] * 2
    assert ids.dtype == np.int64 and ids.tolist() == [list(range(77))]
    with pytest.raises(mrm.RandomModelsError):
        mrm.make_values(TS("x", (2,), np.dtype(np.float16), "bogus"), 0, "m")


def test_specs_from_module_classifies_norms_and_biases():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.gn = torch.nn.GroupNorm(2, 4)
            self.seq = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
            self.emb = torch.nn.Parameter(torch.zeros(6))

    with torch.device("meta"):
        m = Tiny()
    specs = mrm.specs_from_module(m, "p.", std_for=lambda k: 0.5 if k == "emb" else 0.02)
    got = {s.key: (s.shape, s.init, s.std, s.dtype) for s in specs}
    f16 = np.dtype(np.float16)
    assert got == {
        "p.emb": ((6,), "uniform", 0.5, f16),
        "p.conv.weight": ((4, 3, 3, 3), "uniform", 0.02, f16),
        "p.conv.bias": ((4,), "zeros", 0.0, f16),
        "p.gn.weight": ((4,), "ones", 0.0, f16),
        "p.gn.bias": ((4,), "zeros", 0.0, f16),
        "p.seq.0.weight": ((4,), "ones", 0.0, f16),
        "p.seq.0.bias": ((4,), "zeros", 0.0, f16),
        "p.seq.1.weight": ((2, 4), "uniform", 0.02, f16),
    }


def test_controlnet_zero_modules_get_small_std():
    assert mrm._controlnet_std("zero_convs.3.0.weight") == mrm.ZERO_MODULE_STD
    assert mrm._controlnet_std("middle_block_out.0.weight") == mrm.ZERO_MODULE_STD
    assert mrm._controlnet_std("input_hint_block.14.weight") == mrm.ZERO_MODULE_STD
    assert mrm._controlnet_std("input_hint_block.12.weight") == mrm.DEFAULT_STD
    assert mrm._controlnet_std("input_blocks.1.0.in_layers.2.weight") == mrm.DEFAULT_STD
    assert 0 < mrm.ZERO_MODULE_STD < mrm.DEFAULT_STD


def test_writer_roundtrip_header_and_sha(tmp_path):
    specs = _tiny_specs()
    path = tmp_path / "sub" / "x.safetensors"
    info = mrm.write_safetensors(path, specs, lambda s: mrm.make_values(s, 0, "t"),
                                 metadata={"p3s_seed": "0", "format": "pt"})
    raw, n, header = _parse_header(path)
    assert (8 + n) % 8 == 0
    assert header["__metadata__"] == {"format": "pt", "p3s_seed": "0"}
    # contiguous data, int64 first, then by key
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    assert [k for k, _ in entries] == ["c.position_ids", "a.norm.bias", "a.norm.weight", "b.weight",
                                       "d.zero_conv.weight"]
    end = 0
    for _, v in entries:
        assert v["data_offsets"][0] == end
        end = v["data_offsets"][1]
    assert len(raw) == 8 + n + end
    assert info == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "tensors": 5,
                    "parameters": 35 + 5 + 5 + 9 + 6}
    # the real safetensors reader agrees, values equal make_values
    loaded = load_file(str(path))
    for s in specs:
        np.testing.assert_array_equal(loaded[s.key], mrm.make_values(s, 0, "t"))
        assert loaded[s.key].dtype == s.dtype
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "p3s_seed": "0"}
        assert f.get_tensor("c.position_ids").dtype == torch.int64
    assert list(path.parent.iterdir()) == [path]  # no temp file left


def test_writer_is_byte_identical_across_workers_and_order(tmp_path):
    specs = _tiny_specs()
    a = mrm.write_safetensors(tmp_path / "a.safetensors", specs, lambda s: mrm.make_values(s, 1, "t"), workers=2)
    b = mrm.write_safetensors(tmp_path / "b.safetensors", specs[::-1], lambda s: mrm.make_values(s, 1, "t"),
                              workers=1)
    assert a == b
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_writer_is_atomic_on_failure(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"old")

    def boom(s):
        if s.key == "b.weight":
            raise RuntimeError("interrupted")
        return mrm.make_values(s, 0, "t")

    with pytest.raises(RuntimeError):
        mrm.write_safetensors(path, _tiny_specs(), boom)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_stale_temp_of_dead_process_is_removed(tmp_path):
    path = tmp_path / "x.safetensors"
    stale = tmp_path / ".x.safetensors.tmp-999999999"  # above any Linux pid_max
    stale.write_bytes(b"half")
    mrm.write_safetensors(path, _tiny_specs()[:1], lambda s: mrm.make_values(s, 0, "t"))
    if os.name != "nt":
        assert not stale.exists()
    assert path.exists()


def test_writer_rejects_duplicates_and_bad_shapes(tmp_path):
    s = _tiny_specs()[0]
    with pytest.raises(mrm.RandomModelsError):
        mrm.safetensors_header([s, s])
    with pytest.raises(mrm.RandomModelsError):
        mrm.write_safetensors(tmp_path / "y.safetensors", [s], lambda _: np.zeros((1,), np.float16))
    assert not any(tmp_path.iterdir())


def test_clip_layouts_match_independent_counts():
    text = mrm.clip_text_specs()
    assert len(text) == 197
    assert all(s.key.startswith("cond_stage_model.transformer.text_model.") for s in text)
    pos = [s for s in text if s.key.endswith("embeddings.position_ids")]
    assert len(pos) == 1 and pos[0].shape == (1, 77) and pos[0].dtype == np.int64
    d, f, L, V, P = 768, 3072, 12, 49408, 77
    per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
    assert sum(s.numel for s in text if s.dtype != np.int64) == V * d + P * d + L * per_layer + 2 * d
    keys = {s.key: s for s in text}
    assert keys["cond_stage_model.transformer.text_model.final_layer_norm.weight"].init == "ones"
    assert keys["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias"].init == "zeros"
    assert keys["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (V, d)

    vis = mrm.clip_vision_specs()
    assert len(vis) == 392
    # what ComfyUI's clip_vision.load_clipvision_from_sd keys on for ViT-L/14 at 224 px
    vk = {s.key: s for s in vis}
    assert "vision_model.encoder.layers.22.layer_norm1.weight" in vk
    assert "vision_model.encoder.layers.30.layer_norm1.weight" not in vk
    assert vk["vision_model.embeddings.position_embedding.weight"].shape == (257, 1024)
    assert vk["vision_model.encoder.layers.0.layer_norm1.weight"].shape == (1024,)
    assert vk["visual_projection.weight"].shape == (768, 1024)
    d, f, L = 1024, 4096, 24
    per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
    expect = d + d * 3 * 14 * 14 + 257 * d + 2 * d + L * per_layer + 2 * d + 768 * d
    assert sum(s.numel for s in vis) == expect


def test_prefix_counts_and_parse_only():
    c = mrm.prefix_counts(["a.x", "a.y", "b.z", "q"], ("a.", "b."))
    assert c == {"a.": 2, "b.": 1, "other": 1}
    assert mrm.parse_only(None) == ["sd15", "clip_vision", "controlnet"]
    assert mrm.parse_only("controlnet, sd15") == ["sd15", "controlnet"]
    with pytest.raises(mrm.RandomModelsError) as e:
        mrm.parse_only("sd15,sdxl")
    assert "--only" in str(e.value) and "sdxl" in str(e.value)


def test_main_end_to_end_with_tiny_layouts(tmp_path, monkeypatch, capsys):
    """The CLI flow (files, manifest, --only merge, determinism) with tiny stand-in layouts."""
    tiny = {
        "sd15": [TS("model.diffusion_model.w", (4, 4), np.dtype(np.float16), "uniform", 0.02),
                 TS("first_stage_model.n.weight", (4,), np.dtype(np.float16), "ones"),
                 TS("cond_stage_model.transformer.text_model.embeddings.position_ids", (1, 77),
                    np.dtype(np.int64), "arange")],
        "clip_vision": [TS("vision_model.x", (3,), np.dtype(np.float16), "uniform", 0.02)],
        "controlnet": [TS("control_model.zero_convs.0.0.weight", (2, 2, 1, 1), np.dtype(np.float16), "uniform",
                          0.005)],
    }
    monkeypatch.setattr(mrm, "specs_for", lambda name, comfy_dir: tiny[name])
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    assert mrm.main(["--seed", "5", "--out", str(out1)]) == 0
    assert mrm.main(["--seed", "5", "--out", str(out2), "--workers", "1"]) == 0
    man = json.loads((out1 / "manifest.json").read_text())
    assert man["seed"] == 5 and man["generator_version"] == mrm.GENERATOR_VERSION
    assert sorted(man["files"]) == ["clip_vision", "controlnet", "sd15"]
    for name, rel in mrm.MODEL_FILES.items():
        data = (out1 / rel).read_bytes()
        assert data == (out2 / rel).read_bytes()
        assert man["files"][name]["path"] == rel
        assert man["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert man["files"][name]["bytes"] == len(data)
    assert man["files"]["sd15"]["prefix_counts"] == {"model.diffusion_model.": 1, "first_stage_model.": 1,
                                                     "cond_stage_model.transformer.": 1}
    assert (out1 / "manifest.json").read_bytes() == (out2 / "manifest.json").read_bytes()
    # --only regenerates one file and keeps the other manifest entries
    before = (out1 / mrm.MODEL_FILES["sd15"]).stat().st_mtime_ns
    assert mrm.main(["--seed", "5", "--out", str(out1), "--only", "controlnet"]) == 0
    assert json.loads((out1 / "manifest.json").read_text()) == man
    assert (out1 / mrm.MODEL_FILES["sd15"]).stat().st_mtime_ns == before
    # another seed: other bytes
    out3 = tmp_path / "o3"
    assert mrm.main(["--seed", "6", "--out", str(out3), "--only", "sd15"]) == 0
    assert (out3 / mrm.MODEL_FILES["sd15"]).read_bytes() != (out1 / mrm.MODEL_FILES["sd15"]).read_bytes()
    assert sorted(json.loads((out3 / "manifest.json").read_text())["files"]) == ["sd15"]
    # bad input: exit status 2 and a typed message
    capsys.readouterr()
    assert mrm.main(["--out", str(out3), "--only", "nope"]) == 2
    assert "P3S: input '--only'" in capsys.readouterr().err


def test_import_comfy_rejects_a_wrong_folder(tmp_path):
    with pytest.raises(mrm.RandomModelsError) as e:
        mrm.import_comfy(tmp_path)
    assert "--comfyui" in str(e.value)
