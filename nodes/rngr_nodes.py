"""P3S RNGR Mask + Inpaint node (paper Eq. 1-3): points -> subject mask -> distractor removed."""
from __future__ import annotations

from .common import (CATEGORY, POINTS, check_choice, check_image_batch, check_int, check_number, image_to_numpy,
                     numpy_to_image, numpy_to_mask)

REMOVE = ["distractor", "background", "distractor and background"]
FILLS = ["biharmonic", "blur", "flat", "none"]


class P3SRNGRMaskInpaint:
    DESCRIPTION = (
        "Turns the clicked points into a subject mask with CLIP ViT-L/14 patch similarity (Eq. 1: cosine "
        "similarity to the patch under each point; Eq. 2: Otsu(Gaussian(M_P (1 - M_N))) keeping the part "
        "connected to the positive point) and removes the distractor (Eq. 3). The whole photo is seen "
        "whatever its aspect ratio (letterboxed, never cropped). Use fill 'none' and the removed-region "
        "MASK to inpaint with a real inpainting checkpoint instead."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["mask", "subject mask", "sam", "segment subject", "remove distractor", "inpaint", "clean reference", "subject"]  # the words users type in the node search
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("cleaned_image", "subject_mask", "removed_mask", "preview")
    OUTPUT_TOOLTIPS = (
        "The photo with the removed region filled (I' of Eq. 3): the reference for the Trainer and Injector.",
        "The subject's mask (Eq. 2).",
        "The region that was filled (distractor and/or background).",
        "Similarity heat map with the subject (green) and distractor (red) outlines and the points.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The reference photo(s)."}),
                "points": (POINTS, {"tooltip": "Points from P3S Point Selector (one set per image, or one for all)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14 vision (clip-vit-large-patch14), the paper's patch encoder."}),
                "sigma": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip": "Gaussian smoothing of the similarity map (Eq. 2), in CLIP patches. Lower keeps small subjects sharper."}),
                "fill": (FILLS, {"default": "biharmonic", "tooltip": "How the removed region is filled (Eq. 3). 'none' leaves the photo as is (inpaint downstream with the MASK)."}),
                "remove": (REMOVE, {"default": "distractor", "tooltip": "What is removed: the distractor (from the negative points), everything but the subject, or both."}),
                "grow": ("INT", {"advanced": True, "default": 4, "min": 0, "max": 128, "step": 1, "tooltip": "Grow the masks by this many pixels (covers the distractor's edges)."}),
            },
        }

    def run(self, image, points, clip_vision, sigma, fill, remove, grow):
        import logging

        from ..p3s_core import comfyui_engine as engine
        from ..p3s_core.errors import PointsError
        from ..p3s_core.points import P3SPoints
        from ..p3s_core.previews import rngr_preview
        from ..p3s_core.rngr import inpaint, rngr_mask

        # --- every input is checked before CLIP runs --------------------------------------------
        b, h, w, _ = check_image_batch(image)
        if not isinstance(points, P3SPoints):
            raise PointsError("points", f"expected P3S_POINTS, got a {type(points).__name__}",
                              "connect the 'points' output of P3S Point Selector")
        if len(points) not in (1, b):
            raise PointsError("points", f"{len(points)} sets of points for {b} images",
                              "give one set of points per image (or one set for all) in P3S Point Selector")
        points.validate("points")
        sigma = check_number(sigma, "sigma", 0.0, 4.0, "use a smoothing between 0 and 4 CLIP patches (default 0.75)")
        grow = check_int(grow, "grow", 0, 128, "use a whole number of pixels between 0 and 128 (default 4)")
        check_choice(fill, "fill", FILLS)
        check_choice(remove, "remove", REMOVE)
        engine.check_clip_vit_l(clip_vision)
        if (points.width, points.height) != (w, h):
            points = points.rescaled(w, h)
        squares, boxes = engine.letterboxed_batch(image)
        tokens = engine.clip_patch_tokens(clip_vision, squares).cpu().numpy()
        cleaned, subjects, removed, previews = [], [], [], []
        for i in range(b):
            rgb = image_to_numpy(image, i)
            pts = points.for_image(i)
            res = rngr_mask(tokens[i], boxes[i], pts, (h, w), sigma=sigma, grow=grow)
            if not res.subject_mask.any():
                logging.warning("P3S RNGR: image %d: the subject mask is empty (the positive point's patch is as "
                                "similar to the negative point as to itself); move the points or lower sigma", i)
            if remove == "distractor":
                region = res.distractor_mask
            elif remove == "background":
                region = ~res.subject_mask
            else:
                region = res.distractor_mask | ~res.subject_mask
            cleaned.append(inpaint(rgb, region, fill))
            subjects.append(res.subject_mask)
            removed.append(region)
            previews.append(rngr_preview(rgb, res, pts))
        return (numpy_to_image(cleaned), numpy_to_mask(subjects), numpy_to_mask(removed), numpy_to_image(previews))
