"""The ComfyUI engine: the P3S Trainer's run (Sec. IV-A): inputs, the loop, the adapter file."""
from __future__ import annotations

import gc
import logging

import torch

from ..copy_config import DEFAULT_COPY_LAYOUT, check_copy_layout
from ..copy_unet import DEFAULT_ENHANCEMENT
from ..errors import TrainingDivergedError
from ..train import TrainSettings
from .frozen_unet import checkpointing_pays, frozen_unet_copy
from .training_inputs import cache_inputs
from .training_step import build_step_fn

log = logging.getLogger("P3S")


def new_training_adapter(unet, resume=None, seed: int = 0, copy_layout: str = DEFAULT_COPY_LAYOUT,
                         enhancement: str = DEFAULT_ENHANCEMENT):
    """A fresh adapter initialised from the (frozen copy of the) base UNet with the copy layout
    ``copy_layout`` and ``enhancement`` (issue 22), or a private copy of ``resume`` (never trained in
    place: nodes are pure; it keeps its own layout and enhancement). Outside inference mode, float32, CPU."""
    from ..adapter import P3SAdapter, new_adapter
    from ..copy_config import CopyUNetConfig

    with torch.inference_mode(False), torch.no_grad():
        if resume is None:
            sd = {k: v.to("cpu") for k, v in unet.state_dict().items()}
            return new_adapter(CopyUNetConfig.sd15(copy_layout), unet_state_dict=sd, seed=seed,
                               training={"steps": 0}, enhancement=enhancement)
        adapter = P3SAdapter(resume.config, resume.lam, dict(resume.training_info),
                             resume.encoder.clip_dim, resume.encoder.inner_dim,
                             resume.base_unet_hash, enhancement=getattr(resume, "enhancement", "self"))
        adapter.load_state_dict({k: v.detach().to("cpu", torch.float32).clone()
                                 for k, v in resume.state_dict().items()})
        return adapter


def run_training(model, clip, vae, clip_vision, images, prompt: str, settings: TrainSettings,
                 save_path, masks=None, resume=None, gradient_checkpointing: bool | None = None,
                 precision: str = "auto", log_every: int = 0, reproducible: bool = True,
                 copy_layout: str = DEFAULT_COPY_LAYOUT):
    """Cache inputs, train (:func:`p3s_core.train.train_adapter`) and save atomically to
    ``save_path`` every ``settings.save_every`` steps and at the end.

    Progress: ``comfy.utils.ProgressBar`` +1 per step (with the loss plot as preview); Cancel:
    ``throw_exception_if_processing_interrupted()`` before every step and after it (before any
    save), so a cancelled run writes nothing more and the last completed save stays. Returns
    ``(adapter, TrainResult, start_step)``; the adapter is in eval mode on the offload device.
    ``gradient_checkpointing=None`` turns it on where it pays (:func:`checkpointing_pays`).
    ``precision`` (:data:`p3s_core.precision.PRECISIONS`): resolved for the device and the UNet's dtype
    (:func:`p3s_core.precision.resolve_precision`); what was used is in the adapter's ``training``
    metadata (``precision``, ``skipped_steps``) and the log.
    ``reproducible`` (default): on the CPU the steps run on one thread
    (:func:`p3s_core.train.reproducible_threads`), so the same seed writes the same adapter bytes.
    ``copy_layout``: the copy layout of a new adapter (:data:`p3s_core.copy_config.COPY_LAYOUTS`);
    a resumed adapter keeps its own.
    """
    import comfy.model_management as mm
    import comfy.utils

    from ..adapter import save_adapter
    from ..errors import AdapterFileError
    from ..previews import plot_losses
    from ..train import reproducible_threads, train_adapter

    settings.validate(prompt)
    check_copy_layout(copy_layout)
    device = mm.get_torch_device()
    start_step = int((resume.training_info or {}).get("steps", 0)) if resume is not None else 0
    unet = batches = adapter = ctx = None
    try:
        mm.throw_exception_if_processing_interrupted()
        batches = cache_inputs(model, clip, vae, clip_vision, images, prompt, masks,
                               settings.resolution)
        if device.type != "cpu":  # the frozen copy replaces ComfyUI's loaded models for the run
            mm.unload_all_models()
            mm.soft_empty_cache()
        unet = frozen_unet_copy(model, device)
        if gradient_checkpointing is None:
            gradient_checkpointing = checkpointing_pays(device, settings.resolution)
        adapter = new_training_adapter(unet, resume, settings.seed, copy_layout, settings.enhancement)
        _warn_if_other_base(adapter, unet)
        with torch.inference_mode(False):
            adapter.to(device)
        info_base = {"prompt": prompt, "images": len(batches), "settings": settings.to_dict(),
                     "gradient_checkpointing": bool(gradient_checkpointing),  # the effective choice
                     "reproducible": bool(reproducible)}
        ctx = build_step_fn(model, adapter, settings, unet=unet, device=device,
                            gradient_checkpointing=gradient_checkpointing, precision=precision)
        info_base["precision"] = ctx.precision.describe()
        log.info("[P3S Trainer] precision: %s", info_base["precision"])
        local_total = settings.epochs * len(batches)
        every = log_every or max(1, local_total // 20)
        pbar = comfy.utils.ProgressBar(local_total)
        losses: list[float] = []
        parts_ldm: list[float] = []
        parts_ac: list[float] = []

        def on_parts(l_ldm, gamma_l_ac):
            parts_ldm.append(float(l_ldm))
            parts_ac.append(float(gamma_l_ac))

        def step_fn(*args, **kwargs):
            mm.throw_exception_if_processing_interrupted()
            return ctx.step_fn(*args, **kwargs)

        saved: list[int] = []

        def save(step, loss, **extra):
            adapter.training_info = dict(info_base, steps=int(step), loss=float(loss),
                                         **loss_parts(parts_ldm, parts_ac), **extra)
            try:
                save_adapter(adapter, save_path)  # refuses non-finite weights, writes nothing
            except AdapterFileError as exc:
                if "NaN or infinite" not in exc.problem:
                    raise
                kept = (f"the save of step {saved[-1]} in {save_path} is kept" if saved
                        else f"nothing was saved by this run ({save_path} is unchanged)")
                raise TrainingDivergedError("learning_rate", f"the weights after step {step} are not "
                                            f"finite ({exc.problem}); {kept}",
                                            "train again with a lower learning_rate (paper: 1e-5) or "
                                            "resume from the last good save") from exc
            saved.append(int(step))

        def on_step(step, total, loss):
            losses.append(loss)
            local = step - start_step
            preview = None
            if local % every == 0 or local == local_total:
                log.info("[P3S Trainer] step %d/%d (total %d) loss %.5f = L_LDM %.5f + gamma*L_ac %.5f",
                         local, local_total, step, loss, parts_ldm[-1], parts_ac[-1])
                preview = _preview(plot_losses(losses, 512, 256, start_step,
                                               parts=plot_parts(parts_ldm, parts_ac)))
            pbar.update_absolute(local, local_total, preview)
            mm.throw_exception_if_processing_interrupted()
            if settings.save_every and local % settings.save_every == 0 and local != local_total:
                save(step, loss)

        try:
            adapter.reference = stored_reference(batches)
            with reproducible_threads(device, reproducible), ctx.precision.matmul_mode():
                result = train_adapter(adapter, batches, step_fn, settings, on_step=on_step,
                                       start_step=start_step, device=device, on_parts=on_parts,
                                       precision=ctx.precision)
        except TrainingDivergedError as exc:
            kept = (f"the save of step {saved[-1]} in {save_path} is kept" if saved
                    else f"nothing was saved by this run ({save_path} is unchanged)")
            raise TrainingDivergedError(exc.input_name, f"{exc.problem}; {kept}", exc.fix) from exc
        with torch.inference_mode(False):
            adapter.to(mm.unet_offload_device())
        save(result.steps, result.losses[-1] if result.losses else float("nan"),
             skipped_steps=int(result.skipped_steps), reference_pairing=result.reference_pairing)
        return adapter, result, start_step
    finally:
        if ctx is not None:
            ctx.close()
        del ctx, unet, batches
        gc.collect()
        mm.soft_empty_cache()


def stored_reference(batches) -> dict | None:
    """The cleaned training references the adapter file carries (latents I' and CLIP hidden states,
    float32 on the CPU), so generation needs no reference photo; None when their grids differ."""
    lats = [b.latent.detach().to("cpu", torch.float32) for b in batches]
    if any(t.shape != lats[0].shape for t in lats):
        return None
    hids = [b.clip_hidden.detach().to("cpu", torch.float32) for b in batches]
    with torch.inference_mode(False):
        return {"latent": torch.cat(lats).clone(), "clip_hidden": torch.cat(hids).clone()}


def loss_parts(ldm: list[float], weighted_ac: list[float]) -> dict:
    """Adapter metadata of the two parts of Eq. 15: the last step's and the run's means."""
    if not ldm:
        return {}
    return {"loss_ldm": ldm[-1], "loss_gamma_ac": weighted_ac[-1],
            "mean_loss_ldm": sum(ldm) / len(ldm), "mean_loss_gamma_ac": sum(weighted_ac) / len(weighted_ac)}


def plot_parts(ldm: list[float], weighted_ac: list[float]):
    """The loss plot's extra curves: L_LDM (green) and gamma*L_ac (red)."""
    return (("L_LDM", ldm), ("gamma*L_ac", weighted_ac))


def _warn_if_other_base(adapter, unet) -> None:
    """Log a warning when a resumed adapter was trained on another base UNet (it still trains)."""
    from ..adapter import unet_fingerprint
    from ..copy_init import ldm_key_map

    if not adapter.base_unet_hash:
        return
    keys = list(ldm_key_map(adapter.copy).values())
    current = unet_fingerprint(unet.state_dict(), keys)
    if current != adapter.base_unet_hash:
        log.warning("[P3S Trainer] the resumed adapter was initialised from another base model "
                    "(%s, this one is %s); training continues on this model",
                    adapter.base_unet_hash, current)


def _preview(img):
    try:
        from PIL import Image

        return ("PNG", Image.fromarray(img), 512)
    except Exception:  # pragma: no cover - previews are optional
        return None
