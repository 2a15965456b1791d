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


# --- Eq. 7 inside the tiles of HyperTile and for the merged queries of ToMe (issue 24) -------------
LEVEL0_LAYER = "input_1"  # a level-0 self-attention: 64 tokens of the 8x8 latent, tiled / merged by both


def _attend(attn, zq, k_in, v_in):
    """attn1 written out: ``to_out(softmax(W_Q zq (W_K k_in)^T / sqrt d) W_V v_in)`` per head."""
    w = lambda lin: lin.weight.to(zq.dtype)  # noqa: E731
    q, k, v = (torch.nn.functional.linear(x, w(lin)) for x, lin in ((zq, attn.to_q), (k_in, attn.to_k),
                                                                        (v_in, attn.to_v)))
    b, heads = q.shape[0], attn.heads
    d = q.shape[-1] // heads

    def split(x):
        return x.reshape(b, x.shape[1], heads, d).transpose(1, 2)

    probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d ** 0.5, dim=-1)
    out = (probs @ split(v)).transpose(1, 2).reshape(b, q.shape[1], heads * d)
    proj = attn.to_out[0]
    return torch.nn.functional.linear(out, w(proj), proj.bias.to(zq.dtype))


def _eq7(attn, zq, zk, fk=None, lam=0.2):
    """Eq. 7-8: queries ``zq``, ``K' = W_K [zk, fk]``, ``V' = W_V [zk + lam fk, fk]`` (the copy
    features ``fk`` of the key tokens ``zk``, already scaled by eps_t); ``fk`` None: plain attention."""
    if fk is None:
        return _attend(attn, zq, zk, zk)
    return _attend(attn, zq, torch.cat([zk, fk], dim=1), torch.cat([zk + lam * fk, fk], dim=1))


def _injector_key(comfy, model):
    backend = comfy.core("comfyui_engine")
    patches = model.model_options["transformer_options"].get("patches", {}).get("attn1_patch", [])
    keys = [p.key for p in patches if isinstance(p, backend.P3SInjectorPatch)]
    assert len(keys) <= 1, keys
    return keys[0] if keys else None


def record_level0(comfy, sd15, model, conds):
    """One sampling step of ``model`` recording every call of the level-0 self-attention ``input_1``:
    its normed hidden state ``z`` (norm1's output, before any patch), the queries, keys and values the
    attention module received (after every attn1 patch), its output (before the output patches), and,
    with a P3S injector on ``model``, the copy feature ``f`` of that layer, ``eps_t`` and lambda."""
    copy_mod = comfy.core("copy_unet")
    block = sd15.model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    key = _injector_key(comfy, model)
    calls = []

    def on_norm(module, args, out):
        calls.append({"z": out.clone()})

    def probe(n, context, value, extra_options):  # last attn1 patch: reads the P3S bank of this call
        if copy_mod.layer_key(extra_options["block"], extra_options.get("block_index", 0)) == LEVEL0_LAYER:
            bank = extra_options.get(key) if key else None
            if bank is not None:
                calls[-1].update(f=bank.features[LEVEL0_LAYER].clone(), weight=float(bank.weight), lam=bank.lam)
        return n, context, value

    def on_attn(module, args, kwargs, out):
        calls[-1].update(q=args[0].clone(), k=kwargs["context"].clone(), v=kwargs["value"].clone(), out=out.clone())

    probed = model.clone()
    probed.set_model_attn1_patch(probe)
    hooks = [block.norm1.register_forward_hook(on_norm),
             block.attn1.register_forward_hook(on_attn, with_kwargs=True)]
    try:
        sample(comfy, probed, conds)
    finally:
        for h in hooks:
            h.remove()
    assert calls and all("out" in c for c in calls), "the level-0 self-attention was not recorded"
    return block.attn1, calls


def _close(out, ref, what):
    err = float((out - ref).abs().max())
    assert err <= 1e-4 * max(1.0, float(ref.abs().max())), f"{what}: max |difference| {err:.3g}"


def _tiles(call, grid):
    """HyperTile's tiles of this call: (batch row, tile index, query token indices, key token indices).
    Queries: the 2-D tile (HyperTile's rearrange); keys: the tile's share of the untiled keys, which the
    attention kernel folds into the tile batch by token order (the per-token layout keeps each token's
    z and f together there)."""
    z, q = call["z"], call["q"]
    b, n = z.shape[:2]
    tiles = q.shape[0] // b
    side = int(round(q.shape[1] ** 0.5))
    per_row = grid // side
    assert tiles > 1 and side * side == q.shape[1] and per_row * per_row == tiles, (tuple(q.shape), tuple(z.shape))
    r = torch.arange(side)
    for row in range(b):
        for t in range(tiles):
            i, j = divmod(t, per_row)
            query = ((i * side + r)[:, None] * grid + (j * side + r)[None, :]).flatten()
            yield row, row * tiles + t, query, torch.arange(t * n // tiles, (t + 1) * n // tiles)


def test_eq7_holds_in_every_hypertile_tile(comfy, sd15, conds, p3s):
    """HyperTile tiles the level-0 queries into the batch; the attention kernel then gives each tile its
    share of the keys by token order. Checked per tile, on the real patched attention of input_1:
    HyperTile alone is the plain attention of the tile's queries over those key tokens (what the tile
    attends to), and with P3S in either order it is Eq. 7 over the same tokens with their copy features
    appended as extra keys/values. Appending the features after all the tokens (no per-token layout)
    would hand the tiles other tokens' features: the last check tells the two apart."""
    hypertile = CORE["HyperTile"].apply
    grid = SIZE // 8
    with torch.inference_mode():
        attn, plain_calls = record_level0(comfy, sd15, hypertile(comfy, sd15.model, conds), conds)
        for call in plain_calls:
            for row, tile, query, keys in _tiles(call, grid):
                z = call["z"][row:row + 1]
                assert torch.equal(call["q"][tile:tile + 1], z[:, query])  # the tile's queries, untouched
                _close(call["out"][tile:tile + 1], _eq7(attn, z[:, query], z[:, keys]), f"HyperTile alone, tile {tile}")
        orders = {"HyperTile then P3S": p3s(hypertile(comfy, sd15.model, conds)),
                  "P3S then HyperTile": hypertile(comfy, p3s(sd15.model), conds)}
        for order, model in orders.items():
            _, calls = record_level0(comfy, sd15, model, conds)
            for call in calls:
                assert call["weight"] > 0 and call["k"].shape[1] == 2 * call["z"].shape[1], order
                n = call["z"].shape[1]
                for row, tile, query, keys in _tiles(call, grid):
                    z, f = call["z"][row:row + 1], call["f"][row:row + 1] * call["weight"]
                    assert torch.equal(call["q"][tile:tile + 1], z[:, query]), order
                    out = call["out"][tile:tile + 1]
                    _close(out, _eq7(attn, z[:, query], z[:, keys], f[:, keys], call["lam"]), f"{order}, tile {tile}")
                    # the concatenated layout [z_0..z_N, f_0..f_N], folded by token order, would give
                    # this tile other tokens' keys and features
                    tiles = call["q"].shape[0] // call["z"].shape[0]
                    chunk = slice((tile % tiles) * 2 * n // tiles, (tile % tiles + 1) * 2 * n // tiles)
                    k_cat, v_cat = torch.cat([z, f], 1), torch.cat([z + call["lam"] * f, f], 1)
                    wrong = _attend(attn, z[:, query], k_cat[:, chunk], v_cat[:, chunk])
                    assert float((out - wrong).abs().max()) > 1e-3, (order, tile)


def test_eq7_holds_for_tome_merged_queries(comfy, sd15, conds, p3s):
    """ToMe merges the level-0 queries (fewer query tokens, each a token of z or a mean of several) and
    leaves the keys and values whole: the real patched attention of input_1 is Eq. 7 for the merged
    queries over every token, its copy features appended as extra keys/values (either order), and
    ToMe alone is the plain attention of the merged queries."""
    tome = CORE["TomePatchModel"].apply
    runs = {"ToMe alone": tome(comfy, sd15.model, conds),
            "ToMe then P3S": p3s(tome(comfy, sd15.model, conds)),
            "P3S then ToMe": tome(comfy, p3s(sd15.model), conds)}
    with torch.inference_mode():
        for name, model in runs.items():
            attn, calls = record_level0(comfy, sd15, model, conds)
            for call in calls:
                z, q = call["z"], call["q"]
                assert q.shape[0] == z.shape[0] and q.shape[1] < z.shape[1], (name, tuple(q.shape))  # merged
                # the merged queries come from this z: ToMe's unmerged tokens are rows of it
                exact = ((q[:, :, None] - z[:, None]).abs().amax(dim=-1).amin(dim=-1) == 0).sum(dim=-1)
                assert bool((exact >= q.shape[1] // 2).all()), (name, exact.tolist())
                if name == "ToMe alone":
                    _close(call["out"], _eq7(attn, q, z), name)
                    continue
                assert call["weight"] > 0 and call["k"].shape[1] == 2 * z.shape[1], name
                f = call["f"] * call["weight"]
                _close(call["out"], _eq7(attn, q, z, f, call["lam"]), name)
                assert float((call["out"] - _eq7(attn, q, z)).abs().max()) > 1e-3, name  # P3S acted here
