"""Training precision (issue 21.3): the rules of :func:`resolve_precision`, dynamic loss scaling on
an fp16 toy whose gradients underflow without it, skipped steps counted, and a run whose gradients
stay all zero stopped with a clear error."""
from __future__ import annotations

import pytest
import torch

from p3s_core.errors import TrainingConfigError, TrainingDivergedError
from p3s_core.precision import ZERO_GRAD_STEPS, GradientWatch, TrainingPrecision, resolve_precision
from p3s_core.train import TrainBatch, TrainSettings, train_adapter


def test_the_precision_rules():
    cpu = resolve_precision("cpu", "auto")
    assert (cpu.autocast_dtype, cpu.loss_scaling, cpu.tf32) == (None, False, False)
    assert cpu.describe() == "fp32"
    fp16_unet = resolve_precision("cpu", "auto", torch.float16)
    assert fp16_unet.loss_scaling and fp16_unet.autocast_dtype is None  # backward through fp16 activations
    assert not resolve_precision("cpu", "auto", torch.bfloat16).loss_scaling  # bf16 has fp32's range
    ampere = resolve_precision("cuda", "auto", torch.float16, bf16_supported=True, tf32_supported=True)
    assert ampere.autocast_dtype is torch.bfloat16 and ampere.tf32
    assert ampere.describe() == "bf16 autocast, dynamic loss scaling, TF32 matmuls"
    bf16_unet = resolve_precision("cuda", "auto", torch.bfloat16, bf16_supported=True, tf32_supported=True)
    assert (bf16_unet.autocast_dtype, bf16_unet.loss_scaling) == (torch.bfloat16, False)
    turing = resolve_precision("cuda", "auto", torch.float32, bf16_supported=False, tf32_supported=False)
    assert (turing.autocast_dtype, turing.loss_scaling, turing.tf32) == (torch.float16, True, False)
    assert turing.describe() == "fp16 autocast, dynamic loss scaling"
    full = resolve_precision("cuda", "fp32", torch.float32, bf16_supported=True, tf32_supported=True)
    assert (full.autocast_dtype, full.loss_scaling, full.tf32) == (None, False, True)
    with pytest.raises(TrainingConfigError, match="precision"):
        resolve_precision("cpu", "fp8")


def test_tf32_is_switched_on_for_the_run_and_restored():
    prev = torch.backends.cuda.matmul.allow_tf32
    with TrainingPrecision(tf32=True).matmul_mode():
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == prev


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))  # fp32 master weights


def _batches(n=2):
    z = torch.zeros(1, 4, 2, 2)
    return [TrainBatch(latent=z.clone(), context=torch.zeros(1, 2, 4), uncond=torch.zeros(1, 2, 4),
                       clip_hidden=torch.zeros(1, 2, 4)) for _ in range(n)]


def _fp16_step(scale_of_loss: float, x: float = 1.0):
    """An fp16 forward like an fp16 UNet's: the weights cast to fp16, the loss's gradient with
    respect to the fp16 activations is ``scale_of_loss`` (below fp16's smallest subnormal, 6e-8,
    it underflows to zero in the backward unless the loss is scaled)."""
    def step_fn(adapter, x0, context, clip_hidden, generator):
        h = adapter.w.to(torch.float16) * torch.full((4,), x, dtype=torch.float16)
        return (h * scale_of_loss).float().sum(), torch.zeros(())
    return step_fn


def test_fp16_gradients_underflow_without_loss_scaling_and_train_with_it():
    settings = TrainSettings(epochs=5, lr=1e-2, cond_dropout=0.0, weight_decay=0.0)
    plain = TrainingPrecision(choice="fp32")
    with pytest.raises(TrainingDivergedError, match="all zero for 5 steps") as err:
        train_adapter(_Toy(), _batches(1), _fp16_step(1e-9), settings, precision=plain)
    assert "underflow" in str(err.value) and "precision" in str(err.value)
    toy = _Toy()
    scaled = TrainingPrecision(choice="auto", loss_scaling=True)
    res = train_adapter(toy, _batches(1), _fp16_step(1e-9), settings, precision=scaled)
    # the first scaled step overflows (65536 is beyond fp16's 65504) and is skipped; the scale halves
    assert res.steps == 5 and res.skipped_steps == 1
    assert res.precision == "fp32, dynamic loss scaling"
    assert bool((toy.w.detach() < 1.0).all())  # AdamW moved every weight against its tiny gradient


def test_steps_whose_scaled_gradients_overflow_are_skipped_and_counted():
    toy = _Toy()
    settings = TrainSettings(epochs=20, lr=1e-2, cond_dropout=0.0, weight_decay=0.0)
    # dL/dh = 1 and x = 1000: scaled by 65536 the fp16 gradient overflows until the scale is <= 32
    res = train_adapter(toy, _batches(1), _fp16_step(1.0, x=1000.0), settings,
                        precision=TrainingPrecision(choice="auto", loss_scaling=True))
    assert 1 <= res.skipped_steps < 20
    assert res.steps == 20 and bool((toy.w.detach() < 1.0).all())  # the later steps trained


def test_the_gradient_watch_resets_on_a_non_zero_gradient():
    w = torch.nn.Parameter(torch.ones(2))
    watch = GradientWatch()
    prec = TrainingPrecision()
    for step in range(1, ZERO_GRAD_STEPS):
        w.grad = torch.zeros(2)
        watch.check([w], step, prec)
    w.grad = torch.tensor([0.0, 1e-30])
    watch.check([w], ZERO_GRAD_STEPS, prec)  # a non-zero gradient: the streak starts again
    assert watch.zero_streak == 0
    w.grad = None
    for step in range(ZERO_GRAD_STEPS - 1):
        watch.check([w], 10 + step, prec)
    with pytest.raises(TrainingDivergedError, match=r"steps 10-14"):
        watch.check([w], 14, prec)
