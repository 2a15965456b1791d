"""The speed-ups of issue 14 through the path users run: the real node in the real ComfyUI (CPU,
its default sub-quadratic attention), each compared with the straightforward computation."""
from __future__ import annotations

import os

import pytest
import torch

SIZE = 64


@pytest.fixture(scope="module")
def setup(comfy, sd15, clip_vision):
    adapter_mod, copy_mod, backend = comfy.core("adapter"), comfy.core("copy_unet"), comfy.core("comfy_backend")
    with torch.inference_mode(False):
        sd = {k: v.detach().clone() for k, v in backend.base_unet_state_dict(sd15.model).items()}
        adapter = adapter_mod.new_adapter(copy_mod.CopyUNetConfig.sd15(), sd, seed=0)
        del sd
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for conv in adapter.copy.zero_convs.values():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    adapter = adapter.eval().requires_grad_(False)
    ref = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(2))
    enc = comfy.node("CLIPTextEncode")()
    with torch.inference_mode():
        conds = enc.encode(sd15.clip, "a photo of sks dog")[0], enc.encode(sd15.clip, "")[0]
    return adapter, ref, conds


def _inject(comfy, sd15, clip_vision, adapter, ref, **kw):
    args = dict(lam=0.2, strength=1.0, apply_to="cond and uncond")
    args.update(kw)
    with torch.inference_mode():
        return comfy.node("P3SConditionInjector")().inject(sd15.model, adapter, ref, sd15.vae, clip_vision, **args)[0]


def _sample(comfy, model, conds, steps=2):
    latent = comfy.node("EmptyLatentImage")().generate(SIZE, SIZE, 1)[0]
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, 7, steps, 7.5, "ddim", "normal", conds[0], conds[1],
                                             latent, denoise=1.0)[0]
    return out["samples"].clone()


def _straightforward(adapter):
    """Context manager: the copy without CFG-row sharing, ComfyUI's kernel for the extended keys."""
    class Off:
        def __enter__(self):
            self.env = os.environ.get("P3S_EXTENDED_ATTENTION")
            os.environ["P3S_EXTENDED_ATTENTION"] = "comfy"
            adapter.copy.share_cfg_rows = False

        def __exit__(self, *exc):
            if self.env is None:
                os.environ.pop("P3S_EXTENDED_ATTENTION", None)
            else:
                os.environ["P3S_EXTENDED_ATTENTION"] = self.env
            adapter.copy.share_cfg_rows = True
    return Off()


@pytest.mark.parametrize("apply_to", ["cond and uncond", "cond only"])
def test_sampling_with_the_speed_ups_equals_the_straightforward_sampling(comfy, sd15, clip_vision, setup, apply_to):
    adapter, ref, conds = setup
    backend = comfy.core("comfy_backend")
    import comfy.ldm.modules.attention as attn

    assert attn.optimized_attention.__name__ == "attention_sub_quad"  # ComfyUI's CPU default
    model = _inject(comfy, sd15, clip_vision, adapter, ref, apply_to=apply_to)
    routed = backend._ExtendedAttention.routed
    fast = _sample(comfy, model, conds)
    n_routed = backend._ExtendedAttention.routed - routed
    assert n_routed == 2 * 16  # every extended self-attention of both steps took the fused kernel
    with _straightforward(adapter):
        slow = _sample(comfy, model, conds)
    assert backend._ExtendedAttention.routed - routed == n_routed  # switched off: none more
    plain = _sample(comfy, sd15.model, conds)
    assert (slow - plain).abs().max() > 1e-3  # the injection acts, so the comparison means something
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_weight_zero_installs_nothing(comfy, sd15, clip_vision, setup):
    adapter, ref, conds = setup
    off = _inject(comfy, sd15, clip_vision, adapter, ref, strength=0.0)
    opts = off.model_options["transformer_options"]
    before = sd15.model.model_options["transformer_options"]
    assert opts.get("patches", {}).get("attn1_patch", []) == before.get("patches", {}).get("attn1_patch", [])
    assert off.get_additional_models() == sd15.model.get_additional_models()
    assert torch.equal(_sample(comfy, off, conds), _sample(comfy, sd15.model, conds))
