"""One method, two engines: the random SD1.5 in the real ComfyUI (in process) and in diffusers
(loaded from the same single-file checkpoint with the shipped configs) give the same P3S noise
prediction and the same training step (loss and adapter gradients), in fp32.

Tolerances (fp32, CPU): the two UNets are different implementations of the same maths (LDM vs
diffusers modules, the same SDPA kernel), so results agree to float rounding: noise prediction
max |diff| <= 1e-4 (values are O(1)); loss rel. 1e-4; gradients: relative L2 error of the whole
adapter gradient <= 1e-3 and of every tensor with a non-negligible gradient <= 1e-2.
"""
from __future__ import annotations

import pytest
import torch

LATENT = 8  # 64x64 images: every UNet level exists, one step stays cheap


@pytest.fixture(scope="module")
def engines(comfy, sd15):
    db = comfy.core("diffusers_engine")
    path = comfy.folder_paths.get_full_path("checkpoints", "p3s_random_sd15.safetensors")
    with torch.inference_mode(False):
        dunet = db.load_unet(path, dtype=torch.float32)
    return db, dunet


@pytest.fixture(scope="module")
def adapter(comfy, sd15):
    """Initialised from ComfyUI's UNet, with active zero convs and encoder (as after training)."""
    backend = comfy.core("comfyui_engine")
    adapter_mod = comfy.core("adapter")
    with torch.inference_mode(False):
        sd = {k: v.detach().clone().float() for k, v in backend.base_unet_state_dict(sd15.model).items()}
        ad = adapter_mod.new_adapter(None, sd, seed=0, enhancement="cross")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for conv in list(ad.copy.zero_convs.values()) + [ad.encoder.zero_conv]:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
            for lin in ad.copy.cross_zero_convs.values():  # issue 22: both engines add the same
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    return ad.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def texts(comfy, sd15):
    enc = comfy.node("CLIPTextEncode")()
    with torch.inference_mode():
        cond = enc.encode(sd15.clip, "a photo of sks dog")[0][0][0]
        uncond = enc.encode(sd15.clip, "")[0][0][0]
    with torch.inference_mode(False):
        return torch.cat([uncond, cond]).float().clone()  # diffusers' CFG order: [uncond, cond]


def _comfy_eps(comfy, sd15, adapter, i2, x_vp, t, context, **kw):
    import comfy.model_management as mm

    backend = comfy.core("comfyui_engine")
    patched, _patch = backend.apply_injector(sd15.model, adapter, i2, kw.pop("schedule"), **kw)
    mm.load_models_gpu([patched])
    ms = patched.get_model_object("model_sampling")
    sigma = ms.sigma(torch.tensor([float(t)])).float()
    x_in = x_vp * (sigma ** 2 + 1).sqrt()
    opts = dict(patched.model_options["transformer_options"])
    opts["wrappers"] = patched.wrappers
    opts.update(cond_or_uncond=[1, 0], sigmas=sigma.expand(x_vp.shape[0]))
    with torch.no_grad():
        denoised = sd15.model.model.apply_model(x_in, sigma.expand(x_vp.shape[0]), c_crossattn=context,
                                                transformer_options=opts)
    return (x_in - denoised) / sigma


def test_copy_init_from_diffusers_equals_init_from_comfyui(engines, adapter):
    db, dunet = engines
    with torch.inference_mode(False):
        mine = db.new_adapter_for_unet(dunet, seed=0, enhancement="cross")
    assert mine.base_unet_hash == adapter.base_unet_hash
    theirs = adapter.copy.state_dict()
    for k, v in mine.copy.state_dict().items():
        if not k.startswith(("zero_convs.", "cross_zero_convs.")):  # set non-zero in the fixture
            assert torch.equal(v, theirs[k]), k


@pytest.mark.parametrize("apply_to", ["cond and uncond", "cond only"])
def test_noise_prediction_matches_comfyui(comfy, sd15, engines, adapter, texts, apply_to):
    db, dunet = engines
    sched_mod = comfy.core("schedule")
    assert next(sd15.model.model.diffusion_model.parameters()).dtype == torch.float32
    g = torch.Generator().manual_seed(5)
    x_vp = torch.randn(2, 4, LATENT, LATENT, generator=g)
    with torch.inference_mode(False), torch.no_grad():
        i2 = adapter.encode_reference(torch.randn(1, 4, 10, 6, generator=g),
                                      torch.randn(1, 257, 1024, generator=g))
    t = 601
    sched = sched_mod.P3SSchedule()  # the paper's Eq. 10
    kw = dict(schedule=sched, lam=0.2, strength=0.8, apply_to=apply_to)
    eps_c = _comfy_eps(comfy, sd15, adapter, i2, x_vp, t, texts, **kw)
    with torch.inference_mode(False), torch.no_grad():
        plain = dunet(x_vp, torch.tensor(t), encoder_hidden_states=texts).sample
        with db.P3SDiffusersInjector(dunet, adapter, i2, sched, lam=0.2, strength=0.8,
                                     apply_to=apply_to, cfg_batch=True):
            eps_d = dunet(x_vp, torch.tensor(t), encoder_hidden_states=texts).sample
    diff = float((eps_c - eps_d).abs().max())
    effect = float((eps_d - plain).abs().max())
    print(f"[parity {apply_to}] max|eps_comfy - eps_diffusers| = {diff:.3g}, P3S effect {effect:.3g}")
    assert diff <= 1e-4, diff
    assert effect > 100 * max(diff, 1e-6), "P3S must change the prediction far beyond the tolerance"
    if apply_to == "cond only":
        assert torch.allclose(eps_d[0], plain[0], atol=1e-4)  # the uncond row is untouched


def test_training_step_loss_and_gradients_match_comfyui(comfy, sd15, engines, adapter, texts):
    db, dunet = engines
    tr = comfy.core("comfyui_engine")
    train = comfy.core("train")
    settings = train.TrainSettings()
    g = torch.Generator().manual_seed(6)
    with torch.inference_mode(False):
        x0 = torch.randn(1, 4, LATENT, LATENT, generator=g)
        hidden = torch.randn(1, 257, 1024, generator=g)
        context = texts[1:2].clone()

    def run(step_fn):
        with torch.inference_mode(False), torch.enable_grad():
            adapter.requires_grad_(True)
            adapter.zero_grad(set_to_none=True)
            l_ldm, l_ac = step_fn(adapter, x0, context, hidden, torch.Generator().manual_seed(11))
            loss = l_ldm + settings.gamma * l_ac
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in adapter.named_parameters() if p.grad is not None}
            adapter.zero_grad(set_to_none=True)
            adapter.requires_grad_(False)
        return float(l_ldm.detach()), float(l_ac.detach()), grads

    with torch.inference_mode():
        unet_c = tr.frozen_unet_copy(sd15.model)
    ctx = tr.build_step_fn(sd15.model, adapter, settings, unet=unet_c, precision="fp32")
    try:
        ldm_c, ac_c, g_c = run(ctx.step_fn)
    finally:
        ctx.close()
        del unet_c, ctx
    step_fn, close = db.build_step_fn(dunet, adapter, settings)
    try:
        ldm_d, ac_d, g_d = run(step_fn)
    finally:
        close()
    print(f"[parity train] L_LDM {ldm_c:.6g} vs {ldm_d:.6g}, L_ac {ac_c:.6g} vs {ac_d:.6g}")
    assert ldm_d == pytest.approx(ldm_c, rel=1e-4)
    assert ac_d == pytest.approx(ac_c, rel=1e-4)
    assert set(g_c) == set(g_d) and len(g_c) == len(list(adapter.parameters()))
    flat_c = torch.cat([g_c[k].flatten() for k in sorted(g_c)])
    flat_d = torch.cat([g_d[k].flatten() for k in sorted(g_c)])
    rel = float((flat_c - flat_d).norm() / flat_c.norm())
    print(f"[parity train] relative L2 gradient error {rel:.3g} over {flat_c.numel()} values")
    assert float(flat_c.norm()) > 0 and rel <= 1e-3
    big = flat_c.norm() / len(g_c) ** 0.5 * 1e-3
    worst = max(float((g_c[k] - g_d[k]).norm() / g_c[k].norm()) for k in g_c if g_c[k].norm() > big)
    assert worst <= 1e-2, worst
