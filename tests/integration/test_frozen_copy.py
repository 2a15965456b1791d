"""The Trainer's frozen, differentiable base UNet (issue 11.3 / 14.3), in the real ComfyUI with the
random SD1.5: built without deep-copying the MODEL, with the graph's LoRA applied exactly as
ComfyUI applies it (full loads, lowvram loads that patch at cast time, and with another clone's
LoRA written into the shared weights), sharing the unpatched weights instead of a second UNet,
and giving the adapter the same gradients as the old deep-copy path.

Lean sizes: 64x64 latents of 8x8, one step per comparison.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

LORA_NAME = "p3s_test_frozen_copy_lora.safetensors"
# (layer, kind): Linear self-/cross-attention projections, a 1x1 and a 3x3 conv
LORA_LAYERS = [
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "linear"),
    ("output_blocks.11.1.transformer_blocks.0.attn2.to_k", "linear"),
    ("middle_block.1.proj_in", "conv1"),
    ("input_blocks.1.0.in_layers.2", "conv3"),
]


def _lora_state_dict(model) -> dict:
    """A rank-4 LoRA in ComfyUI's generic key format for LORA_LAYERS, sized from the UNet."""
    dm = model.model.diffusion_model
    weights = dict(dm.named_parameters())
    g = torch.Generator().manual_seed(21)
    sd = {}
    rank = 4
    for name, kind in LORA_LAYERS:
        w = weights[name + ".weight"]
        out_f, in_f = w.shape[0], w.shape[1]
        if kind == "linear":
            down, up = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
        else:
            k = 1 if kind == "conv1" else 3
            down = torch.randn(rank, in_f, k, k, generator=g)
            up = torch.randn(out_f, rank, 1, 1, generator=g)
        sd[f"diffusion_model.{name}.lora_down.weight"] = (down * 0.1).contiguous()
        sd[f"diffusion_model.{name}.lora_up.weight"] = (up * 0.1).contiguous()
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank))
    return sd


@pytest.fixture(scope="module")
def lora_model(comfy, sd15):
    """The SD1.5 MODEL through the real LoraLoaderModelOnly node with a LoRA file on disk."""
    from safetensors.torch import save_file

    folder = Path(comfy.folder_paths.get_folder_paths("loras")[0])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_lora_state_dict(sd15.model), str(folder / LORA_NAME))
    with torch.inference_mode():
        (m,) = comfy.node("LoraLoaderModelOnly")().load_lora_model_only(sd15.model, LORA_NAME, 1.0)
    patched = {k for k in m.patches}
    assert patched == {f"diffusion_model.{n}.weight" for n, _ in LORA_LAYERS}, patched
    return m


def _inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, 768, generator=g)
    return x, t, ctx


def _comfy_forward(model, x, t, ctx):
    """ComfyUI's own forward of MODEL's diffusion model in its current load state."""
    with torch.inference_mode():
        return model.model.diffusion_model(x, t, context=ctx).clone()


def _frozen_forward(tr, model, x, t, ctx):
    unet = tr.frozen_unet_copy(model, torch.device("cpu"))
    with torch.inference_mode(False), torch.no_grad():
        return unet(x, t, context=ctx)


def test_frozen_copy_applies_the_graphs_lora_like_comfyui(comfy, sd15, lora_model):
    """Fully loaded (LoRA written into the weights), the frozen copy of the LoRA MODEL computes what
    ComfyUI computes; the frozen copy of the plain MODEL, built while the LoRA clone is the one
    loaded into the shared module, is the plain UNet (no LoRA leaks in, none is applied twice)."""
    import comfy.model_management as mm

    tr = comfy.core("comfyui_engine")
    x, t, ctx = _inputs()
    mm.load_models_gpu([sd15.model], force_full_load=True)
    plain_ref = _comfy_forward(sd15.model, x, t, ctx)
    mm.load_models_gpu([lora_model], force_full_load=True)  # LoRA now written into the weights
    lora_ref = _comfy_forward(lora_model, x, t, ctx)
    effect = float((lora_ref - plain_ref).abs().max())
    assert effect > 1e-2, effect  # the LoRA visibly changes ComfyUI's output

    mine_lora = _frozen_forward(tr, lora_model, x, t, ctx)
    mine_plain = _frozen_forward(tr, sd15.model, x, t, ctx)  # while the LoRA clone is loaded
    assert torch.allclose(mine_lora, lora_ref, atol=1e-5, rtol=1e-5), float((mine_lora - lora_ref).abs().max())
    assert torch.allclose(mine_plain, plain_ref, atol=1e-5, rtol=1e-5), float((mine_plain - plain_ref).abs().max())
    mm.unload_all_models()


def test_frozen_copy_of_a_lowvram_load_that_patches_at_cast_time(comfy, sd15, lora_model):
    """A lowvram (partial) load leaves the LoRA out of the weights and applies it per layer at cast
    time, as Dynamic VRAM does: the frozen copy still carries the LoRA, equal to ComfyUI's forward
    in that state, and takes none of the cast machinery (plain torch layers, no weight functions)."""
    import comfy.model_management as mm

    tr = comfy.core("comfyui_engine")
    x, t, ctx = _inputs()
    mm.unload_all_models()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        lora_model.patch_model(device_to=cpu, lowvram_model_memory=1, load_weights=True)
    try:
        dm = lora_model.model.diffusion_model
        name = LORA_LAYERS[0][0]
        layer = dm.get_submodule(name)
        assert layer.comfy_cast_weights and layer.weight_function, "not a cast-time (lowvram) state"
        assert lora_model.backup.get(f"diffusion_model.{name}.weight") is None  # weight not patched
        ref = _comfy_forward(lora_model, x, t, ctx)
        unet = tr.frozen_unet_copy(lora_model, cpu)
        with torch.inference_mode(False), torch.no_grad():
            mine = unet(x, t, context=ctx)
    finally:
        with torch.inference_mode():
            lora_model.unpatch_model(cpu)
    assert torch.allclose(mine, ref, atol=1e-5, rtol=1e-5), float((mine - ref).abs().max())
    mine_layer = unet.get_submodule(name)
    assert type(mine_layer) is torch.nn.Linear
    assert not any(hasattr(m, "weight_function") or hasattr(m, "comfy_cast_weights") for m in unet.modules())


def test_frozen_copy_shares_unpatched_weights_and_copies_only_patched_ones(comfy, sd15, lora_model):
    """Training memory (issue 14.3): on the CPU the frozen UNet is no second UNet. Every weight no
    patch touches is the MODEL's own memory; the 4 LoRA weights are new tensors; all are normal
    (non-inference) tensors autograd may save, in the model's own dtype, without requires_grad."""
    import comfy.model_management as mm

    tr = comfy.core("comfyui_engine")
    mm.unload_all_models()
    unet = tr.frozen_unet_copy(lora_model, torch.device("cpu"))
    src = dict(lora_model.model.diffusion_model.named_parameters())
    mine = dict(unet.named_parameters())
    assert mine.keys() == src.keys()
    patched = {f"{n}.weight" for n, _ in LORA_LAYERS}
    shared = {k for k in mine if mine[k].data_ptr() == src[k].data_ptr()}
    assert shared == set(mine) - patched
    assert all(not p.is_inference() and not p.requires_grad for p in mine.values())
    assert {p.dtype for p in mine.values()} == {next(iter(src.values())).dtype}
    new_bytes = sum(mine[k].numel() * mine[k].element_size() for k in patched)
    all_bytes = sum(p.numel() * p.element_size() for p in mine.values())
    assert new_bytes < 0.02 * all_bytes


def _old_deepcopy_unet(model):
    """The pre-issue-14 frozen copy (reference): a full load writing the LoRA into the weights, then
    a deep copy of the diffusion model with every inference tensor cloned."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    with torch.inference_mode(False), torch.no_grad():
        unet = copy.deepcopy(model.model.diffusion_model)
        for mod in unet.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                if p.is_inference():
                    setattr(mod, name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.is_inference():
                    mod._buffers[name] = b.clone()
        unet.requires_grad_(False).eval()
    mm.unload_all_models()
    return unet


def _adapter_grads(comfy, model, adapter, unet, batch, seed=3, checkpointing=False):
    tr = comfy.core("comfyui_engine")
    train = comfy.core("train")
    settings = train.TrainSettings(ac_layers="all")
    ctx = tr.build_step_fn(model, adapter, settings, unet=unet, device=torch.device("cpu"),
                           gradient_checkpointing=checkpointing)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in adapter.parameters():
                p.requires_grad_(True)
                p.grad = None
            l_ldm, l_ac = ctx.step_fn(adapter, batch["latent"], batch["context"], batch["clip_hidden"],
                                      torch.Generator().manual_seed(seed))
            (l_ldm + 0.1 * l_ac).backward()
            grads = {n: p.grad.detach().clone() for n, p in adapter.named_parameters() if p.grad is not None}
            for p in adapter.parameters():
                p.grad = None
                p.requires_grad_(False)
    finally:
        ctx.close()
    return (float(l_ldm), float(l_ac)), grads


@pytest.fixture(scope="module")
def grad_setup(comfy, lora_model):
    tr = comfy.core("comfyui_engine")
    g = torch.Generator().manual_seed(8)
    batch = {"latent": torch.randn(1, 4, 8, 8, generator=g), "context": torch.randn(1, 77, 768, generator=g),
             "clip_hidden": torch.randn(1, 257, 1024, generator=g)}
    new_unet = tr.frozen_unet_copy(lora_model, torch.device("cpu"))
    adapter = tr.new_training_adapter(new_unet, seed=0)
    with torch.inference_mode(False), torch.no_grad():
        for conv in adapter.copy.zero_convs.values():  # a clearly active adapter: gradients everywhere
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    return batch, new_unet, adapter


def test_adapter_gradients_match_the_old_deepcopy_path(comfy, lora_model, grad_setup):
    """Gradients reach the adapter through the new frozen UNet exactly as through the old deep
    copy (same LoRA MODEL, same step draws): losses and every parameter's gradient within tolerance."""
    batch, new_unet, adapter = grad_setup
    old_unet = _old_deepcopy_unet(lora_model)
    (old_l, old_g) = _adapter_grads(comfy, lora_model, adapter, old_unet, batch)
    del old_unet
    (new_l, new_g) = _adapter_grads(comfy, lora_model, adapter, new_unet, batch)
    assert new_l == pytest.approx(old_l, rel=1e-4, abs=1e-6)
    assert old_g.keys() == new_g.keys() and len(new_g) > 10
    nonzero = [n for n in new_g if float(new_g[n].abs().max()) > 0]
    assert len(nonzero) > len(new_g) // 2
    for n in new_g:
        scale = float(old_g[n].abs().max()) + 1e-12
        err = float((new_g[n] - old_g[n]).abs().max())
        assert err <= 1e-3 * scale + 1e-9, (n, err, scale)


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) / (float(b[n].abs().max()) + 1e-12) for n in b)


def test_gradients_are_deterministic_and_checkpointing_keeps_them(comfy, lora_model, grad_setup):
    """Same seed -> bit-identical losses (the forward through the new frozen UNet is deterministic)
    and the same gradients (to float reassociation: on 0.33 two identical backward passes in one
    process were seen to differ in the last bits); gradient checkpointing (on a fresh frozen UNet:
    it wraps that UNet's layers) gives the same gradients."""
    tr = comfy.core("comfyui_engine")
    batch, new_unet, adapter = grad_setup
    l1, g1 = _adapter_grads(comfy, lora_model, adapter, new_unet, batch, seed=4)
    l2, g2 = _adapter_grads(comfy, lora_model, adapter, new_unet, batch, seed=4)
    assert l1 == l2
    bitwise = all(torch.equal(g1[n], g2[n]) for n in g1)
    assert bitwise or _max_rel(g2, g1) <= 1e-5, _max_rel(g2, g1)
    print(f"[p3s] repeated backward bit-identical: {bitwise}, max rel diff {_max_rel(g2, g1):.3g}")
    ck_unet = tr.frozen_unet_copy(lora_model, torch.device("cpu"))
    l3, g3 = _adapter_grads(comfy, lora_model, adapter, ck_unet, batch, seed=4, checkpointing=True)
    assert l3 == pytest.approx(l1, rel=1e-5)
    for n in g1:
        scale = float(g1[n].abs().max()) + 1e-12
        assert float((g3[n] - g1[n]).abs().max()) <= 1e-4 * scale + 1e-9, n


def test_patched_weight_is_comfyuis_own_patch_on_both_paths(comfy, lora_model):
    """Per key, :func:`patched_weight` equals what ComfyUI writes into the weight on a full load
    (bit-exact) and, for Dynamic VRAM's cast-time path, what ComfyUI's own ``LowVramPatch`` (the
    object a dynamic or lowvram load attaches to a layer) returns for the cast weight."""
    import comfy.model_management as mm
    import comfy.model_patcher as cmp

    tr = comfy.core("comfyui_engine")
    cpu = torch.device("cpu")
    mm.unload_all_models()
    keys = [f"diffusion_model.{n}.weight" for n, _ in LORA_LAYERS]
    dtype = tr.frozen_unet_dtype(lora_model)
    mine_full = {k: tr.patched_weight(lora_model, k, cpu, dtype, dynamic=False) for k in keys}
    mine_dyn = {k: tr.patched_weight(lora_model, k, cpu, dtype, dynamic=True) for k in keys}
    originals = {k: tr.original_weight(lora_model, k).detach().clone() for k in keys}
    mm.load_models_gpu([lora_model], force_full_load=True)
    try:
        for k in keys:
            written, _, _ = cmp.get_key_weight(lora_model.model, k)
            assert torch.equal(mine_full[k], written.to(dtype)), k
            with torch.inference_mode(False), torch.no_grad():
                cast_time = cmp.LowVramPatch(k, lora_model.patches)(originals[k].to(dtype, copy=True))
            assert torch.allclose(mine_dyn[k], cast_time, atol=1e-6, rtol=1e-6), k
            assert not torch.equal(mine_full[k], originals[k].to(dtype)), k  # the LoRA changed it
    finally:
        mm.unload_all_models()
