"""The ComfyUI engine: the attention kernel the extended self-attention takes (Eq. 8, issue 14), and
user-facing names of other nodes' attention patches."""
from __future__ import annotations

import torch

_KNOWN_PATCHES = {
    "nodes_hypertile": "HyperTile", "nodes_tomesd": "TomePatchModel (ToMe)",
    "nodes_hypernetwork": "Load Hypernetwork", "nodes_pag": "Perturbed-Attention Guidance",
    "nodes_sag": "Self-Attention Guidance", "nodes_nag": "Normalized Attention Guidance",
}


def describe_patch(fn) -> str:
    """A user-facing name for another node's attention patch: the core node, or module.function."""
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    for key, node in _KNOWN_PATCHES.items():
        if key in (mod or ""):
            return f"'{node}'"
    return f"the attention patch {mod}.{name}"


class ExtendedAttentionRoute:
    """ComfyUI ``optimized_attention_override`` for one P3S model call (Eq. 8's kernel, issue 14).

    When ComfyUI runs its sub-quadratic kernel (its CPU default, chunked ``baddbmm`` + softmax),
    the self-attention calls whose keys P3S extended go through ComfyUI's own PyTorch SDPA kernel
    instead (the same softmax(QK^T/sqrt d)V, fused: no [queries x keys] matrix written to memory);
    every other call (the plain layers, cross-attention, masked calls) reaches the kernel ComfyUI
    picked, or another node's override, unchanged. The attn1 patch announces the (batch, key
    tokens) of the call it extended; only a call of exactly that shape is routed.
    """

    #: class switch (benchmark "speed-ups off", tests); routed kernels by ComfyUI function name
    enabled = True
    KERNELS = ("attention_sub_quad",)

    def __init__(self, previous=None):
        self.previous = previous
        self.expect = None
        self.routed = 0

    def __call__(self, func, *args, **kwargs):
        expect, k = self.expect, (args[1] if len(args) > 1 else None)
        if (expect is not None and len(args) == 4 and isinstance(k, torch.Tensor) and k.dim() == 3
                and (k.shape[0], k.shape[1]) == expect and kwargs.get("mask") is None
                and not kwargs.get("skip_reshape", False) and getattr(func, "__name__", "") in self.KERNELS):
            import comfy.ldm.modules.attention as attention

            self.expect = None
            self.routed += 1
            return attention.attention_pytorch(*args, **kwargs)
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)
