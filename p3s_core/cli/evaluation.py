"""The DreamBench evaluation protocol (paper Sec. IV-A "Evaluation", Table I; DreamBooth's data set).

Metrics, each a cosine similarity of L2-normalised embeddings:

* CLIP-I: generated image vs every real image of its subject, CLIP ViT-B/32 image embeddings
  (``CLIPModel.get_image_features``);
* CLIP-T: generated image vs its prompt, CLIP ViT-B/32 text embedding (``get_text_features``);
* DINO: generated vs real images, DINOv2 (the paper reports DINOv2) CLS embedding after the
  final layer norm (``Dinov2Model(...).pooler_output``).

Averaging (DreamBooth's, used by the paper): a generated image's CLIP-I / DINO score is the mean over
all real images of its subject; scores are averaged over the N images of a prompt, then over the
prompts of a subject, then over subjects (each subject counts once, whatever its image count).

Decisions where the protocol is vague:

* CLIP-T's text is the prompt with the identifier removed ("a sks dog in the snow" -> "a dog in the
  snow"): the identifier is a rare token with no meaning to CLIP (``clip_t_text="prompt"`` keeps it).
* Preprocessing is done here (no processor files are needed): CLIP: resize the short side to the
  model's image size (bicubic), centre crop, OpenAI mean/std; DINOv2: resize the short side to
  256/224 of the image size, centre crop, ImageNet mean/std.

Encoders load from local folders with ``transformers`` (``local_files_only=True``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import P3SError

__all__ = [
    "OBJECT_PROMPTS", "LIVE_PROMPTS", "SUBJECTS", "LIVE_SUBJECTS", "PAPER",
    "EvalInputError", "prompts_for", "Encoders", "load_encoders", "score", "format_table",
    "collect_generated",
]

#: DreamBooth's 25 prompts for objects ({0} = identifier, {1} = class noun).
OBJECT_PROMPTS = [
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest", "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it", "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street", "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug", "a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}",
    "a wet {0} {1}", "a cube shaped {0} {1}",
]
#: DreamBooth's 25 prompts for live subjects (pets).
LIVE_PROMPTS = OBJECT_PROMPTS[:10] + [
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf", "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit", "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit",
] + OBJECT_PROMPTS[20:]
#: The 30 DreamBench subjects and their class nouns.
SUBJECTS = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl", "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat",
    "clock": "clock", "colorful_sneaker": "sneaker", "dog": "dog", "dog2": "dog", "dog3": "dog",
    "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog", "duck_toy": "toy",
    "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon",
    "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
}
LIVE_SUBJECTS = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
#: The paper's P3S figures (Table I).
PAPER = {"CLIP-I": 0.7748, "CLIP-T": 0.2383, "DINO": 0.5491}
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")


class EvalInputError(P3SError):
    """An evaluation folder, encoder or prompt list that cannot be used."""


def prompts_for(subject: str, class_noun: str | None = None, identifier: str = "sks",
                live: bool | None = None) -> list[str]:
    """The 25 DreamBooth prompts of ``subject`` (live-subject list for pets)."""
    noun = class_noun or SUBJECTS.get(subject)
    if noun is None:
        raise EvalInputError("subject", f"{subject!r} is not a DreamBench subject and has no class",
                             "pass its class noun (e.g. --class-noun dog)")
    live = subject in LIVE_SUBJECTS if live is None else live
    return [p.format(identifier, noun) for p in (LIVE_PROMPTS if live else OBJECT_PROMPTS)]


def strip_identifier(prompt: str, identifier: str) -> str:
    return re.sub(r"\s+", " ", re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", "", prompt)).strip()


# --- encoders ---------------------------------------------------------------------------------------
def _resize_crop(img: np.ndarray, resize: int, crop: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    w, h = im.size
    s = resize / min(w, h)
    im = im.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0


def _normalise(batch: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@dataclass
class Encoders:
    """CLIP (image + text) and DINOv2 embedders; every ``embed_*`` returns L2-normalised rows."""

    clip: torch.nn.Module
    tokenizer: object
    dino: torch.nn.Module
    device: str = "cpu"

    @torch.no_grad()
    def embed_clip_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        size = int(self.clip.config.vision_config.image_size)
        x = _normalise([_resize_crop(i, size, size) for i in images],
                       (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
        e = self.clip.get_image_features(pixel_values=x.to(self.device))
        e = getattr(e, "pooler_output", e)
        return torch.nn.functional.normalize(e.float().cpu(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=int(self.clip.config.text_config.max_position_embeddings),
                             return_tensors="pt")
        e = self.clip.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                        attention_mask=tok["attention_mask"].to(self.device))
        e = getattr(e, "pooler_output", e)
        return torch.nn.functional.normalize(e.float().cpu(), dim=-1)

    @torch.no_grad()
    def embed_dino(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        size = int(self.dino.config.image_size)
        x = _normalise([_resize_crop(i, round(size * 256 / 224), size) for i in images],
                       (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        e = self.dino(pixel_values=x.to(self.device)).pooler_output
        return torch.nn.functional.normalize(e.float().cpu(), dim=-1)


def load_encoders(clip_dir, dino_dir, device: str = "cpu") -> Encoders:
    """CLIP ViT-B/32 (``CLIPModel`` + ``CLIPTokenizer``) and DINOv2 (``Dinov2Model``) from local
    folders (transformers ``save_pretrained`` layout)."""
    from transformers import CLIPModel, CLIPTokenizer, Dinov2Model

    for name, d in (("clip", clip_dir), ("dino", dino_dir)):
        if not Path(d).is_dir() or not (Path(d) / "config.json").is_file():
            raise EvalInputError(name, f"{d} is not a local transformers model folder (no config.json)",
                                 f"download the model once and pass its folder with --{name}")
    clip = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval().to(device)
    tok = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    dino = Dinov2Model.from_pretrained(str(dino_dir), local_files_only=True).eval().to(device)
    return Encoders(clip, tok, dino, device)


# --- data -------------------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT)


def collect_generated(gen_dir: Path, real_dir: Path) -> dict:
    """``{subject: {"real": [paths], "prompts": {prompt: [paths]}}}`` from the layout that
    ``p3s generate --dreambench`` writes: ``GEN/<subject>/<prompt index>/*.png`` with
    ``GEN/<subject>/prompts.json`` (the list of prompts); real images in ``REAL/<subject>/``."""
    gen_dir, real_dir = Path(gen_dir), Path(real_dir)
    if not gen_dir.is_dir():
        raise EvalInputError("generated", f"{gen_dir} is not a folder", "pass the folder p3s generate wrote")
    out = {}
    for sub in sorted(p for p in gen_dir.iterdir() if p.is_dir()):
        pj = sub / "prompts.json"
        if not pj.is_file():
            continue
        prompts = json.loads(pj.read_text())
        real = _images(real_dir / sub.name) if (real_dir / sub.name).is_dir() else []
        if not real:
            raise EvalInputError("real", f"no real images for subject {sub.name!r} in {real_dir / sub.name}",
                                 "pass the DreamBench dataset folder (one sub-folder per subject)")
        per = {}
        for i, prompt in enumerate(prompts):
            imgs = _images(sub / str(i)) if (sub / str(i)).is_dir() else []
            if not imgs:
                raise EvalInputError("generated", f"no images for prompt {i} ({prompt!r}) of {sub.name}",
                                     "re-run p3s generate for this subject")
            per[prompt] = imgs
        out[sub.name] = {"real": real, "prompts": per}
    if not out:
        raise EvalInputError("generated", f"{gen_dir} has no <subject>/prompts.json",
                             "pass the folder p3s generate --dreambench wrote")
    return out


# --- scoring ----------------------------------------------------------------------------------------
def score(data: Mapping, enc: Encoders, identifier: str = "sks", clip_t_text: str = "class",
          progress: Callable[[Iterable], Iterable] | None = None) -> dict:
    """The three metrics with the paper's averaging (module docstring); also per subject."""
    wrap = progress or (lambda x: x)
    per_subject = {}
    for subject in wrap(list(data)):
        entry = data[subject]
        real = [read_image(p) for p in entry["real"]]
        r_clip, r_dino = enc.embed_clip_images(real), enc.embed_dino(real)
        prompt_scores = {"CLIP-I": [], "CLIP-T": [], "DINO": []}
        for prompt, paths in entry["prompts"].items():
            imgs = [read_image(p) for p in paths]
            g_clip, g_dino = enc.embed_clip_images(imgs), enc.embed_dino(imgs)
            text = prompt if clip_t_text == "prompt" else strip_identifier(prompt, identifier)
            t = enc.embed_texts([text])
            prompt_scores["CLIP-I"].append(float((g_clip @ r_clip.T).mean(dim=1).mean()))
            prompt_scores["DINO"].append(float((g_dino @ r_dino.T).mean(dim=1).mean()))
            prompt_scores["CLIP-T"].append(float((g_clip @ t.T).mean()))
        per_subject[subject] = {k: float(np.mean(v)) for k, v in prompt_scores.items()}
    overall = {k: float(np.mean([s[k] for s in per_subject.values()])) for k in PAPER}
    return {"overall": overall, "subjects": per_subject}


def format_table(result: Mapping, method: str = "P3S (this run)") -> str:
    """Markdown table in the paper's format (Table I columns), the paper's P3S row beside it."""
    o = result["overall"]
    lines = ["| method | CLIP-I ↑ | CLIP-T ↑ | DINOv2 ↑ |", "|---|---|---|---|",
             f"| {method} | {o['CLIP-I']:.4f} | {o['CLIP-T']:.4f} | {o['DINO']:.4f} |",
             f"| P3S (paper, Table I) | {PAPER['CLIP-I']:.4f} | {PAPER['CLIP-T']:.4f} | {PAPER['DINO']:.4f} |"]
    n = len(result.get("subjects", {}))
    lines.append(f"\n{n} subject(s); CLIP ViT-B/32 for CLIP-I/T, DINOv2 for DINO.")
    return "\n".join(lines)


def finite(result: Mapping) -> bool:
    return all(math.isfinite(v) for v in result["overall"].values())
