"""Regional injection (issue 16) in the real ComfyUI with the random SD1.5.

At every one of the 16 self-attention layers, a probe chained after the injector(s) recomputes, from
the layer's own input ``z`` and its own ``attn1`` module, the plain attention ``A(z)`` and the
unmasked P3S attention ``A_inj(z)`` (Eq. 7-8 from ``injection.injected_context_value`` and the
copy's features of this step), and checks the layer's actual output token by token: outside the
region = ``A(z)`` (fp32 tolerance), inside = ``A_inj(z)`` and not ``A(z)``.
"""
from __future__ import annotations

import pytest
import torch

SIZE = 128  # 16x16 latent: every level's token grid (16, 8, 4, 2) splits into exact halves


# --------------------------------------------------------------------------- fixtures / helpers
def run_node(comfy, name, **kwargs):
    """Call a core or P3S node by its input names (V1 classes and V3 ``execute`` classes alike)."""
    cls = comfy.node(name)
    with torch.inference_mode():
        if hasattr(cls, "FUNCTION"):
            return getattr(cls(), cls.FUNCTION)(**kwargs)
        out = cls.execute(**kwargs)
        return out.result if hasattr(out, "result") else out


@pytest.fixture(scope="module")
def references():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 80, 64, 3, generator=g)
    a[:, 20:60, 16:48, :] = torch.tensor([0.8, 0.5, 0.2])
    b = torch.rand(1, 64, 96, 3, generator=g)
    b[:, 10:50, 30:70, :] = torch.tensor([0.1, 0.3, 0.9])
    return a, b


def _adapter(comfy, sd15, seed):
    adapter_mod, copy_mod, backend = comfy.core("adapter"), comfy.core("copy_unet"), comfy.core("comfyui_engine")
    with torch.inference_mode(False):
        sd = {k: v.detach().clone() for k, v in backend.base_unet_state_dict(sd15.model).items()}
        adapter = adapter_mod.new_adapter(copy_mod.CopyUNetConfig.sd15(), sd, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for conv in adapter.copy.zero_convs.values():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    return adapter.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def adapters(comfy, sd15):
    """Two different adapters (as after training two subjects): non-zero zero-convs, other seeds."""
    return _adapter(comfy, sd15, 0), _adapter(comfy, sd15, 10)


@pytest.fixture(scope="module")
def conds(comfy, sd15):
    with torch.inference_mode():
        pos = run_node(comfy, "CLIPTextEncode", clip=sd15.clip, text="a photo of sks dog and zwx cat")[0]
        neg = run_node(comfy, "CLIPTextEncode", clip=sd15.clip, text="")[0]
    return pos, neg


def sample(comfy, model, conds, steps=1, size=SIZE, seed=7):
    latent = run_node(comfy, "EmptyLatentImage", width=size, height=size, batch_size=1)[0]
    out = run_node(comfy, "KSampler", model=model, seed=seed, steps=steps, cfg=7.5, sampler_name="ddim",
                   scheduler="normal", positive=conds[0], negative=conds[1], latent_image=latent, denoise=1.0)[0]
    return out["samples"].clone()


def inject(comfy, model, sd15, clip_vision, adapter, reference, **kw):
    args = dict(lam=0.2, strength=1.0, apply_to="cond and uncond")
    args.update(kw)
    return run_node(comfy, "P3SConditionInjector", model=model, adapter=adapter, reference=reference,
                    vae=sd15.vae, clip_vision=clip_vision, **args)[0]


def half(side):
    """Exact token weights of a half region on a (h, w) grid (independent of the pack's resampling)."""
    def weights(h, w):
        g = torch.zeros(h, w)
        if side == "left":
            g[:, : w // 2] = 1
        elif side == "right":
            g[:, w // 2:] = 1
        elif side == "top":
            g[: h // 2] = 1
        return g.flatten()
    return weights


def attn1_module(unet, block, block_index):
    seq = {"input": lambda i: unet.input_blocks[i], "middle": lambda i: unet.middle_block,
           "output": lambda i: unet.output_blocks[i]}[block[0]](block[1])
    return [m for m in seq if hasattr(m, "transformer_blocks")][0].transformer_blocks[block_index].attn1


def probe(comfy, model, regional):
    """A clone of ``model`` with a checking probe chained after everything (attn1 + attn1 output).

    ``regional``: list of (patch, token-weight function or None for an unmasked injector). Returns
    (model, records); each record: layer key, rows, outside/inside errors against the references."""
    injection = comfy.core("injection")
    copy_mod = comfy.core("copy_unet")
    unet = model.get_model_object("diffusion_model")
    records = []

    def grab(n, context, value, extra_options):
        extra_options["_probe"] = (n, context, value)
        return n, context, value

    def check(out, extra_options):
        n, context, value = extra_options.pop("_probe")
        key = copy_mod.layer_key(extra_options["block"], extra_options.get("block_index", 0))
        attn1 = attn1_module(unet, extra_options["block"], extra_options.get("block_index", 0))
        H, W = extra_options["original_shape"][-2:]
        ds = int(round((H * W / n.shape[1]) ** 0.5))
        h, w = -(-H // ds), -(-W // ds)
        plain = attn1(n, transformer_options=extra_options)
        expected = plain.clone()
        inside_any = torch.zeros(n.shape[0], n.shape[1], dtype=torch.bool)
        touched = torch.zeros(n.shape[0], n.shape[1], dtype=torch.bool)
        for patch, weights in regional:
            bank = extra_options.get(patch.key)
            if bank is None:
                continue
            f = bank.features[key].to(n)
            ctx, val = injection.injected_context_value(n, f, bank.weight, bank.lam)
            inj = attn1(n, context=ctx, value=val, transformer_options=extra_options)
            tok = torch.ones(n.shape[1]) if weights is None else weights(h, w).cpu().float()
            rows = torch.ones(n.shape[0], dtype=torch.bool) if bank.active is None else bank.active.cpu()
            sel = rows.view(-1, 1) & (tok > 0).view(1, -1)
            blend = expected + tok.view(1, -1, 1).to(n) * (inj - expected)  # soft edge: w A_inj + (1-w) A
            expected = torch.where(sel.unsqueeze(-1), torch.where((tok == 1).view(1, -1, 1), inj, blend), expected)
            inside_any |= rows.view(-1, 1) & (tok == 1).view(1, -1)
            touched |= sel
        outside = ~touched
        records.append({
            "key": key, "context_untouched": context is n and value is n,
            "err_all": float((out - expected).abs().max()),
            "err_outside": float((out[outside] - plain[outside]).abs().max()) if outside.any() else 0.0,
            "n_outside": int(outside.sum()), "n_inside": int(inside_any.sum()),
            "inside_vs_plain": float((out[inside_any] - plain[inside_any]).abs().max()) if inside_any.any() else 0.0,
            "scale": float(plain.abs().max()),
        })
        return out

    m = model.clone()
    m.set_model_attn1_patch(grab)
    m.set_model_attn1_output_patch(check)
    return m, records


def regional_patches(model):
    """The P3S patch objects on a MODEL, in chain order."""
    patches = model.model_options["transformer_options"]["patches"]["attn1_patch"]
    return [p for p in patches if hasattr(p, "region_output")]


def by_layer(records):
    """Records grouped by layer; all 16 layers seen, each the same number of times (ComfyUI may run
    cond and uncond as separate calls when it estimates memory is short)."""
    layers = {}
    for r in records:
        layers.setdefault(r["key"], []).append(r)
    assert len(layers) == 16, sorted(layers)
    assert len({len(v) for v in layers.values()}) == 1
    return layers


def assert_layers(records, outside=True, inside=True):
    """Per layer: outside tokens == plain attention, every token == the expected blend, and inside
    tokens clearly not plain."""
    for key, recs in by_layer(records).items():
        for r in recs:
            tol = 1e-5 * max(1.0, r["scale"])
            assert r["context_untouched"], key  # the regional patch leaves K/V to the plain model
            assert r["err_outside"] <= tol, r
            assert r["err_all"] <= 10 * tol, r
            if r["n_inside"]:
                assert r["inside_vs_plain"] > 1e3 * tol, r
        if outside:
            assert sum(r["n_outside"] for r in recs) > 0, key
        if inside:
            assert sum(r["n_inside"] for r in recs) > 0, key


# --------------------------------------------------------------------------- the tests
def test_outside_is_plain_inside_is_injected_at_every_layer(comfy, sd15, clip_vision, adapters, references, conds):
    """A P3S Region (left half) mask: per layer, outside == plain attention, inside == Eq. 7-8."""
    mask, preview = run_node(comfy, "P3SRegion", shape="left half", width=512, height=512, left=0.25, top=0.25,
                             right=0.75, bottom=0.75, invert=False)
    assert mask.shape == (1, 512, 512) and preview.shape == (1, 512, 512, 3)
    patched = inject(comfy, sd15.model, sd15, clip_vision, adapters[0], references[0], region=mask)
    (patch,) = regional_patches(patched)
    m, records = probe(comfy, patched, [(patch, half("left"))])
    out = sample(comfy, m, conds)
    assert torch.isfinite(out).all()
    assert_layers(records)


def test_two_stacked_regional_injectors_each_act_in_their_own_region(comfy, sd15, clip_vision, adapters,
                                                                    references, conds):
    """Two adapters, two references, left and right halves from core mask nodes (Solid Mask + Mask
    Composite for the left, Load Image-style alpha for the right): each region gets only its subject."""
    blank = run_node(comfy, "SolidMask", value=0.0, width=96, height=64)[0]
    block = run_node(comfy, "SolidMask", value=1.0, width=48, height=64)[0]
    left = run_node(comfy, "MaskComposite", destination=blank, source=block, x=0, y=0, operation="add")[0]
    assert left.shape == (1, 64, 96) and float(left[0, :, :48].min()) == 1 and float(left[0, :, 48:].max()) == 0
    right = 1.0 - left  # what Load Image's MASK gives for a picture whose left half is opaque
    one = inject(comfy, sd15.model, sd15, clip_vision, adapters[0], references[0], region=left)
    two = inject(comfy, one, sd15, clip_vision, adapters[1], references[1], region=right)
    first, second = regional_patches(two)
    m, records = probe(comfy, two, [(first, half("left")), (second, half("right"))])
    stacked = sample(comfy, m, conds)
    assert_layers(records, outside=False)
    assert all(r["n_outside"] == 0 for r in records)  # every token is in one region, with its subject
    # each injector alone changes only its half of the tokens: the right-only model differs from the
    # stacked one, and the left-only from the right-only
    alone = sample(comfy, inject(comfy, sd15.model, sd15, clip_vision, adapters[1], references[1], region=right), conds)
    assert torch.isfinite(stacked).all() and (stacked - alone).abs().max() > 1e-4


def test_region_beside_controlnet_lora_schedule_and_cond_only(comfy, sd15, clip_vision, adapters, references,
                                                              conds, tmp_path):
    """LoRA (real LoraLoaderModelOnly on the self-attention), ControlNet on the conditioning, a
    fixed-weight schedule, 'cond only' and a top-half mask: the per-layer checks still hold."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    lora = {}
    for name in ("input_blocks_1_1", "middle_block_1", "output_blocks_11_1"):
        width = 1280 if name.startswith("middle") else 320
        for proj in ("to_q", "to_k", "to_v"):
            k = f"lora_unet_{name}_transformer_blocks_0_attn1_{proj}"
            lora[f"{k}.lora_down.weight"] = torch.randn(4, width, generator=g) * 0.1
            lora[f"{k}.lora_up.weight"] = torch.randn(width, 4, generator=g) * 0.1
            lora[f"{k}.alpha"] = torch.tensor(4.0)
    loras = comfy.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(loras / "p3s_test_region_lora.safetensors"))
    lora_model = run_node(comfy, "LoraLoaderModelOnly", model=sd15.model,
                          lora_name="p3s_test_region_lora.safetensors", strength_model=1.0)[0]
    assert len(lora_model.patches) >= 9

    cn = run_node(comfy, "ControlNetLoader", control_net_name="p3s_random_controlnet_sd15.safetensors")[0]
    hint = torch.rand(1, SIZE, SIZE, 3, generator=g)
    pos, neg = run_node(comfy, "ControlNetApplyAdvanced", positive=conds[0], negative=conds[1], control_net=cn,
                        image=hint, strength=0.8, start_percent=0.0, end_percent=1.0, vae=sd15.vae)[:2]
    sched_mod = comfy.core("schedule")
    schedule = sched_mod.P3SSchedule(mode="fixed", weight=0.7)
    top = run_node(comfy, "P3SRegion", shape="top half", width=64, height=64, left=0.25, top=0.25, right=0.75,
                   bottom=0.75, invert=False)[0]
    # hard edge: every layer has tokens wholly outside (plain) and wholly inside (Eq. 7-8, cond row only)
    hard = inject(comfy, lora_model, sd15, clip_vision, adapters[0], references[0], region=top,
                  schedule=schedule, apply_to="cond only")
    (hp,) = regional_patches(hard)
    m, records = probe(comfy, hard, [(hp, half("top"))])
    out = sample(comfy, m, (pos, neg))
    assert torch.isfinite(out).all()
    assert_layers(records)
    for recs in by_layer(records).values():  # the top half of the cond row only
        assert sum(r["n_inside"] for r in recs) * 4 == sum(r["n_inside"] + r["n_outside"] for r in recs)


def test_feathered_region_blends_the_edge(comfy, sd15, clip_vision, adapters, references, conds):
    """A feathered mask: tokens in the soft band get w A_inj + (1 - w) A with the region's token
    weights; tokens beyond the band are exactly plain / exactly injected."""
    left = run_node(comfy, "P3SRegion", shape="left half", width=64, height=64, left=0.25, top=0.25, right=0.75,
                    bottom=0.75, invert=False)[0]
    soft = inject(comfy, sd15.model, sd15, clip_vision, adapters[0], references[0], region=left, feather=0.1)
    (sp,) = regional_patches(soft)
    band = sp.region.weights((8, 8))
    assert bool(((band > 0) & (band < 1)).any()) and bool((band == 0).any()) and bool((band == 1).any())
    m, records = probe(comfy, soft, [(sp, lambda h, w: sp.region.weights((h, w)))])
    sample(comfy, m, conds, size=64)
    assert_layers(records, outside=False, inside=False)
    layers = by_layer(records)
    assert sum(sum(r["n_outside"] for r in recs) > 0 for recs in layers.values()) >= 10  # the 8x8 and 4x4 grids


def test_empty_region_is_the_plain_model_bit_for_bit(comfy, sd15, clip_vision, adapters, references, conds):
    empty = run_node(comfy, "SolidMask", value=0.0, width=64, height=64)[0]
    plain = sample(comfy, sd15.model, conds, steps=2, size=64)
    off = sample(comfy, inject(comfy, sd15.model, sd15, clip_vision, adapters[0], references[0], region=empty,
                               feather=0.2), conds, steps=2, size=64)
    assert torch.equal(plain, off)
    on = sample(comfy, inject(comfy, sd15.model, sd15, clip_vision, adapters[0], references[0],
                              region=1.0 - empty), conds, steps=2, size=64)
    assert (on - plain).abs().max() > 1e-4


def test_no_region_keeps_the_model_options_as_before(comfy, sd15, clip_vision, adapters, references):
    """Without a mask the injector installs exactly what it did before issue 16 (no output patch)."""
    patched = inject(comfy, sd15.model, sd15, clip_vision, adapters[0], references[0])
    patches = patched.model_options["transformer_options"]["patches"]
    assert "attn1_output_patch" not in patches or patches["attn1_output_patch"] == \
        sd15.model.model_options["transformer_options"].get("patches", {}).get("attn1_output_patch")
    regional = inject(comfy, sd15.model, sd15, clip_vision, adapters[0], references[0],
                      region=torch.ones(1, 8, 8))
    assert len(regional.model_options["transformer_options"]["patches"]["attn1_output_patch"]) == 1
