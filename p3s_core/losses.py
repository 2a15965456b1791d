"""Training losses (paper Sec. III, Eq. 11-15).

* :func:`attention_probs` -- Eq. 13 cross-attention maps ``softmax(Q K^T / sqrt(d))``.
* :func:`attention_consistency_loss` -- Eq. 11-12 ``L_ac`` (default: summed squared difference over
  the mean map mass; ``reading="literal"``: ``MSE(M_c, M_o) / avg`` as printed).
* :func:`ldm_loss` -- Eq. 14 ``||eps - eps_theta||^2``.
* :func:`total_loss` -- Eq. 15 ``L = L_LDM + gamma L_ac``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import P3SError, TrainingConfigError

__all__ = [
    "LossInputError",
    "attention_probs",
    "attention_consistency_loss",
    "ldm_loss",
    "total_loss",
    "DEFAULT_GAMMA",
    "AC_READINGS",
]

#: How Eq. 11-12 is normalised. ``"mass"`` (default): ``sum((M_c - M_o)^2) / avg``, the mean
#: per-query squared distance between the two attention distributions; ``"literal"``: the
#: equations as printed, ``mean((M_c - M_o)^2) / avg`` (about 1e-9 at 512^2: no effect).
AC_READINGS = ("mass", "literal")

#: Eq. 15's gamma (paper: 0.1).
DEFAULT_GAMMA = 0.1


class LossInputError(P3SError):
    """Tensors handed to a loss with shapes that cannot be compared."""


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Eq. 13: ``softmax(Q K^T / sqrt(d))`` per head, ``[B, heads, Nq, Nk]``.

    ``q`` is ``[B, Nq, C]`` and ``k`` is ``[B, Nk, C]`` (already projected by ``W_Q`` / ``W_K``), with
    ``C`` split into ``heads`` heads of width ``d = C / heads``. Half-precision inputs are computed
    and returned in float32 (softmax of fp16 logits loses the small probabilities the loss compares).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise LossInputError("q", f"expected [B, Nq, C], got {_shape(q)}", "pass projected queries")
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise LossInputError("k", f"expected [B, Nk, C], got {_shape(k)}", "pass projected keys")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise LossInputError("k", f"keys {_shape(k)} do not match queries {_shape(q)} in batch or "
                             "channels", "project queries and keys of the same layer and batch")
    heads = int(heads)
    if heads < 1 or q.shape[2] % heads:
        raise LossInputError("heads", f"{heads} heads do not divide the width {q.shape[2]}",
                             "use the layer's own head count")
    if q.dtype in (torch.float16, torch.bfloat16):
        q, k = q.float(), k.float()
    b, nq, c = q.shape
    nk = k.shape[1]
    d = c // heads
    qh = q.reshape(b, nq, heads, d).transpose(1, 2)
    kh = k.reshape(b, nk, heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)


def _resize_queries(m: torch.Tensor, hw_from: tuple[int, int], hw_to: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample the query-token axis (-2) of ``[..., H*W, Nk]`` maps to another grid."""
    lead = m.shape[:-2]
    nk = m.shape[-1]
    h0, w0 = hw_from
    h1, w1 = hw_to
    x = m.reshape(-1, h0, w0, nk).permute(0, 3, 1, 2)  # [L, Nk, H, W]
    x = F.interpolate(x, size=(h1, w1), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(*lead, h1 * w1, nk)


def _hw(name: str, hw, tokens: int) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise LossInputError(name, f"{hw!r} is not a (height, width) pair",
                             "pass the latent grid of the map as (h, w)") from None
    if h < 1 or w < 1 or h * w != tokens:
        raise LossInputError(name, f"grid {h}x{w} does not hold the map's {tokens} query tokens",
                             "pass the spatial grid the attention layer ran at")
    return h, w


def attention_consistency_loss(
    m_c: torch.Tensor,
    m_o: torch.Tensor,
    eps: float = 1e-12,
    hw_c: Sequence[int] | None = None,
    hw_o: Sequence[int] | None = None,
    reading: str = "mass",
) -> torch.Tensor:
    """Eq. 11-12: ``L_ac = D(M_c, M_o) / avg`` with ``avg = (Sum(M_c) + Sum(M_o)) / 2``.

    ``m_c`` is the last cross-attention map of the trainable copy, ``m_o`` the original UNet's, both
    ``[..., Nq, Nk]`` (e.g. ``[B, heads, Nq, Nk]`` from :func:`attention_probs`), query axis = image
    tokens (-2), key axis = text tokens (-1).

    Decisions:
        * ``reading="mass"`` (default): ``D`` is the *summed* squared difference. For softmax maps
          ``avg`` is the number of query rows, so the loss is the mean per-query squared distance
          between the two attention distributions: independent of the resolution and of the
          number of text tokens, about 1e-2..1e-1 for maps that differ, so gamma = 0.1 gives a
          gradient the optimiser sees. This is the reading that can give the paper's ablation gains
          (Tables II, IV).
        * ``reading="literal"``: ``D`` is the MSE (mean over every element) as Eq. 11 prints it; the
          loss is then divided by the element count once more (Nq * Nk * rows, about 3e5 at 512^2),
          about 1e-9, and its gradient falls below AdamW's eps: kept for comparison.
        * ``avg`` is clamped below by ``eps``.
        * Maps of different spatial sizes: pass ``hw_c`` and ``hw_o`` (the (h, w) grids of the
          query tokens) and ``M_c`` is resized bilinearly over the query grid to ``M_o``'s. Bilinear
          weights are convex, so the resized rows still sum to 1.
        * Neither map is detached; detach ``m_o`` yourself if only the copy should learn.
    """
    if reading not in AC_READINGS:
        raise LossInputError("reading", f"{reading!r} is not one of {AC_READINGS}",
                             "use 'mass' (default) or 'literal' (Eq. 11-12 as printed)")
    if not isinstance(m_c, torch.Tensor) or m_c.dim() < 2:
        raise LossInputError("m_c", f"expected an attention map [..., Nq, Nk], got {_shape(m_c)}",
                             "pass the copy's last cross-attention probabilities")
    if not isinstance(m_o, torch.Tensor) or m_o.dim() < 2:
        raise LossInputError("m_o", f"expected an attention map [..., Nq, Nk], got {_shape(m_o)}",
                             "pass the original UNet's last cross-attention probabilities")
    if (hw_c is None) != (hw_o is None):
        raise LossInputError("hw_c/hw_o", "only one of the two spatial grids was given",
                             "pass both hw_c and hw_o, or neither when the maps have the same size")
    if hw_c is not None:
        gc = _hw("hw_c", hw_c, m_c.shape[-2])
        go = _hw("hw_o", hw_o, m_o.shape[-2])
        if gc != go:
            m_c = _resize_queries(m_c, gc, go)
    if m_c.shape != m_o.shape:
        raise LossInputError(
            "m_c", f"copy attention map {_shape(m_c)} does not match the original's {_shape(m_o)}",
            "take both maps from the same (last) cross-attention layer with the same heads and "
            "prompt; pass hw_c and hw_o when only the spatial grid differs")
    sq = (m_c - m_o) ** 2
    diff = sq.sum() if reading == "mass" else sq.mean()
    avg = (m_c.sum() + m_o.sum()) / 2
    return diff / avg.clamp_min(float(eps))


def ldm_loss(noise: torch.Tensor, noise_pred: torch.Tensor) -> torch.Tensor:
    """Eq. 14: ``E ||eps - eps_theta(x_t, t, c)||^2`` as the mean squared error over all elements.

    Shapes must match exactly (no broadcasting). Computed in float32.
    """
    if not isinstance(noise, torch.Tensor) or not isinstance(noise_pred, torch.Tensor):
        raise LossInputError("noise_pred", "noise and prediction must be tensors",
                             "pass the sampled noise and the UNet's prediction")
    if noise.shape != noise_pred.shape:
        raise LossInputError("noise_pred", f"prediction {_shape(noise_pred)} does not match the "
                             f"noise {_shape(noise)}", "predict noise for the same latent batch")
    return F.mse_loss(noise_pred.float(), noise.float(), reduction="mean")


def total_loss(l_ldm: torch.Tensor, l_ac: torch.Tensor, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """Eq. 15: ``L = L_LDM + gamma * L_ac`` (paper gamma = 0.1; 0 disables the consistency loss)."""
    g = float(gamma)
    if not math.isfinite(g) or g < 0:
        raise TrainingConfigError("gamma", f"{gamma!r} is not a finite number >= 0",
                                  "use gamma = 0.1 (paper) or 0 to disable the attention loss")
    return l_ldm + g * l_ac


# --- the copy's cross-attention maps (M_c of Eq. 11), read by both engines' training steps ---------
def _probs_of(attn, x, context) -> torch.Tensor:
    """Head-averaged cross-attention map of a copy ``CrossAttention`` for inputs ``x``/``context``."""
    q = attn.to_q(x)
    k = attn.to_k(context)
    return attention_probs(q, k, attn.heads).mean(dim=1)


@contextlib.contextmanager
def copy_attention_hooks(adapter, sink: dict):
    """Forward hooks on the copy's cross-attention layers (4, or 16 in the "full" layout) writing
    ``sink[feature index] = map`` (:func:`~p3s_core.copy_config.feature_index` of a layer-map entry
    names the map that layer's loss term reads)."""
    mods = [st.transformer_blocks[0].attn2 for st in adapter.copy.feature_transformers()]
    handles = []
    for index, mod in enumerate(mods):
        def hook(module, args, output, index=index):
            x, context = args[0], (args[1] if len(args) > 1 else args[0])
            sink[index] = _probs_of(module, x, context)
        handles.append(mod.register_forward_hook(hook))
    try:
        yield sink
    finally:
        for h in handles:
            h.remove()
