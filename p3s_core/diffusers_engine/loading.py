"""The diffusers engine: loading SD1.5 UNets and pipelines from local files (never a hub), LDM <->
diffusers key names, and new adapters initialised from a diffusers UNet."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ModelMismatchError, P3SError
from .layers import check_unet_sd15

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sd15"


class ModelLoadError(P3SError):
    """A model path that cannot be loaded (missing, a pickle, not SD1.5, no tokenizer)."""


def _check_model_path(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelLoadError("model", f"{p} does not exist",
                             "pass a local diffusers SD1.5 folder or a .safetensors checkpoint")
    if p.is_file() and p.suffix.lower() != ".safetensors":
        raise ModelLoadError("model", f"{p.name} is not a .safetensors file (pickled .ckpt/.bin "
                             "checkpoints are never loaded)", "convert it to .safetensors first")
    return p


def _subdir(p: Path, name: str) -> dict:
    return {"subfolder": name} if (p / name).is_dir() else {}


def load_unet(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """A diffusers SD1.5 UNet from a local diffusers folder (``unet/`` inside or the UNet folder
    itself) or a single-file LDM checkpoint (.safetensors, converted with the shipped config)."""
    from diffusers import UNet2DConditionModel

    p = _check_model_path(path)
    if p.is_dir():
        unet = UNet2DConditionModel.from_pretrained(str(p), local_files_only=True,
                                                    torch_dtype=dtype, **_subdir(p, "unet"))
    else:
        unet = UNet2DConditionModel.from_single_file(str(p), config=str(CONFIG_DIR),
                                                     subfolder="unet", local_files_only=True,
                                                     torch_dtype=dtype)
    unet = unet.to(device).eval().requires_grad_(False)
    check_unet_sd15(unet, "model")
    return unet


def find_tokenizer(explicit=None, model_dir: Path | None = None) -> Path:
    """The CLIP tokenizer folder (vocab.json + merges.txt): ``explicit``, the diffusers folder's
    ``tokenizer/``, ``$P3S_TOKENIZER``, or ComfyUI's ``comfy/sd1_tokenizer`` (``$P3S_COMFYUI``)."""
    cands = []
    if explicit:
        cands.append(Path(explicit))
    if model_dir is not None:
        cands.append(model_dir / "tokenizer")
    if os.environ.get("P3S_TOKENIZER"):
        cands.append(Path(os.environ["P3S_TOKENIZER"]))
    if os.environ.get("P3S_COMFYUI"):
        cands.append(Path(os.environ["P3S_COMFYUI"]) / "comfy" / "sd1_tokenizer")
    for c in cands:
        if (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
            return c
    if explicit:
        raise ModelLoadError("tokenizer", f"{explicit} has no vocab.json + merges.txt",
                             "point --tokenizer at a CLIP tokenizer folder (e.g. ComfyUI's "
                             "comfy/sd1_tokenizer or a diffusers SD1.5 folder's tokenizer/)")
    raise ModelLoadError("tokenizer", "no CLIP tokenizer found for the single-file checkpoint",
                         "pass --tokenizer DIR (a folder with vocab.json and merges.txt, e.g. "
                         "ComfyUI's comfy/sd1_tokenizer) or set P3S_TOKENIZER")


@contextlib.contextmanager
def _config_dir_with_tokenizer(tokenizer: Path):
    """The shipped SD1.5 config folder plus the tokenizer's vocabulary, in a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="p3s_sd15_cfg_"))
    try:
        shutil.copytree(CONFIG_DIR, tmp / "sd15")
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tokenizer / name, tmp / "sd15" / "tokenizer" / name)
        yield tmp / "sd15"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_pipeline(path, controlnet=None, tokenizer=None, dtype: torch.dtype = torch.float32,
                  device="cpu", scheduler: str = "ddim"):
    """A ``StableDiffusionPipeline`` (or ``StableDiffusionControlNetPipeline`` with ``controlnet``,
    a local folder or .safetensors) from local files only; the scheduler is DDIM by default."""
    import diffusers
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    p = _check_model_path(path)
    cn = None
    if controlnet is not None:
        cp = _check_model_path(controlnet)
        if cp.is_dir():
            cn = ControlNetModel.from_pretrained(str(cp), local_files_only=True, torch_dtype=dtype)
        else:
            cn = ControlNetModel.from_single_file(str(cp), config=str(CONFIG_DIR / "controlnet"),
                                                  local_files_only=True, torch_dtype=dtype)
    cls = StableDiffusionControlNetPipeline if cn is not None else StableDiffusionPipeline
    extra = {"controlnet": cn} if cn is not None else {}
    diffusers.utils.logging.disable_progress_bar()
    if p.is_dir():
        pipe = cls.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **extra)
    else:
        tok = find_tokenizer(tokenizer)
        with _config_dir_with_tokenizer(tok) as cfg:
            pipe = cls.from_single_file(str(p), config=str(cfg), local_files_only=True,
                                        torch_dtype=dtype, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False,
                                        **extra)
    diffusers.utils.logging.enable_progress_bar()
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    check_unet_sd15(pipe.unet, "model")
    pipe.unet.requires_grad_(False)
    return pipe.to(device)


# --- adapter init from a diffusers UNet ------------------------------------------------------------
_RES = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
        "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
_LDM_TO_DIFFUSERS = [
    ("time_embed.0.", "time_embedding.linear_1.", None),
    ("time_embed.2.", "time_embedding.linear_2.", None),
    ("input_blocks.0.0.", "conv_in.", None),
    ("input_blocks.1.0.", "down_blocks.0.resnets.0.", _RES),
    ("input_blocks.1.1.", "down_blocks.0.attentions.0.", None),
    ("input_blocks.2.0.", "down_blocks.0.resnets.1.", _RES),
    ("input_blocks.2.1.", "down_blocks.0.attentions.1.", None),
    ("input_blocks.3.0.op.", "down_blocks.0.downsamplers.0.conv.", None),
    ("input_blocks.4.0.", "down_blocks.1.resnets.0.", _RES),
    ("input_blocks.4.1.", "down_blocks.1.attentions.0.", None),
    ("input_blocks.5.0.", "down_blocks.1.resnets.1.", _RES),
    ("input_blocks.5.1.", "down_blocks.1.attentions.1.", None),
    ("input_blocks.6.0.op.", "down_blocks.1.downsamplers.0.conv.", None),
    ("input_blocks.7.0.", "down_blocks.2.resnets.0.", _RES),
    ("input_blocks.7.1.", "down_blocks.2.attentions.0.", None),
    ("input_blocks.8.0.", "down_blocks.2.resnets.1.", _RES),
    ("input_blocks.8.1.", "down_blocks.2.attentions.1.", None),
    ("input_blocks.9.0.op.", "down_blocks.2.downsamplers.0.conv.", None),
    ("middle_block.0.", "mid_block.resnets.0.", _RES),
    ("middle_block.1.", "mid_block.attentions.0.", None),
    # the decoder half of the "full" copy layout (issue 22, :mod:`p3s_core.copy_decoder`)
    ("output_blocks.2.1.", "up_blocks.0.upsamplers.0.", None),
    ("output_blocks.3.0.", "up_blocks.1.resnets.0.", _RES),
    ("output_blocks.3.1.", "up_blocks.1.attentions.0.", None),
    ("output_blocks.4.0.", "up_blocks.1.resnets.1.", _RES),
    ("output_blocks.4.1.", "up_blocks.1.attentions.1.", None),
    ("output_blocks.5.0.", "up_blocks.1.resnets.2.", _RES),
    ("output_blocks.5.1.", "up_blocks.1.attentions.2.", None),
    ("output_blocks.5.2.", "up_blocks.1.upsamplers.0.", None),
    ("output_blocks.6.0.", "up_blocks.2.resnets.0.", _RES),
    ("output_blocks.6.1.", "up_blocks.2.attentions.0.", None),
    ("output_blocks.7.0.", "up_blocks.2.resnets.1.", _RES),
    ("output_blocks.7.1.", "up_blocks.2.attentions.1.", None),
    ("output_blocks.8.0.", "up_blocks.2.resnets.2.", _RES),
    ("output_blocks.8.1.", "up_blocks.2.attentions.2.", None),
    ("output_blocks.8.2.", "up_blocks.2.upsamplers.0.", None),
    ("output_blocks.9.0.", "up_blocks.3.resnets.0.", _RES),
    ("output_blocks.9.1.", "up_blocks.3.attentions.0.", None),
    ("output_blocks.10.0.", "up_blocks.3.resnets.1.", _RES),
    ("output_blocks.10.1.", "up_blocks.3.attentions.1.", None),
    ("output_blocks.11.0.", "up_blocks.3.resnets.2.", _RES),
    ("output_blocks.11.1.", "up_blocks.3.attentions.2.", None),
]


def _ldm_to_diffusers_key(ldm_key: str) -> str:
    for lp, dp, sub in _LDM_TO_DIFFUSERS:
        if ldm_key.startswith(lp):
            rest = ldm_key[len(lp):]
            if sub:
                for a, b in sub.items():
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
            return dp + rest
    raise KeyError(ldm_key)


def ldm_state_from_diffusers(unet_state: Mapping[str, torch.Tensor], config=None) -> dict:
    """The LDM-named base-UNet tensors the copy is initialised from (ControlNet-style), taken from a
    diffusers UNet state dict; a missing key raises :class:`ModelMismatchError`."""
    from ..copy_init import ldm_key_map
    from ..copy_unet import CopyUNetConfig, P3SCopyUNet

    with torch.device("meta"):
        copy = P3SCopyUNet(config or CopyUNetConfig.sd15())
    out, missing = {}, []
    for lk in ldm_key_map(copy).values():
        dk = _ldm_to_diffusers_key(lk)
        if dk not in unet_state:
            missing.append(dk)
        else:
            out[lk] = unet_state[dk]
    if missing:
        raise ModelMismatchError("unet", f"the diffusers UNet lacks {len(missing)} tensors the P3S "
                                 f"copy needs, e.g. {', '.join(missing[:3])}",
                                 "load an SD1.5 UNet (or an SD1.5 fine-tune)")
    return out


def copy_config_for(unet, layout: str = "encoder"):
    """The :class:`~p3s_core.copy_unet.CopyUNetConfig` matching a diffusers UNet's widths (SD1.5:
    ``CopyUNetConfig.sd15(layout)``; tiny test UNets: their own widths)."""
    from ..copy_unet import CopyUNetConfig

    c = unet.config
    b = list(c.block_out_channels)
    heads = c.attention_head_dim if isinstance(c.attention_head_dim, int) else c.attention_head_dim[0]
    return CopyUNetConfig(in_channels=int(c.in_channels), model_channels=int(b[0]),
                          channel_mult=tuple(int(x // b[0]) for x in b[:3]),
                          context_dim=int(c.cross_attention_dim), num_heads=int(heads),
                          time_embed_dim=4 * int(b[0]), groups=int(c.norm_num_groups),
                          layout=layout)


def new_adapter_for_unet(unet, seed: int = 0, config=None, **kwargs):
    """A fresh adapter whose copy is initialised from a diffusers UNet (same as the nodes' init
    from the LDM weights; the same base gives the same ``base_unet_hash``)."""
    from ..adapter import new_adapter

    sd = {k: v.detach().to("cpu", torch.float32)
          for k, v in ldm_state_from_diffusers(unet.state_dict(), config).items()}
    return new_adapter(config, sd, seed=seed, **kwargs)
