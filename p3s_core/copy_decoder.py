"""The decoder half of the "full" copy layout (paper Sec. III-B, Eq. 6; issue 22).

"We copy the layers of a simplified U-Net (with only one ResNet block in each block), each
corresponding to a spatial-transformer layer in the original U-Net": for each of the 9 decoder-side
transformers of the SD1.5 UNet (``output_blocks.3`` .. ``11``) ONE ResNet block and ONE
SpatialTransformer, three per decoder level, each fed by the copy's OWN skip (``cat([h, skip])`` as
LDM), an upsample between levels. Module names follow the SD1.5 UNet's ``output_blocks`` so that
:data:`DECODER_LDM_PREFIXES` initialises them from the base UNet (:mod:`.copy_init`):

============================  ================  ==========================================
copy module                   in -> out (sd)    initialised from (LDM ``diffusion_model``)
============================  ================  ==========================================
``decoder.ups.2``             1280 (/8 -> /4)   ``output_blocks.2.1`` (Upsample)
``decoder.levels.2.0.res/st`` 2560 -> 1280      ``output_blocks.3.0`` / ``output_blocks.3.1``
``decoder.levels.2.1.res/st`` 2560 -> 1280      ``output_blocks.4.0`` / ``.4.1``
``decoder.levels.2.2.res/st`` 1920 -> 1280      ``output_blocks.5.0`` / ``.5.1``
``decoder.ups.1``             1280 (/4 -> /2)   ``output_blocks.5.2``
``decoder.levels.1.0.res/st`` 1920 -> 640       ``output_blocks.6.0`` / ``.6.1``
``decoder.levels.1.1.res/st`` 1280 -> 640       ``output_blocks.7.0`` / ``.7.1``
``decoder.levels.1.2.res/st`` 960 -> 640        ``output_blocks.8.0`` / ``.8.1``
``decoder.ups.0``             640 (/2 -> /1)    ``output_blocks.8.2``
``decoder.levels.0.0.res/st`` 960 -> 320        ``output_blocks.9.0`` / ``.9.1``
``decoder.levels.0.1.res/st`` 640 -> 320        ``output_blocks.10.0`` / ``.10.1``
``decoder.levels.0.2.res/st`` 640 -> 320        ``output_blocks.11.0`` / ``.11.1``
============================  ================  ==========================================

The skips, a stack as in LDM (last in, first out): ``conv_in``'s output, each encoder pair's output
and each downsample's output up to level 2, 9 in all (the UNet's 8x8 level, whose skips feed
``output_blocks.0`` .. ``2``, has no copy). So every input width is the UNet's (:func:`skip_widths`).
Upsampling goes to the next skip's size (nearest, then a 3x3 conv, as LDM's ``Upsample`` with
``output_shape``), so odd latent sizes line up like the UNet's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .copy_blocks import ResBlock, SpatialTransformer
from .copy_config import CopyUNetConfig
from .operations import check_operations

__all__ = ["Upsample", "CopyDecoder", "DECODER_LDM_PREFIXES", "PAIRS_PER_LEVEL", "skip_widths"]

#: (ResBlock, transformer) pairs per decoder level (SD1.5: ``num_res_blocks + 1``).
PAIRS_PER_LEVEL = 3
#: the first ``output_blocks`` index of decoder level 2, 1, 0 (SD1.5), and each level's upsampler
_FIRST_OUTPUT_BLOCK = {2: 3, 1: 6, 0: 9}
_UPSAMPLER = {2: "output_blocks.2.1.", 1: "output_blocks.5.2.", 0: "output_blocks.8.2."}


def _decoder_ldm_prefixes() -> list[tuple[str, str]]:
    out = []
    for lvl in (2, 1, 0):
        out.append((f"decoder.ups.{lvl}.", _UPSAMPLER[lvl]))
        for j in range(PAIRS_PER_LEVEL):
            n = _FIRST_OUTPUT_BLOCK[lvl] + j
            out += [(f"decoder.levels.{lvl}.{j}.res.", f"output_blocks.{n}.0."),
                    (f"decoder.levels.{lvl}.{j}.st.", f"output_blocks.{n}.1.")]
    return out


#: copy key prefix -> LDM UNet key prefix for the decoder half (see the module table).
DECODER_LDM_PREFIXES = _decoder_ldm_prefixes()


def skip_widths(cfg: CopyUNetConfig) -> list[int]:
    """Widths of the copy's 9 skips in push order: conv_in, level 0 pairs a/b, downsample 0, level 1
    pairs a/b, downsample 1, level 2 pairs a/b."""
    ch = cfg.level_channels
    return [cfg.model_channels, ch[0], ch[0], ch[0], ch[1], ch[1], ch[1], ch[2], ch[2]]


class Upsample(nn.Module):
    """LDM Upsample: nearest to ``size`` (the skip's), then ``conv`` (3x3, padding 1)."""

    def __init__(self, channels: int, operations=None):
        super().__init__()
        self.conv = check_operations(operations).Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class _DecoderLevel(nn.Module):
    """One (ResBlock, SpatialTransformer) pair: the copy layer of one decoder-side UNet transformer."""

    def __init__(self, cin: int, cout: int, cfg: CopyUNetConfig, operations=None):
        super().__init__()
        self.res = ResBlock(cin, cfg.time_embed_dim, cout, cfg.groups, cfg.dropout, operations)
        self.st = SpatialTransformer(cout, cfg.num_heads, cfg.context_dim, cfg.groups, cfg.dropout,
                                     operations)


class CopyDecoder(nn.Module):
    """Decoder levels 2, 1, 0 of the full copy. ``levels[l][j]`` is pair ``j`` (0..2, execution order)
    of the resolution level ``l`` (0 = the latent's size); ``ups[l]`` upsamples into level ``l``."""

    def __init__(self, config: CopyUNetConfig, operations=None):
        super().__init__()
        cfg, ops = config, check_operations(operations)
        ch = cfg.level_channels
        self.ups = nn.ModuleList([Upsample(ch[1], ops), Upsample(ch[2], ops), Upsample(ch[3], ops)])
        skips = skip_widths(cfg)
        levels = {}
        for lvl in (2, 1, 0):
            pairs, h = [], ch[lvl + 1]  # the level below's width (level 3 = the middle)
            for _j in range(PAIRS_PER_LEVEL):
                cin = h + skips.pop()
                pairs.append(_DecoderLevel(cin, ch[lvl], cfg, ops))
                h = ch[lvl]
            levels[lvl] = nn.ModuleList(pairs)
        self.levels = nn.ModuleList([levels[0], levels[1], levels[2]])

    def forward(self, h: torch.Tensor, skips, emb: torch.Tensor, context: torch.Tensor,
                return_attn: bool = False, sink: list | None = None):
        """``h``: the middle feature; ``skips``: the copy's 9 skips in push order (:func:`skip_widths`;
        not modified). Returns the 9 decoder features in execution order (levels 2, 1, 0, pairs 0..2;
        layer map ``output_3`` .. ``output_11``) and, with ``return_attn``, the last transformer's
        (``output_11``'s counterpart) attn2 map averaged over heads. ``sink``: receives each
        transformer's attn2 output, in the same order (the cross-attention enhancement's input)."""
        stack = list(skips)
        feats, amap = [], None
        for lvl in (2, 1, 0):
            h = self.ups[lvl](h, stack[-1].shape[-2:])
            for j, pair in enumerate(self.levels[lvl]):
                skip = stack.pop()
                h = pair.res(torch.cat([h, skip.to(h.dtype)], dim=1), emb)
                if lvl == 0 and j == PAIRS_PER_LEVEL - 1 and return_attn:
                    h, amap = pair.st(h, context, return_attn=True, sink=sink)
                else:
                    h = pair.st(h, context, sink=sink)
                feats.append(h)
        return (feats, amap) if return_attn else feats

    def transformers(self) -> list[nn.Module]:
        """The transformers in feature order (levels 2, 1, 0; pairs 0..2 each)."""
        return [pair.st for lvl in (2, 1, 0) for pair in self.levels[lvl]]
