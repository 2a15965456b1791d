"""The decoder half of the "full" copy layout (paper Sec. III-B, Eq. 6; issue 22).

"We copy the layers of a simplified U-Net (with only one ResNet block in each block), each
corresponding to a spatial-transformer layer in the original U-Net": per decoder level ONE ResNet
block and ONE SpatialTransformer, fed by the copy's OWN encoder skips (``cat([h, skip])`` as LDM),
then an upsample. Module names and widths follow the SD1.5 UNet's ``output_blocks`` so that
:data:`DECODER_LDM_PREFIXES` initialises them from the base UNet (:mod:`.copy_init`):

==========================  ================  ==========================================
copy module                 in -> out (sd)    initialised from (LDM ``diffusion_model``)
==========================  ================  ==========================================
``decoder.ups.2``           1280 (/8 -> /4)   ``output_blocks.2.1`` (Upsample)
``decoder.levels.2.res/st`` 2560 -> 1280      ``output_blocks.3.0`` / ``output_blocks.3.1``
``decoder.ups.1``           1280 (/4 -> /2)   ``output_blocks.5.2``
``decoder.levels.1.res/st`` 1920 -> 640       ``output_blocks.6.0`` / ``output_blocks.6.1``
``decoder.ups.0``           640 (/2 -> /1)    ``output_blocks.8.2``
``decoder.levels.0.res/st`` 960 -> 320        ``output_blocks.9.0`` / ``output_blocks.9.1``
==========================  ================  ==========================================

The input widths match the UNet's because the copy's skip of level ``l`` has the width of the
UNet's last skip of that level. Upsampling goes to the skip's size (nearest, then a 3x3 conv, as
LDM's ``Upsample`` with ``output_shape``), so odd latent sizes line up like the UNet's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .copy_blocks import ResBlock, SpatialTransformer
from .copy_config import CopyUNetConfig
from .operations import check_operations

__all__ = ["Upsample", "CopyDecoder", "DECODER_LDM_PREFIXES"]

#: copy key prefix -> LDM UNet key prefix for the decoder half (see the module table).
DECODER_LDM_PREFIXES = [
    ("decoder.ups.2.", "output_blocks.2.1."),
    ("decoder.levels.2.res.", "output_blocks.3.0."),
    ("decoder.levels.2.st.", "output_blocks.3.1."),
    ("decoder.ups.1.", "output_blocks.5.2."),
    ("decoder.levels.1.res.", "output_blocks.6.0."),
    ("decoder.levels.1.st.", "output_blocks.6.1."),
    ("decoder.ups.0.", "output_blocks.8.2."),
    ("decoder.levels.0.res.", "output_blocks.9.0."),
    ("decoder.levels.0.st.", "output_blocks.9.1."),
]


class Upsample(nn.Module):
    """LDM Upsample: nearest to ``size`` (the skip's), then ``conv`` (3x3, padding 1)."""

    def __init__(self, channels: int, operations=None):
        super().__init__()
        self.conv = check_operations(operations).Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class _DecoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: CopyUNetConfig, operations=None):
        super().__init__()
        self.res = ResBlock(cin, cfg.time_embed_dim, cout, cfg.groups, cfg.dropout, operations)
        self.st = SpatialTransformer(cout, cfg.num_heads, cfg.context_dim, cfg.groups, cfg.dropout,
                                     operations)


class CopyDecoder(nn.Module):
    """Decoder levels 2, 1, 0 of the full copy. ``levels[l]`` / ``ups[l]`` are indexed by the
    resolution level ``l`` they produce (0 = the latent's size)."""

    def __init__(self, config: CopyUNetConfig, operations=None):
        super().__init__()
        cfg, ops = config, check_operations(operations)
        ch = cfg.level_channels
        self.ups = nn.ModuleList([Upsample(ch[1], ops), Upsample(ch[2], ops), Upsample(ch[3], ops)])
        self.levels = nn.ModuleList([_DecoderLevel(ch[1] + ch[0], ch[0], cfg, ops),
                                     _DecoderLevel(ch[2] + ch[1], ch[1], cfg, ops),
                                     _DecoderLevel(ch[3] + ch[2], ch[2], cfg, ops)])

    def forward(self, h: torch.Tensor, skips, emb: torch.Tensor, context: torch.Tensor,
                return_attn: bool = False, sink: list | None = None):
        """``h``: the middle feature; ``skips``: the copy's encoder features of levels 0, 1, 2.
        Returns the decoder features ``[level 2, level 1, level 0]`` (and, with ``return_attn``,
        the level-0 transformer's attn2 map averaged over heads). ``sink``: receives each
        transformer's attn2 output, in the same order (the cross-attention enhancement's input)."""
        feats, amap = [], None
        for lvl in (2, 1, 0):
            skip = skips[lvl]
            h = self.ups[lvl](h, skip.shape[-2:])
            h = self.levels[lvl].res(torch.cat([h, skip.to(h.dtype)], dim=1), emb)
            if lvl == 0 and return_attn:
                h, amap = self.levels[lvl].st(h, context, return_attn=True, sink=sink)
            else:
                h = self.levels[lvl].st(h, context, sink=sink)
            feats.append(h)
        return (feats, amap) if return_attn else feats

    def transformers(self) -> list[nn.Module]:
        """The transformers in feature order (levels 2, 1, 0)."""
        return [self.levels[lvl].st for lvl in (2, 1, 0)]
