"""The diffusers engine: which diffusers attention modules are SD1.5's 16 self-attention layers, and
the SD1.5 shape check of a diffusers UNet."""
from __future__ import annotations

from ..copy_unet import LAYER_MAP
from ..errors import ModelMismatchError


def _diffusers_layer_keys() -> dict[str, str]:
    """``{diffusers attn1 module name: P3S layer key}`` for the 16 SD1.5 self-attention layers."""
    out = {}
    for i, (blk, key_ids) in enumerate([(0, (1, 2)), (1, (4, 5)), (2, (7, 8))]):
        for j, k in enumerate(key_ids):
            out[f"down_blocks.{blk}.attentions.{j}.transformer_blocks.0.attn1"] = f"input_{k}"
    out["mid_block.attentions.0.transformer_blocks.0.attn1"] = "middle_0"
    for up, first in ((1, 3), (2, 6), (3, 9)):
        for j in range(3):
            out[f"up_blocks.{up}.attentions.{j}.transformer_blocks.0.attn1"] = f"output_{first + j}"
    return out


#: diffusers attn1 name -> P3S layer-map key (``input_1`` .. ``output_11``, ``middle_0``).
DIFFUSERS_LAYER_KEYS: dict[str, str] = _diffusers_layer_keys()
#: The original UNet's last cross-attention layer (``output_blocks.11`` in LDM names), for L_ac.
LAST_CROSS_ATTENTION = "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
_ATTN2_KEYS = {k.replace("attn1", "attn2"): v for k, v in DIFFUSERS_LAYER_KEYS.items()}
assert set(DIFFUSERS_LAYER_KEYS.values()) == {e["key"] for e in LAYER_MAP}


def check_unet_sd15(unet, input_name: str = "unet") -> None:
    """Refuse a diffusers UNet that is not SD1.5-shaped (widths 320.., context 768, 4 channels)."""
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(unet, "set_attn_processor"):
        raise ModelMismatchError(input_name, f"this is not a diffusers UNet2DConditionModel "
                                 f"(got {type(unet).__name__})", "load an SD1.5 UNet with diffusers")
    ctx = cfg.get("cross_attention_dim") if hasattr(cfg, "get") else getattr(cfg, "cross_attention_dim")
    names = {n[: -len(".processor")] for n in unet.attn_processors}
    missing = [n for n in DIFFUSERS_LAYER_KEYS if n not in names]
    if missing or int(getattr(cfg, "in_channels", 4)) != 4 or getattr(cfg, "addition_embed_type", None):
        raise ModelMismatchError(
            input_name, f"the UNet is not SD1.5-shaped (context {ctx}, in_channels "
            f"{getattr(cfg, 'in_channels', '?')}, {len(missing)} of the 16 self-attention layers "
            "missing); P3S adapters are made for SD1.5", "load an SD1.5 model (or an SD1.5 fine-tune)")
