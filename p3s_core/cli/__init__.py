"""The command line ``p3s``: P3S outside ComfyUI, on diffusers (``python -m p3s ...`` or the ``p3s`` console script).

Commands (paper defaults shown by ``--help``):

* ``mask``: photos + clicked points -> subject masks and cleaned photos (Eq. 1-3, RNGR);
* ``train``: a folder of (cleaned) photos -> an adapter file (Eq. 4-15; the same files as the nodes);
* ``generate``: adapter + reference + prompts -> images (DDIM 50, CFG 7.5; Eq. 6-10);
* ``eval``: the DreamBench metrics (CLIP-I, CLIP-T, DINOv2) with the paper's figures beside them;
* ``train-many``: one adapter per subject folder, sharded over ``accelerate launch`` / ``torchrun``
  processes (:mod:`p3s_core.cli.train_many`).

Every run writes ``p3s_<command>.json`` next to its outputs (the resolved arguments); ``--config
FILE`` reads such a file as defaults, so ``p3s train --config out/p3s_train.json`` repeats a run.
Bad input raises a typed :class:`~p3s_core.errors.P3SError` before any work: the command prints
``P3S: input '...': problem. Fix: ...`` and exits with status 2.

Modules: :mod:`.common` (reading photos, points and models; one training run), :mod:`.commands`
(mask, train, generate, eval), :mod:`.train_many`, :mod:`.evaluation` (DreamBench) and
:mod:`.main` (the parser). The command line uses the method and the diffusers engine, never ComfyUI.
"""
from __future__ import annotations

from .main import build_parser, main, parse

__all__ = ["build_parser", "main", "parse"]
