"""Inference precision through the real ComfyUI (issue 21.2 / 21.6): the Condition Injector's copy and
encoder compute in the UNet's compute dtype by default, in fp32 with ``copy_precision='fp32'``.

The UNet is loaded by ComfyUI's own checkpoint loader with ``--fp16-unet`` / ``--bf16-unet``
(``args.fp16_unet`` / ``args.bf16_unet``, what the command-line flags set). On a CPU ComfyUI stores
that UNet in half precision but computes it in fp32 (``unet_manual_cast``: the CPU does not
compute fp16/bf16), so there the copy follows it in fp32. A GPU computes it in half precision: the
second half of each test sets ``manual_cast_dtype`` to None, the value ``unet_manual_cast`` gives on
such a GPU, so the UNet really computes in fp16 / bf16 here, and the copy with it.
A forward hook on every layer of the copy and the encoder reads the dtype each one computed in.
"""
from __future__ import annotations

import pytest
import torch

SIZE = 64  # 8x8 latent


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def half_unet(request, comfy):
    """(dtype, MODEL) of the random SD1.5 loaded with --fp16-unet / --bf16-unet."""
    import comfy.model_management as mm
    from comfy.cli_args import args

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[request.param]
    flag = f"{request.param}_unet"
    saved = getattr(args, flag)
    setattr(args, flag, True)
    try:
        with torch.inference_mode():
            model = comfy.node("CheckpointLoaderSimple")().load_checkpoint("p3s_random_sd15.safetensors")[0]
    finally:
        setattr(args, flag, saved)
    yield dtype, model
    del model
    mm.unload_all_models()
    mm.cleanup_models()


@pytest.fixture(scope="module")
def conds(comfy, sd15):
    enc = comfy.node("CLIPTextEncode")()
    with torch.inference_mode():
        return enc.encode(sd15.clip, "a photo of sks dog")[0], enc.encode(sd15.clip, "")[0]


def _sample(comfy, model, conds, seed=7, steps=2):
    latent = comfy.node("EmptyLatentImage")().generate(SIZE, SIZE, 1)[0]
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, seed, steps, 7.5, "ddim", "normal", conds[0], conds[1],
                                             latent, denoise=1.0)[0]
    return out["samples"].clone()


class _Dtypes:
    """Forward hooks on every layer with weights of ``module``: the dtype each one computed in."""

    def __init__(self, module):
        self.seen: dict[str, set] = {}
        self.layers = [(n, m) for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers]

    def _hook(self, name):
        def hook(module, args, out):
            self.seen.setdefault(name, set()).add(out.dtype)
        return hook

    def all(self) -> set:
        assert set(self.seen) == {n for n, _ in self.layers}, "some layers of the copy or the encoder never ran"
        return set().union(*self.seen.values())

    def close(self):
        for h in self.handles:
            h.remove()


def _run(comfy, model, adapter, clip_vision, reference, sd15, conds, **kw):
    """Sample through the Condition Injector node; the dtypes the copy and encoder computed in."""
    engine = comfy.core("comfyui_engine")
    with torch.inference_mode():
        patched = comfy.node("P3SConditionInjector")().inject(model, adapter, reference, sd15.vae, clip_vision,
                                                               lam=0.2, strength=1.0, **kw)[0]
    probe = _Dtypes(engine.comfy_twin(adapter))
    try:
        out = _sample(comfy, patched, conds)
    finally:
        probe.close()
    return out, probe.all()


def test_the_copy_computes_in_the_unets_compute_dtype_or_fp32(comfy, sd15, clip_vision, active_adapter, reference,
                                                               conds, half_unet):
    dtype, model = half_unet
    assert model.model.get_dtype() == dtype  # stored in half precision, as --fp16-unet / --bf16-unet do

    # this CPU: ComfyUI computes the half-precision UNet in fp32, and so does the copy
    assert model.model.manual_cast_dtype == torch.float32
    out, seen = _run(comfy, model, active_adapter, clip_vision, reference, sd15, conds)
    assert seen == {torch.float32} and bool(torch.isfinite(out).all())

    # a GPU that computes in fp16 / bf16 (unet_manual_cast gives None): the copy computes in it too
    model.model.manual_cast_dtype = None
    try:
        plain = _sample(comfy, model, conds)
        half, seen_half = _run(comfy, model, active_adapter, clip_vision, reference, sd15, conds)
        kept, seen_fp32 = _run(comfy, model, active_adapter, clip_vision, reference, sd15, conds,
                               copy_precision="fp32")
    finally:
        model.model.manual_cast_dtype = torch.float32
    assert seen_half == {dtype}  # every layer of the copy and the encoder ran in the UNet's dtype
    assert seen_fp32 == {torch.float32}  # the option keeps them all in fp32
    for x in (plain, half, kept):
        assert bool(torch.isfinite(x).all())
    effect = float((kept - plain).abs().max())
    assert effect > 1e-2  # P3S acts
    assert float((half - plain).abs().max()) > 0.5 * effect  # ... in the half-precision copy too
    # the parameters were never converted: the adapter keeps its fp32 weights
    assert {p.dtype for p in active_adapter.parameters()} == {torch.float32}
