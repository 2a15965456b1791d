"""Layer families for the copy and the encoder, handed to their constructors as ComfyUI's own
``UNetModel`` takes ``operations``: a namespace with ``Linear``, ``Conv2d``, ``GroupNorm`` and
``LayerNorm`` (the four layer types with weights in :mod:`.copy_unet` and :mod:`.encoder`).

* :class:`TorchOps` (the default; ``torch.nn`` itself is taken as it): plain torch.nn layers; they
  compute in their weights' dtype and device.
* :class:`CastOps`: the same layers, casting their weight and bias to the input's dtype and device
  at every call. The weights stay where they are (fp32 master weights; no second copy in memory)
  and the layer computes in the dtype of what it is given (fp16 / bf16 beside a half-precision
  UNet). The diffusers engine uses it; the ComfyUI engine uses ComfyUI's own families
  (``comfy.ops``), which do the same and also let ComfyUI's lowvram load cast layer by layer.

A model built with one family shares its parameters with a twin built with another
(:meth:`p3s_core.adapter.P3SAdapter.with_operations`): same tensors, another way of calling them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelMismatchError

__all__ = ["OPERATION_NAMES", "CastOps", "TorchOps", "check_operations"]

#: The layer types a family must provide (their constructors take torch.nn's arguments).
OPERATION_NAMES = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")


class TorchOps:
    """The plain torch.nn layers, as a class (a model keeps its family as an attribute, and a class,
    unlike the ``torch.nn`` module, survives ``copy.deepcopy`` of the model: ComfyUI 0.3.75 deep-copies
    a MODEL's patches, and with them the adapter, on every ``clone()``)."""

    Linear, Conv2d, GroupNorm, LayerNorm = nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm


def check_operations(operations):
    """``operations`` (None or ``torch.nn`` = :class:`TorchOps`) if it provides every layer of
    :data:`OPERATION_NAMES`, each a subclass of the torch.nn layer of that name; else
    :class:`ModelMismatchError`."""
    if operations is None or operations is nn:
        return TorchOps
    bad = [n for n in OPERATION_NAMES
           if not (isinstance(getattr(operations, n, None), type) and issubclass(getattr(operations, n), getattr(nn, n)))]
    if bad:
        raise ModelMismatchError("operations", f"{getattr(operations, '__name__', type(operations).__name__)} "
                                 f"lacks torch.nn-compatible {', '.join(bad)}",
                                 "pass torch.nn, p3s_core.operations.CastOps or a ComfyUI comfy.ops family")
    return operations


def _cast(layer: nn.Module, x: torch.Tensor):
    w = layer.weight.to(device=x.device, dtype=x.dtype) if layer.weight is not None else None
    b = layer.bias.to(device=x.device, dtype=x.dtype) if layer.bias is not None else None
    return w, b


class CastOps:
    """torch.nn layers that compute in the input's dtype on the input's device (weights cast per call)."""

    class Linear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, *_cast(self, x))

    class Conv2d(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, *_cast(self, x))

    class GroupNorm(nn.GroupNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.group_norm(x, self.num_groups, *_cast(self, x), self.eps)

    class LayerNorm(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.normalized_shape, *_cast(self, x), self.eps)
