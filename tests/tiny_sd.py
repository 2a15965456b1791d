"""Tiny random-weight models in the SD1.5 / CLIP layouts, saved as local diffusers / transformers
folders, for the command-line tests (built from configs, seconds on a CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def tiny_tokenizer_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {}
    for tok in letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_unet(seed: int = 0, widths=(32, 64, 128, 128), groups: int = 8, context: int = 32, jitter: float = 0.01):
    """A random diffusers UNet with the SD1.5 structure and small ``widths`` (eval, no grad), every
    parameter moved by ``jitter`` noise so that no norm or bias is trivial."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(widths), norm_num_groups=groups, cross_attention_dim=context,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return unet.eval().requires_grad_(False)


def build(root: Path, seed: int = 0) -> dict:
    """``{"model": diffusers SD folder, "clip_vision": transformers folder}`` under ``root``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    root = Path(root)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128, 128), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=77, bos_token_id=52, eos_token_id=53,
                                        pad_token_id=53))
    tiny_tokenizer_files(root / "tok")
    tok = CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"),
                        model_max_length=77)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    clipv = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=224, patch_size=32, projection_dim=8))
    clipv.save_pretrained(root / "clipv")
    return {"model": root / "sd", "clip_vision": root / "clipv"}


def photos(folder: Path, n: int = 3, seed: int = 0, size: int = 64) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = (rng.random((size, size, 3)) * 80).astype(np.uint8)
        img[16:48, 20:44] = (200, 120, 40)  # the "subject"
        p = folder / f"photo_{i}.png"
        Image.fromarray(img).save(p)
        out.append(p)
    return out
