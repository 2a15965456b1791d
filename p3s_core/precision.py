"""Training precision (paper Sec. IV-A trains in full precision; users train on fp16/bf16 GPUs).

Which arithmetic one training step (Eq. 11-15) runs in, decided once per run from the device, the
user's choice and the frozen UNet's dtype, and reported in the progress text and the adapter's
metadata:

* ``auto`` on a GPU with bfloat16 (Ampere and later): the forward under bf16 autocast. bf16 has
  fp32's exponent range, so gradients do not underflow and no loss scaling is needed.
* ``auto`` on an fp16-only GPU (T4, V100, RTX 20xx): fp16 autocast, the adapter's weights stay fp32
  (the master weights the optimiser updates) and the loss is scaled dynamically
  (``torch.amp.GradScaler``): a step whose scaled gradients overflow is skipped (counted) and the
  scale halves; small gradients that would underflow to zero in fp16 are kept.
* ``fp32``, or any run on the CPU: no autocast. Loss scaling is still used when the frozen UNet
  itself is fp16 (``--fp16-unet``): the backward then runs through fp16 activations.
* TF32 for fp32 matrix products and convolutions wherever the GPU has it (Ampere and later).

Separately from overflow, a run whose adapter gradients are all exactly zero for
:data:`ZERO_GRAD_STEPS` steps in a row has stopped learning (fp16 underflow without scaling, a
broken graph): the loop stops with a clear error (:class:`GradientWatch`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

#: the user's choices (the Trainer node's ``precision`` input, the command line's ``--precision``)
PRECISIONS = ("auto", "fp32")
#: this many consecutive steps with all adapter gradients exactly zero stop the run
ZERO_GRAD_STEPS = 5


@dataclass(frozen=True)
class TrainingPrecision:
    """The arithmetic of a run: autocast dtype (None = none), dynamic loss scaling, TF32."""

    choice: str = "fp32"
    device_type: str = "cpu"
    autocast_dtype: torch.dtype | None = None
    loss_scaling: bool = False
    tf32: bool = False

    def describe(self) -> str:
        """A short text for the progress text and the adapter metadata, e.g. ``bf16 autocast``."""
        parts = [{None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
                 [self.autocast_dtype]]
        if self.loss_scaling:
            parts.append("dynamic loss scaling")
        if self.tf32:
            parts.append("TF32 matmuls")
        return ", ".join(parts)

    def autocast(self):
        """The context one forward pass runs in."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def matmul_mode(self):
        """TF32 on for the run where chosen; the previous global settings are restored after."""
        if not self.tf32:
            yield
            return
        prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev

    def grad_scaler(self):
        """A ``torch.amp.GradScaler`` for this run, or None without loss scaling."""
        if not self.loss_scaling:
            return None
        return torch.amp.GradScaler(self.device_type)


def resolve_precision(device, choice: str = "auto", unet_dtype: torch.dtype = torch.float32,
                      bf16_supported: bool | None = None, tf32_supported: bool | None = None) -> TrainingPrecision:
    """The :class:`TrainingPrecision` of a run on ``device`` (see the module docstring).

    ``bf16_supported`` / ``tf32_supported`` default to what the CUDA device reports (tests pass them
    to check the rules for GPUs this machine does not have)."""
    from .errors import TrainingConfigError

    if choice not in PRECISIONS:
        raise TrainingConfigError("precision", f"{choice!r} is not one of {PRECISIONS}", "use 'auto' or 'fp32'")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if bf16_supported is None:
        bf16_supported = bool(cuda and torch.cuda.is_bf16_supported())
    if tf32_supported is None:
        tf32_supported = bool(cuda and torch.cuda.get_device_capability(device)[0] >= 8)
    autocast = None
    if choice == "auto" and cuda:
        autocast = torch.bfloat16 if bf16_supported else torch.float16
    scaling = autocast is torch.float16 or unet_dtype == torch.float16
    return TrainingPrecision(choice=choice, device_type=device.type, autocast_dtype=autocast,
                             loss_scaling=scaling, tf32=bool(cuda and tf32_supported))


class GradientWatch:
    """Counts the steps whose scaled gradients overflowed (skipped by the loss scaler) and stops a
    run whose adapter gradients stay all zero for :data:`ZERO_GRAD_STEPS` steps in a row."""

    def __init__(self, limit: int = ZERO_GRAD_STEPS):
        self.limit = int(limit)
        self.skipped = 0
        self.zero_streak = 0
        self.first_zero_step = None

    @staticmethod
    def all_zero(params) -> bool:
        """True when no parameter received a non-zero gradient (None counts as zero)."""
        return all(p.grad is None or not bool(p.grad.ne(0).any()) for p in params)

    def check(self, params, step: int, precision: TrainingPrecision) -> None:
        """After the backward pass of global step ``step`` (1-based), before the optimiser step."""
        from .errors import TrainingDivergedError

        if not self.all_zero(params):
            self.zero_streak, self.first_zero_step = 0, None
            return
        self.zero_streak += 1
        if self.first_zero_step is None:
            self.first_zero_step = step
        if self.zero_streak >= self.limit:
            cause = ("in fp16 they underflow to zero without loss scaling" if not precision.loss_scaling
                     else "the loss does not reach the adapter's weights")
            raise TrainingDivergedError(
                "precision", f"the adapter's gradients were all zero for {self.zero_streak} steps in a row "
                f"(steps {self.first_zero_step}-{step}, precision {precision.describe()}): {cause}; the "
                "adapter stopped learning", "train with precision 'fp32' (or a bf16-capable GPU), or resume "
                "from the last good save")
