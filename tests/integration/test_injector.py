"""The P3S Condition Injector in the real ComfyUI with the random SD1.5 (paper Eq. 6-10)."""
from __future__ import annotations

import pytest
import torch

SIZE = 64  # 8x8 latent: all four UNet levels exist, sampling stays cheap on the CPU


@pytest.fixture(scope="module")
def conds(comfy, sd15):
    enc = comfy.node("CLIPTextEncode")()
    with torch.inference_mode():
        return enc.encode(sd15.clip, "a photo of sks dog")[0], enc.encode(sd15.clip, "")[0]


def sample(comfy, model, conds, seed=7, steps=2, cfg=7.5):
    latent = comfy.node("EmptyLatentImage")().generate(SIZE, SIZE, 1)[0]
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, seed, steps, cfg, "ddim", "normal", conds[0], conds[1],
                                             latent, denoise=1.0)[0]
    return out["samples"].clone()


def inject(comfy, sd15, clip_vision, adapter, reference, **kw):
    args = dict(lam=0.2, strength=1.0, apply_to="cond and uncond")
    args.update(kw)
    with torch.inference_mode():
        return comfy.node("P3SConditionInjector")().inject(sd15.model, adapter, reference, sd15.vae,
                                                           clip_vision, **args)[0]


def test_every_self_attention_patch_fires_each_step(comfy, sd15, clip_vision, active_adapter, reference, conds):
    """All 16 attn1 layers get the copy feature (K/V twice as long) on every step: none silently skipped."""
    copy_mod = comfy.core("copy_unet")
    patched = inject(comfy, sd15, clip_vision, active_adapter, reference)
    seen = []

    def probe(n, context, value, extra_options):  # chained after the P3S patch
        seen.append((copy_mod.layer_key(extra_options["block"]), n.shape, context.shape, value.shape))
        return n, context, value

    probed = patched.clone()
    probed.set_model_attn1_patch(probe)
    steps = 3
    sample(comfy, probed, conds, steps=steps)
    keys = [e["key"] for e in copy_mod.LAYER_MAP]
    assert len(keys) == 16
    for key in keys:
        calls = [s for s in seen if s[0] == key]
        assert len(calls) == steps, (key, len(calls))
        for _, n_shape, c_shape, v_shape in calls:
            assert c_shape[0] == n_shape[0] == 2  # cond + uncond rows, batch kept
            assert c_shape[1] == 2 * n_shape[1] and v_shape == c_shape  # [z, f] on the token axis
            assert c_shape[2] == n_shape[2]
    assert {s[0] for s in seen} == set(keys)


def test_input_model_is_untouched_and_patch_chains(comfy, sd15, clip_vision, active_adapter, reference):
    before = list(sd15.model.model_options["transformer_options"].get("patches", {}).get("attn1_patch", []))
    one = inject(comfy, sd15, clip_vision, active_adapter, reference)
    with torch.inference_mode():
        two = comfy.node("P3SConditionInjector")().inject(one, active_adapter, reference, sd15.vae, clip_vision,
                                                          lam=0.2, strength=1.0, apply_to="cond only")[0]
    assert sd15.model.model_options["transformer_options"].get("patches", {}).get("attn1_patch", []) == before
    assert len(one.model_options["transformer_options"]["patches"]["attn1_patch"]) == len(before) + 1
    assert len(two.model_options["transformer_options"]["patches"]["attn1_patch"]) == len(before) + 2


def test_weight_zero_is_the_plain_model_bit_for_bit(comfy, sd15, clip_vision, active_adapter, reference, conds):
    plain = sample(comfy, sd15.model, conds)
    off = sample(comfy, inject(comfy, sd15, clip_vision, active_adapter, reference, strength=0.0), conds)
    assert torch.equal(plain, off)
    sched_mod = comfy.core("schedule")
    window = sched_mod.P3SSchedule(mode="fixed", weight=0.0)
    zero_sched = sample(comfy, inject(comfy, sd15, clip_vision, active_adapter, reference, schedule=window), conds)
    assert torch.equal(plain, zero_sched)


def test_active_adapter_changes_the_sample(comfy, sd15, clip_vision, active_adapter, reference, conds):
    plain = sample(comfy, sd15.model, conds)
    on = sample(comfy, inject(comfy, sd15, clip_vision, active_adapter, reference), conds)
    assert on.shape == plain.shape and torch.isfinite(on).all()
    assert (on - plain).abs().max() > 1e-3
    cond_only = sample(comfy, inject(comfy, sd15, clip_vision, active_adapter, reference, apply_to="cond only"), conds)
    assert (cond_only - on).abs().max() > 1e-4


def recorded_sample(comfy, model, conds, steps, replay=None):
    """Sample while recording every UNet call (input, sigma, output) through ComfyUI's unet function wrapper.

    ``replay``: the calls of another run; call i then gets that run's input i instead of its own, so two
    models can be compared on the very same input at every step."""
    calls = []
    m = model.clone()

    def wrapper(apply_model, args):
        x = args["input"] if replay is None else replay[len(calls)]["input"]
        out = apply_model(x, args["timestep"], **args["c"])
        calls.append({"input": x.clone(), "sigma": args["timestep"].clone(), "out": out.clone()})
        return out

    m.set_model_unet_function_wrapper(wrapper)
    return calls, sample(comfy, m, conds, steps=steps)


def test_schedule_window_limits_the_injection(comfy, sd15, clip_vision, active_adapter, reference, conds):
    """Steps outside the schedule's window are the plain model's, bit for bit; steps inside are not.

    A window in the middle (0.3-0.7 of 6 DDIM steps) leaves steps before and after it. Before it the
    whole run equals plain sampling (same inputs, same outputs); after it the inputs differ (the window
    acted), so the plain model is run on the very inputs the windowed run saw, and must give its outputs."""
    sched_mod = comfy.core("schedule")
    start, end, steps = 0.3, 0.7, 6
    window = sched_mod.P3SSchedule(start_percent=start, end_percent=end)
    windowed, w_latent = recorded_sample(comfy, inject(comfy, sd15, clip_vision, active_adapter, reference,
                                                       schedule=window), conds, steps)
    plain, p_latent = recorded_sample(comfy, sd15.model, conds, steps)
    replayed, _ = recorded_sample(comfy, sd15.model, conds, steps, replay=windowed)
    assert len(windowed) == len(plain) == len(replayed) >= steps
    ms = sd15.model.get_model_object("model_sampling")
    sigma_start, sigma_end = float(ms.percent_to_sigma(start)), float(ms.percent_to_sigma(end))
    where = []
    for call in windowed:
        sigma = float(call["sigma"].max())
        where.append("before" if sigma > sigma_start else "after" if sigma <= sigma_end else "inside")
    assert {"before", "inside", "after"} <= set(where), where  # each kind of step is there to check
    first_inside = where.index("inside")
    for i, kind in enumerate(where):
        if kind == "before":  # the run so far is plain sampling
            assert torch.equal(windowed[i]["input"], plain[i]["input"]), i
            assert torch.equal(windowed[i]["out"], plain[i]["out"]), i
        elif kind == "after":  # the plain model on the same input
            assert torch.equal(replayed[i]["input"], windowed[i]["input"]), i
            assert torch.equal(replayed[i]["out"], windowed[i]["out"]), (i, (replayed[i]["out"] - windowed[i]["out"]).abs().max())
            assert not torch.equal(windowed[i]["input"], plain[i]["input"]), i  # the window acted before it
        else:  # inside: the injection changes the prediction on the same input
            assert (replayed[i]["out"] - windowed[i]["out"]).abs().max() > 1e-4, i
    assert torch.equal(windowed[first_inside]["input"], plain[first_inside]["input"])
    full = sample(comfy, inject(comfy, sd15, clip_vision, active_adapter, reference), conds, steps=steps)
    assert not torch.equal(w_latent, p_latent) and not torch.equal(w_latent, full)


def test_two_injectors_stack_on_one_model(comfy, sd15, clip_vision, active_adapter, reference, conds):
    """A second P3S injector chains after the first: K/V grow to [z, f1, f2] and both act."""
    one = inject(comfy, sd15, clip_vision, active_adapter, reference)
    with torch.inference_mode():
        two = comfy.node("P3SConditionInjector")().inject(one, active_adapter, reference.flip(1), sd15.vae,
                                                          clip_vision, lam=0.2, strength=1.0,
                                                          apply_to="cond and uncond")[0]
    lengths = []

    def probe(n, context, value, extra_options):
        lengths.append((context.shape[1] // n.shape[1], value.shape == context.shape))
        return n, context, value

    probed = two.clone()
    probed.set_model_attn1_patch(probe)
    stacked = sample(comfy, probed, conds)
    assert len(lengths) == 2 * 16 and all(ratio == 3 and same for ratio, same in lengths)
    single = sample(comfy, one, conds)
    assert torch.isfinite(stacked).all() and (stacked - single).abs().max() > 1e-4


def test_composes_with_kohya_deep_shrink(comfy, sd15, clip_vision, active_adapter, reference, conds):
    """A core node that changes the UNet's internal resolution: the copy features are resized to the
    layers' token grids instead of failing or folding tokens into the batch."""
    out = comfy.node("PatchModelAddDownscale").execute(sd15.model, 3, 2.0, 0.0, 1.0, True, "bicubic", "bicubic")
    shrunk = out.result[0] if hasattr(out, "result") else out[0]
    with torch.inference_mode():
        patched = comfy.node("P3SConditionInjector")().inject(shrunk, active_adapter, reference, sd15.vae,
                                                              clip_vision, lam=0.2, strength=1.0,
                                                              apply_to="cond and uncond")[0]
    seen = {}

    def probe(n, context, value, extra_options):
        seen[extra_options["block"]] = (n.shape[1], context.shape[1])
        return n, context, value

    patched.set_model_attn1_patch(probe)
    result = sample(comfy, patched, conds)
    assert torch.isfinite(result).all()
    assert seen[("input", 4)] == (4, 8)  # 2x2 tokens after the shrink (not 4x4), doubled by P3S
    assert all(c == 2 * n for n, c in seen.values()) and len(seen) == 16
    assert not torch.equal(result, sample(comfy, shrunk, conds))
