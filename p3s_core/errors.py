"""Typed, user-facing errors.

Every message names the input, what was wrong with it and how to fix it, so a ComfyUI user sees a
sentence instead of a traceback. All are ``ValueError`` subclasses (ComfyUI shows the message).
"""
from __future__ import annotations


class P3SError(ValueError):
    """Base class: ``P3S: <input>: <problem>. Fix: <fix>``."""

    def __init__(self, input_name: str, problem: str, fix: str):
        self.input_name = input_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"P3S: input '{input_name}': {problem}. Fix: {fix}")


class PointsError(P3SError):
    """Clicked points or coordinate strings that cannot be used."""


class ImageInputError(P3SError):
    """An IMAGE / MASK batch of the wrong shape, channels, size or content."""


class ModelMismatchError(P3SError):
    """A MODEL / CLIP_VISION / VAE that is not the family this pack needs (SD1.5, ViT-L/14)."""


class AdapterFileError(P3SError):
    """An adapter file that is missing, unsafe, truncated, for another base, or of a newer format."""


class ScheduleError(P3SError):
    """Timestep-schedule settings that make no sense (start >= end, bad custom list, ...)."""


class TrainingConfigError(P3SError):
    """Trainer settings that cannot work (epochs 0, lr <= 0, prompt without identifier, ...)."""


class TrainingDivergedError(P3SError):
    """Training produced a non-finite loss; the last good save is kept."""


class RNGRSettingsError(P3SError):
    """A setting of the RNGR mask / inpaint step that cannot work (unknown mode, sigma < 0, ...)."""
