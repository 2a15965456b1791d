"""The world: 32 px images of one or two objects (shape x colour x texture) on textured backgrounds,
captions that name them, a fixed 2x latent map in the VAE's place, and a word-level CLIP tokenizer.

Everything here is deterministic given a ``numpy.random.Generator``; nothing is trained.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMG = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.92, 0.16, 0.14), "green": (0.12, 0.85, 0.22), "blue": (0.18, 0.32, 0.98),
           "yellow": (0.96, 0.90, 0.12), "purple": (0.68, 0.20, 0.88), "white": (0.97, 0.97, 0.97)}
COLOUR_NAMES = tuple(COLOURS)
TEXTURES = ("plain", "striped", "checkered")
BACKGROUNDS = {"sand": (0.78, 0.66, 0.46), "grass": (0.30, 0.48, 0.26), "sky": (0.56, 0.74, 0.93),
               "night": (0.10, 0.10, 0.22)}
BG_NAMES = tuple(BACKGROUNDS)
IDENTIFIER = "sks"
#: Subjects the base model never sees (their exact shape-colour-texture combination is held out of
#: its training data); each evaluation seed uses one. The look-alike distractor has the subject's
#: shape and colour and another texture: what text cannot tell apart and points can.
SUBJECTS = (("circle", "purple", "checkered", "striped"),
            ("square", "yellow", "striped", "checkered"),
            ("triangle", "red", "checkered", "plain"))
HELD_OUT = {(s, c, t) for s, c, t, _ in SUBJECTS}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    texture: str
    x: int  # top-left, even pixels
    y: int
    size: int  # even

    def words(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


def shape_mask(shape: str, size: int) -> np.ndarray:
    """The shape drawn on the 2 px grid (computed at half resolution, each cell repeated 2 x 2)."""
    return _shape_half(shape, size // 2).repeat(2, 0).repeat(2, 1)


def _shape_half(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c = size / 2.0
    if shape == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= (size / 2.0) ** 2
    if shape == "square":
        m = np.zeros((size, size), bool)
        m[:, :] = True
        return m
    if shape == "triangle":
        half = (yy / size) * (size / 2.0)
        return np.abs(xx - c) <= half
    if shape == "cross":
        t = size / 5.0
        return (np.abs(xx - c) <= t) | (np.abs(yy - c) <= t)
    raise ValueError(shape)


def texture_pattern(texture: str, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """1 where the object shows its colour, 0 where it shows the dark shade; aligned to the 2 px grid
    of the latent map (absolute image coordinates)."""
    if texture == "plain":
        return np.ones(ys.shape)
    if texture == "striped":
        return ((ys // 2) % 2 == 0).astype(np.float64)
    if texture == "checkered":
        return (((ys // 2) + (xs // 2)) % 2 == 0).astype(np.float64)
    raise ValueError(texture)


def background(kind: str, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(BACKGROUNDS[kind])
    noise = rng.normal(0, 0.035, (IMG // 2, IMG // 2, 1)).repeat(2, 0).repeat(2, 1)
    return np.clip(base[None, None] + noise, 0, 1)


def render(objs, bg: str, rng: np.random.Generator, return_masks: bool = False):
    """float32 [32, 32, 3] in [0, 1] (and one bool mask per object)."""
    img = background(bg, rng)
    masks = []
    for o in objs:
        m = np.zeros((IMG, IMG), bool)
        m[o.y:o.y + o.size, o.x:o.x + o.size] = shape_mask(o.shape, o.size)
        ys, xs = np.nonzero(m)
        pat = texture_pattern(o.texture, ys, xs)
        col = np.asarray(COLOURS[o.colour])
        img[ys, xs] = col[None] * (0.35 + 0.65 * pat[:, None])
        masks.append(m)
    img = img.astype(np.float32)
    return (img, masks) if return_masks else img


def caption(objs, bg: str) -> str:
    return " and ".join(f"a {o.words()}" for o in objs) + f" on {bg}"


def place(rng: np.random.Generator, n: int, sizes=(10, 12, 14)) -> list[tuple[int, int, int]]:
    """n non-overlapping boxes (x, y, size) on even pixels with a 2 px gap."""
    for _ in range(200):
        boxes = []
        for _i in range(n):
            s = int(rng.choice(sizes))
            x = 2 * int(rng.integers(0, (IMG - s) // 2 + 1))
            y = 2 * int(rng.integers(0, (IMG - s) // 2 + 1))
            boxes.append((x, y, s))
        ok = all(a[0] + a[2] + 2 <= b[0] or b[0] + b[2] + 2 <= a[0] or a[1] + a[2] + 2 <= b[1]
                 or b[1] + b[2] + 2 <= a[1] for i, a in enumerate(boxes) for b in boxes[i + 1:])
        if ok:
            return boxes
    raise RuntimeError("could not place the objects")


def random_kind(rng, allow_held_out: bool):
    while True:
        k = (SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
             TEXTURES[rng.integers(len(TEXTURES))])
        if allow_held_out or k not in HELD_OUT:
            return k


def random_scene(rng, allow_held_out: bool = False, p_two: float = 0.4):
    n = 2 if rng.random() < p_two else 1
    objs = [Obj(*random_kind(rng, allow_held_out), x, y, s) for x, y, s in place(rng, n)]
    bg = BG_NAMES[rng.integers(len(BG_NAMES))]
    return objs, bg


def labels(objs, bg: str) -> dict:
    """Multi-hot presence of each shape / colour / texture, the background index."""
    out = {"shape": np.zeros(len(SHAPES), np.float32), "colour": np.zeros(len(COLOUR_NAMES), np.float32),
           "texture": np.zeros(len(TEXTURES), np.float32), "bg": BG_NAMES.index(bg)}
    for o in objs:
        out["shape"][SHAPES.index(o.shape)] = 1
        out["colour"][COLOUR_NAMES.index(o.colour)] = 1
        out["texture"][TEXTURES.index(o.texture)] = 1
    return out


def patch_labels(objs, masks, bg: str, grid: int = 8) -> np.ndarray:
    """Per vision patch (grid x grid over the 32 px image): [is_object, shape, colour, texture, bg]
    by majority; -1 where a field does not apply (background patches have no shape)."""
    p = IMG // grid
    lab = np.full((grid, grid, 5), -1, np.int64)
    lab[..., 4] = BG_NAMES.index(bg)
    lab[..., 0] = 0
    for o, m in zip(objs, masks):
        cover = m.reshape(grid, p, grid, p).mean(axis=(1, 3))
        on = cover >= 0.5
        lab[on, 0] = 1
        lab[on, 1] = SHAPES.index(o.shape)
        lab[on, 2] = COLOUR_NAMES.index(o.colour)
        lab[on, 3] = TEXTURES.index(o.texture)
    return lab


# --- the fixed latent map (in the VAE's place) ----------------------------------------------------
def make_latent_map_class():
    """A diffusers model with the AutoencoderKL calls the pipeline and the engine use
    (``encode(x).latent_dist.mean``, ``decode(z, return_dict=False)[0]``, ``config.scaling_factor``,
    ``config.block_out_channels`` for the 2x factor): per 2 x 2 pixel block, the mean R, G, B and
    the mean luminance (a redundant fourth channel: SD1.5's UNet takes 4). Exact for the world's
    images, whose edges and textures lie on the 2 px grid: decoding repeats each block's colour."""
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin

    class _Dist:
        def __init__(self, mean):
            self.mean = mean

        def sample(self, generator=None):
            return self.mean

        def mode(self):
            return self.mean

    class _Enc:
        def __init__(self, mean):
            self.latent_dist = _Dist(mean)

    class FixedLatentMap(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, block_out_channels=(4, 4), latent_channels: int = 4, scaling_factor: float = 1.0,
                     force_upcast: bool = False, shift_factor=None):
            super().__init__()
            # a (frozen) parameter, not a buffer: the engine reads the device from ``vae.parameters()``
            self.lum = torch.nn.Parameter(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1),
                                          requires_grad=False)

        def encode(self, x, return_dict: bool = True):
            mean = torch.nn.functional.avg_pool2d(x, 2)
            z = torch.cat([mean, (mean * self.lum.to(mean.dtype)).sum(1, keepdim=True)], dim=1)
            return _Enc(z) if return_dict else (_Dist(z),)

        def decode(self, z, return_dict: bool = True, generator=None):
            out = z[:, :3].repeat_interleave(2, 2).repeat_interleave(2, 3)
            if return_dict:
                from diffusers.models.autoencoders.vae import DecoderOutput
                return DecoderOutput(sample=out)
            return (out,)

    return FixedLatentMap


# --- tokenizer ---------------------------------------------------------------------------------
WORDS = (("a", "and", "on", "of", "photo", IDENTIFIER) + SHAPES + COLOUR_NAMES + TEXTURES + BG_NAMES)
MAX_TOKENS = 16


def tokenizer_files(folder: Path) -> None:
    """A CLIP BPE vocabulary where every world word is one token (merges build each word left to right)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(tok):
        if tok not in vocab:
            vocab[tok] = len(vocab)

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    for ch in letters:
        add(ch)
    for ch in letters:
        add(ch + "</w>")
    merges = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            add(cur)
    add("<|startoftext|>")
    add("<|endoftext|>")
    for _round in range(10):  # BPE ranks can split a word on another word's merge: join the pieces
        merges = list(dict.fromkeys(merges))
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = load_tokenizer(folder)
        split = {w: tok.tokenize(w) for w in WORDS}
        split = {w: p for w, p in split.items() if len(p) > 1}
        if not split:
            return
        for w, pieces in split.items():
            cur = pieces[0]
            for nxt in pieces[1:]:
                merges.append(f"{cur} {nxt}")
                cur = cur + nxt
                add(cur)
    raise RuntimeError(f"words still split: {split}")


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
