"""The P3S adapter: RNGR encoder (Eq. 4-5) + trainable copy with its zero convs (Eq. 6) + lambda (Eq. 7).

File format (``FORMAT_VERSION`` 2, safetensors, never pickle), independent of ComfyUI so that a
diffusers pipeline can load it too:

* tensors ``encoder.*`` (:class:`~p3s_core.encoder.RNGREncoder`: ``zero_conv``, ``to_q``, ``to_k``,
  ``to_v``) and ``copy.*`` (:class:`~p3s_core.copy_unet.P3SCopyUNet`, LDM sub-names, plus
  ``copy.zero_convs.<layer key>``, and with the cross-attention enhancement
  ``copy.cross_zero_convs.<layer key>``);
* metadata (all strings): ``p3s_format_version`` ("2"), ``enhancement`` ("cross": self-attention
  injection + cross-attention enhancement, the paper's Fig. 3; "self": the self-attention injection
  only), ``copy_layout`` (the copy config's ``layout``: "encoder" or "full", :mod:`.copy_config`), ``base_family`` ("sd15"), ``config``
  (JSON of :class:`CopyUNetConfig`), ``encoder_config`` (JSON: latent_channels, clip_dim,
  inner_dim), ``layer_map`` (JSON list, see :func:`~p3s_core.copy_unet.layer_map`), ``lambda``
  (Eq. 7's lambda), ``training`` (JSON: settings and step count), ``base_unet_hash`` when known,
  plus any caller-given extra keys;
* optional (additive, still format 1): ``reference.latent`` [N, 4, h, w] (the cleaned training
  photos' VAE latents I', after ``process_latent_in``) and ``reference.clip_hidden`` [N, S, clip_dim]
  (their CLIP ViT-L/14 last hidden states c_s): what the RNGR encoder and the copy need to make I''
  (Eq. 4-6), so generation needs no reference photo, VAE or CLIP vision. Files without them load
  as before (``adapter.reference`` is None).

Format 1 (written before issue 22) has no ``enhancement`` / ``copy_layout`` entries: it loads as
"self" / "encoder", the same tensors as before, so its results are bit for bit those of the pack
that wrote it. :func:`save_adapter` writes format 2 (``version=1`` writes format 1 for a "self"
adapter, e.g. for an older pack).

Decisions:

* The training record is the attribute ``training_info`` (not ``training``): ``nn.Module.training``
  is the train/eval flag and ``.train()``/``.eval()`` overwrite it on every submodule.
* ``base_unet_hash`` is a cheap fingerprint (:func:`unet_fingerprint`), not a full hash of the
  ~1.7 GB UNet: names, shapes and 256 evenly spaced values per tensor.
* Loading builds the model on the meta device and assigns the file's tensors (no random init, no
  double memory); the file's dtype is kept unless ``dtype`` is given. The tensors are read into
  ordinary owned, 64-byte-aligned memory (:func:`~p3s_core.safe_io.read_safetensors_tensors`),
  never left as views into a memory map of the file: the file can be replaced or deleted while
  ComfyUI runs, and results do not depend on the offsets inside the file.
* Non-finite weights (NaN / inf) are refused on load and before a save (:func:`check_finite`):
  they would make every sample black.
* Layer family (``operations``, :mod:`.operations`): ``torch.nn`` unless given. :func:`new_adapter`
  initialises with torch.nn and only then builds the requested family's twin
  (:meth:`P3SAdapter.with_operations`), so a family that skips weight init (ComfyUI's
  ``comfy.ops``) never leaves a weight uninitialised; :func:`load_adapter` takes every weight from the file.
* :func:`new_adapter` and :func:`load_adapter` run under ``torch.inference_mode(False)``: ComfyUI
  executes nodes in inference mode, and parameters created there would be inference tensors that
  the trainer could not back-propagate through.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .copy_init import init_from_ldm_unet, ldm_key_map
from .copy_config import COPY_LAYOUTS as _COPY_LAYOUTS
from .copy_unet import DEFAULT_ENHANCEMENT, ENHANCEMENTS, CopyUNetConfig, P3SCopyUNet, check_enhancement, layer_map
from .encoder import RNGREncoder
from .errors import AdapterFileError
from .operations import check_operations
from .safe_io import atomic_save_safetensors, read_safetensors_header, read_safetensors_tensors

__all__ = [
    "FORMAT_VERSION",
    "BASE_FAMILY",
    "DEFAULT_LAMBDA",
    "P3SAdapter",
    "save_adapter",
    "load_adapter",
    "new_adapter",
    "adapter_metadata",
    "unet_fingerprint",
    "check_finite",
]

FORMAT_VERSION = 2
BASE_FAMILY = "sd15"
#: Copy layouts this version reads and writes (metadata ``copy_layout``, the copy config's
#: ``layout``: :mod:`.copy_config`; format 1 = "encoder").
COPY_LAYOUTS = _COPY_LAYOUTS
DEFAULT_LAMBDA = 0.2
_RESERVED = ("p3s_format_version", "base_family", "config", "encoder_config", "layer_map",
             "lambda", "training", "base_unet_hash", "enhancement", "copy_layout")
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
#: Optional stored-reference tensors (``reference.<name>``), see the module docstring.
REFERENCE_TENSORS = ("latent", "clip_hidden")


def _split_reference(path, infos: dict, clip_dim: int, latent_channels: int) -> dict:
    """Take the optional ``reference.*`` tensor infos out of ``infos`` and check their shapes."""
    found = {k: infos.pop(k) for k in list(infos) if k.startswith("reference.")}
    if not found:
        return {}
    names = {f"reference.{n}" for n in REFERENCE_TENSORS}
    if set(found) != names:
        raise AdapterFileError(str(path), f"its stored reference is incomplete or unknown "
                               f"({_names(found)}; expected {_names(names)})", "re-train the adapter")
    lat, hid = (tuple(found[f"reference.{n}"]["shape"]) for n in REFERENCE_TENSORS)
    if (len(lat) != 4 or lat[1] != latent_channels or len(hid) != 3 or hid[2] != clip_dim
            or lat[0] != hid[0] or lat[0] < 1 or min(lat) < 1 or min(hid) < 1
            or any(found[k]["dtype"] not in _FLOAT_DTYPES for k in found)):
        raise AdapterFileError(str(path), f"its stored reference has shapes {lat} / {hid}",
                               "re-train the adapter")
    return found


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class P3SAdapter(nn.Module):
    """``encoder`` (Eq. 4-5) + ``copy`` (Eq. 6, incl. zero convs) + ``config`` + ``lam`` (Eq. 7)
    + ``training_info`` (settings, ``steps``) + ``base_unet_hash`` (or None). ``operations``: the
    layer family of the encoder and the copy (:mod:`.operations`; None = ``torch.nn``).
    ``enhancement`` (:data:`~p3s_core.copy_unet.ENHANCEMENTS`): "cross" adds the cross-attention
    enhancement's zero convs (Fig. 3); "self" (the default of this class, and format-1 files) has
    the self-attention injection only. ``copy_layout``: the copy config's layout (:data:`COPY_LAYOUTS`)."""

    def __init__(self, config: CopyUNetConfig | None = None, lam: float = DEFAULT_LAMBDA,
                 training: Mapping[str, Any] | None = None, clip_dim: int = 1024,
                 encoder_inner_dim: int = 64, base_unet_hash: str | None = None, operations=None,
                 enhancement: str = "self"):
        super().__init__()
        self.config = config or CopyUNetConfig.sd15()
        self.operations = check_operations(operations)
        self.enhancement = check_enhancement(enhancement)
        self.encoder = RNGREncoder(self.config.in_channels, clip_dim, encoder_inner_dim, self.operations)
        self.copy = P3SCopyUNet(self.config, self.operations, self.enhancement)
        self.lam = float(lam)
        self.training_info: dict[str, Any] = dict(training) if training else {"steps": 0}
        self.base_unet_hash = base_unet_hash
        #: The stored cleaned reference(s): {"latent": [N,4,h,w], "clip_hidden": [N,S,clip_dim]} or None.
        self.reference: dict[str, torch.Tensor] | None = None

    @property
    def copy_layout(self) -> str:
        """The copy's layout (its config's; metadata ``copy_layout``)."""
        return self.config.layout

    @property
    def layer_map(self) -> list[dict[str, Any]]:
        """The 16 injection targets (see :func:`p3s_core.copy_unet.layer_map`)."""
        return self.copy.layer_map

    @property
    def encoder_config(self) -> dict[str, int]:
        return self.encoder.config()

    def encode_reference(self, ref_latent: torch.Tensor, clip_hidden: torch.Tensor,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
        """Eq. 4-5: I'' from the reference latent I' and the CLIP image hidden states (``dtype``:
        see :meth:`RNGREncoder.forward`)."""
        return self.encoder(ref_latent, clip_hidden, dtype)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                ref: torch.Tensor | None = None, return_attn_map: bool = False,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Eq. 6 features ``{layer key: [B, tokens, C]}`` (see :meth:`P3SCopyUNet.forward`)."""
        return self.copy(x_t, timesteps, context, ref, return_attn_map=return_attn_map, dtype=dtype)

    def with_operations(self, operations) -> "P3SAdapter":
        """This adapter built from another layer family, sharing its parameters: the twin's
        parameters ARE this adapter's ``Parameter`` objects (built on the meta device, then
        ``load_state_dict(assign=True)``: no init, no copy, every weight from this adapter), so a
        training step or a move of one is seen by the other. ``requires_grad`` flags, the train/eval
        mode, ``reference`` and the metadata are kept. The same family: ``self``. A family whose
        loader wraps tensors in new ``Parameter`` objects (ComfyUI 0.33's lazily initialised
        ``Linear`` under Dynamic VRAM) shares the storage, not the objects."""
        ops = check_operations(operations)
        if ops is self.operations:
            return self
        with torch.inference_mode(False), torch.device("meta"):
            twin = P3SAdapter(self.config, self.lam, self.training_info, self.encoder.clip_dim,
                              self.encoder.inner_dim, self.base_unet_hash, operations=ops,
                              enhancement=self.enhancement)
        mine = self.state_dict(keep_vars=True)
        for name, p in twin.named_parameters():
            p.requires_grad_(mine[name].requires_grad)  # assign=True copies these flags onto ours
        with torch.inference_mode(False):
            twin.load_state_dict(mine, strict=True, assign=True)
        twin.training_info = self.training_info
        twin.reference = self.reference
        twin.copy.share_cfg_rows = self.copy.share_cfg_rows
        return twin.train(self.training)


def adapter_metadata(adapter: P3SAdapter, version: int = FORMAT_VERSION) -> dict[str, str]:
    """The safetensors metadata strings that describe ``adapter`` (see module docstring) in format
    ``version`` (2, or 1 for a "self" adapter: no ``enhancement`` / ``copy_layout`` entries)."""
    enhancement = getattr(adapter, "enhancement", "self")
    layout = adapter.copy_layout
    if version not in (1, FORMAT_VERSION) or (version == 1 and (enhancement, layout) != ("self", "encoder")):
        raise AdapterFileError("version", f"cannot write format {version!r} for an adapter with "
                               f"enhancement {enhancement!r} and copy layout {layout!r}",
                               f"write format {FORMAT_VERSION} (the default); format 1 holds only 'self' "
                               "adapters of the 'encoder' layout")
    meta = {
        "p3s_format_version": str(version),
        "base_family": BASE_FAMILY,
        "config": _dumps(adapter.config.to_dict()),
        "encoder_config": _dumps(adapter.encoder_config),
        "layer_map": _dumps(adapter.layer_map),
        "lambda": repr(float(adapter.lam)),
        "training": _dumps(adapter.training_info),
    }
    if adapter.base_unet_hash:
        meta["base_unet_hash"] = str(adapter.base_unet_hash)
    if version >= 2:
        meta["enhancement"] = enhancement
        meta["copy_layout"] = layout
    return meta


def save_adapter(adapter: P3SAdapter, path: str | os.PathLike,
                 extra_metadata: Mapping[str, str] | None = None, version: int = FORMAT_VERSION) -> Path:
    """Save ``adapter`` atomically as safetensors (``encoder.*`` / ``copy.*`` + metadata).

    ``extra_metadata`` (str -> str) is added; it may not override the P3S keys. Same adapter ->
    same bytes. ``version``: the format (2; 1 for a "self" adapter). Returns the path written.
    """
    meta = adapter_metadata(adapter, version)
    for k, v in (extra_metadata or {}).items():
        if k in _RESERVED:
            raise AdapterFileError("extra_metadata", f"key {k!r} is reserved for P3S",
                                   "use another metadata key name")
        if not isinstance(k, str) or not isinstance(v, str):
            raise AdapterFileError("extra_metadata", f"entry {k!r} is not a str -> str pair",
                                   "convert metadata values to strings")
        meta[k] = v
    tensors = {k: v for k, v in adapter.state_dict().items()}
    check_finite(tensors, str(path), "the adapter to save",
                 "do not save it: train again with a lower learning_rate (or resume from the last "
                 "good save)")
    ref = getattr(adapter, "reference", None)
    if ref is not None:
        for name in REFERENCE_TENSORS:
            tensors[f"reference.{name}"] = ref[name].detach().to("cpu").contiguous()
    return atomic_save_safetensors(tensors, path, meta)


def check_finite(tensors: Mapping[str, torch.Tensor], input_name: str, what: str, fix: str) -> None:
    """Raise :class:`AdapterFileError` if any floating tensor holds NaN or infinity."""
    bad = [k for k, t in tensors.items()
           if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(input_name, f"{what} holds NaN or infinite weights in {len(bad)} "
                               f"tensors: {_names(bad)}", fix)


def _json_meta(path, meta: Mapping[str, str], key: str):
    if key not in meta:
        raise AdapterFileError(str(path), f"the P3S metadata entry {key!r} is missing",
                               "re-save the adapter with the P3S Trainer")
    try:
        return json.loads(meta[key])
    except ValueError as exc:
        raise AdapterFileError(str(path), f"the metadata entry {key!r} is corrupted (not valid JSON)",
                               "re-save the adapter with the P3S Trainer") from exc


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_adapter(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, operations=None) -> P3SAdapter:
    """Load and validate an adapter file; raises :class:`AdapterFileError` when it cannot be used.

    Checks, in order: a real safetensors file (no pickle is ever opened), format version (newer ->
    "update the pack"), base family (only ``sd15``), config, layer map equal to the one this
    version expects, every tensor present with the expected shape and a float dtype, no extra
    tensors, every value finite. Reads tensors with :func:`~p3s_core.safe_io.read_safetensors_tensors`
    (owned, aligned memory; the file is closed afterwards). Returns the adapter in eval
    mode on ``device`` (dtype of the file unless ``dtype`` is given), built from ``operations``
    (:mod:`.operations`; None = ``torch.nn``).
    """
    operations = check_operations(operations)
    with torch.inference_mode(False):
        return _load_adapter(Path(path), device, dtype, operations)


def _load_adapter(path: Path, device, dtype, operations) -> P3SAdapter:
    meta, infos = read_safetensors_header(path)
    if "p3s_format_version" not in meta:
        raise AdapterFileError(str(path), "this safetensors file is not a P3S adapter (no "
                               "'p3s_format_version' metadata)",
                               "select an adapter saved by the P3S Trainer (models/p3s)")
    try:
        version = int(meta["p3s_format_version"])
    except ValueError as exc:
        raise AdapterFileError(str(path), f"invalid format version "
                               f"{meta['p3s_format_version']!r}", "re-train the adapter") from exc
    if version > FORMAT_VERSION:
        raise AdapterFileError(str(path), f"the adapter was made by a newer P3S version (format "
                               f"{version}; this pack reads up to {FORMAT_VERSION})",
                               "update the pack (P3S for ComfyUI) to load it")
    if version < 1:
        raise AdapterFileError(str(path), f"invalid format version {version}",
                               "re-train the adapter")
    enhancement, layout = _enhancement_layout(path, meta, version)
    family = meta.get("base_family")
    if family != BASE_FAMILY:
        raise AdapterFileError(str(path), f"the adapter is for base model family {family!r}, but "
                               f"this pack is SD1.5 ('{BASE_FAMILY}') only",
                               "use an adapter trained on an SD1.5 model")
    raw_config = _json_meta(path, meta, "config")
    try:
        config = CopyUNetConfig.from_dict(raw_config)
    except AdapterFileError as exc:
        raise AdapterFileError(str(path), f"the metadata entry 'config' is corrupted ({exc.problem})",
                               "re-save or re-train the adapter") from None
    except Exception as exc:  # any other error of the dataclass on a corrupted value
        raise AdapterFileError(str(path), f"the metadata entry 'config' is corrupted ({type(exc).__name__}: "
                               f"{str(exc)[:120]})", "re-save or re-train the adapter") from None
    enc = _json_meta(path, meta, "encoder_config")
    if (not isinstance(enc, dict) or set(enc) != {"latent_channels", "clip_dim", "inner_dim"}
            or not all(isinstance(v, int) and v > 0 for v in enc.values())
            or enc["latent_channels"] != config.in_channels):
        raise AdapterFileError(str(path), f"invalid encoder_config {enc!r}", "re-train the adapter")
    stored_map = _json_meta(path, meta, "layer_map")
    expected_map = json.loads(_dumps(layer_map(config)))
    if stored_map != expected_map:
        raise AdapterFileError(str(path), "its layer map differs from the 16 SD1.5 self-attention "
                               "layers this P3S version injects into",
                               "re-train the adapter with this version of the pack")
    try:
        lam = float(meta.get("lambda", str(0.2)))
    except ValueError as exc:
        raise AdapterFileError(str(path), f"invalid lambda {meta.get('lambda')!r}",
                               "re-train the adapter") from exc
    if not math.isfinite(lam):
        raise AdapterFileError(str(path), f"lambda is {lam}", "re-train the adapter")
    training = _json_meta(path, meta, "training") if "training" in meta else {"steps": 0}
    if not isinstance(training, dict):
        raise AdapterFileError(str(path), "the training record is not a JSON object",
                               "re-train the adapter")

    with torch.device("meta"):
        adapter = P3SAdapter(config, lam, training, enc["clip_dim"], enc["inner_dim"],
                             meta.get("base_unet_hash"), operations=operations, enhancement=enhancement)
    if adapter.copy_layout != layout:
        raise AdapterFileError(str(path), f"its metadata entry 'copy_layout' ({layout!r}) disagrees with its "
                               f"copy config's layout ({adapter.copy_layout!r})", "re-save the adapter with the "
                               "P3S Trainer")
    infos = dict(infos)
    ref_infos = _split_reference(path, infos, enc["clip_dim"], enc["latent_channels"])
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    missing = set(expected) - set(infos)
    extra = set(infos) - set(expected)
    if missing:
        raise AdapterFileError(str(path), f"{len(missing)} tensors are missing: {_names(missing)}",
                               "the file is incomplete; re-save or re-train the adapter")
    if extra:
        raise AdapterFileError(str(path), f"{len(extra)} unexpected tensors: {_names(extra)}",
                               "the file does not match this P3S version; re-train the adapter")
    bad = [f"{k} {tuple(infos[k]['shape'])} (expected {expected[k]})" for k in sorted(expected)
           if tuple(infos[k]["shape"]) != expected[k]]
    if bad:
        raise AdapterFileError(str(path), f"{len(bad)} tensors have the wrong shape, e.g. "
                               f"{'; '.join(bad[:3])}", "re-train the adapter")
    not_float = [k for k in infos if infos[k]["dtype"] not in _FLOAT_DTYPES]
    if not_float:
        raise AdapterFileError(str(path), f"tensors with a non-float dtype: {_names(not_float)}",
                               "re-train the adapter")
    sd = _read_weights(path, {**infos, **ref_infos}, device, None)
    ref = {n: sd.pop(f"reference.{n}").float() for n in REFERENCE_TENSORS} if ref_infos else None
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    adapter.load_state_dict(sd, strict=True, assign=True)
    adapter.reference = ref
    return adapter.eval()


def _enhancement_layout(path, meta: Mapping[str, str], version: int) -> tuple[str, str]:
    """``(enhancement, copy_layout)`` of a file: format 1 -> ("self", "encoder"); format 2 -> its
    metadata, checked against :data:`ENHANCEMENTS` / :data:`COPY_LAYOUTS`."""
    if version < 2:
        return "self", COPY_LAYOUTS[0]
    enhancement = meta.get("enhancement")
    if enhancement not in ENHANCEMENTS:
        raise AdapterFileError(str(path), f"its metadata entry 'enhancement' is {enhancement!r}, not one of "
                               f"{ENHANCEMENTS}", "re-save the adapter with the P3S Trainer")
    layout = meta.get("copy_layout")
    if layout not in COPY_LAYOUTS:
        raise AdapterFileError(str(path), f"its copy layout {layout!r} is not one this pack reads "
                               f"({', '.join(COPY_LAYOUTS)})", "update the pack (P3S for ComfyUI) to load it")
    return enhancement, layout


def _read_weights(path: Path, infos, device, dtype) -> dict[str, torch.Tensor]:
    """The file's tensors in owned, aligned memory on ``device`` (``dtype`` if given), all finite."""
    sd = read_safetensors_tensors(path, infos)
    check_finite(sd, str(path), "the adapter file",
                 "the file is damaged or was saved from a diverged training; use an earlier save "
                 "or re-train with a lower learning_rate")
    dev = torch.device(device)
    if dtype is not None or dev.type != "cpu":
        sd = {k: v.to(device=dev, dtype=dtype or v.dtype) for k, v in sd.items()}
    return sd


def _with_enhancement(adapter: P3SAdapter, enhancement: str) -> P3SAdapter:
    """``adapter`` ("self", randomly initialised) with ``enhancement``: the cross zero convs are
    added after every random draw (they are zeros), so both enhancements share the same weights."""
    if enhancement == "self":
        return adapter
    with torch.device("meta"):
        twin = P3SAdapter(adapter.config, adapter.lam, adapter.training_info, adapter.encoder.clip_dim,
                          adapter.encoder.inner_dim, adapter.base_unet_hash, enhancement=enhancement)
    twin.copy.cross_zero_convs.to_empty(device="cpu")
    sd = dict(adapter.state_dict())
    for name, t in twin.copy.cross_zero_convs.state_dict().items():
        sd[f"copy.cross_zero_convs.{name}"] = torch.zeros_like(t)
    twin.load_state_dict(sd, strict=True, assign=True)
    return twin


def unet_fingerprint(unet_state_dict: Mapping[str, torch.Tensor], keys=None) -> str:
    """Cheap fingerprint of base UNet weights: sha256 over sorted (name, shape, 256 evenly spaced
    values rounded to float16) of ``keys`` (default: all). Independent of the storage dtype as
    long as the values round to the same float16. Returns ``"p3sfp1:<hex>"``."""
    h = hashlib.sha256()
    for k in sorted(keys if keys is not None else unet_state_dict.keys()):
        t = unet_state_dict[k]
        h.update(k.encode("utf-8"))
        h.update(repr(tuple(t.shape)).encode("ascii"))
        flat = t.detach().reshape(-1)
        n = flat.numel()
        if n:
            idx = torch.linspace(0, n - 1, steps=min(n, 256), device=flat.device).round().long()
            # float32 linspace rounds n - 1 up to n past 2**24 elements (the full copy's 2560-wide
            # decoder convs): clamp, which leaves every smaller tensor's indices (and hash) as they were
            idx = idx.clamp_(max=n - 1)
            vals = flat[idx].to("cpu", torch.float16).contiguous()
            h.update(vals.view(torch.uint8).numpy().tobytes())
    return "p3sfp1:" + h.hexdigest()


def new_adapter(config: CopyUNetConfig | None = None,
                unet_state_dict: Mapping[str, torch.Tensor] | None = None,
                lam: float = DEFAULT_LAMBDA, seed: int = 0, *, unet_prefix: str = "",
                clip_dim: int = 1024, encoder_inner_dim: int = 64,
                training: Mapping[str, Any] | None = None, operations=None,
                enhancement: str = DEFAULT_ENHANCEMENT) -> P3SAdapter:
    """Build a fresh adapter, deterministic for ``seed`` (the global RNG is left untouched).

    With ``unet_state_dict`` (LDM names, ``unet_prefix`` e.g. ``"model.diffusion_model."``) the
    copy is initialised from the base UNet (:func:`init_from_ldm_unet`, ControlNet-style) and
    ``base_unet_hash`` is set to :func:`unet_fingerprint` of the copied tensors; zero convs are
    zero either way. Without it the copy keeps PyTorch's default random init. ``operations``: the
    layer family of the result (:mod:`.operations`); it is initialised with torch.nn first, then
    rebuilt from that family sharing the same tensors (:meth:`P3SAdapter.with_operations`).
    ``enhancement``: "cross" (default, the paper: self-attention injection + cross-attention
    enhancement) or "self" (the self-attention injection only; the same random draws, so a "self"
    adapter equals a "cross" one without its cross zero convs).
    """
    operations = check_operations(operations)
    check_enhancement(enhancement)
    with torch.inference_mode(False):
        adapter = _new_adapter(config or CopyUNetConfig.sd15(), unet_state_dict, lam, seed,
                               unet_prefix, clip_dim, encoder_inner_dim, training, enhancement)
        return adapter.with_operations(operations)


def _new_adapter(config, unet_state_dict, lam, seed, unet_prefix, clip_dim, encoder_inner_dim,
                 training, enhancement="self") -> P3SAdapter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if unet_state_dict is None:
            adapter = P3SAdapter(config, lam, training, clip_dim, encoder_inner_dim)
            return _with_enhancement(adapter, enhancement)
        # Every copy tensor is overwritten from the UNet: skip the random init of the copy.
        with torch.device("meta"):
            adapter = P3SAdapter(config, lam, training, clip_dim, encoder_inner_dim, enhancement=enhancement)
        adapter.encoder = RNGREncoder(config.in_channels, clip_dim, encoder_inner_dim)
    adapter.copy.to_empty(device="cpu")
    for conv in list(adapter.copy.zero_convs.values()) + list(getattr(adapter.copy, "cross_zero_convs", {}).values()):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    init_from_ldm_unet(adapter.copy, unet_state_dict, unet_prefix)
    keys = list(ldm_key_map(adapter.copy, unet_prefix).values())
    adapter.base_unet_hash = unet_fingerprint(unet_state_dict, keys)
    return adapter
