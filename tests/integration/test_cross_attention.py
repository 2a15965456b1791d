"""Cross-attention enhancement (paper Fig. 3, issue 22) through the real Condition Injector node in
the real ComfyUI with the random SD1.5.

Two attn2 output probes bracket the injector's patch in ComfyUI's ``attn2_output_patch`` list: one
set on the MODEL before the injector (runs first), one on the injected MODEL (runs after P3S). At
every one of the 16 cross-attention layers ``after - before`` is what P3S added there: eps_t times
the copy's cross feature of that layer (read from the injector's per-step bank), nothing at all
with ``cross_attention='off'`` or a self-attention-only (format 1) adapter, and only inside a region.
"""
from __future__ import annotations

import pytest
import torch

SIZE = 64  # 8x8 latent: token grids 8x8, 4x4, 2x2, 1x1


def run_node(comfy, name, **kwargs):
    cls = comfy.node(name)
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**kwargs)


@pytest.fixture(scope="module")
def cross_adapter(comfy, sd15):
    """An SD1.5 adapter with the enhancement, every zero conv non-zero (as after training)."""
    adapter_mod, backend = comfy.core("adapter"), comfy.core("comfyui_engine")
    with torch.inference_mode(False):
        sd = {k: v.detach().clone() for k, v in backend.base_unet_state_dict(sd15.model).items()}
        adapter = adapter_mod.new_adapter(None, sd, seed=0, enhancement="cross")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for conv in adapter.copy.zero_convs.values():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
            for lin in adapter.copy.cross_zero_convs.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    assert adapter.enhancement == "cross"
    return adapter.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def conds(comfy, sd15):
    pos = run_node(comfy, "CLIPTextEncode", clip=sd15.clip, text="a photo of sks dog")[0]
    neg = run_node(comfy, "CLIPTextEncode", clip=sd15.clip, text="")[0]
    return pos, neg


def sample(comfy, model, conds, steps=1):
    latent = run_node(comfy, "EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)[0]
    out = run_node(comfy, "KSampler", model=model, seed=7, steps=steps, cfg=7.5, sampler_name="ddim",
                   scheduler="normal", positive=conds[0], negative=conds[1], latent_image=latent, denoise=1.0)[0]
    return out["samples"].clone()


class Probes:
    """attn2 output patches before and after the injector's: per layer key, the outputs and the
    expected addition eps_t * g from the injector's bank (None when the bank has no cross feature)."""

    def __init__(self, comfy):
        self.copy_unet = comfy.core("copy_unet")
        self.before, self.after, self.expected = {}, {}, {}

    def __deepcopy__(self, memo):  # ComfyUI 0.3.75's clone() deep-copies the patch lists: share
        return self

    def _key(self, extra_options):
        return self.copy_unet.layer_key(extra_options["block"], extra_options.get("block_index", 0))

    def first(self, out, extra_options):
        self.before[self._key(extra_options)] = out.clone()
        return out

    def last(self, out, extra_options):
        key = self._key(extra_options)
        self.after[key] = out.clone()
        banks = [v for k, v in extra_options.items() if isinstance(k, str) and k.startswith("p3s_")
                 and hasattr(v, "features")]
        g = banks[0].features.get(self.copy_unet.cross_key(key)) if banks else None
        self.expected[key] = None if g is None else (g.float() * banks[0].weight)
        return out


def probed(comfy, sd15, clip_vision, reference, adapter, extra_patch=None, replace=None, **kw):
    probes = Probes(comfy)
    base = sd15.model.clone()
    base.set_model_attn2_output_patch(probes.first)
    if extra_patch is not None:  # an IPAdapter-style attn2 output patch, before P3S in the list
        base.set_model_attn2_output_patch(extra_patch)
    if replace is not None:  # an IPAdapter-style attn2 replacement on every cross-attention layer
        for blk in [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", i) for i in range(3, 12)]:
            base.set_model_attn2_replace(replace, blk[0], blk[1])
    args = dict(lam=0.2, strength=1.0, apply_to="cond and uncond")
    args.update(kw)
    model = run_node(comfy, "P3SConditionInjector", model=base, adapter=adapter, reference=reference,
                     vae=sd15.vae, clip_vision=clip_vision, **args)[0]
    model = model.clone()
    model.set_model_attn2_output_patch(probes.last)
    return model, probes


LAYERS = 16


def has_cross_patch(model) -> bool:
    """Whether the injector's attn2 output patch is in the MODEL's patch list."""
    patches = model.model_options["transformer_options"].get("patches", {}).get("attn2_output_patch", [])
    return any(getattr(f, "__name__", "") == "cross_output" for f in patches)


def test_attn2_outputs_get_eps_t_times_the_cross_feature_and_off_leaves_them(comfy, sd15, clip_vision, reference,
                                                                            cross_adapter, conds):
    model, p = probed(comfy, sd15, clip_vision, reference, cross_adapter)
    sample(comfy, model, conds)
    assert len(p.after) == LAYERS and all(p.expected[k] is not None for k in p.after)
    for key in p.after:
        added = (p.after[key] - p.before[key]).float()
        assert float(added.abs().max()) > 1e-4, key  # the enhancement acts at every layer
        assert torch.allclose(added, p.expected[key], atol=1e-5, rtol=1e-4), key
    model, p = probed(comfy, sd15, clip_vision, reference, cross_adapter, cross_attention="off")
    sample(comfy, model, conds)
    assert len(p.after) == LAYERS and all(p.expected[k] is None for k in p.after)
    assert all(torch.equal(p.after[k], p.before[k]) for k in p.after)
    with pytest.raises(ValueError, match="cross_attention"):
        probed(comfy, sd15, clip_vision, reference, cross_adapter, cross_attention="on")


def test_a_format_1_adapter_has_no_enhancement_and_samples_as_off(comfy, sd15, clip_vision, reference,
                                                                  cross_adapter, conds, tmp_path):
    adapter_mod = comfy.core("adapter")
    # a format-1 file (the same weights without the cross zero convs), loaded back
    with torch.inference_mode(False):
        sd = {k: v for k, v in cross_adapter.state_dict().items() if "cross_zero" not in k}
        with torch.device("meta"):
            selfonly = adapter_mod.P3SAdapter(enhancement="self")
        selfonly.load_state_dict(sd, assign=True)
        selfonly.reference = cross_adapter.reference
        path = adapter_mod.save_adapter(selfonly, tmp_path / "v1.safetensors", version=1)
        loaded = adapter_mod.load_adapter(path)
    assert loaded.enhancement == "self"
    model, p = probed(comfy, sd15, clip_vision, reference, loaded)
    assert not has_cross_patch(model)
    v1 = sample(comfy, model, conds)
    assert all(torch.equal(p.after[k], p.before[k]) for k in p.after) and len(p.after) == LAYERS
    off, _ = probed(comfy, sd15, clip_vision, reference, cross_adapter, cross_attention="off")
    on, _ = probed(comfy, sd15, clip_vision, reference, cross_adapter)
    assert has_cross_patch(on) and not has_cross_patch(off)
    assert torch.equal(v1, sample(comfy, off, conds))  # format 1 = the cross adapter with it off
    assert float((sample(comfy, on, conds) - v1).abs().max()) > 1e-4


def test_the_cross_enhancement_composes_with_ipadapter_style_attn2_patches(comfy, sd15, clip_vision, reference, cross_adapter, conds):
    calls = []

    def ip_output(out, extra_options):  # another node's attn2 output patch: adds its own term
        return out + 0.01

    def ip_replace(n, context, value, extra_options):  # another node's attn2 replacement
        calls.append(extra_options["block"])
        import comfy.ldm.modules.attention as attention

        return attention.optimized_attention(n, context, value, extra_options["n_heads"]) * 1.05

    model, p = probed(comfy, sd15, clip_vision, reference, cross_adapter, extra_patch=ip_output, replace=ip_replace)
    sample(comfy, model, conds)
    assert len(calls) >= LAYERS  # the replacement ran at every cross-attention layer
    for key in p.after:
        added = (p.after[key] - p.before[key]).float()
        assert torch.allclose(added, p.expected[key] + 0.01, atol=1e-5, rtol=1e-4), key  # both applied


def test_a_region_limits_the_enhancement(comfy, sd15, clip_vision, reference, cross_adapter, conds):
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, :, : SIZE // 2] = 1.0  # left half
    model, p = probed(comfy, sd15, clip_vision, reference, cross_adapter, region=mask)
    sample(comfy, model, conds)
    checked = 0
    for key in p.after:
        added = (p.after[key] - p.before[key]).float()
        n = added.shape[1]
        side = int(round(n ** 0.5))
        if side < 2:
            continue
        grid = added.reshape(added.shape[0], side, side, -1)
        assert float(grid[:, :, side // 2:].abs().max()) == 0.0, key  # right half: untouched
        assert torch.allclose(grid[:, :, : side // 2], p.expected[key].reshape(grid.shape)[:, :, : side // 2],
                              atol=1e-5, rtol=1e-4), key
        checked += 1
    assert checked == LAYERS - 1  # all but the 1x1 middle layer


def test_the_enhancement_in_a_half_precision_unet(comfy, sd15, clip_vision, reference, cross_adapter, conds):
    """--bf16-unet computed in bf16 (``manual_cast_dtype`` None, as on a GPU): the addition is made in
    the UNet's dtype, finite, and it acts."""
    import comfy.model_management as mm
    from comfy.cli_args import args

    saved = args.bf16_unet
    args.bf16_unet = True
    try:
        with torch.inference_mode():
            model = comfy.node("CheckpointLoaderSimple")().load_checkpoint("p3s_random_sd15.safetensors")[0]
    finally:
        args.bf16_unet = saved
    model.model.manual_cast_dtype = None
    try:
        half = type(sd15)(model=model, clip=sd15.clip, vae=sd15.vae)
        on, p = probed(comfy, sd15=half, clip_vision=clip_vision, reference=reference, adapter=cross_adapter)
        a = sample(comfy, on, conds)
        off, _ = probed(comfy, sd15=half, clip_vision=clip_vision, reference=reference, adapter=cross_adapter,
                        cross_attention="off")
        b = sample(comfy, off, conds)
    finally:
        del model
        mm.unload_all_models()
        mm.cleanup_models()
    assert {t.dtype for t in p.after.values()} == {torch.bfloat16}
    assert bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
    assert float((a - b).abs().max()) > 1e-3
    for key in p.after:
        added = (p.after[key] - p.before[key]).float()
        exp = p.expected[key]  # bf16 rounds the sum: compare as a relative error of the whole map
        assert float((added - exp).norm()) < 0.1 * float(exp.norm()), key
