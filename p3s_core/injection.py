"""Self-attention condition injection (paper Sec. III, Eq. 7-8, with the Eq. 9 weight).

Eq. 7: ``Q = W_Q z``, ``K' = W_K [z, f]``, ``V' = W_V [z + lam f, f]`` (``[.,.]`` = concatenation on
the token axis), Eq. 8: ``softmax(Q K'^T / sqrt(d)) V'``; Eq. 9 scales the copy feature ``f`` by the
schedule weight ``eps_t`` first.

ComfyUI's ``attn1`` patch receives ``n`` (the normed hidden state ``z``) and returns
``(n, context, value)``; the attention then takes ``Q`` from ``n``, ``K`` from ``context`` and ``V``
from ``value``. :func:`injected_context_value` builds exactly that ``(context, value)`` pair, so the
ComfyUI backend only has to call it. This module is pure torch (no ComfyUI import).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import P3SError

__all__ = [
    "InjectionInputError",
    "injected_context_value",
    "interleave_slots",
    "append_kv_slot",
    "reference_attention",
    "enhanced_cross_output",
    "DEFAULT_LAMBDA",
]

#: Eq. 7's lambda (paper: 0.2).
DEFAULT_LAMBDA = 0.2


class InjectionInputError(P3SError):
    """A copy feature, weight or row mask that cannot be injected into this self-attention layer."""


def _row_weights(weight, batch: int, like: torch.Tensor) -> torch.Tensor | float:
    """Normalise ``weight`` to a python float or a ``[B]`` tensor on ``like``'s device/dtype."""
    if isinstance(weight, torch.Tensor):
        if weight.dim() == 0:
            w = float(weight.item())
        else:
            if weight.dim() != 1 or weight.shape[0] != batch:
                raise InjectionInputError(
                    "weight", f"weight tensor has shape {tuple(weight.shape)} but the batch has {batch} "
                    "rows", "pass a float or a 1-D tensor with one weight per batch row")
            wt = weight.to(device=like.device, dtype=like.dtype)
            if not bool(torch.isfinite(wt).all()):
                raise InjectionInputError("weight", "the per-row weights contain NaN or inf",
                                          "check the P3S schedule settings")
            return wt
    elif isinstance(weight, (int, float)) and not isinstance(weight, bool):
        w = float(weight)
    else:
        raise InjectionInputError("weight", f"{type(weight).__name__} is not a number or tensor",
                                  "pass the schedule weight as a float or a [B] tensor")
    if not math.isfinite(w):
        raise InjectionInputError("weight", f"{w} is not finite", "check the P3S schedule settings")
    return w


def _check_pair(x, f, x_name: str, f_name: str, what: str, where: str) -> None:
    """``x`` a [B, N, C] tensor and ``f`` (a copy feature) of exactly its shape, else a typed error."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise InjectionInputError(x_name, f"expected a [B, N, C] {what}, got "
                                  f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}",
                                  f"call this from a {where}")
    if not isinstance(f, torch.Tensor) or tuple(f.shape) != tuple(x.shape):
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise InjectionInputError(
            f_name, f"copy feature shape {got} does not match the {what} "
            f"{tuple(x.shape)} [batch, tokens, channels]",
            "use the adapter trained for this base model and run the copy on the same latent batch "
            "and resolution as the sampler")


def _row_mask(active, batch: int, device: torch.device) -> torch.Tensor | None:
    if active is None:
        return None
    if isinstance(active, torch.Tensor):
        m = active
    elif isinstance(active, Sequence):
        m = torch.tensor([bool(a) for a in active])
    else:
        raise InjectionInputError("active", f"{type(active).__name__} is not a row mask",
                                  "pass None or a bool tensor / list with one entry per batch row")
    if m.dim() != 1 or m.shape[0] != batch:
        raise InjectionInputError(
            "active", f"row mask has shape {tuple(m.shape)} but the batch has {batch} rows",
            "pass one True/False per batch row (e.g. True for cond rows when only cond is injected)")
    return m.to(device=device, dtype=torch.bool)


def injected_context_value(
    z: torch.Tensor,
    f: torch.Tensor,
    weight: float | torch.Tensor,
    lam: float = DEFAULT_LAMBDA,
    active: torch.Tensor | Sequence[bool] | None = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context, value)`` for ComfyUI's attn1 so that attention computes Eq. 7-8.

    Args:
        z: normed hidden state of the original UNet's self-attention, ``[B, N, C]``.
        f: copy feature for this layer (Eq. 6 output), ``[B, N, C]``; cast to ``z``'s dtype/device.
        weight: Eq. 9-10 ``eps_t``: a float, or a ``[B]`` tensor (one weight per batch row).
        lam: Eq. 7 ``lambda``.
        active: optional bool ``[B]``: rows that receive the injection (e.g. only the cond rows of
            a CFG batch). ``None`` = every row.
        interleaved: return the per-token layout of :func:`interleave_slots` (``[z_0, f_0, z_1,
            f_1, ...]``) directly, one allocation per tensor instead of a concatenation and a copy.

    Returns:
        ``context = [z, eps f]`` and ``value = [z + lam eps f, eps f]`` concatenated on the token
        axis (``[B, 2N, C]``).

    Decisions (DESIGN.md):
        * If the effective weight is 0 for every row (or no row is active) this returns ``(z, z)``
          -- the very same tensor object, no concatenation -- so the model is bit-for-bit the plain
          model. Concatenating a zero ``f`` would not be a no-op: the extra keys add zero-logit
          tokens to the softmax.
        * In a mixed batch, rows that are inactive or have weight 0 get ``context = value =
          [z, z]``: duplicating every key/value pair doubles each softmax numerator and the
          denominator alike, so those rows compute the plain attention (up to float rounding) while
          the batch keeps one tensor shape.
        * ``f`` must match ``z`` in batch, token count and channels; anything else raises, since a
          mismatch could otherwise be folded silently into the batch by the attention kernel.
    """
    _check_pair(z, f, "z", "f", "self-attention hidden state", "self-attention (attn1) patch")
    lam_f = float(lam)
    if not math.isfinite(lam_f):
        raise InjectionInputError("lam", f"{lam!r} is not finite", "use lambda = 0.2 (paper)")
    batch = z.shape[0]
    w = _row_weights(weight, batch, z)
    mask = _row_mask(active, batch, z.device)

    # Fast path: one scalar weight, every row injected.
    if isinstance(w, float) and mask is None:
        if w == 0.0:
            return z, z
        fs = f.to(device=z.device, dtype=z.dtype) * w
        return _join(z, fs, torch.add(z, fs, alpha=lam_f), fs, interleaved)

    # Per-row path.
    if isinstance(w, float):
        w_rows = torch.full((batch,), w, device=z.device, dtype=z.dtype)
    else:
        w_rows = w
    on = w_rows != 0
    if mask is not None:
        on = on & mask
    if not bool(on.any()):
        return z, z
    fs = f.to(device=z.device, dtype=z.dtype) * w_rows.view(batch, 1, 1)
    context, value = _join(z, fs, torch.add(z, fs, alpha=lam_f), fs, interleaved)
    if bool(on.all()):
        return context, value
    plain = _join(z, z, z, z, interleaved)[0]
    keep = on.view(batch, 1, 1)
    return torch.where(keep, context, plain), torch.where(keep, value, plain)


def enhanced_cross_output(out: torch.Tensor, g: torch.Tensor, weight: float | torch.Tensor,
                          active: torch.Tensor | Sequence[bool] | None = None,
                          token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-attention enhancement (paper Fig. 3, Eq. 9 weight; issue 22): ``out + eps_t g``.

    ``out``: the original UNet's cross-attention (attn2) output ``[B, N, C]`` (after ``to_out``,
    before the residual); ``g``: the copy's attn2 output of the matching level through its zero
    convolution (:func:`~p3s_core.copy_unet.cross_key` entry of the copy's features), same shape;
    ``weight``: eps_t, a float or ``[B]``; ``active``: optional bool ``[B]`` (rows that receive it);
    ``token_weights``: optional ``[N]`` region weights in [0, 1] (the addition is scaled by them, so
    it is exactly 0 outside the region). Returns ``out`` itself when nothing is added (weight 0 or
    no active row): the plain model bit for bit.

    Decision (why added to the attn2 OUTPUT and not as extra keys/values of attn2): the paper adds
    "the hidden states ... in self and cross attention layers to the original model through a zero
    convolution" (Fig. 3); only the self-attention half is written as extra keys/values (Eq. 7).
    Extra K/V in attn2 would put image tokens beside the 77 text tokens of one softmax and change
    every cross-attention map (the one L_ac compares, Eq. 11-13) even at initialisation; an added
    zero-conv output is ControlNet's zero-convolution form, an exact no-op until trained, and keeps
    the text-attention maps as they are.
    """
    _check_pair(out, g, "out", "g", "cross-attention output", "cross-attention (attn2) output patch")
    batch = out.shape[0]
    w = _row_weights(weight, batch, out)
    mask = _row_mask(active, batch, out.device)
    if isinstance(w, float):
        if w == 0.0:
            return out
        rows = None if mask is None else mask.to(out.dtype) * w
    else:
        rows = w if mask is None else w * mask.to(out.dtype)
    if rows is not None and not bool((rows != 0).any()):
        return out
    scale = w if rows is None else rows.view(batch, 1, 1)
    if token_weights is not None:
        tw = token_weights.to(device=out.device, dtype=out.dtype).reshape(1, -1, 1)
        if tw.shape[1] != out.shape[1]:
            raise InjectionInputError("token_weights", f"{tw.shape[1]} region weights for {out.shape[1]} tokens",
                                      "compute the region weights on this layer's token grid")
        scale = tw * scale
    return out + g.to(device=out.device, dtype=out.dtype) * scale


def _join(k0: torch.Tensor, k1: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, interleaved: bool):
    """``([k0, k1], [v0, v1])`` on the token axis, concatenated or per token interleaved
    (:func:`interleave_slots` of the concatenation, built in one pass)."""
    if not interleaved:
        return torch.cat([k0, k1], dim=1), torch.cat([v0, v1], dim=1)
    b, n, c = k0.shape
    return (torch.stack([k0, k1], dim=2).reshape(b, 2 * n, c),
            torch.stack([v0, v1], dim=2).reshape(b, 2 * n, c))


def interleave_slots(x: torch.Tensor, slots: int) -> torch.Tensor:
    """``[B, S*N, C]`` in concatenated layout ``[s_0 | s_1 | ...]`` -> per-token interleaved layout
    ``[s_0[0], s_1[0], ..., s_0[1], s_1[1], ...]``.

    Eq. 8 is invariant to one permutation applied to both K' and V', so this changes nothing on its
    own. It matters when another patch folds K/V into tiles by a plain reshape (ComfyUI's HyperTile
    tiles the queries and the attention kernel then splits K/V into contiguous chunks): with the
    per-token layout each chunk holds the same tokens' ``z`` *and* ``f``, i.e. Eq. 7 within the tile.
    """
    b, t, c = x.shape
    if slots <= 1:
        return x
    return x.reshape(b, slots, t // slots, c).transpose(1, 2).reshape(b, t, c)


def append_kv_slot(context: torch.Tensor, value: torch.Tensor, wf: torch.Tensor, lam: float, slots: int,
                   plain_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 on K/V that another patch already produced, in the per-token layout of
    :func:`interleave_slots` with ``slots`` entries per token (slot 0 = the layer's own ``z`` part):
    ``K' = [.., f]`` and ``V' = [v_0 + lam f, .., f]`` per token, ``wf`` being ``eps_t f`` ``[B, N, C]``.

    Used when the attn1 inputs are not the plain ``(z, z)``: after a second P3S injector (``slots``
    > 1) or a patch that rewrote K/V per token (a hypernetwork). Rows in ``plain_rows`` (bool
    ``[B]``) get slot 0 duplicated instead when ``slots == 1`` (the exact ``[z, z]`` no-op of
    :func:`injected_context_value`) and a zero feature otherwise (close to, not exactly, a no-op).
    """
    b, t, c = context.shape
    n = t // slots
    ctx = context.reshape(b, n, slots, c)
    val = value.reshape(b, n, slots, c)
    f = wf.to(device=context.device, dtype=context.dtype).reshape(b, n, 1, c)
    if plain_rows is not None and slots > 1:
        f = f * (~plain_rows).to(f.dtype).view(-1, 1, 1, 1)
    new_ctx = torch.cat([ctx, f], dim=2)
    new_val = torch.cat([val[:, :, :1] + float(lam) * f, val[:, :, 1:], f], dim=2)
    if plain_rows is not None and slots == 1 and bool(plain_rows.any()):
        keep = plain_rows.view(-1, 1, 1, 1)
        new_ctx = torch.where(keep, torch.cat([ctx, ctx], dim=2), new_ctx)
        new_val = torch.where(keep, torch.cat([val, val], dim=2), new_val)
    return new_ctx.reshape(b, n * (slots + 1), c), new_val.reshape(b, n * (slots + 1), c)


def reference_attention(
    z: torch.Tensor,
    f: torch.Tensor | None,
    Wq: torch.Tensor,
    Wk: torch.Tensor,
    Wv: torch.Tensor,
    heads: int,
    lam: float = DEFAULT_LAMBDA,
) -> torch.Tensor:
    """Explicit Eq. 7-8 for tests: multi-head ``softmax(Q K'^T / sqrt(d)) V'`` (no out projection).

    ``Q = z Wq^T``, ``K' = [z, f] Wk^T``, ``V' = [z + lam f, f] Wv^T`` with ``W*`` of shape
    ``[inner, C]`` (``torch.nn.Linear`` weights) and ``d = inner / heads``. ``f = None`` gives the
    plain self-attention. ``f`` is used as given (scale it by ``eps_t`` first for Eq. 9).
    Returns ``[B, N, inner]``.
    """
    if f is None:
        k_in, v_in = z, z
    else:
        k_in = torch.cat([z, f], dim=1)
        v_in = torch.cat([z + lam * f, f], dim=1)
    q = z @ Wq.t()
    k = k_in @ Wk.t()
    v = v_in @ Wv.t()
    b, nq, inner = q.shape
    if inner % heads:
        raise InjectionInputError("heads", f"inner width {inner} is not divisible by {heads} heads",
                                  "use a head count that divides the projection width")
    d = inner // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, x.shape[1], heads, d).permute(0, 2, 1, 3)

    qh, kh, vh = split(q), split(k), split(v)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = probs @ vh
    return out.permute(0, 2, 1, 3).reshape(b, nq, inner)


# --- token grids (which layer a token map belongs to; another node may change it) ------------------
def token_grid(n_tokens: int, original_shape):
    """The (h, w) grid of a layer's ``n_tokens`` in a UNet whose input latent is ``original_shape``
    (each level halves the size, rounding up as the stride-2 convs do); None if no level fits."""
    h0, w0 = int(original_shape[-2]), int(original_shape[-1])
    for ds in (1, 2, 4, 8, 16, 32):
        h, w = -(-h0 // ds), -(-w0 // ds)
        if h * w == n_tokens:
            return h, w
    return None


def resize_tokens(f: torch.Tensor, n_tokens: int, original_shape) -> torch.Tensor | None:
    """Resize a [B, T, C] token map to ``n_tokens`` when another patch (e.g. Kohya Deep Shrink)
    changed the layer's grid; None when either grid cannot be inferred."""
    if len(original_shape) < 2:
        return None
    src, dst = token_grid(f.shape[1], original_shape), token_grid(n_tokens, original_shape)
    if src is None or dst is None:
        return None
    b, t, c = f.shape
    grid = f.transpose(1, 2).reshape(b, c, *src)
    grid = torch.nn.functional.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


def pooled_tokens(f: torch.Tensor, original_shape) -> torch.Tensor | None:
    """2x2 average pool of a [B, h*w, C] level token map (None when the grid is unknown or odd)."""
    grid = token_grid(f.shape[1], original_shape) if len(original_shape) >= 2 else None
    if grid is None or grid[0] % 2 or grid[1] % 2:
        return None
    b, _, c = f.shape
    pooled = torch.nn.functional.avg_pool2d(f.transpose(1, 2).reshape(b, c, *grid), 2)
    return pooled.flatten(2).transpose(1, 2)
