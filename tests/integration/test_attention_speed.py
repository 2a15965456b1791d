"""Issue 14 in the real ComfyUI: how P3S's longer keys reach the attention kernel, and the opt-in
pooled level-0 keys (``level0_keys``), on the random SD1.5 at 64^2 (ComfyUI's CPU default kernel)."""
from __future__ import annotations

import pytest
import torch

from test_injector import conds, inject, sample  # noqa: F401  (the injector tests' helpers, fixture and size)


@pytest.fixture()
def attention(comfy):
    import comfy.ldm.modules.attention as attention

    # the harness boots ComfyUI on the CPU without --use-pytorch-cross-attention: its default kernel
    assert attention.optimized_attention.__name__ == "attention_sub_quad"
    return attention


def _probed(model, calls):
    """A clone whose attention calls are recorded by an ``optimized_attention_override`` of its own
    (as another node would set one); P3S's route must chain to it for every call it does not take."""
    def probe(func, *args, **kwargs):
        calls.append((func.__name__, args[0].shape[1], args[1].shape[1]))
        return func(*args, **kwargs)

    m = model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = probe
    return m


def test_extended_self_attention_goes_to_sdpa_everything_else_to_comfyui(comfy, sd15, clip_vision,
                                                                          active_adapter, reference, conds,
                                                                          attention):
    backend = comfy.core("comfyui_engine")
    patched = inject(comfy, sd15, clip_vision, active_adapter, reference)
    routed, plain = [], []
    on = sample(comfy, _probed(patched, routed), conds, steps=1)
    sample(comfy, _probed(sd15.model, plain), conds, steps=1)
    extended = [c for c in routed if c[2] == 2 * c[1]]
    assert extended == []  # all 16 extended self-attentions were taken by the route
    assert len(routed) == len(plain) - 16  # every other call reached the probe (and the kernel)
    assert {c[0] for c in routed} == {"attention_sub_quad"}
    backend.ExtendedAttentionRoute.enabled = False
    try:
        off_calls = []
        off = sample(comfy, _probed(patched, off_calls), conds, steps=1)
    finally:
        backend.ExtendedAttentionRoute.enabled = True
    assert len([c for c in off_calls if c[2] == 2 * c[1]]) == 16 and len(off_calls) == len(plain)
    # the same Eq. 8 through another kernel: equal up to float32 rounding
    plain_sample = sample(comfy, sd15.model, conds, steps=1)
    scale = (on - plain_sample).abs().max()
    assert scale > 1e-3
    assert (on - off).abs().max() <= 1e-3 * scale


def test_routed_kernel_equals_comfyuis_sub_quadratic_kernel(comfy, attention):
    backend = comfy.core("comfyui_engine")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 256, 320, generator=g)
    k, v = torch.randn(2, 512, 320, generator=g), torch.randn(2, 512, 320, generator=g)
    sub_quad = attention.attention_sub_quad.__wrapped__
    want = sub_quad(q, k, v, 8)
    route = backend.ExtendedAttentionRoute()
    assert torch.equal(route(sub_quad, q, k, v, 8), want) and route.routed == 0  # nothing announced
    route.expect = (2, 512)
    got = route(sub_quad, q, k, v, 8)
    assert route.routed == 1 and route.expect is None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    route.expect = (2, 512)
    route(sub_quad, q, k, v, 8, mask=torch.zeros(256, 512))  # a masked call is never taken
    assert route.routed == 1


def test_pooled_level0_keys_are_eq7_with_2x2_pooled_features(comfy, sd15, clip_vision, active_adapter,
                                                             reference, conds):
    copy_mod = comfy.core("copy_unet")
    level = {e["key"]: e["level"] for e in copy_mod.LAYER_MAP}
    seen = []

    def probe(n, context, value, extra_options):
        seen.append((copy_mod.layer_key(extra_options["block"]), n, context, value))
        return n, context, value

    fast = inject(comfy, sd15, clip_vision, active_adapter, reference, level0_keys="pooled 2x2 (faster)")
    probed = fast.clone()
    probed.set_model_attn1_patch(probe)
    sample(comfy, probed, conds, steps=1)
    assert len(seen) == 16
    for key, n, context, value in seen:
        tokens = n.shape[1]
        if level[key] != 0:
            assert context.shape[1] == 2 * tokens  # other levels: exact Eq. 7
            continue
        assert context.shape[1] == tokens + tokens // 4 and value.shape == context.shape
        assert torch.equal(context[:, :tokens], n)  # K' = [z, eps pool(f)]
        wf = (value[:, :tokens] - n) / 0.2  # V' = [z + lam eps f, eps pool(f)]  ->  eps f
        side = int(tokens ** 0.5)
        pooled = torch.nn.functional.avg_pool2d(wf.transpose(1, 2).reshape(2, -1, side, side), 2)
        torch.testing.assert_close(pooled.flatten(2).transpose(1, 2), context[:, tokens:], rtol=1e-3, atol=1e-5)
        assert torch.equal(value[:, tokens:], context[:, tokens:])
        assert wf.abs().max() > 1e-4
    exact = sample(comfy, inject(comfy, sd15, clip_vision, active_adapter, reference), conds)
    pooled_sample = sample(comfy, fast, conds)
    plain = sample(comfy, sd15.model, conds)
    assert 0 < (pooled_sample - exact).abs().max() < (exact - plain).abs().max()



def test_pooled_level0_keys_fall_back_to_exact_under_a_second_injector(comfy, sd15, clip_vision, active_adapter,
                                                                      reference, conds):
    """A second P3S injector extends the keys token by token (slot layout), which pooled keys would
    break: with two injectors on one MODEL both use the exact keys ([z, f1, f2] at every level)."""
    import sys

    node_module = sys.modules[comfy.node("P3SConditionInjector").__module__]
    assert tuple(node_module.LEVEL0_KEYS) == comfy.core("comfyui_engine").LEVEL0_KEYS  # the node's list is the core's
    copy_mod = comfy.core("copy_unet")
    seen = []

    def probe(n, context, value, extra_options):
        seen.append((copy_mod.layer_key(extra_options["block"]), n.shape[1], context.shape[1]))
        return n, context, value

    one = inject(comfy, sd15, clip_vision, active_adapter, reference, level0_keys="pooled 2x2 (faster)")
    with torch.inference_mode():
        two = comfy.node("P3SConditionInjector")().inject(one, active_adapter, reference, sd15.vae, clip_vision,
                                                          lam=0.2, strength=1.0, apply_to="cond and uncond",
                                                          level0_keys="pooled 2x2 (faster)")[0]
    probed = two.clone()
    probed.set_model_attn1_patch(probe)
    sample(comfy, probed, conds, steps=1)
    assert len(seen) == 16 and all(keys == 3 * tokens for _, tokens, keys in seen)
