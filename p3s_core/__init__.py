"""P3S-Diffusion model core (paper: "P3S-Diffusion", Sec. III).

Pure torch / numpy / scikit-image / safetensors: this package never imports ComfyUI, so it can be
unit-tested with tiny models and reused from a diffusers pipeline. The one module that touches
ComfyUI internals is :mod:`p3s_core.comfy_backend`, which imports ComfyUI lazily.
"""
