"""The DreamBench protocol on tiny random-weight encoders and a tiny data set built here; each metric
is checked against a value computed by hand (explicit loops, own preprocessing)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p3s_core.cli import evaluation as dbm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tiny_sd  # noqa: E402

CLIP_SIZE, DINO_SIZE = 32, 28  # 32x32 images: CLIP needs no resize; DINOv2 resizes to 32 and crops 28


@pytest.fixture(scope="module")
def encoders_dirs(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=52,
                         eos_token_id=53, pad_token_id=53),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=CLIP_SIZE, patch_size=8),
        projection_dim=8))
    clip.save_pretrained(root / "clip")
    tiny_sd.tiny_tokenizer_files(root / "clip")
    CLIPTokenizer(str(root / "clip" / "vocab.json"), str(root / "clip" / "merges.txt")).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             image_size=DINO_SIZE, patch_size=14)).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def _img(rng):
    return (rng.random((CLIP_SIZE, CLIP_SIZE, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two subjects: 'dog' (3 real, 2 prompts x 2 images), 'can' (1 real, 2 prompts x 2 images;
    prompt 0 holds the real image itself)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("db")
    layout = {"dog": 3, "can": 1}
    for subject, n_real in layout.items():
        (root / "real" / subject).mkdir(parents=True)
        reals = [_img(rng) for _ in range(n_real)]
        for i, r in enumerate(reals):
            Image.fromarray(r).save(root / "real" / subject / f"{i:02d}.png")
        prompts = dbm.prompts_for(subject)[:2]
        gdir = root / "gen" / subject
        gdir.mkdir(parents=True)
        (gdir / "prompts.json").write_text(json.dumps(prompts))
        for p in range(2):
            (gdir / str(p)).mkdir()
            for k in range(2):
                img = reals[0] if (subject == "can" and p == 0) else _img(rng)
                Image.fromarray(img).save(gdir / str(p) / f"{k}.png")
    return root


def _load(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def _hand_embeddings(clip, tok, dino, path):
    """Embeddings computed without dreambench's code: 32x32 images need no CLIP resize; DINO's
    resize to round(28*256/224) = 32 is the identity, then the centre 28x28 crop."""
    x = torch.from_numpy(_load(path)).permute(2, 0, 1)[None]
    cm = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    cs = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    dm = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    ds = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        c = clip.get_image_features(pixel_values=(x - cm) / cs)
        c = getattr(c, "pooler_output", c)[0]
        d = dino(pixel_values=((x - dm) / ds)[:, :, 2:30, 2:30]).pooler_output[0]
    return c / c.norm(), d / d.norm()


def _text(clip, tok, text):
    ids = tok([text], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        t = clip.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    t = getattr(t, "pooler_output", t)[0]
    return t / t.norm()


def test_prompt_lists_and_templates():
    assert len(dbm.SUBJECTS) == 30 and len(dbm.LIVE_SUBJECTS) == 9
    assert len(dbm.OBJECT_PROMPTS) == len(dbm.LIVE_PROMPTS) == 25
    dog, can = dbm.prompts_for("dog"), dbm.prompts_for("can")
    assert "a sks dog wearing a santa hat" in dog and "a sks can wearing a santa hat" not in can
    assert "a sks can floating in an ocean of milk" in can
    assert dbm.prompts_for("bear_plushie")[0] == "a sks stuffed animal in the jungle"
    assert dbm.strip_identifier("a sks dog in the snow", "sks") == "a dog in the snow"
    with pytest.raises(dbm.EvalInputError, match="class noun"):
        dbm.prompts_for("my_mug")


def test_metrics_match_hand_computed_values(encoders_dirs, dataset):
    from transformers import CLIPModel, CLIPTokenizer, Dinov2Model

    enc = dbm.load_encoders(*encoders_dirs)
    data = dbm.collect_generated(dataset / "gen", dataset / "real")
    result = dbm.score(data, enc)
    clip = CLIPModel.from_pretrained(str(encoders_dirs[0]), local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(str(encoders_dirs[0]), local_files_only=True)
    dino = Dinov2Model.from_pretrained(str(encoders_dirs[1]), local_files_only=True).eval()
    subj_vals = {}
    for subject in ("can", "dog"):
        reals = sorted((dataset / "real" / subject).iterdir())
        r = [_hand_embeddings(clip, tok, dino, p) for p in reals]
        prompts = json.loads((dataset / "gen" / subject / "prompts.json").read_text())
        per_prompt = {"CLIP-I": [], "CLIP-T": [], "DINO": []}
        for i, prompt in enumerate(prompts):
            t = _text(clip, tok, prompt.replace("sks ", ""))
            ci, di, ct = [], [], []
            for gp in sorted((dataset / "gen" / subject / str(i)).iterdir()):
                gc, gd = _hand_embeddings(clip, tok, dino, gp)
                ci.append(sum(float(gc @ rc) for rc, _ in r) / len(r))
                di.append(sum(float(gd @ rd) for _, rd in r) / len(r))
                ct.append(float(gc @ t))
            for k, v in (("CLIP-I", ci), ("DINO", di), ("CLIP-T", ct)):
                per_prompt[k].append(sum(v) / len(v))
        subj_vals[subject] = {k: sum(v) / len(v) for k, v in per_prompt.items()}
        for k in per_prompt:
            assert result["subjects"][subject][k] == pytest.approx(subj_vals[subject][k], abs=1e-5), (subject, k)
    for k in ("CLIP-I", "CLIP-T", "DINO"):
        hand = (subj_vals["can"][k] + subj_vals["dog"][k]) / 2
        assert result["overall"][k] == pytest.approx(hand, abs=1e-5), k
    # the 'can' prompt 0 images ARE the real image: its CLIP-I / DINO are exactly 1 there
    can0 = [_hand_embeddings(clip, tok, dino, p) for p in sorted((dataset / "gen" / "can" / "0").iterdir())]
    real0 = _hand_embeddings(clip, tok, dino, next((dataset / "real" / "can").iterdir()))
    assert all(float(c @ real0[0]) == pytest.approx(1.0, abs=1e-5) for c, _ in can0)
    table = dbm.format_table(result)
    assert "0.7748" in table and "0.2383" in table and "0.5491" in table
    assert f"{result['overall']['CLIP-I']:.4f}" in table


def test_missing_real_images_is_a_typed_error(dataset, tmp_path):
    with pytest.raises(dbm.EvalInputError, match="no real images"):
        dbm.collect_generated(dataset / "gen", tmp_path)
    with pytest.raises(dbm.EvalInputError, match="config.json"):
        dbm.load_encoders(tmp_path, tmp_path)


def test_cli_eval_writes_table_and_config(encoders_dirs, dataset, tmp_path, capsys):
    from p3s_core import cli

    out = tmp_path / "eval"
    rc = cli.main(["eval", str(dataset / "gen"), "--real", str(dataset / "real"),
                   "--clip", str(encoders_dirs[0]), "--dino", str(encoders_dirs[1]), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "dreambench.json").read_text())
    assert set(res["overall"]) == {"CLIP-I", "CLIP-T", "DINO"}
    assert all(math.isfinite(v) for v in res["overall"].values())
    assert "0.7748" in (out / "dreambench.md").read_text()
    cfg = json.loads((out / "p3s_eval.json").read_text())
    assert cfg["command"] == "eval" and cfg["args"]["real"] == str(dataset / "real")
    assert "CLIP-I" in capsys.readouterr().out
