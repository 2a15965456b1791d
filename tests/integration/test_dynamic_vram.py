"""Dynamic VRAM (ComfyUI 0.33 on NVIDIA, issue 11.3) and offloaded loads, tested on the CPU against
the real ComfyUI classes.

On the CPU ``ModelPatcherDynamic`` falls back to the plain ``ModelPatcher`` and comfy-aimdo has no
native library, so a dynamic load cannot run here. What can: the adapter's patcher is made with
the class ComfyUI uses for its own auxiliary models (``CoreModelPatcher``, which 0.33's main.py
points at ``ModelPatcherDynamic`` when Dynamic VRAM is on) so it never pushes a dynamic UNet's load
list onto the non-dynamic path; the adapter runs as its ComfyUI twin, every layer of which carries
``comfy_cast_weights`` (so a dynamic load casts all of it through its virtual allocations, none of it
outside); and P3S sampling keeps working when ComfyUI offloads the UNet and the adapter (a lowvram
load that casts weights per layer, as Dynamic VRAM does): every layer of the copy and the encoder on
ComfyUI's lowvram path, the step equal to the full-load step within fp32 rounding (issue 21).
``scripts/gpu_check.py`` runs the CUDA side (with and without ``--disable-dynamic-vram``).
"""
from __future__ import annotations

import torch


def test_adapter_patcher_uses_comfyuis_core_patcher_class(comfy):
    """The adapter's patcher class is ComfyUI's CoreModelPatcher (0.3.75: the plain ModelPatcher);
    with Dynamic VRAM switched on the way 0.33's main.py does it, it is ModelPatcherDynamic, whose
    CPU fallback gives a plain patcher that stays the adapter's one patcher across calls."""
    import comfy.model_management as mm
    import comfy.model_patcher as cmp

    backend = comfy.core("comfyui_engine")
    core = getattr(cmp, "CoreModelPatcher", cmp.ModelPatcher)
    assert backend.adapter_patcher_class() is core
    adapter = torch.nn.Linear(4, 4)
    p = backend.adapter_patcher(adapter)
    assert type(p) is core and p is backend.adapter_patcher(adapter)
    assert p.load_device == mm.get_torch_device()

    dynamic = getattr(cmp, "ModelPatcherDynamic", None)
    if dynamic is None:  # ComfyUI 0.3.75: no Dynamic VRAM, the plain patcher as before
        assert core is cmp.ModelPatcher
        return
    saved = cmp.CoreModelPatcher
    cmp.CoreModelPatcher = dynamic  # what main.py does when comfy-aimdo initialises
    try:
        assert backend.adapter_patcher_class() is dynamic
        other = torch.nn.Linear(4, 4)
        q = backend.adapter_patcher(other)
        base = dynamic(torch.nn.Linear(4, 4), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        # CPU load device: ModelPatcherDynamic reroutes to the plain patcher, for us as for the UNet
        assert type(q) is type(base) is cmp.ModelPatcher
        assert q.is_dynamic() == base.is_dynamic() is False
        assert backend.adapter_patcher(other) is q  # cached: one patcher per adapter
        # the patcher made before the switch is replaced, not reused with the wrong class
        assert backend.adapter_patcher(adapter) is not p
    finally:
        cmp.CoreModelPatcher = saved
    assert backend.adapter_patcher(adapter) is not None


def test_injector_joins_the_load_list_with_the_unets_patcher_class(comfy, sd15, active_adapter):
    """The injected MODEL brings the adapter into ComfyUI's load list (additional models and the
    patch's models()) as a patcher of the UNet's own patcher family, so 0.33's load_models_gpu keeps
    its dynamic path whenever the UNet is dynamic."""
    backend = comfy.core("comfyui_engine")
    patched, patch = backend.apply_injector(sd15.model, active_adapter, None, None)
    extra = patched.get_additional_models()
    twin = backend.comfy_twin(active_adapter)
    assert patch.compute_adapter() is twin and twin is not active_adapter
    mine = backend.adapter_patcher(twin)
    assert patch.adapter_patcher() is mine and backend.adapter_patcher(active_adapter) is not mine
    assert any(m is mine for m in extra)
    assert any(m is mine for m in patched.model_patches_models())
    assert type(mine) is type(sd15.model)  # same family as the UNet's patcher (CoreModelPatcher)

    def dynamic(m):
        return bool(getattr(m, "is_dynamic", lambda: False)())

    assert all(dynamic(m) == dynamic(patched) for m in patched.model_patches_models())


def _layers_with_weights(module):
    return [(n, m) for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


def test_the_twin_is_all_comfyui_cast_layers_sharing_the_adapters_weights(comfy, active_adapter):
    """Every weight of the twin sits in a layer with ``comfy_cast_weights`` (the layers a dynamic or
    lowvram load casts per call; the plain adapter has none), and is the adapter's own tensor: the
    twin is cached, and rebuilt when the adapter's weights are replaced."""
    backend = comfy.core("comfyui_engine")
    twin = backend.comfy_twin(active_adapter)
    assert backend.comfy_twin(active_adapter) is twin  # cached
    layers = _layers_with_weights(twin)
    # 112 layers + the 16 zero convs of the cross-attention enhancement (issue 22; the fixture has it)
    assert len(layers) == len(_layers_with_weights(active_adapter)) == 112 + 16
    assert sum(n.startswith("copy.cross_zero_convs.") for n, _ in layers) == 16
    assert all(hasattr(m, "comfy_cast_weights") and not any(True for _ in m.children()) for _, m in layers)
    assert not any(hasattr(m, "comfy_cast_weights") for _, m in _layers_with_weights(active_adapter))
    mine = dict(active_adapter.named_parameters())
    theirs = dict(twin.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(theirs[k].data_ptr() == p.data_ptr() and theirs[k].dtype == p.dtype for k, p in mine.items())
    assert [p.requires_grad for p in active_adapter.parameters()] == [False] * len(mine)  # flags kept

    adapter = comfy.core("adapter").new_adapter(comfy.core("copy_unet").CopyUNetConfig.tiny(), seed=0, clip_dim=16)
    first = backend.comfy_twin(adapter)
    with torch.inference_mode(False), torch.no_grad():
        adapter.copy.conv_in.weight.add_(1.0)  # an optimizer step: in place, seen by the twin
    assert backend.comfy_twin(adapter) is first
    assert torch.equal(first.copy.conv_in.weight, adapter.copy.conv_in.weight)
    adapter.copy.conv_in.weight = torch.nn.Parameter(adapter.copy.conv_in.weight.detach() * 2)  # replaced
    second = backend.comfy_twin(adapter)
    assert second is not first and second.copy.conv_in.weight is adapter.copy.conv_in.weight


def _apply(model, x, sigma, ctx, patched=None):
    opts = {}
    if patched is not None:
        opts = dict(patched.model_options["transformer_options"])
        opts["wrappers"] = patched.wrappers
    opts.update(cond_or_uncond=[0], sigmas=sigma)
    with torch.inference_mode():
        return model.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=opts).clone()


def _lowvram_layers(module) -> list[str]:
    """The layers ComfyUI's ``ModelPatcher.load`` put on its lowvram path: it marks each layer it
    casts per call with ``prev_comfy_cast_weights`` and each layer it loaded whole with
    ``comfy_patched_weights``."""
    return [n for n, m in _layers_with_weights(module)
            if hasattr(m, "prev_comfy_cast_weights") and m.comfy_cast_weights
            and not getattr(m, "comfy_patched_weights", False)]


def test_p3s_sampling_step_is_unchanged_when_comfyui_offloads(comfy, sd15, active_adapter):
    """A forced tiny memory budget (``ModelPatcher.load`` through ``patch_model(...,
    lowvram_model_memory=1)``, ComfyUI's own partial-load path) puts every layer of the copy and
    the encoder on ComfyUI's lowvram path (cast per call; the plain adapter's layers cannot be),
    and ComfyUI's sampling forward (apply_model with the injector's wrapper and attn1 patch, I''
    encoded in the step) then gives the full-load prediction within fp32 rounding; P3S acts."""
    import comfy.model_management as mm

    backend = comfy.core("comfyui_engine")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    sigma = torch.tensor([3.0])
    reference = (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 257, 1024, generator=g))
    patched, patch = backend.apply_injector(sd15.model, active_adapter, None, None, strength=1.0,
                                            reference=reference)
    cpu = torch.device("cpu")

    mm.load_models_gpu([patched], force_full_load=True)
    full = _apply(patched, x, sigma, ctx, patched)
    plain = _apply(sd15.model, x, sigma, ctx)
    mm.unload_all_models()

    # control: the plain adapter's torch layers cannot take the lowvram path (what issue 21 fixed)
    plain_aux = backend.adapter_patcher(active_adapter)
    with torch.inference_mode():
        plain_aux.patch_model(device_to=cpu, lowvram_model_memory=1, load_weights=True)
    try:
        assert _lowvram_layers(active_adapter) == []
    finally:
        with torch.inference_mode():
            plain_aux.unpatch_model(cpu)

    twin = patch.compute_adapter()
    aux = patch.adapter_patcher()
    assert aux.model is twin
    with torch.inference_mode():
        patched.patch_model(device_to=cpu, lowvram_model_memory=1, load_weights=True)
        aux.patch_model(device_to=cpu, lowvram_model_memory=1, load_weights=True)
    try:
        layer = patched.model.diffusion_model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
        assert layer.comfy_cast_weights  # really the per-layer cast (offloaded) path
        every = [n for n, _ in _layers_with_weights(twin)]
        assert _lowvram_layers(twin) == every and len(every) == 112 + 16  # + the cross zero convs
        assert any(n.startswith("encoder.") for n in every) and any(n.startswith("copy.zero_convs.") for n in every)
        assert twin.model_lowvram is True and twin.model_loaded_weight_memory == 0
        low = _apply(patched, x, sigma, ctx, patched)
    finally:
        with torch.inference_mode():
            patched.unpatch_model(cpu)
            aux.unpatch_model(cpu)
    assert _lowvram_layers(twin) == []  # unloaded: ComfyUI wiped its marks
    assert torch.allclose(low, full, atol=1e-5, rtol=1e-5), float((low - full).abs().max())
    assert float((full - plain).abs().max()) > 1e-3  # P3S acts in both
