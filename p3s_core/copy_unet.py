"""Trainable copy of a simplified SD1.5 UNet (paper Sec. III-B, Eq. 6).

    f_i = Z_i(F_i(x_t + I'', c, t))                                                    (6)

The copy keeps the encoder half of the SD1.5 UNet with ONE ResNet block per level ("a simplified
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

Parameter count (``count_parameters(P3SCopyUNet(CopyUNetConfig.sd15()))``): 179,614,400, of which
the 16 zero convs hold 12,402,880 (about 718 MB in float32; the SD1.5 UNet has 859.5 M).

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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterFileError, ModelMismatchError
from .operations import check_operations

__all__ = [
    "CopyUNetConfig",
    "LAYER_MAP",
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
    "cross_key",
]

#: Condition injection parts (issue 22): "cross" = self-attention injection (Eq. 7) + cross-attention
#: enhancement (Fig. 3, the paper's); "self" = the self-attention injection only (format-1 files).
ENHANCEMENTS = ("cross", "self")
#: Prefix of the cross-attention enhancement features in ``P3SCopyUNet.forward``'s dict.
CROSS_PREFIX = "cross:"


def cross_key(key: str) -> str:
    """Feature-dict key of the cross-attention enhancement of layer ``key`` (``"cross:input_1"``)."""
    return CROSS_PREFIX + key

#: Key of the cross-attention map in the dict returned by ``P3SCopyUNet(..., return_attn_map=True)``.
ATTN_MAP_KEY = "attn_map"


@dataclass(frozen=True)
class CopyUNetConfig:
    """Shape of the copy. ``channel_mult`` gives the widths of levels 0, 1, 2 (``mc * mult``); the
    middle level has the width of level 2. Exactly three levels + middle (the SD1.5 structure)."""

    in_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    context_dim: int = 768
    num_heads: int = 8
    time_embed_dim: int = 1280
    groups: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        problems = []
        if len(self.channel_mult) != 3:
            problems.append(f"channel_mult must have 3 entries (SD1.5 levels), got "
                            f"{self.channel_mult}")
        for name in ("in_channels", "model_channels", "context_dim", "num_heads",
                     "time_embed_dim", "groups"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1")
        if not problems:
            for c in self.level_channels:
                if c % self.groups:
                    problems.append(f"width {c} is not divisible by groups={self.groups}")
                if c % self.num_heads:
                    problems.append(f"width {c} is not divisible by num_heads={self.num_heads}")
            if self.model_channels % 2:
                problems.append("model_channels must be even (sinusoidal timestep embedding)")
        if not 0.0 <= float(self.dropout) < 1.0:
            problems.append("dropout must be in [0, 1)")
        if problems:
            raise AdapterFileError("copy config", "; ".join(problems),
                                   "use CopyUNetConfig.sd15() or a consistent custom config")

    @property
    def level_channels(self) -> tuple[int, int, int, int]:
        """Widths of levels 0, 1, 2 and the middle level (3)."""
        c = [self.model_channels * m for m in self.channel_mult]
        return (c[0], c[1], c[2], c[2])

    @classmethod
    def sd15(cls) -> "CopyUNetConfig":
        """The SD1.5 copy: widths 320/640/1280/1280, 8 heads, context 768."""
        return cls()

    @classmethod
    def tiny(cls) -> "CopyUNetConfig":
        """A few-channel copy for tests: widths 32/64/128/128, 2 heads, context 32."""
        return cls(model_channels=32, num_heads=2, context_dim=32, time_embed_dim=128, groups=8)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists instead of tuples)."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CopyUNetConfig":
        """Inverse of :meth:`to_dict`; unknown or ill-typed keys raise :class:`AdapterFileError`."""
        if not isinstance(d, Mapping):
            raise AdapterFileError("copy config", f"expected a JSON object, got {type(d).__name__}",
                                   "re-save the adapter with this P3S version")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise AdapterFileError("copy config", f"unknown fields {unknown}",
                                   "update the P3S pack or re-train the adapter")
        kwargs: dict[str, Any] = {}
        try:
            for k, v in d.items():
                if k == "channel_mult":
                    kwargs[k] = tuple(int(x) for x in v)
                elif k == "dropout":
                    kwargs[k] = float(v)
                else:
                    if isinstance(v, bool) or int(v) != v:
                        raise ValueError(f"{k}={v!r} is not an integer")
                    kwargs[k] = int(v)
        except (TypeError, ValueError) as exc:
            raise AdapterFileError("copy config", f"invalid value ({exc})",
                                   "re-save the adapter with this P3S version") from exc
        return cls(**kwargs)


_ORIGINAL_ATTN1 = (
    [("input", 1, 0), ("input", 2, 0), ("input", 4, 1), ("input", 5, 1), ("input", 7, 2),
     ("input", 8, 2), ("middle", 0, 3)]
    + [("output", i, 2) for i in (3, 4, 5)]
    + [("output", i, 1) for i in (6, 7, 8)]
    + [("output", i, 0) for i in (9, 10, 11)]
)


def layer_key(block: Sequence[Any], transformer_index: int = 0) -> str:
    """ComfyUI ``extra_options["block"]`` (e.g. ``("input", 4)``) -> layer-map key ``"input_4"``.

    ``transformer_index`` is 0 for all SD1.5 layers (depth 1); other indices get a ``_t<i>`` suffix
    and so match no entry of the layer map.
    """
    key = f"{block[0]}_{int(block[1])}"
    return key if int(transformer_index) == 0 else f"{key}_t{int(transformer_index)}"


def layer_map(config: CopyUNetConfig | None = None) -> list[dict[str, Any]]:
    """The 16 SD1.5 self-attention targets, in UNet execution order, as JSON-friendly dicts:
    ``{"key", "block": [name, id], "transformer_index", "level" (0..2, 3 = middle),
    "downscale" (1, 2, 4, 8), "channels"}``."""
    config = config or CopyUNetConfig.sd15()
    out = []
    for name, idx, level in _ORIGINAL_ATTN1:
        out.append({"key": layer_key((name, idx)), "block": [name, idx], "transformer_index": 0,
                    "level": level, "downscale": 2 ** level,
                    "channels": config.level_channels[level]})
    return out


#: The SD1.5 layer map (see :func:`layer_map`).
LAYER_MAP: list[dict[str, Any]] = layer_map(CopyUNetConfig.sd15())


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
                       ) -> torch.Tensor:
    """LDM sinusoidal embedding [B] -> [B, dim]: ``cat([cos(t f), sin(t f)])`` with
    ``f_j = exp(-ln(max_period) j / (dim/2))``, computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """LDM ResBlock: ``skip(x) + out_layers(in_layers(x) + emb_layers(emb))`` (keys as LDM)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 groups: int = 32, dropout: float = 0.0, operations=None):
        super().__init__()
        ops = check_operations(operations)
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(ops.GroupNorm(groups, channels, eps=1e-5), nn.SiLU(),
                                       ops.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(ops.GroupNorm(groups, out_channels, eps=1e-5), nn.SiLU(),
                                        nn.Dropout(dropout),
                                        ops.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else ops.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """LDM attention: ``to_q``/``to_k``/``to_v`` (no bias), ``to_out.0`` (bias); heads split the
    width. ``forward(..., return_probs=True)`` also returns the head-averaged probabilities
    ``softmax(QK^T/sqrt(d))`` [B, Nq, Nk]."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0, operations=None):
        super().__init__()
        ops = check_operations(operations)
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = ops.Linear(query_dim, inner, bias=False)
        self.to_k = ops.Linear(context_dim, inner, bias=False)
        self.to_v = ops.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner, query_dim), nn.Dropout(dropout))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                return_probs: bool = False):
        context = x if context is None else context
        q, k, v = (self._split(self.to_q(x)), self._split(self.to_k(context)),
                   self._split(self.to_v(context)))
        probs = None
        if return_probs:
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(self.dim_head),
                                  dim=-1)
            out = probs.to(v.dtype) @ v
            probs = probs.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        out = self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))
        return (out, probs) if return_probs else out


class _GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, operations=None):
        super().__init__()
        self.proj = check_operations(operations).Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, operations=None):
        super().__init__()
        self.net = nn.Sequential(_GEGLU(dim, dim * mult, operations), nn.Dropout(dropout),
                                 check_operations(operations).Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """LDM block: self-attention, cross-attention to the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float = 0.0, operations=None):
        super().__init__()
        ops = check_operations(operations)
        d_head = dim // heads
        self.attn1 = CrossAttention(dim, None, heads, d_head, dropout, ops)
        self.ff = _FeedForward(dim, 4, dropout, ops)
        self.attn2 = CrossAttention(dim, context_dim, heads, d_head, dropout, ops)
        self.norm1, self.norm2, self.norm3 = ops.LayerNorm(dim), ops.LayerNorm(dim), ops.LayerNorm(dim)

    def self_part(self, x: torch.Tensor) -> torch.Tensor:
        """The self-attention half: it reads no text context, so rows with equal input share it."""
        return self.attn1(self.norm1(x)) + x

    def forward(self, x: torch.Tensor, context: torch.Tensor, return_attn: bool = False,
                expand: torch.Tensor | None = None, sink: list | None = None):
        """``expand`` (a row index): ``x`` holds only the distinct rows; the self-attention runs on
        them and its output is expanded to the full batch before the text cross-attention.
        ``sink``: a list that receives the attn2 output (before its residual; the cross-attention
        enhancement's input)."""
        x = self.self_part(x)
        if expand is not None:
            x = x.index_select(0, expand)
        probs = None
        if return_attn:
            a, probs = self.attn2(self.norm2(x), context, return_probs=True)
        else:
            a = self.attn2(self.norm2(x), context)
        if sink is not None:
            sink.append(a)
        x = a + x
        x = self.ff(self.norm3(x)) + x
        return (x, probs) if return_attn else x


class SpatialTransformer(nn.Module):
    """LDM SpatialTransformer (conv proj_in/proj_out, depth 1): ``x + proj_out(blocks(proj_in(norm x)))``."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int = 32,
                 dropout: float = 0.0, operations=None):
        super().__init__()
        ops = check_operations(operations)
        self.norm = ops.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = ops.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim, dropout, ops)])
        self.proj_out = ops.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, return_attn: bool = False,
                expand: torch.Tensor | None = None, sink: list | None = None):
        """``expand``, ``sink``: see :meth:`BasicTransformerBlock.forward` (``x`` holds the distinct
        rows; the output has the full batch)."""
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        if expand is not None:
            x = x.index_select(0, expand)
        b, c, h, w = x.shape
        probs = None
        for i, blk in enumerate(self.transformer_blocks):
            e = expand if i == 0 else None
            if return_attn:
                t, probs = blk(t, context, return_attn=True, expand=e, sink=sink)
            else:
                t = blk(t, context, expand=e, sink=sink)
        out = x + self.proj_out(t.transpose(1, 2).reshape(b, c, h, w))
        return (out, probs) if return_attn else out


class Downsample(nn.Module):
    """LDM Downsample: ``op`` = Conv3x3, stride 2, padding 1 (output size ceil(h/2))."""

    def __init__(self, channels: int, operations=None):
        super().__init__()
        self.op = check_operations(operations).Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


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
        """``F_level(x_t + I'', c, t)`` for the 4 levels: list of [B, C_l, h_l, w_l] (before the
        zero convs); with ``return_attn_map`` also the level-0 attn2 map [B, h*w, tokens].
        ``cross_sink``: a list that receives each level's attn2 output [B, h_l*w_l, C_l] (in order).
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
        for i, (level, down) in enumerate(zip(self.levels, self.downs)):
            h = level.res(h, emb)
            e = inv if i == 0 else None
            if i == 0 and return_attn_map:
                h, amap = level.st(h, context, return_attn=True, expand=e, sink=cross_sink)
            else:
                h = level.st(h, context, expand=e, sink=cross_sink)
            if i == 0 and inv is not None:
                emb = emb.index_select(0, inv)
            feats.append(h)
            h = down(h)
        h = self.middle.res(h, emb)
        h = self.middle.st(h, context, sink=cross_sink)
        feats.append(h)
        return (feats, amap) if return_attn_map else feats

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                ref: torch.Tensor | None = None, return_attn_map: bool = False,
                dtype: torch.dtype | None = None, cross: bool = True) -> dict[str, torch.Tensor]:
        """Eq. 6 for all 16 layers. ``x_t`` [B,4,h,w], ``timesteps`` [B] (0..999, float),
        ``context`` [B,77,768], ``ref`` = I'' [B,4,h,w] (already at x_t's size; None = no
        reference). Returns ``{key: [B, h_l*w_l, C_l]}``; with ``return_attn_map`` the dict also
        holds ``ATTN_MAP_KEY`` -> the level-0 transformer's attn2 probabilities averaged over heads
        [B, h*w, 77]. That copy layer (320 wide, full latent resolution) is the counterpart of the
        original UNet's LAST cross-attention layer (``output_blocks.11``), used by the attention
        consistency loss (Eq. 11-13). ``dtype``: see :meth:`level_features`. With the cross-attention
        enhancement (``enhancement="cross"`` and ``cross``) the dict also holds ``cross_key(key)`` ->
        ``cross_zero_convs[key]`` of the level's attn2 output [B, h_l*w_l, C_l] for every layer."""
        heads = getattr(self, "cross_zero_convs", None) if cross else None
        sink = [] if heads is not None else None
        res = self.level_features(x_t, timesteps, context, ref, return_attn_map, dtype, sink)
        feats, amap = res if return_attn_map else (res, None)
        out: dict[str, torch.Tensor] = {}
        for e in self.layer_map:
            # Z_i, the 1x1 conv, called as a layer (its family may cast its weight), as tokens
            # [B, h*w, C] in ComfyUI's layout (a transposed view).
            out[e["key"]] = self.zero_convs[e["key"]](feats[e["level"]]).flatten(2).transpose(1, 2)
            if heads is not None:
                out[cross_key(e["key"])] = heads[e["key"]](sink[e["level"]])
        if return_attn_map:
            out[ATTN_MAP_KEY] = amap
        return out
