#!/usr/bin/env python
"""Seeded random-weight model files for the tests and the demo (no weights are ever downloaded).

Usage::

    python scripts/make_random_models.py --seed 0 --out DIR [--only sd15,clip_vision,controlnet]
                                         [--comfyui COMFYUI_DIR]

Writes, byte-identical for the same seed and generator version:

* ``DIR/checkpoints/p3s_random_sd15.safetensors``: an SD1.5 single-file checkpoint in the original
  LDM layout (``model.diffusion_model.`` 686, ``first_stage_model.`` 248,
  ``cond_stage_model.transformer.`` 197 tensors; 1,131 in all), fp16.
* ``DIR/clip_vision/p3s_random_clip_vit_l14.safetensors``: a CLIP ViT-L/14 vision tower in the
  ``transformers`` ``CLIPVisionModelWithProjection`` layout (392 tensors), fp16.
* ``DIR/controlnet/p3s_random_controlnet_sd15.safetensors``: an SD1.5 ControlNet in the original
  lllyasviel layout (``control_model.`` prefix), fp16.
* ``DIR/manifest.json``: file names, sizes, sha256, tensor counts, seed and generator version.

How (decisions):

* Key names and shapes come from the real model classes built on the ``meta`` device (no memory):
  ComfyUI's own LDM ``UNetModel``, ``AutoencoderKL`` and ``cldm.ControlNet`` with ComfyUI's SD1.5
  config, and ``transformers`` CLIP configs for the two CLIP towers. ComfyUI is imported only for
  ``sd15`` and ``controlnet``.
* Values are generated per tensor and streamed straight into the ``.safetensors`` file (written by
  this script, format: 8-byte little-endian header length, JSON header, raw data), so the peak
  memory is one tensor, not one model.
* Each tensor gets its own PCG64 stream seeded from ``sha256(version, seed, model, key)``: the bytes
  of a tensor depend on nothing else (not the order, not ``--only``). numpy's PCG64 + float32
  ``random()`` is integer arithmetic, so the files do not depend on the CPU's SIMD flavour (torch's
  vectorised ``randn`` may).
* Initialisation: norm weights (GroupNorm / LayerNorm) = 1, biases = 0, every other float tensor
  uniform on ``[-a, a]`` with ``a = std * sqrt(3)`` (so its standard deviation is ``std``; uniform
  rather than normal because it is ~8x faster to draw here and bounded, so fp16 cannot meet an
  outlier). ``std`` = 0.02 everywhere, except the ControlNet's "zero" modules (``zero_convs``,
  ``middle_block_out``, the last ``input_hint_block`` conv), which get ``std`` = 0.005 instead of
  zeros so that a ControlNet has a small but measurable effect. ``position_ids`` are int64
  ``arange``. Every float tensor is checked finite before it is written.
* Each file is written to a temporary name in its folder, fsync'ed, then ``os.replace``'d, so an
  interrupted run never leaves a half file under the final name.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from p3s_core.errors import P3SError  # noqa: E402

GENERATOR_NAME = "p3s make_random_models"
GENERATOR_VERSION = "1"
COMFYUI_VERSION = "0.3.75"
DEFAULT_STD = 0.02
ZERO_MODULE_STD = 0.005

MODEL_FILES = {
    "sd15": "checkpoints/p3s_random_sd15.safetensors",
    "clip_vision": "clip_vision/p3s_random_clip_vit_l14.safetensors",
    "controlnet": "controlnet/p3s_random_controlnet_sd15.safetensors",
}
MODEL_NAMES = tuple(MODEL_FILES)

# ComfyUI's SD1.5 UNet config (comfy/model_detection.py, the SD15 entry of
# unet_config_from_diffusers_unet, plus supported_models.SD15.unet_extra_config).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# ComfyUI's default SD1.x VAE (comfy/sd.py, VAE.__init__), embed_dim 4.
SD15_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
# CLIP ViT-L/14 text encoder (SD1.5's cond_stage_model) and vision tower.
CLIP_L_TEXT_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "projection_dim": 768, "layer_norm_eps": 1e-5,
}
CLIP_L_VISION_CONFIG = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "num_channels": 3, "projection_dim": 768,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}

_ST_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}


class RandomModelsError(P3SError):
    """A bad argument or environment for the random-model generator."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its key, shape, numpy dtype and how to fill it.

    ``init`` is ``"uniform"`` (zero-mean, standard deviation ``std``), ``"ones"``, ``"zeros"`` or
    ``"arange"`` (``position_ids``: ``arange(shape[-1])`` broadcast to ``shape``).
    """

    key: str
    shape: tuple
    dtype: np.dtype
    init: str
    std: float = 0.0

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.dtype).itemsize


# --------------------------------------------------------------------------------------------------
# Layout: tensor specs from modules built on the meta device
# --------------------------------------------------------------------------------------------------

def _is_norm(module) -> bool:
    import torch

    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d))


def specs_from_module(module, prefix: str = "", *, std: float = DEFAULT_STD,
                      std_for: Callable[[str], float] | None = None,
                      dtype=np.float16) -> list[TensorSpec]:
    """Specs for every entry of ``module.state_dict()``, keys prefixed with ``prefix``.

    Norm weights -> ones, biases -> zeros, any other float tensor -> uniform with std ``std``
    (or ``std_for(key_without_prefix)`` when given). Integer buffers are not supported here
    (add them explicitly).
    """
    kinds = {}
    for mname, mod in module.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if pname == "bias" or pname.endswith("_bias"):
                kinds[full] = "zeros"
            elif _is_norm(mod) and pname == "weight":
                kinds[full] = "ones"
            else:
                kinds[full] = "uniform"
    specs = []
    for key, t in module.state_dict().items():
        if t.is_floating_point() is False:
            raise RandomModelsError("module", f"non-float tensor '{key}' ({t.dtype}) has no initialiser",
                                    "add integer buffers as explicit TensorSpec entries")
        kind = kinds.get(key, "uniform")
        s = (std_for(key) if std_for is not None else std) if kind == "uniform" else 0.0
        specs.append(TensorSpec(prefix + key, tuple(int(d) for d in t.shape), np.dtype(dtype), kind, s))
    return specs


def import_comfy(comfy_dir: str | os.PathLike):
    """Put ComfyUI first on ``sys.path`` and force CPU mode before ``comfy.model_management`` loads."""
    comfy_dir = Path(comfy_dir)
    if not (comfy_dir / "comfy" / "model_detection.py").is_file():
        raise RandomModelsError("--comfyui", f"'{comfy_dir}' is not a ComfyUI folder (no comfy/model_detection.py)",
                                "pass the ComfyUI v0.3.75 folder (scripts/setup.sh prints it as P3S_COMFYUI)")
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ops  # noqa: F401  (imports comfy.model_management)

    return comfy


def sd15_unet_specs(comfy_dir) -> list[TensorSpec]:
    """``model.diffusion_model.*``: ComfyUI's LDM UNetModel with the SD1.5 config (686 tensors)."""
    import torch

    import_comfy(comfy_dir)
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    m = UNetModel(**SD15_UNET_CONFIG, dtype=torch.float16, device=torch.device("meta"),
                  operations=comfy.ops.disable_weight_init)
    return specs_from_module(m, "model.diffusion_model.")


def sd15_vae_specs(comfy_dir) -> list[TensorSpec]:
    """``first_stage_model.*``: ComfyUI's AutoencoderKL with the SD1.x VAE config (248 tensors)."""
    import torch

    import_comfy(comfy_dir)
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        m = AutoencoderKL(ddconfig=dict(SD15_VAE_DDCONFIG), embed_dim=4)
    return specs_from_module(m, "first_stage_model.")


def clip_text_specs() -> list[TensorSpec]:
    """``cond_stage_model.transformer.text_model.*``: a transformers CLIPTextModel ViT-L/14 (197 tensors).

    Decision: keys use the ``text_model.`` level of the released SD1.5 checkpoints (transformers 5
    dropped that level from the module tree; it is added back), and ``position_ids`` (int64, 1x77,
    a non-persistent buffer in recent transformers) is written as the released files have it.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        m = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    specs = specs_from_module(m, "")
    out = []
    for s in specs:
        key = s.key if s.key.startswith("text_model.") else "text_model." + s.key
        out.append(TensorSpec("cond_stage_model.transformer." + key, s.shape, s.dtype, s.init, s.std))
    n = CLIP_L_TEXT_CONFIG["max_position_embeddings"]
    out.append(TensorSpec("cond_stage_model.transformer.text_model.embeddings.position_ids", (1, n),
                          np.dtype(np.int64), "arange"))
    return out


def sd15_specs(comfy_dir) -> list[TensorSpec]:
    """All 1,131 tensors of the SD1.5 single-file checkpoint (UNet + VAE + CLIP-L text)."""
    return sd15_unet_specs(comfy_dir) + sd15_vae_specs(comfy_dir) + clip_text_specs()


def clip_vision_specs() -> list[TensorSpec]:
    """A transformers CLIPVisionModelWithProjection ViT-L/14 at 224 px, HF layout (392 tensors)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        m = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_VISION_CONFIG))
    return specs_from_module(m, "")


def _controlnet_std(key: str) -> float:
    """The lllyasviel "zero" modules get a small random init instead of zeros (see module doc)."""
    if key.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.14.")):
        return ZERO_MODULE_STD
    return DEFAULT_STD


def controlnet_specs(comfy_dir) -> list[TensorSpec]:
    """``control_model.*``: ComfyUI's cldm.ControlNet with the SD1.5 config and a 3-channel hint."""
    import torch

    import_comfy(comfy_dir)
    import comfy.ops
    from comfy.cldm.cldm import ControlNet

    cfg = dict(SD15_UNET_CONFIG)
    cfg.pop("out_channels")
    m = ControlNet(**cfg, hint_channels=3, dtype=torch.float16, device=torch.device("meta"),
                   operations=comfy.ops.disable_weight_init)
    return specs_from_module(m, "control_model.", std_for=_controlnet_std)


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------

def tensor_seed(seed: int, model: str, key: str) -> int:
    """128-bit PCG64 seed of one tensor: depends only on the generator version, seed, model and key."""
    h = hashlib.sha256(f"p3s-random-models/v{GENERATOR_VERSION}/{int(seed)}/{model}/{key}".encode()).digest()
    return int.from_bytes(h[:16], "little")


def make_values(spec: TensorSpec, seed: int, model: str) -> np.ndarray:
    """The values of one tensor as a C-contiguous numpy array of ``spec.dtype`` and ``spec.shape``."""
    if spec.init == "zeros":
        return np.zeros(spec.shape, dtype=spec.dtype)
    if spec.init == "ones":
        return np.ones(spec.shape, dtype=spec.dtype)
    if spec.init == "arange":
        return np.ascontiguousarray(np.broadcast_to(np.arange(spec.shape[-1], dtype=spec.dtype), spec.shape))
    if spec.init != "uniform":
        raise RandomModelsError("spec", f"unknown init '{spec.init}' for '{spec.key}'",
                                "use uniform, ones, zeros or arange")
    rng = np.random.Generator(np.random.PCG64(tensor_seed(seed, model, spec.key)))
    a = np.float32(spec.std * math.sqrt(3.0))
    u = rng.random(spec.numel, dtype=np.float32)  # [0, 1)
    u *= np.float32(2.0) * a
    u -= a
    out = u.astype(spec.dtype).reshape(spec.shape)
    if not np.isfinite(out).all():
        raise RandomModelsError("seed", f"tensor '{spec.key}' got non-finite values",
                                "report this: the init range is far below the fp16 limit")
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def safetensors_header(specs: Sequence[TensorSpec], metadata: dict | None = None) -> tuple[bytes, list[TensorSpec]]:
    """The padded safetensors header and the data order (itemsize descending, then key).

    Keys are emitted in data order, ``__metadata__`` first, compact separators, padded with spaces
    so the data starts at an 8-byte boundary: a deterministic byte string.
    """
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise RandomModelsError("specs", "duplicate tensor keys", "fix the layout function")
    for s in specs:
        if np.dtype(s.dtype) not in _ST_DTYPES:
            raise RandomModelsError("specs", f"dtype {s.dtype} of '{s.key}' is not supported",
                                    "use float16, float32 or int64")
    order = sorted(specs, key=lambda s: (-np.dtype(s.dtype).itemsize, s.key))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    off = 0
    for s in order:
        header[s.key] = {"dtype": _ST_DTYPES[np.dtype(s.dtype)], "shape": list(s.shape),
                         "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    raw += b" " * ((-(8 + len(raw))) % 8)
    return raw, order


def _atomic_target(path: Path) -> Path:
    """``.NAME.tmp-PID`` beside ``path``; stale ones left by killed runs (dead PID) are removed."""
    for old in path.parent.glob(f".{path.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                old.unlink()
            except OSError:
                pass
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (PermissionError) or not checkable: keep its file
        return True
    return True


def write_safetensors(path: str | os.PathLike, specs: Sequence[TensorSpec],
                      make: Callable[[TensorSpec], np.ndarray], metadata: dict | None = None,
                      workers: int = 2) -> dict:
    """Stream ``make(spec)`` for every spec into a safetensors file, atomically.

    Values are produced by ``workers`` threads a few tensors ahead (numpy and hashlib release the
    GIL) and written in header order. Returns ``{"bytes", "sha256", "tensors", "parameters"}``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header, order = safetensors_header(specs, metadata)
    tmp = _atomic_target(path)
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as f, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for chunk in (len(header).to_bytes(8, "little"), header):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            lookahead = max(2, 2 * workers)
            futures = [pool.submit(make, s) for s in order[:lookahead]]
            for i, spec in enumerate(order):
                arr = futures[i].result()
                futures[i] = None
                if i + lookahead < len(order):
                    futures.append(pool.submit(make, order[i + lookahead]))
                if arr.dtype != np.dtype(spec.dtype) or tuple(arr.shape) != tuple(spec.shape):
                    raise RandomModelsError("make", f"'{spec.key}' came back as {arr.dtype}{arr.shape}",
                                            f"return {spec.dtype}{spec.shape}")
                buf = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
                mv = memoryview(buf).cast("B")
                f.write(mv)
                digest.update(mv)
                size += mv.nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return {"bytes": size, "sha256": digest.hexdigest(), "tensors": len(order),
            "parameters": int(sum(s.numel for s in order))}


def prefix_counts(keys: Iterable[str], prefixes: Sequence[str]) -> dict:
    """How many keys start with each prefix (first match wins), plus ``"other"`` when non-zero."""
    counts = {p: 0 for p in prefixes}
    other = 0
    for k in keys:
        for p in prefixes:
            if k.startswith(p):
                counts[p] += 1
                break
        else:
            other += 1
    if other:
        counts["other"] = other
    return counts


MODEL_PREFIXES = {
    "sd15": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."),
    "clip_vision": ("vision_model.", "visual_projection."),
    "controlnet": ("control_model.",),
}


def build_manifest(seed: int, entries: dict) -> dict:
    """The manifest: generator name/version, seed, and one entry per model (sorted by name)."""
    return {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "layout": f"ComfyUI {COMFYUI_VERSION} LDM classes (sd15 UNet/VAE, controlnet); transformers CLIP configs",
        "init": {"uniform_std": DEFAULT_STD, "controlnet_zero_module_std": ZERO_MODULE_STD,
                 "norm_weight": 1.0, "bias": 0.0, "dtype": "float16"},
        "files": {name: entries[name] for name in sorted(entries)},
    }


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Deterministic JSON (sorted keys, indent 2, trailing newline) written via temp + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest in ``out_dir`` or ``None`` when missing or unreadable."""
    p = Path(out_dir) / "manifest.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def default_comfy_dir() -> Path:
    """``$P3S_COMFYUI``, else ``${P3S_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/p3s-comfyui}/comfyui-0.3.75``."""
    env = os.environ.get("P3S_COMFYUI")
    if env:
        return Path(env)
    cache = os.environ.get("P3S_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "p3s-comfyui")
    return Path(cache) / f"comfyui-{COMFYUI_VERSION}"


def parse_only(text: str | None) -> list[str]:
    """``"sd15,controlnet"`` -> ``["sd15", "controlnet"]`` in canonical order; ``None`` -> all."""
    if text is None or not text.strip():
        return list(MODEL_NAMES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in MODEL_FILES]
    if bad:
        raise RandomModelsError("--only", f"unknown model name(s) {bad}",
                                f"use a comma-separated subset of {','.join(MODEL_NAMES)}")
    return [n for n in MODEL_NAMES if n in names]


def specs_for(name: str, comfy_dir) -> list[TensorSpec]:
    if name == "sd15":
        return sd15_specs(comfy_dir)
    if name == "clip_vision":
        return clip_vision_specs()
    if name == "controlnet":
        return controlnet_specs(comfy_dir)
    raise RandomModelsError("model", f"unknown model '{name}'", f"use one of {MODEL_NAMES}")


def generate(out_dir: str | os.PathLike, seed: int = 0, only: Sequence[str] | None = None,
             comfy_dir=None, workers: int = 2, log=print) -> dict:
    """Write the requested model files and the manifest into ``out_dir``; return the manifest.

    Entries of an existing manifest with the same seed and generator version are kept for models
    not regenerated now, when their file is still there.
    """
    out_dir = Path(out_dir)
    names = list(only) if only is not None else list(MODEL_NAMES)
    comfy_dir = Path(comfy_dir) if comfy_dir is not None else default_comfy_dir()
    entries = {}
    old = read_manifest(out_dir)
    if old and old.get("seed") == int(seed) and old.get("generator_version") == GENERATOR_VERSION:
        for n, e in (old.get("files") or {}).items():
            if n in MODEL_FILES and n not in names and (out_dir / e.get("path", "")).is_file():
                entries[n] = e
    for name in names:
        t0 = time.perf_counter()
        specs = specs_for(name, comfy_dir)
        rel = MODEL_FILES[name]
        meta = {"format": "pt", "p3s_generator": GENERATOR_NAME, "p3s_generator_version": GENERATOR_VERSION,
                "p3s_seed": str(int(seed)), "p3s_model": name}
        info = write_safetensors(out_dir / rel, specs, lambda s, _n=name: make_values(s, seed, _n),
                                 metadata=meta, workers=workers)
        info["path"] = rel
        info["prefix_counts"] = prefix_counts((s.key for s in specs), MODEL_PREFIXES[name])
        entries[name] = info
        log(f"[make_random_models] {rel}: {info['tensors']} tensors, {info['parameters'] / 1e6:.1f} M params, "
            f"{info['bytes'] / 2**20:.0f} MiB, sha256 {info['sha256'][:16]}..., {time.perf_counter() - t0:.1f} s")
    manifest = build_manifest(seed, entries)
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write seeded random-weight SD1.5 / CLIP ViT-L/14 vision / "
                                             "SD1.5 ControlNet files (for tests and the demo).")
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0); same seed -> same bytes")
    ap.add_argument("--out", required=True, help="output folder (checkpoints/, clip_vision/, controlnet/ inside)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(MODEL_NAMES)}")
    ap.add_argument("--comfyui", default=None, help="ComfyUI v0.3.75 folder (default: $P3S_COMFYUI or the cache)")
    ap.add_argument("--workers", type=int, default=2, help="value-generation threads (default 2)")
    args = ap.parse_args(argv)
    try:
        only = parse_only(args.only)
        if args.seed < 0:
            raise RandomModelsError("--seed", f"{args.seed} is negative", "use a seed >= 0")
        t0 = time.perf_counter()
        generate(args.out, seed=args.seed, only=only, comfy_dir=args.comfyui, workers=args.workers)
        print(f"[make_random_models] done in {time.perf_counter() - t0:.1f} s -> {args.out}")
    except RandomModelsError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
