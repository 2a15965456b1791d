"""Timestep-based weight scheduler (paper Sec. III, Eq. 9-10; Table III; Fig. 5).

The copy feature ``f`` of every self-attention layer is scaled by a weight ``eps_t`` before it is
injected (Eq. 9: ``F(eps_t * f, x_t, c, t)``). :class:`P3SSchedule` is the ``P3S_SCHEDULE`` value the
nodes pass around: a small, immutable, JSON-friendly description of ``eps_t``.

Time conventions used throughout this module:

* ``t_over_T`` is the paper's ``t/T`` in ``[0, 1]``: **1 = pure noise** (first sampling step),
  **0 = clean image** (last step). Use :func:`timestep_to_t_over_T` to get it from a 0..999
  timestep index.
* ``progress`` is ComfyUI's "percent" of denoising: ``progress = 1 - t/T``, **0 = first step**,
  **1 = end**. ``start_percent`` / ``end_percent`` are progresses, exactly like ComfyUI's ControlNet
  ``start_percent`` / ``end_percent``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


from .errors import ScheduleError

__all__ = [
    "MODES",
    "P3SSchedule",
    "timestep_to_t_over_T",
]

#: Every supported ``mode``.
MODES = ("paper", "fixed", "quadratic_increasing", "quadratic_decreasing", "custom")

#: Format version written by :meth:`P3SSchedule.to_dict`.
SCHEDULE_FORMAT_VERSION = 1

_NUMERIC_FIELDS = ("alpha", "beta", "k", "weight", "low", "high", "start_percent", "end_percent",
                   "strength")

# How far outside [0, 1] a t/T or progress may be before it is treated as a caller bug (a raw
# 0..999 timestep passed by mistake) instead of float rounding.
_RANGE_TOLERANCE = 1e-3
# Window edges are compared with this slack so that float rounding of 1 - t/T does not move a
# step that sits exactly on start_percent / end_percent to the other side.
_BOUNDARY_SLACK = 1e-9


def _finite(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ScheduleError(name, f"{value!r} is not a number", "enter a finite number") from None
    if not math.isfinite(out):
        raise ScheduleError(name, f"{value!r} is not finite", "enter a finite number")
    return out


def _unit_interval(name: str, value: Any) -> float:
    """A t/T or progress in [0, 1]; tiny rounding overshoot is clamped, anything else raises."""
    v = _finite(name, value)
    if v < -_RANGE_TOLERANCE or v > 1.0 + _RANGE_TOLERANCE:
        raise ScheduleError(
            name,
            f"{v} is outside [0, 1]",
            "pass the normalised time t/T (or progress 1 - t/T), not a raw 0..999 timestep; "
            "see timestep_to_t_over_T()",
        )
    return min(1.0, max(0.0, v))


def timestep_to_t_over_T(timestep: float, num_train_timesteps: int = 1000) -> float:
    """Paper ``t/T`` (Eq. 10) from a discrete timestep index ``0 .. num_train_timesteps - 1``.

    Decision: ``t/T = timestep / (num_train_timesteps - 1)`` so that the noisiest index (999 for
    SD1.5) is exactly 1 and index 0 is exactly 0. This matches ComfyUI's percent convention
    (``model_sampling.percent_to_sigma(p)`` uses timestep ``(1 - p) * 999``), so
    ``progress = 1 - t/T`` agrees with ``start_percent`` / ``end_percent``.
    """
    n = int(num_train_timesteps)
    if n < 2:
        raise ScheduleError("num_train_timesteps", f"{num_train_timesteps!r} is below 2",
                            "use the model's number of training timesteps (1000 for SD1.5)")
    ts = _finite("timestep", timestep)
    return _unit_interval("timestep", ts / (n - 1))


@dataclass(frozen=True)
class P3SSchedule:
    """The ``P3S_SCHEDULE`` type: how strongly the copy feature is injected at each step (Eq. 9-10).

    Fields
    ------
    mode:
        ``"paper"``: Eq. 10, ``eps = 1 - alpha * (t/T)^k + beta`` (0.7 at t=T, 1.2 at t=0 with the
        paper's alpha=0.5, beta=0.2, k=2). ``"fixed"``: ``eps = weight`` (Fig. 5).
        ``"quadratic_increasing"`` / ``"quadratic_decreasing"``: Table III, see :meth:`curve`.
        ``"custom"``: piecewise-linear through ``values`` over the denoising progress.
    alpha, beta, k:
        Eq. 10 multiplier, bias and exponent (``k > 0``).
    weight:
        The constant of ``"fixed"`` (``>= 0``).
    low, high:
        End values of the two quadratic curves (``0 <= low <= high``).
    values:
        Weights of ``"custom"``, spread evenly from the first step (progress 0) to the last
        (progress 1); a single value is a constant. Stored as a tuple (the dataclass is frozen so a
        cached node output cannot be mutated); :meth:`to_dict` writes a list.
    start_percent, end_percent:
        Window of denoising progress (ComfyUI convention, 0 = first step) where the injection is on;
        outside it the weight is exactly 0 and the model runs as the plain model.
    strength:
        Multiplier applied to every curve (``>= 0``).

    The constructor validates (raises :class:`~p3s_core.errors.ScheduleError`); :meth:`validate`
    can be called again at any time.
    """

    mode: str = "paper"
    alpha: float = 0.5
    beta: float = 0.2
    k: float = 2.0
    weight: float = 1.0
    low: float = 0.2
    high: float = 1.2
    values: tuple[float, ...] = field(default_factory=tuple)
    start_percent: float = 0.0
    end_percent: float = 1.0
    strength: float = 1.0

    def __post_init__(self) -> None:
        vals = self.values
        if vals is None:
            vals = ()
        elif isinstance(vals, (str, bytes)) or not isinstance(vals, Iterable):
            raise ScheduleError("values", f"{vals!r} is not a list of numbers",
                                "give the custom weights as a list such as [0.2, 0.8, 1.2]")
        object.__setattr__(self, "values", tuple(_finite(f"values[{i}]", v) for i, v in enumerate(vals)))
        for name in _NUMERIC_FIELDS:  # numbers from JSON / widgets may arrive as int or str
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "P3SSchedule":
        """Check every field; raise :class:`ScheduleError` naming the first bad one. Returns self."""
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ScheduleError("mode", f"unknown mode {self.mode!r}", f"use one of {', '.join(MODES)}")
        for name in _NUMERIC_FIELDS:
            _finite(name, getattr(self, name))
        for name in ("start_percent", "end_percent"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ScheduleError(name, f"{v} is outside [0, 1]",
                                    "use a fraction of the denoising steps between 0 and 1")
        if float(self.start_percent) >= float(self.end_percent):
            raise ScheduleError(
                "start_percent",
                f"start_percent {float(self.start_percent)} is not below end_percent "
                f"{float(self.end_percent)}, so the injection would never be on",
                "make start_percent smaller than end_percent",
            )
        if float(self.strength) < 0:
            raise ScheduleError("strength", f"{float(self.strength)} is negative",
                                "use a strength >= 0 (0 turns the injection off)")
        if self.mode == "paper":
            if float(self.k) <= 0:
                raise ScheduleError("k", f"exponent k={float(self.k)} is not positive",
                                    "use k > 0 (the paper uses k = 2)")
            # Eq. 10 is monotone in (t/T)^k in [0, 1]: its extremes are at t/T = 0 and t/T = 1.
            lowest = min(1.0 + float(self.beta), 1.0 - float(self.alpha) + float(self.beta))
            if lowest < 0:
                raise ScheduleError(
                    "alpha",
                    f"with alpha={float(self.alpha)}, beta={float(self.beta)} the Eq. 10 weight "
                    f"reaches {lowest:.4g} (negative)",
                    "keep 1 - alpha + beta >= 0 and 1 + beta >= 0 (paper: alpha 0.5, beta 0.2)",
                )
        elif self.mode == "fixed":
            if float(self.weight) < 0:
                raise ScheduleError("weight", f"{float(self.weight)} is negative", "use a weight >= 0")
        elif self.mode in ("quadratic_increasing", "quadratic_decreasing"):
            if float(self.low) < 0:
                raise ScheduleError("low", f"{float(self.low)} is negative", "use low >= 0")
            if float(self.high) < float(self.low):
                raise ScheduleError(
                    "high", f"high {float(self.high)} is below low {float(self.low)}",
                    "set high >= low; pick the other quadratic mode to reverse the direction")
        elif self.mode == "custom":
            if len(self.values) == 0:
                raise ScheduleError("values", "the custom weight list is empty",
                                    "give at least one weight, e.g. [0.2, 0.8, 1.2]")
            for i, v in enumerate(self.values):
                fv = _finite(f"values[{i}]", v)
                if fv < 0:
                    raise ScheduleError(f"values[{i}]", f"{fv} is negative", "use weights >= 0")
        return self

    # ------------------------------------------------------------------ the curve
    def curve(self, t_over_T: float) -> float:
        """``eps_t`` of Eq. 9-10 at ``t/T`` (1 = pure noise, 0 = clean), ignoring the window.

        * ``paper``: ``(1 - alpha * (t/T)^k + beta) * strength`` (Eq. 10).
        * ``fixed``: ``weight * strength``.
        * Table III quadratics. The paper says "quadratic decreasing uses a smaller weight in the
          early stage of denoising" (early = large t), so the direction is read over ``t``:
          ``quadratic_decreasing`` decreases with t: ``high - (high - low) * (t/T)^2`` (``low`` at
          the first step, ``high`` at the end, like Eq. 10); ``quadratic_increasing`` increases with
          t: ``low + (high - low) * (t/T)^2`` (``high`` at the first step, ``low`` at the end).
        * ``custom``: linear interpolation of ``values`` placed evenly over progress ``1 - t/T``
          (first value at the first step, last value at the end).
        """
        x = _unit_interval("t_over_T", t_over_T)
        s = float(self.strength)
        if self.mode == "paper":
            eps = 1.0 - float(self.alpha) * x ** float(self.k) + float(self.beta)
        elif self.mode == "fixed":
            eps = float(self.weight)
        elif self.mode == "quadratic_decreasing":
            lo, hi = float(self.low), float(self.high)
            eps = hi - (hi - lo) * x * x
        elif self.mode == "quadratic_increasing":
            lo, hi = float(self.low), float(self.high)
            eps = lo + (hi - lo) * x * x
        elif self.mode == "custom":
            vals = [float(v) for v in self.values]
            if len(vals) == 1:
                eps = vals[0]
            else:
                pos = (1.0 - x) * (len(vals) - 1)
                i = min(int(math.floor(pos)), len(vals) - 2)
                frac = pos - i
                eps = vals[i] + (vals[i + 1] - vals[i]) * frac
        else:  # pragma: no cover - validate() rejects unknown modes
            raise ScheduleError("mode", f"unknown mode {self.mode!r}", f"use one of {', '.join(MODES)}")
        return eps * s

    def in_window(self, progress: float) -> bool:
        """True where the denoising ``progress`` lies in ``[start_percent, end_percent]``.

        One definition everywhere: the window is closed at both ends, as sampling switches a step on
        in both engines (ComfyUI: ``sigma_end <= sigma <= sigma_start``, the ControlNet idiom; diffusers:
        ``(1 - end) T <= t <= (1 - start) T``), as the scheduler's plot and :meth:`weight_at` read it.
        Both edges are widened by ``1e-9`` so a progress that went through ``1 - (1 - p)`` rounding
        still counts as on the edge.
        """
        p = _unit_interval("progress", progress)
        start, end = float(self.start_percent), float(self.end_percent)
        return start - _BOUNDARY_SLACK <= p <= end + _BOUNDARY_SLACK

    def weight_at(self, t_over_T: float, progress: float | None = None) -> float:
        """``eps_t`` inside the window, exactly ``0.0`` outside (Eq. 9 with a start/end window).

        ``progress`` defaults to ``1 - t_over_T``; pass it explicitly when the sampler's progress is
        known separately (e.g. from sigmas) so the window matches ComfyUI's percent exactly.
        """
        x = _unit_interval("t_over_T", t_over_T)
        p = 1.0 - x if progress is None else progress
        if not self.in_window(p):
            return 0.0
        return self.curve(x)

    def sample_curve(self, n: int = 100) -> list[tuple[float, float]]:
        """``n`` evenly spaced ``(progress, weight)`` pairs from progress 0 to 1 (window applied)."""
        n = int(n)
        if n < 2:
            raise ScheduleError("n", f"{n} samples cannot draw a curve", "use n >= 2")
        out = []
        for i in range(n):
            p = i / (n - 1)
            out.append((p, self.weight_at(1.0 - p, progress=p)))
        return out

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (with ``"version"``), the inverse of :meth:`from_dict`."""
        d: dict[str, Any] = {"version": SCHEDULE_FORMAT_VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = [float(x) for x in v] if f.name == "values" else v
        for name in _NUMERIC_FIELDS:
            d[name] = float(d[name])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "P3SSchedule":
        """Build and validate from :meth:`to_dict` output. Missing fields take their defaults.

        Decision: unknown keys or a newer ``version`` raise :class:`ScheduleError` instead of being
        dropped, because silently ignoring a setting would change the generated images.
        """
        if not isinstance(data, Mapping):
            raise ScheduleError("schedule", f"expected a dict, got {type(data).__name__}",
                                "pass the dict produced by P3SSchedule.to_dict()")
        d = dict(data)
        version = d.pop("version", SCHEDULE_FORMAT_VERSION)
        try:
            version = int(version)
        except (TypeError, ValueError):
            raise ScheduleError("version", f"{version!r} is not an integer",
                                "pass the dict produced by P3SSchedule.to_dict()") from None
        if version > SCHEDULE_FORMAT_VERSION:
            raise ScheduleError("version", f"schedule format {version} is newer than this pack "
                                f"({SCHEDULE_FORMAT_VERSION})", "update the P3S node pack")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ScheduleError("schedule", f"unknown field(s) {unknown}",
                                f"use only {sorted(names)}")
        return cls(**d)


