"""P3S for ComfyUI: point-supervised selective subject-driven generation (P3S-Diffusion, SD1.5).

Node API: the classic V1 API (``NODE_CLASS_MAPPINGS``). It loads on every ComfyUI version users run
(0.3.x to 0.33), while V3's ``comfy_entrypoint`` lacks ``on_load`` / ``search_aliases`` in 0.3.75;
a pack picks one style because a module exporting ``NODE_CLASS_MAPPINGS`` never takes the V3 path.

Import cost: only the node classes' schemas are defined here; torch-heavy work, scikit-image and the
model core are imported inside the node functions, so importing the pack adds little to start-up.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.paths import register_model_folder

WEB_DIRECTORY = "./web/js"

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
