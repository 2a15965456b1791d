"""P3S Point Selector node: clicked points (or KJNodes/SAM2 coordinate strings) -> P3S_POINTS."""
from __future__ import annotations

from .common import CATEGORY, POINTS, check_image_batch, image_to_numpy, numpy_to_image

__all__ = ["P3SPointSelector"]


class P3SPointSelector:
    DESCRIPTION = (
        "Mark the subject to keep: click on the node's picture to add a positive point (green), "
        "right-click or shift-click for a negative point on a look-alike distractor (red), click a point "
        "to remove it; step through the batch with the arrows. Coordinate strings from KJNodes Points "
        "Editor or SAM2 can be connected instead (they replace the clicks). The same points come out as "
        "SAM2-style strings."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["points", "click points", "point editor", "sam", "sam points", "select subject", "coordinates", "subject"]  # the words users type in the node search
    FUNCTION = "select"
    RETURN_TYPES = (POINTS, "STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("points", "positive_coords", "negative_coords", "preview")
    OUTPUT_TOOLTIPS = (
        "The points of every image, for P3S RNGR Mask + Inpaint.",
        "Positive points of the first image as JSON [{\"x\": .., \"y\": ..}] (for SAM2 / KJNodes).",
        "Negative points of the first image in the same format.",
        "The images with the points drawn.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The reference photo(s) of the subject."}),
                "points_store": ("STRING", {"default": "", "multiline": False,
                                            "tooltip": "The clicked points (JSON, kept by the canvas widget so the workflow round-trips)."}),
            },
            "optional": {
                "coordinates_positive": ("STRING", {"forceInput": True, "tooltip": "KJNodes/SAM2 points on the subject, e.g. [{\"x\": 312, \"y\": 205}] (pixels or 0-1). Replace the clicks when connected."}),
                "coordinates_negative": ("STRING", {"forceInput": True, "tooltip": "KJNodes/SAM2 points on the distractor, same format."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def select(self, image, points_store="", coordinates_positive=None, coordinates_negative=None, unique_id=None):
        from ..p3s_core.errors import PointsError
        from ..p3s_core.points import P3SPoints, points_from_strings
        from ..p3s_core.previews import draw_points

        b, h, w, _ = check_image_batch(image)
        if coordinates_positive is not None and str(coordinates_positive).strip() not in ("", "[]"):
            points = points_from_strings(coordinates_positive, coordinates_negative or "", w, h, b)
        elif coordinates_negative is not None and str(coordinates_negative).strip() not in ("", "[]"):
            raise PointsError("coordinates_positive", "negative points were given but no positive point",
                              "connect positive coordinates too (or click a positive point on the subject)")
        elif str(points_store or "").strip():
            points = P3SPoints.from_widget_state(points_store, w, h, b, input_name="points_store")
        else:
            self._show_images_in_widget(image, unique_id)  # so the user can click after this run
            raise PointsError("points_store", "no point was clicked",
                              "click on the subject in the node's picture (right-click marks a distractor)")
        radius = max(3, round(min(h, w) / 60))
        previews = [draw_points(image_to_numpy(image, i), points.for_image(i), radius) for i in range(b)]
        pos, neg = points.to_coordinate_strings(0)
        return {"ui": {"p3s_images": self._temp_images(image)},
                "result": (points, pos, neg, numpy_to_image(previews))}

    @classmethod
    def _show_images_in_widget(cls, image, unique_id):
        """Send the batch to the canvas widget when the run stops for lack of points (the images
        cannot be shown before a run when they do not come straight from a Load Image node)."""
        try:
            from server import PromptServer
        except ImportError:
            return
        instance = getattr(PromptServer, "instance", None)
        if instance is None or unique_id is None:
            return
        instance.send_sync("p3s.point_selector.images", {"node": unique_id, "p3s_images": cls._temp_images(image)})

    @staticmethod
    def _temp_images(image):
        """The reference images as temp PNGs, so the canvas widget shows them after a run."""
        import os

        import folder_paths
        import numpy as np
        from PIL import Image

        temp = folder_paths.get_temp_directory()
        b, h, w = image.shape[:3]
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path("p3s_points", temp, w, h)
        files = []
        for i in range(b):
            fname = f"{name}_{counter + i:05}_.png"
            arr = (image_to_numpy(image, i) * 255.0).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(folder, fname), compress_level=1)
            files.append({"filename": fname, "subfolder": subfolder, "type": "temp"})
        return files
