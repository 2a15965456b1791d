"""Trainable copy of a simplified SD1.5 UNet (paper Sec. III-B, Eq. 6).

    f_i = Z_i(F_i(x_t + I'', c, t))                                                    (6)

The copy keeps (layout "encoder") the encoder half of the SD1.5 UNet with ONE ResNet block per level ("a simplified
U-Net with only one ResNet block in each block"), in the original LDM module names so that it can be
initialised from the base UNet ControlNet-style (:func:`init_from_ldm_unet`):

=========  =======================  ==========  ===============================================
level      modules                  width (sd)  initialised from (LDM ``model.diffusion_model``)
=========  =======================  ==========  ===============================================
(stem)     ``time_embed``           1280        ``time_embed``
(stem)     ``conv_in``              320         ``input_blocks.0.0``
0  (/1)    ``levels.0.res/.st``     320         ``input_blocks.1.0`` / ``input_blocks.1.1``
           ``downs.0.op``                       ``input_blocks.3.0.op``
1  (/2)    ``levels.1.res/.st``     640         ``input_blocks.4.0`` / ``input_blocks.4.1``
           ``downs.1.op``                       ``input_blocks.6.0.op``
2  (/4)    ``levels.2.res/.st``     1280        ``input_blocks.7.0`` / ``input_blocks.7.1``
           ``downs.2.op``                       ``input_blocks.9.0.op``
3  (/8)    ``middle.res/.st``       1280        ``middle_block.0`` / ``middle_block.1``
=========  =======================  ==========  ===============================================

``F_level`` is the output of the level's SpatialTransformer (before the downsample). Each of the 16
self-attention (attn1) layers of the original UNet takes the copy feature of the level with the same
resolution and width through ITS OWN zero-initialised 1x1 conv ``zero_convs.<key>`` (see
:data:`LAYER_MAP`): input 1,2 & output 9,10,11 <- level 0; input 4,5 & output 6,7,8 <- level 1;
input 7,8 & output 3,4,5 <- level 2; middle <- level 3. Decision: the paper does not say which copy
layer feeds which original layer; this keeps levels and widths, so one copy feature can feed the
encoder- and decoder-side layers of that level. All 16 features are exactly zero at initialisation.

Odd latent sizes: the stride-2 downsample uses padding 1 like LDM, so level sizes are
``ceil(h / 2**level)``, the same as the original UNet's (its decoder upsamples back to those sizes).

Layouts (:mod:`.copy_config`, issue 22): the table above is the ``"encoder"`` layout (4 copy
transformers). ``"full"`` is one copy layer (one ResBlock + one transformer) per UNet transformer, 16:
it adds ``levels_b.<l>.res/.st``, the second pair of each encoder level (from ``input_blocks.2`` /
``5`` / ``8``, run after ``levels.<l>``, before the downsample), and the decoder half of
:mod:`.copy_decoder` (``self.decoder``, three pairs per level from ``output_blocks.3`` .. ``11``, fed
by the copy's own 9 skips). Each of the 16 layers then reads its own copy transformer
(:func:`feature_index` = its layer-map position), and the ``output_11`` counterpart of
``ATTN_MAP_KEY`` is the decoder's last level-0 transformer.

Parameter count (``count_parameters(P3SCopyUNet(CopyUNetConfig.sd15()))``): 179,614,400, of which
the 16 zero convs hold 12,402,880 (about 718 MB in float32; the SD1.5 UNet has 859.5 M); the
``"full"`` layout: 631,001,600 (the same 12,402,880 in zero convs; about 2.52 GB in float32).

Cross-attention enhancement (paper Sec. III-B, Fig. 3: "we add the hidden states both in self and
cross attention layers to the original model through a zero convolution"; issue 22): with
``enhancement="cross"`` each layer-map entry also gets ``cross_zero_convs.<key>``, a zero-initialised
1x1 convolution on tokens (a ``Linear`` C->C, the same map as a 1x1 conv on the token grid) applied to
the copy level's cross-attention (attn2) output, before its residual. ``forward`` returns it under
:func:`cross_key` ``(key)``; the injector adds it, times eps_t, to the matching original attn2
output. Keyed by the layer-map key, so a layout with more layers just has more of them (+12,402,880
parameters for the 16 SD1.5 layers). ``enhancement="self"`` (and every format-1 file) has none.
"""
from __future__ import annotations

import torch
from torch import nn

from .copy_blocks import (BasicTransformerBlock, CrossAttention, Downsample, ResBlock, SpatialTransformer,
                          timestep_embedding)
from .copy_config import (COPY_LAYOUTS, LAYER_MAP, CopyUNetConfig, feature_index, layer_key,
                          layer_map, num_features)
from .copy_decoder import CopyDecoder
from .errors import AdapterFileError, ModelMismatchError
from .operations import check_operations

__all__ = [
    "COPY_LAYOUTS",
    "CopyUNetConfig",
    "CopyDecoder",
    "LAYER_MAP",
    "feature_index",
    "num_features",
    "ATTN_MAP_KEY",
    "layer_map",
    "layer_key",
    "timestep_embedding",
    "ResBlock",
    "CrossAttention",
    "BasicTransformerBlock",
    "SpatialTransformer",
    "Downsample",
    "P3SCopyUNet",
    "ENHANCEMENTS",
    "DEFAULT_ENHANCEMENT",
    "cross_key",
]

#: Condition injection parts (issue 22): "cross" = self-attention injection (Eq. 7) + cross-attention
#: enhancement (Fig. 3, the paper's); "self" = the self-attention injection only (format-1 files).
ENHANCEMENTS = ("cross", "self")
#: The default of a new adapter: "cross", the paper's. Trained with each photo as its own reference it
#: learns to copy that aligned reference (held-out loss with another photo as reference far above the
#: plain model's in the toy world), so training pairs it with another photo (:mod:`p3s_core.train`,
#: ``reference_pairing="auto"``); then it beats the plain model and a self-only adapter (README, "Decisions").
DEFAULT_ENHANCEMENT = "cross"
#: Prefix of the cross-attention enhancement features in ``P3SCopyUNet.forward``'s dict.
CROSS_PREFIX = "cross:"


def cross_key(key: str) -> str:
    """Feature-dict key of the cross-attention enhancement of layer ``key`` (``"cross:input_1"``)."""
    return CROSS_PREFIX + key

#: Key of the cross-attention map in the dict returned by ``P3SCopyUNet(..., return_attn_map=True)``.
ATTN_MAP_KEY = "attn_map"




class _Level(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: CopyUNetConfig, operations=None):
        super().__init__()
        self.res = ResBlock(cin, cfg.time_embed_dim, cout, cfg.groups, cfg.dropout, operations)
        self.st = SpatialTransformer(cout, cfg.num_heads, cfg.context_dim, cfg.groups, cfg.dropout, operations)


def distinct_rows(x: torch.Tensor, timesteps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(firsts, inv)``: the first row of each distinct ``(x, timesteps)`` row and, per row, the
    index of its distinct row (``x == x[firsts][inv]``); None when every row is distinct. A CFG batch holds the same ``x_t`` and ``t`` in its cond
    and uncond halves, so the part of the copy that does not read the text context (Eq. 6: time
    embedding, ``conv_in``, level 0's ResBlock and self-attention) is computed once per distinct
    row. Rows compare bit for bit (``torch.equal``), so the result is the same computation."""
    b = x.shape[0]
    if b < 2:
        return None
    firsts: list[int] = []
    inv: list[int] = []
    for i in range(b):
        for pos, j in enumerate(firsts):
            if bool(timesteps[i] == timesteps[j]) and torch.equal(x[i], x[j]):
                inv.append(pos)
                break
        else:
            firsts.append(i)
            inv.append(len(firsts) - 1)
    if len(firsts) == b:
        return None
    return torch.tensor(firsts, device=x.device), torch.tensor(inv, device=x.device)


def _zero_linear(channels: int, operations=None) -> nn.Linear:
    """A zero-initialised 1x1 convolution on tokens [B, N, C] (a ``Linear``): the cross-attention
    enhancement's zero convolution (Fig. 3)."""
    lin = check_operations(operations).Linear(channels, channels)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def check_enhancement(enhancement: str, input_name: str = "enhancement") -> str:
    """``enhancement`` if it is one of :data:`ENHANCEMENTS`; else :class:`AdapterFileError`."""
    if enhancement not in ENHANCEMENTS:
        raise AdapterFileError(input_name, f"{enhancement!r} is not one of {ENHANCEMENTS}",
                               "use 'cross' (self + cross attention, the paper) or 'self'")
    return enhancement


def _zero_conv(channels: int, operations=None) -> nn.Conv2d:
    conv = check_operations(operations).Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class P3SCopyUNet(nn.Module):
    """Eq. 6: the trainable copy. ``forward`` returns ``{layer key: f_i [B, h_l*w_l, C_l]}``.

    Tokens are in ComfyUI's layout (row-major ``(h w)``, as ``b c h w -> b (h w) c``), ready to be
    concatenated with the normed hidden states ``n`` of that self-attention layer (Eq. 7).

    ``operations``: the layer family (:mod:`.operations`; None = ``torch.nn``), as ComfyUI's
    ``UNetModel`` takes it. Every weight is used through its layer's ``forward`` (the zero convs
    too), so a family that casts weights per call (ComfyUI's lowvram load) sees every use.
    """

    def __init__(self, config: CopyUNetConfig | None = None, operations=None, enhancement: str = "self"):
        super().__init__()
        cfg = config or CopyUNetConfig.sd15()
        self.enhancement = check_enhancement(enhancement)
        ops = check_operations(operations)
        self.config = cfg
        self.operations = ops
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        ch = cfg.level_channels
        self.time_embed = nn.Sequential(ops.Linear(mc, ted), nn.SiLU(), ops.Linear(ted, ted))
        self.conv_in = ops.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.levels = nn.ModuleList([_Level(mc, ch[0], cfg, ops), _Level(ch[0], ch[1], cfg, ops),
                                     _Level(ch[1], ch[2], cfg, ops)])
        self.downs = nn.ModuleList([Downsample(ch[0], ops), Downsample(ch[1], ops), Downsample(ch[2], ops)])
        self.middle = _Level(ch[2], ch[3], cfg, ops)
        full = cfg.layout == "full"
        #: "full" (issue 22): the second (ResBlock, transformer) pair of each encoder level, the copy
        #: layers of input_blocks 2 / 5 / 8; None in the "encoder" layout
        self.levels_b = nn.ModuleList([_Level(c, c, cfg, ops) for c in ch[:3]]) if full else None
        #: the decoder half of the "full" layout (issue 22); None in the "encoder" layout
        self.decoder = CopyDecoder(cfg, ops) if full else None
        self.layer_map = layer_map(cfg)
        self.zero_convs = nn.ModuleDict({e["key"]: _zero_conv(e["channels"], ops)
                                         for e in self.layer_map})
        if enhancement == "cross":  # issue 22: one per layer-map entry, keyed like zero_convs
            self.cross_zero_convs = nn.ModuleDict({e["key"]: _zero_linear(e["channels"], ops)
                                                   for e in self.layer_map})
        #: Speed switch (exact within float rounding; tests/unit/test_speed_equivalence.py): compute
        #: the context-free start of the copy once per distinct row of a CFG batch.
        self.share_cfg_rows = True

    def level_features(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                       ref: torch.Tensor | None = None, return_attn_map: bool = False,
                       dtype: torch.dtype | None = None, cross_sink: list | None = None):
        """The copy features ``F(x_t + I'', c, t)`` in :func:`feature_index` order: the 4 encoder /
        middle levels ("encoder"), or the 16 copy transformers in layer-map order ("full"); each
        [B, C_l, h_l, w_l] (before the zero convs). With ``return_attn_map`` also the attn2 map
        [B, h*w, tokens] of the full-resolution transformer that feeds ``output_11`` (encoder level
        0, or the decoder's last level-0 pair).
        ``cross_sink``: a list that receives each transformer's attn2 output [B, h_l*w_l, C_l], in the
        same order as the features.
        ``dtype``: the compute dtype (None = the weights'; another one needs a casting layer family)."""
        cfg = self.config
        if x_t.ndim != 4 or x_t.shape[1] != cfg.in_channels:
            raise ModelMismatchError("latent", f"expected [B, {cfg.in_channels}, h, w], got "
                                     f"{tuple(x_t.shape)}", "use an SD1.5 (4-channel) latent")
        b = x_t.shape[0]
        if ref is not None:
            if ref.shape != x_t.shape:
                raise ModelMismatchError(
                    "reference", f"I'' of shape {tuple(ref.shape)} does not match x_t "
                    f"{tuple(x_t.shape)}", "resize/expand it with encoder.prepare_reference")
            x_t = x_t + ref.to(x_t.dtype)
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.context_dim:
            raise ModelMismatchError(
                "conditioning", f"expected text context [{b}, tokens, {cfg.context_dim}], got "
                f"{tuple(context.shape)}", "use an SD1.5 text encoder (CLIP ViT-L, 768 wide)")
        timesteps = torch.as_tensor(timesteps, device=x_t.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(b)
        dtype = dtype or self.conv_in.weight.dtype
        rows = distinct_rows(x_t, timesteps) if self.share_cfg_rows else None
        inv = None
        if rows is not None:  # the context-free start once per distinct row
            firsts, inv = rows
            x_t, timesteps = x_t.index_select(0, firsts), timesteps.index_select(0, firsts)
        temb = timestep_embedding(timesteps, cfg.model_channels).to(dtype)
        emb = self.time_embed(temb)
        h = self.conv_in(x_t.to(dtype))
        context = context.to(dtype)
        feats, amap = [], None
        full = self.decoder is not None
        skips = []  # "full": the decoder's skip stack (conv_in, each encoder pair, downsamples 0, 1)
        if full:
            skips.append(h if inv is None else h.index_select(0, inv))
        for i, (level, down) in enumerate(zip(self.levels, self.downs)):
            h = level.res(h, emb)
            e = inv if i == 0 else None
            if i == 0 and return_attn_map and not full:
                h, amap = level.st(h, context, return_attn=True, expand=e, sink=cross_sink)
            else:
                h = level.st(h, context, expand=e, sink=cross_sink)
            if i == 0 and inv is not None:
                emb = emb.index_select(0, inv)
            feats.append(h)
            if full:  # the level's second pair (input_blocks 2 / 5 / 8)
                skips.append(h)
                second = self.levels_b[i]
                h = second.st(second.res(h, emb), context, sink=cross_sink)
                feats.append(h)
                skips.append(h)
            h = down(h)
            if full and i < 2:
                skips.append(h)
        h = self.middle.res(h, emb)
        h = self.middle.st(h, context, sink=cross_sink)
        feats.append(h)
        if full:
            res = self.decoder(h, skips, emb, context, return_attn=return_attn_map, sink=cross_sink)
            dec, amap = res if return_attn_map else (res, None)
            feats.extend(dec)
        return (feats, amap) if return_attn_map else feats

    def feature_transformers(self) -> list[nn.Module]:
        """The copy's SpatialTransformers in :func:`feature_index` order (4, or 16 in "full")."""
        if self.decoder is None:
            return [lvl.st for lvl in self.levels] + [self.middle.st]
        enc = [st for a, b in zip(self.levels, self.levels_b) for st in (a.st, b.st)]
        return enc + [self.middle.st] + self.decoder.transformers()

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                ref: torch.Tensor | None = None, return_attn_map: bool = False,
                dtype: torch.dtype | None = None, cross: bool = True) -> dict[str, torch.Tensor]:
        """Eq. 6 for all 16 layers. ``x_t`` [B,4,h,w], ``timesteps`` [B] (0..999, float),
        ``context`` [B,77,768], ``ref`` = I'' [B,4,h,w] (already at x_t's size; None = no
        reference). Returns ``{key: [B, h_l*w_l, C_l]}``; with ``return_attn_map`` the dict also
        holds ``ATTN_MAP_KEY`` -> the level-0 transformer's attn2 probabilities averaged over heads
        [B, h*w, 77]. That copy layer (320 wide, full latent resolution: encoder level 0, or the
        decoder's last level-0 pair in the "full" layout) is the counterpart of the original UNet's LAST cross-attention
        layer (``output_blocks.11``), used by the attention consistency loss (Eq. 11-13).
        ``dtype``: see :meth:`level_features`. With the cross-attention enhancement
        (``enhancement="cross"`` and ``cross``) the dict also holds ``cross_key(key)`` ->
        ``cross_zero_convs[key]`` of the attn2 output of the copy transformer that feeds the layer
        (:func:`feature_index`) [B, h_l*w_l, C_l] for every layer."""
        heads = getattr(self, "cross_zero_convs", None) if cross else None
        sink = [] if heads is not None else None
        res = self.level_features(x_t, timesteps, context, ref, return_attn_map, dtype, sink)
        feats, amap = res if return_attn_map else (res, None)
        out: dict[str, torch.Tensor] = {}
        for e in self.layer_map:
            # Z_i, the 1x1 conv, called as a layer (its family may cast its weight), as tokens
            # [B, h*w, C] in ComfyUI's layout (a transposed view).
            idx = feature_index(e)
            out[e["key"]] = self.zero_convs[e["key"]](feats[idx]).flatten(2).transpose(1, 2)
            if heads is not None:
                out[cross_key(e["key"])] = heads[e["key"]](sink[idx])
        if return_attn_map:
            out[ATTN_MAP_KEY] = amap
        return out
