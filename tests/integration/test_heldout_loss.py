"""Issue 22.4: the trained adapter beats the plain model, not only the untrained one, on held-out
denoising loss (:mod:`benchmarks.heldout_loss`; the committed figures come from the same functions).

Through the real nodes (the real ComfyUI, random SD1.5, 64x64; one SD1.5 load per session): the P3S
Trainer node trains on 2 photos (20 steps); the denoising loss is measured on (noise, t) pairs the
training never drew, each photo as the target with the OTHER photo's stored reference
(``reference_index``), through the Condition Injector's patch; the untrained adapter's dilution per
self-attention layer is read from the real attn1 calls.

The toy world: its trained denoiser (where the random SD1.5 has learnt nothing), P3S trained through
the diffusers engine, evaluated through P3SDiffusersInjector, the next photo as the reference.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import heldout_loss as H

#: the trained adapter's held-out loss must be below the plain model's by at least this fraction
#: (other-photo reference; the committed run measured the margin in the README's heldout block)
MARGIN_VS_PLAIN = 0.02


@pytest.fixture(scope="module")
def result(comfy, sd15, clip_vision):
    return H.measure(comfy, sd15, clip_vision, H.Settings(save_name="p3s_heldout_test"))


def test_trained_adapter_beats_the_plain_model_with_the_other_photo_as_reference(result):
    m = result["summary"]["other photo"]
    print("\nheld-out loss, other-photo reference:", {k: round(v, 4) for k, v in m.items()})
    assert result["training"]["steps"] == 20
    # the Trainer's defaults: the cross-attention enhancement, trained with the other photo as reference
    assert (result["training"]["enhancement"], result["training"]["pairing_used"]) == ("cross", "other photo")
    assert m["pairs"] == 2 * len(H.Settings().timesteps)
    # trained vs plain: the claim (a lower loss than SD1.5 without P3S), by a margin, at most t
    assert m["trained"] < m["plain"] * (1 - MARGIN_VS_PLAIN), m
    assert m["trained_beats_plain_pairs"] >= m["pairs"] - 2, m
    # and vs the untrained adapter (the Trainer's start)
    assert m["trained"] < m["untrained"], m


def test_untrained_adapter_dilutes_every_self_attention_layer(result, sd15):
    """Eq. 7 as printed with f = 0: each of the 16 layers' attention gives part of its mass to the N
    appended zero-logit keys (the probe also checked those keys are exactly zero)."""
    per = result["dilution_untrained"]["per_layer"]
    names = sorted(n[:-len(".attn1")] for n, _ in sd15.model.model.diffusion_model.named_modules()
                   if n.endswith(".attn1"))
    assert sorted(per) == names and len(per) == 16
    assert all(0.0 < v < 1.0 for v in per.values()), per
    # a zero-logit key gets exp(0) / (N + sum exp(logits)): the untrained adapter is not the plain model
    m = result["summary"]["other photo"]
    assert m["untrained"] != m["plain"]


def test_the_plain_figure_is_the_plain_model(comfy, sd15, clip_vision, result):
    """The 'plain' loss is what the Injector at strength 0 gives (it installs nothing: SD1.5 as is)."""
    s = H.Settings()
    trained = comfy.node("P3SAdapterLoader")().load("p3s_heldout_test.safetensors")[0]
    with torch.inference_mode():
        zero = comfy.node("P3SConditionInjector")().inject(sd15.model, trained, lam=s.lam, strength=0.0,
                                                           apply_to="cond and uncond", reference_index=1)[0]
        context = comfy.node("CLIPTextEncode")().encode(sd15.clip, H.PROMPT)[0][0][0]
    x0 = trained.reference["latent"][:1]
    got = H.denoising_losses(zero, context, x0, H.heldout_pairs(s, s.size // 8))
    case = next(c for c in result["cases"] if c["target"] == 0 and c["reference"] == 1)
    assert got == case["plain"]
    assert got != case["trained"]


#: the toy world (a trained denoiser, deterministic on one CPU thread): with the defaults (the cross-attention
#: enhancement, trained with another photo as reference) the committed run is well below the plain model; a
#: self-attention-only adapter trained on its own photo, the defaults before issue 22, stayed within 2 % of it
TOY_MARGIN_VS_PLAIN = 0.03


@pytest.mark.toyworld
@pytest.mark.slow
def test_toyworld_trained_adapter_beats_the_plain_denoiser_and_the_untrained_one_dilutes_it():
    """The same comparison where the base model has learnt its world (the random SD1.5 has not):
    the toy world's denoiser, P3S trained through the diffusers engine, evaluated through
    P3SDiffusersInjector with the next photo as the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = H.measure_toyworld()
    finally:
        torch.set_num_threads(before)
    assert r["settings"]["enhancement"] == "cross" and r["settings"]["pairing_used"] == "other photo"  # the defaults
    m = r["summary"]["other photo"]
    print("\ntoy world, other-photo reference:", {k: round(v, 4) for k, v in m.items()})
    assert m["trained"] < m["plain"] * (1 - TOY_MARGIN_VS_PLAIN), m
    assert m["trained"] < m["untrained"], m
    # Eq. 7 as printed at f = 0 costs a trained denoiser: the untrained adapter is worse than plain
    assert m["untrained"] > m["plain"], m
    per = r["dilution_untrained"]["per_layer"]
    assert len(per) == 16 and all(0.0 < v < 1.0 for v in per.values()), per


@pytest.mark.toyworld
@pytest.mark.slow
def test_toyworld_cross_enhancement_trained_on_its_own_photo_copies_it():
    """Why the cross-attention enhancement trains with another photo (``reference_pairing="auto"``): with
    each photo as its own reference it learns to copy the aligned reference -- better than plain when the
    reference IS the target, worse than plain with another photo as the reference (as at generation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = H.measure_toyworld(enhancement="cross", reference_pairing="self")
    finally:
        torch.set_num_threads(before)
    other, same = r["summary"]["other photo"], r["summary"]["same photo"]
    assert r["settings"]["pairing_used"] == "self" and r["settings"]["enhancement"] == "cross"
    assert same["trained"] < same["plain"] * (1 - TOY_MARGIN_VS_PLAIN), same
    assert other["trained"] > other["plain"] * (1 + TOY_MARGIN_VS_PLAIN), other
