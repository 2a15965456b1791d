"""P3S-Diffusion model core (paper: "P3S-Diffusion", Sec. III).

Pure torch / numpy / scikit-image / safetensors: this package never imports ComfyUI, so it can be
unit-tested with tiny models and reused from a diffusers pipeline. The modules that touch
ComfyUI internals are :mod:`p3s_core.comfy_backend` (sampling) and
:mod:`p3s_core.comfy_backend_train` (training), which import ComfyUI lazily.
"""
