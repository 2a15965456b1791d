"""The toy world's headline claims, CI-sized (issue 23): P3S trained through the diffusers engine on
a world built here (``benchmarks/toyworld/build.py --size ci``, cached by seed in P3S_CACHE_DIR)
puts the subject's texture into new prompts above the base model, and with both points keeps the
look-alike distractor out, below training without RNGR. The same measurement with a bug planted
in the real code path (the copy's features zeroed at the injection; the negative point ignored)
must break the claim, so the test can fail.

Margins: set from this seed's own measurement (per_prompt 8, 32 images per variant; seed 0 measured
subject texture 25 % vs base 3 % and features-zeroed 3 %; distractor texture 12.5 % with both points vs
50 % without RNGR and 41 % with the negative point ignored). The run is deterministic on the CPU with
one thread. Across seeds the effects vary a lot on the CI-sized world (docs/TOYWORLD.md: seed 2's RNGR
misses its plain look-alike), so this test guards seed 0's result, not the 3-seed mean."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.toyworld import build as B
from benchmarks.toyworld import p3s_path as P
from benchmarks.toyworld import world as W

pytestmark = pytest.mark.toyworld

SEED = 0
#: subject transfer: the share of images with the subject's texture (never named in the prompt) must
#: exceed the base model's by this much
TRANSFER_MARGIN = 0.12
#: distractor exclusion: with both points the share of images with the look-alike's texture must stay
#: under this ceiling and below the no-RNGR share by the margin
EXCLUSION_CEILING = 0.25
EXCLUSION_MARGIN = 0.2


@pytest.fixture(scope="module")
def setup():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on the shared 2-core machines two threads under load are slower
    try:
        world = P.ToyWorld(B.build(SEED, "ci", threads=1))
        photos = P.make_photos(0, SEED)
        prompt = P.train_prompt(photos)
        bgs = list(W.BG_NAMES)
        prompts = [f"a {W.IDENTIFIER} {photos.shape} on {b}" for b in bgs]
        rs, gs = P.RunSettings(seed=SEED), P.GenSettings(seed=1000, per_prompt=8)
        cleaned = P.rngr_clean(world, photos, "both points")
        raw = P.rngr_clean(world, photos, "no RNGR")
        adapter, _ = P.train_p3s(world, cleaned, prompt, rs)
        raw_adapter, _ = P.train_p3s(world, raw, prompt, rs)

        def m(imgs):
            return P.measure_subject(world, imgs, photos, bgs)

        out = {"world": world, "photos": photos, "prompt": prompt, "prompts": prompts, "rs": rs, "gs": gs,
               "cleaned": cleaned, "measure": m,
               "base": m(P.generate_plain(world, prompts, gs)),
               "p3s": m(P.generate_p3s(world, adapter, cleaned.images, prompts, gs)),
               "no_rngr": m(P.generate_p3s(world, raw_adapter, raw.images, prompts, gs)),
               "zeroed": m(P.generate_p3s(world, adapter, cleaned.images, prompts, gs, zero_features=True))}
        for k in ("base", "p3s", "no_rngr", "zeroed"):
            print(k, {n: round(v, 3) for n, v in out[k].items()})
        yield out
    finally:
        torch.set_num_threads(before)


def transfer_claim(p3s: dict, base: dict) -> bool:
    return p3s["subject_texture"] >= base["subject_texture"] + TRANSFER_MARGIN


def exclusion_claim(p3s: dict, no_rngr: dict) -> bool:
    return (p3s["distractor_in"] <= EXCLUSION_CEILING
            and p3s["distractor_in"] <= no_rngr["distractor_in"] - EXCLUSION_MARGIN)


def test_evaluator_reads_the_world():
    info = P.ToyWorld(B.build(SEED, "ci")).info
    acc = info["evaluator_heldout_accuracy"]
    # the claims read colour and texture (the prompt names the shape); the CI-sized evaluator's shape
    # head is weak (all shapes of an image right: 9 %) and is not used by any assertion
    assert min(acc["colour"], acc["texture"], acc["bg"]) > 0.85, acc


def test_rngr_masks_the_subject_and_the_distractor(setup):
    c = setup["cleaned"]
    # the 8 x 8 patch grid (4 px patches of a 32 px photo) bounds the IoU; what matters for the claims
    # is that the distractor is gone from the cleaned photos and the subject is not
    assert c.iou_subject > 0.35 and c.iou_distractor > 0.35, (c.iou_subject, c.iou_distractor)
    assert c.distractor_left < 0.1, c.distractor_left
    ph = setup["photos"]
    kept = np.mean([(m & ~d).sum() / m.sum() for m, d in zip(ph.subject_masks, c.distractor_masks)])
    assert kept > 0.95, kept


def test_subject_transfer(setup):
    assert transfer_claim(setup["p3s"], setup["base"]), (setup["p3s"], setup["base"])


def test_distractor_exclusion(setup):
    assert exclusion_claim(setup["p3s"], setup["no_rngr"]), (setup["p3s"], setup["no_rngr"])


def test_planted_bug_features_zeroed_breaks_transfer(setup):
    """The injection's features replaced by zeros (monkeypatched in the diffusers engine's processor):
    the same measurement must no longer show the transfer."""
    assert not transfer_claim(setup["zeroed"], setup["base"]), (setup["zeroed"], setup["base"])


def test_planted_bug_negative_point_ignored_breaks_exclusion(setup):
    """The negative points never reach RNGR (so nothing is inpainted): the same measurement must no longer
    show the exclusion. Trained as the paper prints it (self-attention injection only, each photo its own
    reference), against a no-RNGR adapter trained the same way. With the pack's defaults (the
    cross-attention enhancement, trained with another photo) the subject mask's loss weighting alone
    already kept the look-alike out of this toy world's images (the negative point's inpainting no longer
    decides it), so the bug is planted where the inpainting is what the exclusion rests on."""
    s = setup
    literal = dataclasses.replace(s["rs"], enhancement="self", reference_pairing="self")
    bug = P.rngr_clean(s["world"], s["photos"], "both points", ignore_negative=True)
    assert not bug.distractor_masks[0].any()
    raw = P.rngr_clean(s["world"], s["photos"], "no RNGR")
    arms = {}
    for name, cleaned in (("negative ignored", bug), ("no RNGR", raw), ("both points", s["cleaned"])):
        adapter, _ = P.train_p3s(s["world"], cleaned, s["prompt"], literal)
        arms[name] = s["measure"](P.generate_p3s(s["world"], adapter, cleaned.images, s["prompts"], s["gs"]))
        print(name, "(paper's literal training)", {n: round(v, 3) for n, v in arms[name].items()})
    assert exclusion_claim(arms["both points"], arms["no RNGR"]), arms
    assert not exclusion_claim(arms["negative ignored"], arms["no RNGR"]), arms


def test_letterbox_matches_the_build_pixels():
    """The build trains the vision tower on a bilinear resize; the pack letterboxes: same pixels."""
    from p3s_core.letterbox import letterbox

    img = W.render(*W.random_scene(np.random.default_rng(3)), np.random.default_rng(4))
    sq, _ = letterbox(img, 224)
    mine = (B.clip_pixels(torch.from_numpy(img)[None]) * B.CLIP_STD + B.CLIP_MEAN)[0].permute(1, 2, 0).numpy()
    assert np.abs(mine - sq).max() < 1e-4
