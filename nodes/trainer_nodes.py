"""P3S Trainer node (paper Sec. III-B Eq. 11-15, IV-A): fine-tunes a P3S adapter on the cleaned photos."""
from __future__ import annotations

import os
import shutil

from .adapter_nodes import adapter_file_name, check_adapter
from .common import ADAPTER, CATEGORY, check_image_batch, check_text, numpy_to_image

#: issue 22: the injection the new adapter learns (node text -> p3s_core.copy_unet.ENHANCEMENTS)
ENHANCEMENTS = {"self + cross attention (paper)": "cross", "self-attention only": "self"}
#: the label of p3s_core.copy_unet.DEFAULT_ENHANCEMENT (tests/unit checks they agree)
DEFAULT_ENHANCEMENT_LABEL = "self + cross attention (paper)"


def _estimated_adapter_bytes(copy_layout: str = "encoder") -> int:
    """Size of an SD1.5 adapter file of that copy layout (built on the meta device: no memory)."""
    import torch

    from ..p3s_core.adapter import P3SAdapter
    from ..p3s_core.copy_config import CopyUNetConfig
    from ..p3s_core.train import estimate_adapter_bytes

    with torch.device("meta"):
        return estimate_adapter_bytes(P3SAdapter(CopyUNetConfig.sd15(copy_layout), enhancement="cross"))


def _check_mask(images, mask):
    """The MASK batch: one mask for all images or one per image, at the images' size."""
    from ..p3s_core.errors import ImageInputError

    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ImageInputError("mask", f"expected a MASK batch [B,H,W], got {tuple(mask.shape)}",
                              "connect the MASK output of P3S RNGR Mask + Inpaint (or leave it empty)")
    if mask.shape[0] not in (1, images.shape[0]):
        raise ImageInputError("mask", f"{mask.shape[0]} masks for {images.shape[0]} images",
                              "give one mask per image (same order), a single mask, or none")
    if tuple(mask.shape[-2:]) != tuple(images.shape[1:3]):
        raise ImageInputError("mask", f"mask size {tuple(mask.shape[-2:])} differs from the image size "
                              f"{tuple(images.shape[1:3])}", "make the masks from these same images")
    return mask


class P3STrainer:
    DESCRIPTION = (
        "Fine-tunes a P3S adapter on the cleaned photos of one subject (paper Sec. III-B): the RNGR encoder "
        "and the trainable copy learn with L = L_LDM + gamma * L_ac (Eq. 15) while the SD1.5 model stays "
        "frozen; 10 % of the steps drop the prompt for CFG. By default the copy feeds both the self-attention (Eq. 7) and, through zero convolutions, the cross-attention layers (the paper's Fig. 3). The adapter is saved atomically to "
        "models/p3s/<save_name>.safetensors (every save_every steps and at the end). Shows progress and the "
        "loss (L_LDM and gamma*L_ac shown apart); the cleaned photos are stored in the adapter as its default reference. Cancel stops it and keeps the last completed save. Connect resume_adapter to continue training."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["train", "dreambooth", "personalize", "fine-tune", "subject training", "train subject", "subject"]  # the words users type in the node search
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = (ADAPTER, "STRING", "IMAGE")
    RETURN_NAMES = ("adapter", "adapter_name", "loss_plot")
    OUTPUT_TOOLTIPS = (
        "The trained adapter, for the P3S Condition Injector.",
        "The saved file's name in models/p3s, for P3S Adapter Loader.",
        "The loss per step (blue) and its moving average (orange).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        from ..p3s_core.copy_config import COPY_LAYOUTS, DEFAULT_COPY_LAYOUT
        from ..p3s_core.train import CHECKPOINTING_CHOICES, DEFAULT_REFERENCE_PAIRING, REFERENCE_PAIRINGS

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5 MODEL to train against (frozen). LoRAs applied to it are trained with."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP text encoder, to encode the prompt."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode the photos into latents."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14 vision (clip-vit-large-patch14): its last hidden state feeds the RNGR encoder (Eq. 5)."}),
                "images": ("IMAGE", {"tooltip": "The cleaned photos of the subject (P3S RNGR Mask + Inpaint), 3-5 are typical."}),
                "prompt": ("STRING", {"default": "a photo of sks dog", "multiline": False, "tooltip": "The training prompt; it must contain the identifier word, e.g. 'a photo of sks dog'."}),
                "identifier": ("STRING", {"default": "sks", "tooltip": "The rare word [V] that names the subject in prompts."}),
                "epochs": ("INT", {"default": 60, "min": 1, "max": 10000, "tooltip": "Passes over the photos (paper: 60). Steps = epochs x number of photos."}),
                "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-7, "max": 1e-2, "step": 1e-6, "round": False, "tooltip": "AdamW learning rate (paper: 1e-5)."}),
                "gamma": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Weight of the attention consistency loss (Eq. 15, paper: 0.1). 0 turns it off."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 64, "tooltip": "The photos are resized so their short side is this (SD1.5: 512)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip": "Seed of the initialisation, the order, the dropout and the noise: same seed, same adapter."}),
                "save_name": ("STRING", {"default": "p3s_subject", "tooltip": "File name in models/p3s ('.safetensors' is added). An existing file of that name is replaced."}),
                "save_every": ("INT", {"advanced": True, "default": 0, "min": 0, "max": 100000, "tooltip": "Also save every N steps (the same file, atomically), so a cancelled run keeps its progress. 0 = only at the end."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional subject mask(s) (one per photo or one for all): the denoising loss counts the background at 0.1x, so the subject drives training."}),
                "resume_adapter": (ADAPTER, {"tooltip": "Continue training this adapter (its step count continues) instead of starting from the base model."}),
                "gradient_checkpointing": (list(CHECKPOINTING_CHOICES), {"advanced": True, "default": "auto", "tooltip": "Recompute the frozen UNet's blocks in the backward pass: less memory, slower steps. 'auto' (default): on where it pays (on a GPU always; on the CPU from resolution 256), off otherwise. Workflows saved with true/false still run (true = on, false = off)."}),
                "ac_reading": (["mass", "literal"], {"advanced": True, "default": "mass", "tooltip": "Normalisation of L_ac (Eq. 11-12). 'mass' (default): summed squared difference over the mean map mass, the mean per-query distance between the two attention maps, so gamma*L_ac actually steers training. 'literal': the equation as printed (MSE / mass, about 1e-9: no effect)."}),
                "reference_pairing": (list(REFERENCE_PAIRINGS), {"advanced": True, "default": DEFAULT_REFERENCE_PAIRING, "tooltip": "Which reference I' each training step sees. 'auto' (default): 'other photo' for an adapter with the cross-attention enhancement and 2+ photos (trained on its own aligned photo, the enhancement learns to copy it; see the README), else 'self'. 'self' (paper): the photo itself. 'other photo' (2+ photos): another photo of the subject, flipped at random, as at generation where the reference is not aligned with the image; slower to fit, less copying of the reference's pose. With one photo it is always 'self'."}),
                "reproducible": ("BOOLEAN", {"advanced": True, "default": True, "tooltip": "On the CPU: train on one thread, so the same seed writes the same adapter file byte for byte (with several threads the backward pass differs in the last bits from run to run). Costs step time on multi-core CPUs (see the README). No effect on GPUs."}),
                "copy_layout": (list(COPY_LAYOUTS), {"advanced": True, "default": DEFAULT_COPY_LAYOUT, "tooltip": "Layout of the trainable copy (Eq. 6). 'encoder': the copy's encoder half + middle; each UNet self-attention layer reads the copy level of its resolution (179.6 M parameters). 'full': one copy layer (one ResNet block + one transformer) for each of the UNet's 16 transformers, the decoder half fed by the copy's own skips, so every self-attention layer reads its own copy layer, as the paper describes (631.0 M parameters, slower steps, more training memory; see the README). A resumed adapter keeps its own layout."}),
                "enhancement": (list(ENHANCEMENTS), {"advanced": True, "default": DEFAULT_ENHANCEMENT_LABEL, "tooltip": "What the new adapter injects. 'self + cross attention (paper)' (default): the copy's features extend the self-attention (Eq. 7) and its cross-attention outputs are added to the model's cross-attention outputs through zero convolutions (Fig. 3; 16 more zero convolutions, about 50 MB more in the file); trained with reference_pairing 'auto' it lowered the toy world's held-out loss below the plain model's and a self-attention-only adapter's (see the README). 'self-attention only': Eq. 7 alone (adapters of earlier versions). A resumed adapter keeps its own."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, gradient_checkpointing="auto"):
        """Replaces ComfyUI's list check of ``gradient_checkpointing`` only: the choices, plus the
        true/false of workflows saved when it was a BOOLEAN (ComfyUI would refuse those)."""
        from ..p3s_core.errors import P3SError
        from ..p3s_core.train import checkpointing_choice

        try:
            checkpointing_choice(gradient_checkpointing)
        except P3SError as exc:
            return str(exc)
        return True

    def train(self, model, clip, vae, clip_vision, images, prompt, identifier, epochs, learning_rate, gamma,
              resolution, seed, save_name, save_every, mask=None, resume_adapter=None, gradient_checkpointing="auto",
              ac_reading="mass", reference_pairing="auto", reproducible=True, copy_layout=None,
              enhancement=DEFAULT_ENHANCEMENT_LABEL):
        from ..p3s_core import comfyui_engine as engine
        from ..p3s_core.comfyui_engine import training as trainer
        from ..p3s_core.copy_config import COPY_LAYOUTS, DEFAULT_COPY_LAYOUT, check_copy_layout
        from ..p3s_core.copy_unet import CopyUNetConfig
        from ..p3s_core.errors import AdapterFileError, ModelMismatchError, TrainingConfigError
        from ..p3s_core.previews import plot_losses
        from ..p3s_core.train import TrainSettings, checkpointing_choice
        from .paths import save_folder

        # --- validate everything before any work -----------------------------------------------
        check_image_batch(images, "images")  # the same IMAGE checks as every P3S node (RGB, finite, float)
        check_text(prompt, "prompt", fix="write a short prompt such as 'a photo of sks dog'")
        mask = _check_mask(images, mask)
        if enhancement not in ENHANCEMENTS:
            raise TrainingConfigError("enhancement", f"{enhancement!r} is not one of {tuple(ENHANCEMENTS)}",
                                      "use 'self + cross attention (paper)' (default) or 'self-attention only'")
        checkpointing = checkpointing_choice(gradient_checkpointing)  # None: on where it pays
        copy_layout = check_copy_layout(DEFAULT_COPY_LAYOUT if copy_layout is None else copy_layout)
        settings = TrainSettings(epochs=epochs, lr=learning_rate, gamma=gamma, seed=seed,
                                 resolution=resolution, save_every=save_every,
                                 identifier=str(identifier).strip(), ac_reading=ac_reading,
                                 reference_pairing=reference_pairing, enhancement=ENHANCEMENTS[enhancement])
        settings.validate(prompt)
        name = adapter_file_name(save_name, "save_name")
        engine.check_sd15(model)
        engine.check_eps_prediction(model)
        engine.check_clip_vit_l(clip_vision)
        if not (hasattr(clip, "tokenize") and hasattr(clip, "encode_from_tokens")):
            raise ModelMismatchError("clip", "this is not a ComfyUI CLIP text encoder",
                                     "connect the CLIP output of the SD1.5 checkpoint loader")
        engine.check_vae_sd15(vae)
        if resume_adapter is not None:
            check_adapter(resume_adapter, "resume_adapter")
            if resume_adapter.config not in [CopyUNetConfig.sd15(lay) for lay in COPY_LAYOUTS] or not isinstance(resume_adapter.training_info, dict):
                raise AdapterFileError("resume_adapter", "this is not an SD1.5 P3S adapter",
                                       "connect a P3S Adapter Loader or P3S Trainer output")
            steps = resume_adapter.training_info.get("steps", 0)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise AdapterFileError("resume_adapter", f"its step count {steps!r} is not a whole number >= 0",
                                       "resume from an adapter saved by the P3S Trainer")
        folder = save_folder()
        layout = resume_adapter.config.layout if resume_adapter is not None else copy_layout
        need = 2 * _estimated_adapter_bytes(layout)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise TrainingConfigError("save_name", f"only {free / 2**30:.2f} GiB free in {folder}; saving the "
                                      f"adapter needs about {need / 2**30:.2f} GiB (twice its size, for the "
                                      "atomic save)", "free disk space or point 'p3s' in extra_model_paths.yaml "
                                      "to a larger disk")
        # --- train ---------------------------------------------------------------------------------
        path = os.path.join(folder, name)
        adapter, result, start = trainer.run_training(
            model, clip, vae, clip_vision, images, prompt, settings, path, masks=mask,
            resume=resume_adapter, gradient_checkpointing=checkpointing,
            reproducible=bool(reproducible), copy_layout=copy_layout)
        parts = trainer.plot_parts(result.ldm_losses, result.weighted_ac_losses)
        plot = numpy_to_image([plot_losses(result.losses, 512, 256, start, parts=parts).astype("float32") / 255.0])
        text = (f"{name}: {result.steps} steps, last loss {result.losses[-1]:.5f} = L_LDM "
                f"{result.ldm_losses[-1]:.5f} + gamma*L_ac {result.weighted_ac_losses[-1]:.5f}"
                if result.losses else name)
        info = adapter.training_info or {}
        if info.get("precision"):
            text += f"; precision {info['precision']}"
            if info.get("skipped_steps"):
                text += f" ({info['skipped_steps']} steps skipped by loss scaling)"
        if info.get("reference_pairing"):
            text += f"; reference pairing {info['reference_pairing']}"
            if result.pairing_note:
                text += f" ({result.pairing_note})"
        used = info.get("gradient_checkpointing")
        if used is not None:
            text += f"; gradient checkpointing {'on' if used else 'off'}" + (" (auto)" if checkpointing is None else "")
        return {"ui": {"text": [text]}, "result": (adapter, name, plot)}
