"""The copy's initialisation from the original UNet (paper Sec. III-B, Fig. 3: "we copy the layers"):
copy key -> LDM key names, the copy of the weights, and parameter counts."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .copy_decoder import DECODER_LDM_PREFIXES
from .copy_unet import P3SCopyUNet
from .errors import ModelMismatchError

_ENCODER_LDM_PREFIXES = [
    ("time_embed.", "time_embed."),
    ("conv_in.", "input_blocks.0.0."),
    ("levels.0.res.", "input_blocks.1.0."),
    ("levels.0.st.", "input_blocks.1.1."),
    ("downs.0.", "input_blocks.3.0."),
    ("levels.1.res.", "input_blocks.4.0."),
    ("levels.1.st.", "input_blocks.4.1."),
    ("downs.1.", "input_blocks.6.0."),
    ("levels.2.res.", "input_blocks.7.0."),
    ("levels.2.st.", "input_blocks.7.1."),
    ("downs.2.", "input_blocks.9.0."),
    ("middle.res.", "middle_block.0."),
    ("middle.st.", "middle_block.1."),
]
#: "full" only: the second (ResBlock, transformer) pair of each encoder level
_SECOND_PAIR_LDM_PREFIXES = [
    (f"levels_b.{lvl}.{part}.", f"input_blocks.{n}.{sub}.")
    for lvl, n in ((0, 2), (1, 5), (2, 8)) for part, sub in (("res", 0), ("st", 1))
]
#: copy key prefix -> LDM key prefix, both layouts (the second pairs and the decoder only match in
#: "full")
_LDM_PREFIXES = _ENCODER_LDM_PREFIXES + _SECOND_PAIR_LDM_PREFIXES + DECODER_LDM_PREFIXES


def ldm_key_map(copy: P3SCopyUNet, prefix: str = "") -> dict[str, str]:
    """``{copy state-dict key: LDM UNet key}`` for every copy tensor except the zero convs (those of
    the cross-attention enhancement too)."""
    out = {}
    for k in copy.state_dict():
        if k.startswith(("zero_convs.", "cross_zero_convs.")):
            continue
        for cp, lp in _LDM_PREFIXES:
            if k.startswith(cp):
                out[k] = prefix + lp + k[len(cp):]
                break
        else:  # pragma: no cover - guarded by the module structure
            raise RuntimeError(f"copy key {k!r} has no LDM counterpart")
    return out


def _family_hint(sd: Mapping[str, torch.Tensor], prefix: str) -> str:
    k = sd.get(prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if k is None:
        k = sd.get(prefix + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
    if k is not None and k.ndim == 2:
        fam = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(int(k.shape[1]))
        if fam:
            return f" (its text context is {int(k.shape[1])} wide: this looks like {fam})"
    if (prefix + "label_emb.0.0.weight") in sd:
        return " (it has a label embedding: this looks like SDXL)"
    return ""


@torch.no_grad()
def init_from_ldm_unet(copy: P3SCopyUNet, unet_state_dict: Mapping[str, torch.Tensor],
                       prefix: str = "") -> list[str]:
    """ControlNet-style init: copy the base UNet's weights into the copy (see module table).

    ``unet_state_dict`` uses LDM names (``prefix`` e.g. ``"model.diffusion_model."`` for a full
    checkpoint, ``""`` for ComfyUI's ``diffusion_model.state_dict()``). Every key is checked before
    anything is written: a missing or mis-shaped key raises :class:`ModelMismatchError` naming them
    (e.g. SDXL / SD2 UNets). The zero convs stay zero. Returns the copied copy-side keys (in
    state-dict order); :func:`ldm_key_map` gives their LDM names.
    """
    kmap = ldm_key_map(copy, prefix)
    own = copy.state_dict()
    missing, misshaped = [], []
    for ck, lk in kmap.items():
        src = unet_state_dict.get(lk)
        if src is None:
            missing.append(lk)
        elif tuple(src.shape) != tuple(own[ck].shape):
            misshaped.append(f"{lk} {tuple(src.shape)} (expected {tuple(own[ck].shape)})")
    if missing or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:4])}")
        if misshaped:
            parts.append(f"{len(misshaped)} keys with another shape, e.g. "
                         f"{'; '.join(misshaped[:4])}")
        raise ModelMismatchError(
            "model", "the UNet does not fit the P3S copy" + _family_hint(unet_state_dict, prefix)
            + ": " + "; ".join(parts), "connect an SD1.5 checkpoint (or an SD1.5 fine-tune)")
    copied = []
    for ck, lk in kmap.items():
        own[ck].copy_(unet_state_dict[lk])
        copied.append(ck)
    return copied


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
