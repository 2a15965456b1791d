"""P3S composed with every core node that patches the SD1.5 UNet's attention, its tokens or its batch.

For each node, in the real ComfyUI, in both orders (node then P3S Condition Injector, injector then
node): the sample is finite, differs from the node alone and from P3S alone (both act), and the two
orders agree (each node's patch and P3S's act on separate parts of the attention, so the order
must not matter). The node list is what the running ComfyUI ships: a node absent in one version is
not collected there, and ``test_core_attention_nodes_of_this_comfyui`` asserts which are present.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

SIZE = 64  # 8x8 latent: every UNet level exists, sampling stays cheap on the CPU (1 step: CI budget)


def _out(result):
    """MODEL of a V1 tuple or a V3 ``NodeOutput``."""
    return result.result[0] if hasattr(result, "result") else result[0]


@dataclass
class Core:
    module: str                 # comfy_extras/<module>.py
    apply: Callable             # (comfy, model, conds) -> MODEL
    size: int = SIZE
    what: str = ""


CORE = {
    # PAG perturbs the middle block's self-attention, an identity on the 1x1 middle of an 8x8 latent.
    "PerturbedAttentionGuidance": Core(
        "nodes_pag", lambda c, m, k: _out(c.node("PerturbedAttentionGuidance").execute(m, 3.0)), size=128,
        what="attn1 replace of the middle block in an extra UNet pass (post-CFG)"),
    # SAG's blur map needs at least a 2x2 middle block (it fails alone on an 8x8 latent).
    "SelfAttentionGuidance": Core(
        "nodes_sag", lambda c, m, k: _out(c.node("SelfAttentionGuidance").execute(m, 0.5, 2.0)), size=128,
        what="attn1 replace of the middle block recording the map, extra UNet pass"),
    "TomePatchModel": Core(
        "nodes_tomesd", lambda c, m, k: _out(c.node("TomePatchModel").execute(m, 0.5)),
        what="attn1 patch merging the queries, attn1 output patch unmerging"),
    "HyperTile": Core(
        "nodes_hypertile", lambda c, m, k: _out(c.node("HyperTile").execute(m, 32, 1, 0, False)),
        what="attn1 patch tiling the queries into the batch (K/V folded by the kernel)"),
    "PatchModelAddDownscale": Core(
        "nodes_model_downscale",
        lambda c, m, k: _out(c.node("PatchModelAddDownscale").execute(m, 3, 2.0, 0.0, 1.0, True, "bicubic",
                                                                      "bicubic")),
        what="input/output block patches shrinking the token grid (Kohya Deep Shrink)"),
    "NAGuidance": Core(
        "nodes_nag", lambda c, m, k: _out(c.node("NAGuidance").execute(m, 5.0, 0.5, 1.5)),
        what="attn1 output patch mixing the cond and uncond rows"),
    "UNetSelfAttentionMultiply": Core(
        "nodes_attention_multiply",
        lambda c, m, k: _out(c.node("UNetSelfAttentionMultiply").execute(m, 1.0, 1.3, 0.8, 1.0)),
        what="weight patches of attn1 q/k/v/out"),
    "UNetCrossAttentionMultiply": Core(
        "nodes_attention_multiply",
        lambda c, m, k: _out(c.node("UNetCrossAttentionMultiply").execute(m, 1.0, 1.3, 0.8, 1.0)),
        what="weight patches of attn2 q/k/v/out"),
    "PerpNeg": Core(
        "nodes_perpneg", lambda c, m, k: _out(c.node("PerpNeg").execute(m, k[2], 1.0)),
        what="CFG function running an extra batch (the empty prompt)"),
}

#: which of these nodes each ComfyUI version we test on ships
KNOWN = {
    "0.3.75": set(CORE) - {"NAGuidance"},
    "0.33.0": set(CORE),
}


def _comfyui_version_and_nodes():
    """(version, CORE nodes whose comfy_extras module defines them) of the ComfyUI under test."""
    root = Path(os.environ.get("P3S_COMFYUI", ""))
    text = (root / "comfyui_version.py").read_text() if (root / "comfyui_version.py").exists() else ""
    m = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    present = set()
    for name, core in CORE.items():
        src = root / "comfy_extras" / f"{core.module}.py"
        if src.exists() and f'"{name}"' in src.read_text():
            present.add(name)
    return (m.group(1) if m else None), present


VERSION, PRESENT = _comfyui_version_and_nodes()


def test_core_attention_nodes_of_this_comfyui(comfy):
    """The parametrisation below matches what this ComfyUI registers (and, for the two versions CI
    runs, exactly the expected set: no node silently dropped)."""
    registered = {name for name in CORE if name in comfy.nodes.NODE_CLASS_MAPPINGS}
    assert registered == PRESENT
    assert VERSION is not None
    if VERSION in KNOWN:
        assert registered == KNOWN[VERSION], VERSION


@pytest.fixture(scope="module")
def conds(comfy, sd15):
    enc = comfy.node("CLIPTextEncode")()
    with torch.inference_mode():
        return tuple(enc.encode(sd15.clip, text)[0] for text in ("a photo of sks dog", "", "a painting"))


def sample(comfy, model, conds, size=SIZE, seed=7, steps=1, cfg=7.5):
    latent = comfy.node("EmptyLatentImage")().generate(size, size, 1)[0]
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, seed, steps, cfg, "ddim", "normal", conds[0], conds[1],
                                             latent, denoise=1.0)[0]
    return out["samples"].clone()


@pytest.fixture(scope="module")
def p3s(comfy, sd15, clip_vision, active_adapter, reference):
    def apply(model):
        with torch.inference_mode():
            return comfy.node("P3SConditionInjector")().inject(model, active_adapter, reference, sd15.vae,
                                                               clip_vision, lam=0.2, strength=1.0,
                                                               apply_to="cond and uncond")[0]
    return apply


@pytest.fixture(scope="module")
def alone(comfy, sd15, conds, p3s):
    """Samples of the plain model and of P3S alone, per latent size (computed once)."""
    cache = {}

    def get(kind, size):
        if (kind, size) not in cache:
            model = sd15.model if kind == "plain" else p3s(sd15.model)
            cache[(kind, size)] = sample(comfy, model, conds, size=size)
        return cache[(kind, size)]
    return get


def _differs(a, b, tol=1e-3):
    return (a - b).abs().max().item() > tol


@pytest.mark.parametrize("name", sorted(PRESENT))
def test_composes_with_core_node(name, comfy, sd15, conds, p3s, alone):
    core = CORE[name]
    with torch.inference_mode():
        node_then_p3s = p3s(core.apply(comfy, sd15.model, conds))
        p3s_then_node = core.apply(comfy, p3s(sd15.model), conds)
        node_only = core.apply(comfy, sd15.model, conds)
    a = sample(comfy, node_then_p3s, conds, size=core.size)
    b = sample(comfy, p3s_then_node, conds, size=core.size)
    node_alone = sample(comfy, node_only, conds, size=core.size)
    plain, p3s_alone = alone("plain", core.size), alone("p3s", core.size)
    assert _differs(node_alone, plain), f"{name} does not act on its own in this test"
    assert _differs(p3s_alone, plain)
    for order, out in (("node then P3S", a), ("P3S then node", b)):
        assert torch.isfinite(out).all(), order
        assert _differs(out, node_alone), f"{order}: P3S does not act with {name}"
        assert _differs(out, p3s_alone), f"{order}: {name} does not act with P3S"
    # both orders give the same model: P3S extends K/V, the node acts on queries / other stages
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max().item()


def fold_kv_batch(n, context, value, extra_options):
    return n, torch.cat([context, context]), torch.cat([value, value])


def drop_a_key_token(n, context, value, extra_options):
    return n, context[:, 1:], value[:, 1:]


def longer_values(n, context, value, extra_options):
    return n, context, torch.cat([value, value], dim=1)


@pytest.mark.parametrize("patch,problem", [(fold_kv_batch, "changed the batch"),
                                           (drop_a_key_token, "no token grid of this layer"),
                                           (longer_values, "cannot extend")])
def test_kv_changing_patch_gets_a_typed_error(patch, problem, comfy, sd15, conds, p3s):
    """A self-attention patch (here a custom node's, no core node does this) that changes the keys'
    batch or tokens before P3S: a typed error at the first step naming it, and the fix it gives
    (remove that patch from the injector's MODEL path) samples."""
    errors = comfy.core("errors")
    with torch.inference_mode():
        other = sd15.model.clone()
        other.set_model_attn1_patch(patch)
        bad = p3s(other)
    with pytest.raises(errors.ModelMismatchError) as info:
        sample(comfy, bad, conds)
    msg = str(info.value)
    assert patch.__name__ in msg and problem in msg and f"Fix: remove the attention patch" in msg, msg
    assert torch.isfinite(sample(comfy, p3s(sd15.model), conds)).all()
