"""The ComfyUI engine: how the adapter (copy + encoder) is loaded beside the UNet by ComfyUI's model
management, and the UNet weights the copy is initialised from."""
from __future__ import annotations


# --- the patch -----------------------------------------------------------------------------------
def adapter_patcher_class():
    """The patcher class ComfyUI uses for its own auxiliary models (ControlNet, upscalers, model
    patches): ``comfy.model_patcher.CoreModelPatcher``, which ComfyUI 0.33 points at
    ``ModelPatcherDynamic`` when Dynamic VRAM is on (NVIDIA, no ``--disable-dynamic-vram``) and
    which is the plain ``ModelPatcher`` otherwise (0.3.75 has no ``CoreModelPatcher``). A plain
    patcher in the same ``load_models_gpu`` list as a dynamic UNet would make 0.33 take its
    non-dynamic memory path (``free_memory(for_dynamic=False)``: other dynamic models unloaded,
    pinned-memory budget enforced) on every sampling run."""
    import comfy.model_patcher as cmp

    return getattr(cmp, "CoreModelPatcher", cmp.ModelPatcher)


def adapter_patcher(adapter):
    """One patcher per adapter object (of :func:`adapter_patcher_class`), so every injector using it
    shares ComfyUI's bookkeeping (a patcher per injector would leave ComfyUI tracking dead patchers
    of a live module). ``ModelPatcherDynamic`` itself falls back to the plain patcher for a CPU load
    device. The adapter is plain torch layers: a dynamic load moves its weights whole (the
    non-``comfy_cast_weights`` branch of ``ModelPatcherDynamic.load``), a lowvram load of the plain
    patcher loads them whole too, so the copy never runs with weights on another device."""
    cls = adapter_patcher_class()
    made_by, patcher = getattr(adapter, "_p3s_patcher", (None, None))
    if patcher is None or made_by is not cls:
        import comfy.model_management as mm

        patcher = cls(adapter, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        object.__setattr__(adapter, "_p3s_patcher", (cls, patcher))
    return patcher


def base_unet_state_dict(model) -> dict:
    """The SD1.5 UNet weights (LDM names, no prefix) of a ComfyUI MODEL, for the copy's init."""
    return model.get_model_object("diffusion_model").state_dict()
