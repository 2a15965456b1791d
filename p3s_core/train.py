"""The P3S training loop (paper Sec. III-B Eq. 11-15, Sec. IV-A "Training Details").

    L = L_LDM + gamma * L_ac                                                          (15)

This module never imports ComfyUI: the loop gets a ``step_fn`` that runs the (frozen) base UNet
with the adapter and returns ``(L_LDM, L_ac)`` for one image. The ComfyUI side builds it
(:mod:`p3s_core.comfyui_engine.training`); unit tests pass a tiny plain-torch model.

Decisions where the paper is vague:

* Only the adapter trains (RNGR encoder, Eq. 4-5, and the copy with its zero convs, Eq. 6); the base
  UNet, the text encoder, the VAE and CLIP vision stay frozen. Optimiser: AdamW (``lr`` 1e-5, the
  paper's; ``weight_decay`` 0.01, PyTorch's default), batch size 1, no LR schedule.
* One epoch = one pass over the reference images in an order shuffled by the seeded generator
  (paper: 60 epochs; with 3-5 images that is 180-300 steps).
* "We drop out 10 % of the conditions": each step independently, with probability
  ``cond_dropout``, the text context is replaced by the empty-prompt context (the unconditional
  branch of classifier-free guidance). The reference I'' is kept: the injector feeds it to the
  uncond half of the CFG batch too by default.
* A single ``torch.Generator`` seeded from ``seed`` (and ``start_step`` on resume) drives the
  shuffling, the dropout draws and everything ``step_fn`` samples (timestep, noise), so a seed
  gives the same adapter bit for bit on the CPU.
* A non-finite loss or gradient raises :class:`TrainingDivergedError` *before* the optimiser
  step, so the weights (and any save made so far) are the last good ones.
* L_ac's normalisation (``ac_reading``): ``"mass"`` by default, the literal Eq. 11-12 as an option
  (see :func:`p3s_core.losses.attention_consistency_loss`). The loop records ``L_LDM`` and
  ``gamma * L_ac`` separately (:class:`TrainResult`, ``on_parts``).
* Training reference (``reference_pairing``): ``"self"`` (the paper: each photo is its own reference
  I') or ``"other photo"``: with two or more photos, each target is paired with another photo of
  the subject drawn by the generator, flipped left-right with probability 1/2 (the step gets it as
  ``ref_latent`` / ``ref_clip_hidden``). It trades the copy's easy shortcut (copying the
  pixel-aligned target through I'') for learning the subject's appearance from a non-aligned
  view, as at generation, where the reference is never aligned with the image being made.
  ``"auto"`` (default, :func:`resolve_reference_pairing`): "other photo" for an adapter with the
  cross-attention enhancement and two or more photos, else "self". Decision (issue 22): the
  enhancement adds the copy's output straight to the model's cross-attention output, and with the
  photo as its own reference it learns that shortcut: in the toy world the held-out loss with
  another photo as the reference rose far above the plain model's, while with "other photo" it fell
  below both the plain model's and a self-attention-only adapter's (README, "Decisions";
  ``benchmarks/heldout_loss.py --part ablation``). The self-attention half keeps the paper's "self".
* Resume: ``start_step`` continues the step count (``training_info["steps"]``). The optimiser's
  moments are not in the adapter file, so AdamW starts fresh; the generator is re-seeded from
  ``(seed, start_step)`` so a resumed run does not replay the first run's noise.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .copy_unet import DEFAULT_ENHANCEMENT, ENHANCEMENTS
from .errors import TrainingConfigError, TrainingDivergedError
from .losses import total_loss
from .precision import GradientWatch, TrainingPrecision

log = logging.getLogger("P3S")

__all__ = [
    "AC_LAYERS",
    "AC_READINGS",
    "REFERENCE_PAIRINGS",
    "DEFAULT_REFERENCE_PAIRING",
    "resolve_reference_pairing",
    "pairing_fallback_note",
    "TrainSettings",
    "TrainBatch",
    "TrainResult",
    "train_adapter",
    "trainable_parameters",
    "make_optimizer",
    "checkpointing_choice",
    "reproducible_threads",
    "masked_ldm_loss",
    "contains_identifier",
    "estimate_adapter_bytes",
]

#: ``"last"``: L_ac on the last cross-attention layer only (the paper's choice, Table IV);
#: ``"all"``: averaged over every cross-attention layer of the UNet (Table IV's "whole U-Net").
AC_LAYERS = ("last", "all")
#: Eq. 11-12 normalisation, see :data:`p3s_core.losses.AC_READINGS`.
AC_READINGS = ("mass", "literal")
#: Which reference I' a training step sees: "auto" (see :func:`resolve_reference_pairing`), the photo
#: itself (paper) or another photo, flipped at random.
REFERENCE_PAIRINGS = ("auto", "self", "other photo")
DEFAULT_REFERENCE_PAIRING = "auto"


def resolve_reference_pairing(pairing: str, enhancement: str, n_photos: int) -> str:
    """The pairing a run uses: "other photo" only with two or more photos; ``"auto"`` is "other
    photo" for an adapter with the cross-attention enhancement (``enhancement == "cross"``, which
    learns to copy an aligned reference, module docstring) and "self" (the paper) otherwise."""
    if pairing not in REFERENCE_PAIRINGS:
        raise TrainingConfigError("reference_pairing", f"{pairing!r} is not one of {REFERENCE_PAIRINGS}",
                                  "use 'auto' (default), 'self' (paper) or 'other photo'")
    if pairing == "auto":
        pairing = "other photo" if enhancement == "cross" else "self"
    return pairing if n_photos >= 2 else "self"


def pairing_fallback_note(pairing: str, enhancement: str, n_photos: int) -> str:
    """Why a run trains with "self" although another photo was asked for (explicitly, or by "auto"
    for the cross-attention enhancement): there is one photo. Empty when nothing fell back. With
    "self" the enhancement learns to copy its pixel-aligned reference (module docstring)."""
    if n_photos >= 2 or resolve_reference_pairing(pairing, enhancement, 2) != "other photo":
        return ""
    copies = "; the cross-attention enhancement then tends to copy that photo's layout" if enhancement == "cross" else ""
    return f"one photo: trained with the photo as its own reference (self){copies}. Give the Trainer two or more photos"


#: Gradient checkpointing of the frozen UNet: "auto" turns it on where it pays
#: (:func:`p3s_core.comfyui_engine.frozen_unet.checkpointing_pays`).
CHECKPOINTING_CHOICES = ("auto", "on", "off")
_MAX_SEED = 2 ** 64 - 1


@contextlib.contextmanager
def reproducible_threads(device=None, enabled: bool = True):
    """Run the enclosed training steps on ONE intra-op CPU thread (the previous count is restored
    after), so the same seed gives the same adapter bytes on the CPU.

    Measured (issue 12, random SD1.5 at 64^2 through the P3S Trainer, 2-thread CPU): with two threads
    two same-seed runs give bit-identical inputs, copy features and losses, but the gradients reaching
    the input- and middle-level zero convs differ in the last bits from run to run (a multi-threaded
    CPU backward kernel deep in the frozen UNet; the same ops in isolation are reproducible), which
    AdamW's first step turns into differences of up to 4e-7; with one thread the files are identical.
    No effect when ``enabled`` is False, on other devices (GPU kernels are not made deterministic
    here), or when torch already runs one thread. The thread count is process-wide while it lasts."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    before = torch.get_num_threads()
    if not enabled or dev.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def checkpointing_choice(value) -> bool | None:
    """The Trainer's ``gradient_checkpointing`` choice as the core's flag: ``"auto"`` -> None (on
    where it pays), ``"on"`` -> True, ``"off"`` -> False. ``True`` / ``False`` (workflows saved when
    the input was a BOOLEAN) mean "on" / "off". Anything else: :class:`TrainingConfigError`."""
    if value is True or value is False:
        return value
    if isinstance(value, str) and value in CHECKPOINTING_CHOICES:
        return None if value == "auto" else value == "on"
    raise TrainingConfigError("gradient_checkpointing", f"{value!r} is not one of {CHECKPOINTING_CHOICES}",
                              "choose auto (on where it pays), on or off")


def contains_identifier(prompt: str, identifier: str) -> bool:
    """True when ``identifier`` appears in ``prompt`` as a whole word (case-sensitive)."""
    return re.search(rf"(?<![\w]){re.escape(identifier)}(?![\w])", prompt) is not None


@dataclass
class TrainSettings:
    """Trainer settings (defaults: the paper's Sec. IV-A and Eq. 15).

    ``save_every`` is in steps (0 = only at the end). ``resolution`` is the short side the images
    are resized to before VAE encoding (a multiple of 64). ``mask_background_weight`` is the
    L_LDM weight of latent pixels outside the optional subject mask (see :func:`masked_ldm_loss`).
    """

    epochs: int = 60
    lr: float = 1e-5
    gamma: float = 0.1
    cond_dropout: float = 0.1
    seed: int = 0
    resolution: int = 512
    save_every: int = 0
    identifier: str = "sks"
    ac_layers: str = "last"
    ac_reading: str = "mass"
    reference_pairing: str = DEFAULT_REFERENCE_PAIRING
    weight_decay: float = 0.01
    mask_background_weight: float = 0.1
    #: issue 22: "cross" (default: self + cross attention, the paper's Fig. 3) or "self" for a new
    #: adapter; a resumed adapter keeps its own.
    enhancement: str = DEFAULT_ENHANCEMENT

    def validate(self, prompt: str | None = None) -> "TrainSettings":
        """Raise :class:`TrainingConfigError` naming the first bad field; return ``self``.

        With ``prompt`` also checks that it contains the identifier token as a whole word.
        """
        def bad(name, problem, fix):
            raise TrainingConfigError(name, problem, fix)

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        if not is_int(self.epochs) or self.epochs < 1:
            bad("epochs", f"{self.epochs!r} is not a whole number >= 1",
                "train for at least 1 epoch (paper: 60)")
        if not is_num(self.lr) or not math.isfinite(float(self.lr)) or float(self.lr) <= 0:
            bad("learning_rate", f"{self.lr!r} is not a finite number > 0",
                "use a small positive learning rate such as 1e-5 (paper)")
        if not is_num(self.gamma) or not math.isfinite(float(self.gamma)) or float(self.gamma) < 0:
            bad("gamma", f"{self.gamma!r} is not a finite number >= 0",
                "use gamma = 0.1 (paper) or 0 to turn the attention consistency loss off")
        if not is_num(self.cond_dropout) or not 0.0 <= float(self.cond_dropout) < 1.0:
            bad("cond_dropout", f"{self.cond_dropout!r} is outside [0, 1)",
                "use 0.1 (paper: 10 % of the conditions are dropped for CFG)")
        if not is_int(self.seed) or not 0 <= int(self.seed) <= _MAX_SEED:
            bad("seed", f"{self.seed!r} is not a whole number in [0, 2^64)", "use a seed such as 0")
        if not is_int(self.resolution) or self.resolution < 64 or self.resolution % 64:
            bad("resolution", f"{self.resolution!r} is not a multiple of 64 (>= 64)",
                "use 512 (SD1.5's native size) or another multiple of 64")
        if not is_int(self.save_every) or self.save_every < 0:
            bad("save_every", f"{self.save_every!r} is not a whole number >= 0",
                "use 0 to save only at the end, or N to also save every N steps")
        ident = self.identifier
        if not isinstance(ident, str) or not ident.strip() or re.search(r"\s", ident.strip()):
            bad("identifier", f"{ident!r} is not a single word",
                "use a rare single token such as 'sks'")
        if self.ac_layers not in AC_LAYERS:
            bad("ac_layers", f"{self.ac_layers!r} is not one of {AC_LAYERS}",
                "use 'last' (paper) or 'all'")
        if self.ac_reading not in AC_READINGS:
            bad("ac_reading", f"{self.ac_reading!r} is not one of {AC_READINGS}",
                "use 'mass' (default: an L_ac that acts) or 'literal' (Eq. 11-12 as printed)")
        if self.reference_pairing not in REFERENCE_PAIRINGS:
            bad("reference_pairing", f"{self.reference_pairing!r} is not one of {REFERENCE_PAIRINGS}",
                "use 'auto' (default), 'self' (paper) or 'other photo'")
        if self.enhancement not in ENHANCEMENTS:
            bad("enhancement", f"{self.enhancement!r} is not one of {ENHANCEMENTS}",
                "use 'cross' (self + cross attention, the paper) or 'self' (self-attention only)")
        if not is_num(self.weight_decay) or not math.isfinite(float(self.weight_decay)) \
                or float(self.weight_decay) < 0:
            bad("weight_decay", f"{self.weight_decay!r} is not a finite number >= 0", "use 0.01")
        if not is_num(self.mask_background_weight) \
                or not 0.0 <= float(self.mask_background_weight) <= 1.0:
            bad("mask_background_weight", f"{self.mask_background_weight!r} is outside [0, 1]",
                "use 0.1 (background counts a tenth of the subject) or 1 (mask ignored)")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt.strip():
                bad("prompt", "the prompt is empty",
                    f"describe the subject with the identifier, e.g. 'a photo of {ident.strip()} dog'")
            if not contains_identifier(prompt, ident.strip()):
                bad("prompt", f"'{prompt}' does not contain the identifier '{ident.strip()}' as a "
                    "word", f"write it into the prompt, e.g. 'a photo of {ident.strip()} dog'")
        return self

    def to_dict(self) -> dict:
        """JSON-friendly dict (stored in the adapter's ``training`` metadata)."""
        return asdict(self)


@dataclass
class TrainBatch:
    """The cached inputs of one reference image (batch size 1), computed once before training.

    ``latent`` x0 [1,4,h,w] (after ``process_latent_in``), ``context`` / ``uncond`` [1,77,768] text
    encodings of the prompt and of the empty prompt, ``clip_hidden`` [1,257,1024] CLIP ViT-L/14 last
    hidden state of the image, ``mask`` optional subject mask at latent size [1,1,h,w] in [0, 1].
    """

    latent: torch.Tensor
    context: torch.Tensor
    uncond: torch.Tensor
    clip_hidden: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass
class TrainResult:
    """Per-step total losses (Eq. 15), their two parts, the final global step count, and how many
    steps used the dropped (unconditional) context."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    ldm_losses: list[float] = field(default_factory=list)
    ac_losses: list[float] = field(default_factory=list)
    dropped: int = 0
    gamma: float = 0.0
    precision: str = "fp32"    # TrainingPrecision.describe() of the run
    skipped_steps: int = 0     # steps the loss scaler skipped (scaled gradients overflowed)
    reference_pairing: str = "self"  # the pairing the run used (resolve_reference_pairing)
    pairing_note: str = ""     # pairing_fallback_note(): why "other photo" fell back to "self"

    @property
    def weighted_ac_losses(self) -> list[float]:
        """``gamma * L_ac`` per step (the part of Eq. 15's loss that L_ac contributes)."""
        return [self.gamma * v for v in self.ac_losses]


StepFn = Callable[..., tuple]
OnStep = Callable[[int, int, float], None]


def trainable_parameters(adapter: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every adapter parameter (encoder + copy + zero convs), in module order."""
    return [p for p in adapter.parameters()]


def masked_ldm_loss(noise: torch.Tensor, noise_pred: torch.Tensor, mask: torch.Tensor | None,
                    background_weight: float = 0.1) -> torch.Tensor:
    """Eq. 14 with an optional subject mask: ``sum(w (eps - eps_theta)^2) / (C * sum(w))``.

    Decision (the paper has no mask in training; the Trainer has an optional subject MASK): the
    per-pixel weight is ``w = mask + background_weight * (1 - mask)``, so the subject drives the
    reconstruction and the (inpainted) background counts less; ``mask=None`` or
    ``background_weight=1`` gives exactly the plain mean squared error of Eq. 14.
    ``mask`` is [B,1,h,w] (or broadcastable) at the latent's size.
    """
    err = (noise_pred.float() - noise.float()) ** 2
    if mask is None or float(background_weight) == 1.0:
        return err.mean()
    m = mask.to(err.device, torch.float32).clamp(0, 1)
    w = (m + float(background_weight) * (1 - m)).expand_as(err)
    return (w * err).sum() / w.sum().clamp_min(1e-12)


def make_optimizer(params: Sequence[torch.nn.Parameter], settings: TrainSettings):
    """AdamW over ``params``; the fused kernel where this torch has it for the parameters' device
    (about 6x faster than the per-parameter loop on a CPU, and deterministic), else the plain loop."""
    kw = dict(lr=float(settings.lr), weight_decay=float(settings.weight_decay))
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=False, **kw)


def _generator_seed(seed: int, start_step: int) -> int:
    """Seed of the training generator: ``seed`` for a fresh run, mixed with ``start_step`` on resume."""
    if start_step == 0:
        return int(seed)
    return (int(seed) * 1_000_003 + int(start_step) * 7_919 + 1) % (_MAX_SEED + 1)


def _finite_grads(params: Sequence[torch.Tensor]) -> bool:
    for p in params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return False
    return True


def train_adapter(adapter: torch.nn.Module, batches: Sequence[TrainBatch], step_fn: StepFn,
                  settings: TrainSettings, on_step: OnStep | None = None, start_step: int = 0,
                  device: torch.device | str | None = None,
                  on_parts: Callable[[float, float], None] | None = None,
                  precision: TrainingPrecision | None = None) -> TrainResult:
    """Train ``adapter`` in place for ``settings.epochs`` epochs over ``batches`` (Eq. 15).

    ``step_fn(adapter, x0, context, clip_hidden, generator[, mask=...]) -> (l_ldm, l_ac)`` runs one
    image (``mask`` is passed only when the batch has one). The loss is
    ``l_ldm + gamma * l_ac``; a non-finite loss or gradient raises
    :class:`TrainingDivergedError` before the weights change. ``on_step(step, total, loss)`` is
    called after every optimiser step with the global step (``start_step + k``), the global total
    and the loss; it may raise to cancel (the exception propagates at once, no further step runs).
    Tensors of each batch are moved to ``device`` when given (inference tensors are cloned into
    normal ones, so batches made under ``torch.inference_mode()`` work). ``on_parts(l_ldm,
    gamma_l_ac)`` is called before ``on_step`` with the step's two loss parts. When the
    pairing (:func:`resolve_reference_pairing`) is "other photo", ``step_fn`` also gets
    ``ref_latent`` / ``ref_clip_hidden`` of another photo (flipped at random). ``precision``
    (:mod:`p3s_core.precision`; fp32 when None): with loss scaling the backward runs on the scaled
    loss and a step whose gradients overflow is skipped and counted (``TrainResult.skipped_steps``);
    gradients that stay all zero for several steps stop the run (:class:`~p3s_core.precision.GradientWatch`).
    The step function runs its forward in ``precision.autocast()`` itself. Returns a :class:`TrainResult`;
    the adapter is left in eval mode with ``requires_grad`` off.
    """
    settings.validate()
    if not batches:
        raise TrainingConfigError("images", "there are no training images",
                                  "connect 3-5 cleaned photos of the subject")
    if not isinstance(start_step, int) or start_step < 0:
        raise TrainingConfigError("start_step", f"{start_step!r} is not a whole number >= 0",
                                  "resume from an adapter saved by the P3S Trainer")
    with torch.inference_mode(False), torch.enable_grad():
        return _train(adapter, list(batches), step_fn, settings, on_step, start_step, device, on_parts,
                      precision or TrainingPrecision())


def _to(t, device):
    if t is None or device is None:
        return t
    return t.to(device)


def _normal(t):
    """A non-inference version of ``t`` (ComfyUI makes tensors under ``torch.inference_mode()``;
    those cannot be saved for backward)."""
    if t is not None and t.is_inference():
        return t.clone()
    return t


def _prepare(b: TrainBatch, device) -> TrainBatch:
    return TrainBatch(*(_normal(_to(t, device)) for t in (b.latent, b.context, b.uncond,
                                                          b.clip_hidden, b.mask)))


def _other_reference(batches, idx: int, generator: torch.Generator) -> dict:
    """Another photo's (latent, CLIP hidden) for target ``idx``, flipped left-right with p = 1/2."""
    others = [j for j in range(len(batches)) if j != idx]
    j = others[int(torch.randint(len(others), (1,), generator=generator))]
    flip = bool(torch.rand((), generator=generator).item() < 0.5)
    lat = batches[j].latent
    return {"ref_latent": torch.flip(lat, dims=(-1,)) if flip else lat,
            "ref_clip_hidden": batches[j].clip_hidden}


def _train(adapter, batches, step_fn, settings, on_step, start_step, device, on_parts, precision) -> TrainResult:
    batches = [_prepare(b, device) for b in batches]
    params = trainable_parameters(adapter)
    for p in params:
        p.requires_grad_(True)
    adapter.train()
    optimizer = make_optimizer(params, settings)
    generator = torch.Generator().manual_seed(_generator_seed(settings.seed, start_step))
    n = len(batches)
    total = start_step + settings.epochs * n
    result = TrainResult(steps=start_step, gamma=float(settings.gamma), precision=precision.describe())
    scaler = precision.grad_scaler()
    watch = GradientWatch()
    enhancement = getattr(adapter, "enhancement", "self")
    pairing = resolve_reference_pairing(settings.reference_pairing, enhancement, n)
    result.reference_pairing = pairing
    result.pairing_note = pairing_fallback_note(settings.reference_pairing, enhancement, n)
    if result.pairing_note:
        log.warning("[P3S] %s.", result.pairing_note)
    pair_other = pairing == "other photo"
    step = start_step
    try:
        for _epoch in range(settings.epochs):
            order = torch.randperm(n, generator=generator).tolist()
            for idx in order:
                b = batches[idx]
                drop = bool(torch.rand((), generator=generator).item() < float(settings.cond_dropout))
                context = b.uncond if drop else b.context
                kwargs = {} if b.mask is None else {"mask": b.mask}
                if pair_other:
                    kwargs.update(_other_reference(batches, idx, generator))
                l_ldm, l_ac = step_fn(adapter, b.latent, context, b.clip_hidden, generator, **kwargs)
                loss = total_loss(l_ldm, l_ac, settings.gamma)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        "learning_rate", f"the loss became {value} at step {step + 1} "
                        f"(L_LDM {float(torch.as_tensor(l_ldm).detach()):.4g}, L_ac "
                        f"{float(torch.as_tensor(l_ac).detach()):.4g}); the weights of the "
                        "last good step are kept", "lower the learning rate (paper: 1e-5) or gamma")
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    if not _finite_grads(params):
                        raise TrainingDivergedError(
                            "learning_rate", f"the gradients became non-finite at step {step + 1}; the "
                            "weights of the last good step are kept",
                            "lower the learning rate (paper: 1e-5) or use full precision")
                    watch.check(params, step + 1, precision)
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)  # true gradients (inf where the scaled ones overflowed)
                    watch.check(params, step + 1, precision)
                    scale = scaler.get_scale()
                    scaler.step(optimizer)  # skipped when a gradient is not finite
                    scaler.update()
                    result.skipped_steps += int(scaler.get_scale() < scale)
                step += 1
                result.steps = step
                result.losses.append(value)
                result.ldm_losses.append(float(l_ldm.detach()))
                result.ac_losses.append(float(torch.as_tensor(l_ac).detach()))
                result.dropped += int(drop)
                if on_parts is not None:
                    on_parts(result.ldm_losses[-1], result.gamma * result.ac_losses[-1])
                if on_step is not None:
                    on_step(step, total, value)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        for p in params:
            p.requires_grad_(False)
        adapter.eval()
    return result


def estimate_adapter_bytes(adapter: torch.nn.Module) -> int:
    """Bytes of the adapter's tensors as saved (state dict, its dtypes) plus 1 MiB for the header."""
    return sum(t.numel() * t.element_size() for t in adapter.state_dict().values()) + (1 << 20)


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) with the short side = ``resolution`` and the long side scaled alike, rounded to a
    multiple of 8 (the VAE's factor). Decision: resize, never crop (the subject may sit anywhere)."""
    scale = resolution / min(height, width)
    if height <= width:
        return resolution, max(8, int(round(width * scale / 8)) * 8)
    return max(8, int(round(height * scale / 8)) * 8), resolution
