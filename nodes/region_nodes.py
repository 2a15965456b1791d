"""P3S Region node (issue 16): a left/right/top/bottom half or a box as a MASK for the Condition
Injector's ``region`` input, with a preview. Core mask nodes (Solid Mask, Mask Composite, Load
Image's MASK) work in that input too."""
from __future__ import annotations

from .common import CATEGORY, check_choice, check_image_batch, check_int, check_number


class P3SRegion:
    DESCRIPTION = (
        "Makes a region MASK for P3S Condition Injector: the left, right, top or bottom half of the image, "
        "a box given as fractions of the width and height, or everything (invert swaps inside and outside). "
        "Two injectors with two regions put two subjects in one image. The preview shows the region over "
        "the optional image (green = inside)."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["mask", "region", "area", "two subjects", "regional subject"]  # the words users type in the node search
    FUNCTION = "make"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("region", "preview")
    OUTPUT_TOOLTIPS = ("The region (1 = inside) for the injector's region input.",
                       "The region drawn over the image (or grey): green = inside, dark = outside.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..p3s_core.region import SHAPES

        return {
            "required": {
                "shape": (list(SHAPES), {"default": "left half", "tooltip": "Which part of the image the subject goes to. 'box' uses left/top/right/bottom."}),
                "width": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Width of the mask in pixels (the injector stretches it to the image, so only the aspect matters). Ignored when an image is connected."}),
                "height": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Height of the mask in pixels. Ignored when an image is connected."}),
                "left": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Box only: left edge as a fraction of the width."}),
                "top": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Box only: top edge as a fraction of the height."}),
                "right": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Box only: right edge as a fraction of the width."}),
                "bottom": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Box only: bottom edge as a fraction of the height."}),
                "invert": ("BOOLEAN", {"default": False, "tooltip": "Swap inside and outside (e.g. everything but the box)."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Optional: an image to size the mask from and to draw the preview on (e.g. a first generation)."}),
            },
        }

    def make(self, shape, width, height, left, top, right, bottom, invert, image=None):
        from ..p3s_core.previews import region_preview
        from ..p3s_core.region import SHAPES, make_region

        check_choice(shape, "shape", list(SHAPES))
        width = check_int(width, "width", 8, 8192)
        height = check_int(height, "height", 8, 8192)
        box = [check_number(v, name, 0.0, 1.0, "use a fraction between 0 and 1 of the width / height")
               for v, name in ((left, "left"), (top, "top"), (right, "right"), (bottom, "bottom"))]
        if image is not None:
            _, height, width, _ = check_image_batch(image, "image")
        mask = make_region(shape, width, height, box, invert=bool(invert))
        return (mask, region_preview(mask, image))
