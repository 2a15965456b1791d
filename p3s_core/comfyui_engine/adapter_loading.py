"""The ComfyUI engine: how the adapter (copy + encoder) is loaded beside the UNet by ComfyUI's model
management, and the UNet weights the copy is initialised from.

The Condition Injector never runs the adapter object it is given (from the P3S Adapter Loader or
the P3S Trainer: plain torch layers): it runs its :func:`comfy_twin`, the same parameters in
ComfyUI's cast-capable layers (``comfy.ops.manual_cast``), as ComfyUI runs its own models. Each
layer's ``forward`` then casts its weight to the input's device and dtype when needed, which is what
ComfyUI's lowvram load relies on: a layer that does not fit stays on the offload device and is cast
per call (``comfy_cast_weights``), so the copy computes on the UNet's device, in the dtype it is
given, with no tensor on two devices and no silent CPU run while the UNet is on a GPU.
"""
from __future__ import annotations


def comfy_operations():
    """The layer family of the adapter's twin: ``comfy.ops.manual_cast`` (ComfyUI's family for a
    model whose weights are stored in another dtype than it computes in): always cast-capable, no
    weight init (every weight comes from the adapter), the weights cast to the input's dtype and
    device per call. What ``comfy.ops.pick_operations(fp32, fp16)`` gives for an fp32 model run in fp16."""
    import comfy.ops

    return comfy.ops.manual_cast


def _shares_parameters(adapter, twin, record) -> bool:
    """True while ``twin`` still computes with ``adapter``'s weights: the same ``Parameter`` objects
    (always in step: an optimizer step or a move of one is a change of the other) or, where
    ComfyUI's loader wrapped them anew (0.33's lazily initialised Linear), the same source tensors
    as when the twin was built."""
    mine = list(adapter.named_parameters())
    if len(mine) != len(record):
        return False
    theirs = dict(twin.named_parameters())
    for (name, p), (r_name, r_p, r_ptr, r_dtype) in zip(mine, record):
        if name != r_name or p is not r_p:
            return False
        if theirs.get(name) is not p and (p.data_ptr() != r_ptr or p.dtype != r_dtype):
            return False
    return True


def comfy_twin(adapter):
    """The adapter as the Condition Injector runs it: ``adapter.with_operations(comfy_operations())``
    (same parameters, ComfyUI's cast-capable layers; the adapter itself when it already is one),
    cached on the adapter and rebuilt when its weights were replaced (new ``Parameter`` objects, or
    a source tensor swapped under a twin that only shares storage)."""
    ops = comfy_operations()
    twin, record = getattr(adapter, "_p3s_comfy_twin", (None, None))
    if twin is None or twin.operations is not ops or not _shares_parameters(adapter, twin, record):
        twin = adapter.with_operations(ops)
        record = tuple((n, p, p.data_ptr(), p.dtype) for n, p in adapter.named_parameters())
        object.__setattr__(adapter, "_p3s_comfy_twin", (twin, record))  # not a submodule
    return twin


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
    """One patcher per module object (of :func:`adapter_patcher_class`), so every injector using it
    shares ComfyUI's bookkeeping (a patcher per injector would leave ComfyUI tracking dead patchers
    of a live module). ``ModelPatcherDynamic`` itself falls back to the plain patcher for a CPU load
    device. The injector hands it the :func:`comfy_twin`, whose layers all carry
    ``comfy_cast_weights``: a partial (lowvram) load of the plain patcher leaves the layers that do
    not fit on the offload device and casts them per call; a dynamic load (0.33) casts every layer
    through its virtual allocations. Plain torch layers would instead stay wholly on the offload
    device when they do not fit (then the copy met weights on two devices, or ran on the CPU)."""
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
