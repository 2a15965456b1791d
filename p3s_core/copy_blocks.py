"""The LDM building blocks of the trainable copy (paper Sec. III-B, Eq. 6), in the original LDM
module and parameter names so that the copy is initialised from the base UNet key by key: the
timestep embedding, ResBlock, (cross-)attention, transformer block, SpatialTransformer, Downsample.
Used by the encoder half (:mod:`.copy_unet`) and the decoder half (:mod:`.copy_decoder`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .operations import check_operations

__all__ = ["timestep_embedding", "ResBlock", "CrossAttention", "BasicTransformerBlock",
           "SpatialTransformer", "Downsample"]


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
