"""P3S Timestep Weight Scheduler node (paper Eq. 9-10, Table III, Fig. 5)."""
from __future__ import annotations

from .common import CATEGORY, SCHEDULE, numpy_to_image

MODES = ["paper", "fixed", "quadratic_increasing", "quadratic_decreasing", "custom"]


class P3STimestepWeightScheduler:
    DESCRIPTION = (
        "How strongly the subject is injected over the sampling steps (paper Eq. 10: "
        "eps_t = 1 - alpha (t/T)^k + beta). 'paper' is the paper's default curve; 'fixed' a constant "
        "weight (Fig. 5); the quadratic curves are Table III's; 'custom' takes a list of weights. "
        "start/end limit the injection to a window of the denoising, like IPAdapter's start_at/end_at."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["schedule", "timestep weight", "weight curve", "subject strength"]  # the words users type in the node search
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE, "IMAGE")
    RETURN_NAMES = ("schedule", "curve_plot")
    OUTPUT_TOOLTIPS = ("The schedule, for the P3S Condition Injector.", "A plot of the weight over the denoising.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mode": (MODES, {"default": "paper", "tooltip": "The weight curve. 'paper' = Eq. 10 (alpha 0.5, beta 0.2, k 2)."}),
                "alpha": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Eq. 10 multiplier alpha (mode 'paper')."}),
                "beta": ("FLOAT", {"default": 0.2, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Eq. 10 bias beta (mode 'paper')."}),
                "k": ("FLOAT", {"default": 2.0, "min": 0.01, "max": 10.0, "step": 0.01, "tooltip": "Eq. 10 exponent k (mode 'paper')."}),
                "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "The constant weight (mode 'fixed')."}),
                "low": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Smallest weight of the quadratic curves."}),
                "high": ("FLOAT", {"default": 1.2, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Largest weight of the quadratic curves."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Inject from this point of the denoising (0 = first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Stop injecting at this point of the denoising (1 = last step)."}),
                "strength": ("FLOAT", {"advanced": True, "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Multiplies the whole curve. 0 turns the injection off (the plain model, bit for bit)."}),
            },
            "optional": {
                "custom_values": ("STRING", {"advanced": True, "default": "", "multiline": False, "tooltip": "Mode 'custom': comma-separated weights spread evenly from the first to the last step, e.g. '0.4, 0.8, 1.2'."}),
            },
        }

    def build(self, mode, alpha, beta, k, weight, low, high, start_percent, end_percent, strength, custom_values=""):
        from ..p3s_core.errors import ScheduleError
        from ..p3s_core.previews import plot_curve
        from ..p3s_core.schedule import P3SSchedule

        if not isinstance(mode, str) or mode not in MODES:
            raise ScheduleError("mode", f"unknown mode {mode!r}", f"use one of: {', '.join(MODES)}")
        values = []
        if mode == "custom":
            values = self.parse_custom(custom_values)
        schedule = P3SSchedule(mode=mode, alpha=alpha, beta=beta, k=k, weight=weight, low=low, high=high,
                               values=values, start_percent=start_percent, end_percent=end_percent,
                               strength=strength)
        schedule.validate()
        plot = numpy_to_image([plot_curve(schedule).astype("float32") / 255.0])
        return (schedule, plot)

    @staticmethod
    def parse_custom(text) -> list[float]:
        """The 'custom' weights: comma- (or semicolon-) separated, finite, >= 0, at least one."""
        import math

        from ..p3s_core.errors import ScheduleError

        fix = "write comma-separated weights >= 0 such as '0.4, 0.8, 1.2'"
        parts = [v.strip() for v in str(text if text is not None else "").replace(";", ",").split(",")]
        if not any(parts):
            raise ScheduleError("custom_values", "mode 'custom' needs a list of weights but the list is empty", fix)
        values = []
        for i, part in enumerate(parts):
            if not part:
                continue
            try:
                v = float(part)
            except ValueError:
                raise ScheduleError("custom_values", f"'{text}' is not a list of numbers ('{part}' is not a number)",
                                    fix) from None
            if not math.isfinite(v):
                raise ScheduleError("custom_values", f"weight {i + 1} ('{part}') is not a finite number", fix)
            if v < 0:
                raise ScheduleError("custom_values", f"weight {i + 1} ({v:g}) is negative", fix)
            values.append(v)
        return values
