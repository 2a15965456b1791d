"""The copy's shape and layout (paper Sec. III-B, Eq. 6-7) and which copy feature feeds which of the
16 self-attention layers of the original SD1.5 UNet (the layer map).

Two layouts (``CopyUNetConfig.layout``, issue 22):

* ``"encoder"`` (format-1 adapters): the copy's encoder half + middle with one (ResBlock,
  transformer) pair per level, 4 features; each UNet layer reads the feature of its resolution level,
  so the two encoder-side layers of a level share one copy transformer and the 9 decoder-side layers
  read encoder features.
* ``"full"``: the paper's "simplified U-Net (with only one ResNet block in each block), each
  corresponding to a spatial-transformer layer in the original U-Net": ONE copy layer (one ResBlock +
  one transformer) for EACH of the 16 UNet transformers: two per encoder level, the middle, and three
  per decoder level (:mod:`.copy_decoder`, fed by the copy's own skips), i.e. SD1.5's UNet without its
  8x8 level and without ``out``; 16 features. Every layer-map entry carries ``"feature"``, the index of
  its own copy transformer (its position in the map); the decoder-side entries are also marked
  ``"source": "decoder"``.

Copy features, in execution order (:func:`feature_index`): "encoder": 0, 1, 2 = encoder levels 0..2,
3 = the middle; "full": the layer-map order (input_1, input_2, input_4, input_5, input_7, input_8,
middle_0, output_3 .. output_11), which is also the copy's execution order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import AdapterFileError, TrainingConfigError

__all__ = ["COPY_LAYOUTS", "DEFAULT_COPY_LAYOUT", "check_copy_layout", "CopyUNetConfig", "LAYER_MAP", "layer_map", "layer_key", "feature_index",
           "num_features"]

#: The copy layouts: "encoder" (encoder half + middle, 4 copy transformers) and "full" (one copy layer
#: per UNet transformer, 16).
COPY_LAYOUTS = ("encoder", "full")
#: The layout new adapters get (Trainer node, CLI); the README says why (benchmarks/copy_layouts.py).
DEFAULT_COPY_LAYOUT = "encoder"


def check_copy_layout(layout, input_name: str = "copy_layout") -> str:
    """The layout if it is one of :data:`COPY_LAYOUTS`, else :class:`TrainingConfigError`."""
    if not isinstance(layout, str) or layout not in COPY_LAYOUTS:
        raise TrainingConfigError(input_name, f"{layout!r} is not one of {COPY_LAYOUTS}",
                                  f"use '{DEFAULT_COPY_LAYOUT}' (default) or the other layout")
    return layout

@dataclass(frozen=True)
class CopyUNetConfig:
    """Shape of the copy. ``channel_mult`` gives the widths of levels 0, 1, 2 (``mc * mult``); the
    middle level has the width of level 2. Exactly three levels + middle (the SD1.5 structure).
    ``layout``: "encoder" or "full" (see the module docstring)."""

    in_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    context_dim: int = 768
    num_heads: int = 8
    time_embed_dim: int = 1280
    groups: int = 32
    dropout: float = 0.0
    layout: str = "encoder"

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        problems = []
        if len(self.channel_mult) != 3:
            problems.append(f"channel_mult must have 3 entries (SD1.5 levels), got "
                            f"{self.channel_mult}")
        for name in ("in_channels", "model_channels", "context_dim", "num_heads",
                     "time_embed_dim", "groups"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1")
        if not problems:
            for c in self.level_channels:
                if c % self.groups:
                    problems.append(f"width {c} is not divisible by groups={self.groups}")
                if c % self.num_heads:
                    problems.append(f"width {c} is not divisible by num_heads={self.num_heads}")
            if self.model_channels % 2:
                problems.append("model_channels must be even (sinusoidal timestep embedding)")
        if not 0.0 <= float(self.dropout) < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.layout not in COPY_LAYOUTS:
            problems.append(f"layout {self.layout!r} is not one of {COPY_LAYOUTS}")
        if problems:
            raise AdapterFileError("copy config", "; ".join(problems),
                                   "use CopyUNetConfig.sd15() or a consistent custom config")

    @property
    def level_channels(self) -> tuple[int, int, int, int]:
        """Widths of levels 0, 1, 2 and the middle level (3)."""
        c = [self.model_channels * m for m in self.channel_mult]
        return (c[0], c[1], c[2], c[2])

    @classmethod
    def sd15(cls, layout: str = "encoder") -> "CopyUNetConfig":
        """The SD1.5 copy: widths 320/640/1280/1280, 8 heads, context 768."""
        return cls(layout=layout)

    @classmethod
    def tiny(cls, layout: str = "encoder") -> "CopyUNetConfig":
        """A few-channel copy for tests: widths 32/64/128/128, 2 heads, context 32."""
        return cls(model_channels=32, num_heads=2, context_dim=32, time_embed_dim=128, groups=8,
                   layout=layout)

    def with_layout(self, layout: str) -> "CopyUNetConfig":
        """This config with another layout (checked like any config)."""
        return dataclasses.replace(self, layout=layout)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists instead of tuples). ``layout`` is left out when "encoder", so
        the config of an encoder-layout adapter is the format-1 one byte for byte."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        if self.layout == "encoder":
            del d["layout"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CopyUNetConfig":
        """Inverse of :meth:`to_dict`; unknown or ill-typed keys raise :class:`AdapterFileError`."""
        if not isinstance(d, Mapping):
            raise AdapterFileError("copy config", f"expected a JSON object, got {type(d).__name__}",
                                   "re-save the adapter with this P3S version")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise AdapterFileError("copy config", f"unknown fields {unknown}",
                                   "update the P3S pack or re-train the adapter")
        kwargs: dict[str, Any] = {}
        try:
            for k, v in d.items():
                if k == "channel_mult":
                    kwargs[k] = tuple(int(x) for x in v)
                elif k == "layout":
                    if not isinstance(v, str):
                        raise ValueError(f"layout={v!r} is not a string")
                    kwargs[k] = v
                elif k == "dropout":
                    kwargs[k] = float(v)
                else:
                    if isinstance(v, bool) or int(v) != v:
                        raise ValueError(f"{k}={v!r} is not an integer")
                    kwargs[k] = int(v)
        except (TypeError, ValueError) as exc:
            raise AdapterFileError("copy config", f"invalid value ({exc})",
                                   "re-save the adapter with this P3S version") from exc
        return cls(**kwargs)


_ORIGINAL_ATTN1 = (
    [("input", 1, 0), ("input", 2, 0), ("input", 4, 1), ("input", 5, 1), ("input", 7, 2),
     ("input", 8, 2), ("middle", 0, 3)]
    + [("output", i, 2) for i in (3, 4, 5)]
    + [("output", i, 1) for i in (6, 7, 8)]
    + [("output", i, 0) for i in (9, 10, 11)]
)


def layer_key(block: Sequence[Any], transformer_index: int = 0) -> str:
    """ComfyUI ``extra_options["block"]`` (e.g. ``("input", 4)``) -> layer-map key ``"input_4"``.

    ``transformer_index`` is 0 for all SD1.5 layers (depth 1); other indices get a ``_t<i>`` suffix
    and so match no entry of the layer map.
    """
    key = f"{block[0]}_{int(block[1])}"
    return key if int(transformer_index) == 0 else f"{key}_t{int(transformer_index)}"


def layer_map(config: CopyUNetConfig | None = None) -> list[dict[str, Any]]:
    """The 16 SD1.5 self-attention targets, in UNet execution order, as JSON-friendly dicts:
    ``{"key", "block": [name, id], "transformer_index", "level" (0..2, 3 = middle),
    "downscale" (1, 2, 4, 8), "channels"}``; in the "full" layout every entry also holds
    ``"feature"`` (the index of its own copy transformer, :func:`feature_index`) and the ``output``
    entries ``"source": "decoder"`` (they read the copy's decoder half)."""
    config = config or CopyUNetConfig.sd15()
    out = []
    for pos, (name, idx, level) in enumerate(_ORIGINAL_ATTN1):
        e = {"key": layer_key((name, idx)), "block": [name, idx], "transformer_index": 0,
             "level": level, "downscale": 2 ** level, "channels": config.level_channels[level]}
        if config.layout == "full":
            e["feature"] = pos
            if name == "output":
                e["source"] = "decoder"
        out.append(e)
    return out


def feature_index(entry: Mapping[str, Any]) -> int:
    """Index of the copy feature a layer-map entry reads (see the module docstring): its own copy
    transformer's (``"feature"``, layout "full"), else the encoder / middle level ("encoder")."""
    if "feature" in entry:
        return int(entry["feature"])
    return int(entry["level"])


def num_features(config: CopyUNetConfig) -> int:
    """How many features (copy transformers) the copy computes: 4 ("encoder") or 16 ("full")."""
    return len(_ORIGINAL_ATTN1) if config.layout == "full" else 4


#: The SD1.5 layer map (see :func:`layer_map`).
LAYER_MAP: list[dict[str, Any]] = layer_map(CopyUNetConfig.sd15())
