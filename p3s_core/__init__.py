"""P3S-Diffusion for ComfyUI and diffusers (paper: "P3S-Diffusion", Sec. III).

The modules directly in this package are the method, one per part of the paper, in torch / numpy /
scikit-image / safetensors and free of any engine: :mod:`.points`, :mod:`.letterbox`, :mod:`.rngr`
(Eq. 1-2), :mod:`.inpainting` (Eq. 3), :mod:`.encoder` (Eq. 4-5), :mod:`.copy_unet` and
:mod:`.copy_init` (Eq. 6), :mod:`.operations` (their layer families), :mod:`.injection` (Eq. 7-8),
:mod:`.schedule` (Eq. 9-10), :mod:`.losses` (Eq. 11-15), :mod:`.region`, :mod:`.train` (the loop), :mod:`.adapter` and :mod:`.safe_io` (the
adapter file), :mod:`.previews` (what the nodes and the command line draw) and :mod:`.errors`.

Each engine lives in its own subpackage, the only code that imports it: :mod:`.comfyui_engine`
(ComfyUI, imported lazily) and :mod:`.diffusers_engine` (diffusers). :mod:`.cli` is the command line
(``p3s``), train-many and the DreamBench evaluation, on the diffusers engine. The rules are checked
from the syntax tree by ``tests/unit/test_layout.py``.
"""
