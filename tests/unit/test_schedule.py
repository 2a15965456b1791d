"""Timestep weight scheduler (Eq. 9-10, Table III) against formulas written out here."""
from __future__ import annotations

import dataclasses
import json
import math
import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p3s_core.errors import P3SError, ScheduleError
from p3s_core.previews import plot_curve
from p3s_core.schedule import MODES, P3SSchedule, timestep_to_t_over_T

GRID = [i / 20 for i in range(21)]


def eq10(x, alpha=0.5, beta=0.2, k=2.0):
    return 1.0 - alpha * x ** k + beta


# ---------------------------------------------------------------- curves
def test_paper_defaults_match_eq10_values():
    s = P3SSchedule()
    assert s.mode == "paper"
    assert s.curve(1.0) == pytest.approx(0.7)  # start of sampling (pure noise)
    assert s.curve(0.0) == pytest.approx(1.2)  # end (clean)
    assert s.curve(0.5) == pytest.approx(1.0 - 0.5 * 0.25 + 0.2)
    for x in GRID:
        assert s.curve(x) == pytest.approx(eq10(x))


def test_paper_custom_parameters_and_strength():
    s = P3SSchedule(alpha=0.8, beta=0.1, k=3.0, strength=2.0)
    for x in GRID:
        assert s.curve(x) == pytest.approx(2.0 * eq10(x, 0.8, 0.1, 3.0))


def test_fixed_mode_is_constant_times_strength():
    s = P3SSchedule(mode="fixed", weight=0.8, strength=0.5)
    assert {round(s.curve(x), 12) for x in GRID} == {0.4}


def test_quadratic_decreasing_is_small_early_large_late():
    s = P3SSchedule(mode="quadratic_decreasing", low=0.3, high=1.1)
    assert s.curve(1.0) == pytest.approx(0.3)  # early stage of denoising: smaller weight
    assert s.curve(0.0) == pytest.approx(1.1)
    for x in GRID:
        assert s.curve(x) == pytest.approx(1.1 - 0.8 * x * x)
    # decreasing in t means increasing over the sampling steps
    seq = [s.curve(1 - p) for p in GRID]
    assert all(b >= a for a, b in zip(seq, seq[1:])) and seq[-1] > seq[0]


def test_quadratic_increasing_is_large_early_small_late():
    s = P3SSchedule(mode="quadratic_increasing", low=0.3, high=1.1, strength=2.0)
    assert s.curve(1.0) == pytest.approx(2.2)
    assert s.curve(0.0) == pytest.approx(0.6)
    for x in GRID:
        assert s.curve(x) == pytest.approx(2.0 * (0.3 + 0.8 * x * x))


def test_custom_interpolates_linearly_over_progress():
    s = P3SSchedule(mode="custom", values=[0.0, 1.0, 3.0])
    # progress p = 1 - t/T: values at p = 0, 0.5, 1
    expected = {0.0: 0.0, 0.25: 0.5, 0.5: 1.0, 0.75: 2.0, 1.0: 3.0}
    for p, w in expected.items():
        assert s.curve(1.0 - p) == pytest.approx(w)


def test_custom_single_value_is_constant():
    s = P3SSchedule(mode="custom", values=[0.7], strength=2.0)
    assert all(s.curve(x) == pytest.approx(1.4) for x in GRID)


# ---------------------------------------------------------------- window
def test_weight_is_exactly_zero_outside_window_and_curve_inside():
    s = P3SSchedule(start_percent=0.2, end_percent=0.6)
    for p in GRID:
        w = s.weight_at(1.0 - p)
        if 0.2 <= p <= 0.6:
            assert w == pytest.approx(eq10(1.0 - p))
        else:
            assert w == 0.0 and type(w) is float
    assert s.weight_at(0.8) > 0  # start boundary included (p = 0.2)
    assert s.weight_at(0.4) > 0  # end boundary included too (p = 0.6): the window is closed
    assert s.weight_at(0.39) == 0.0 and s.weight_at(0.81) == 0.0


def test_default_window_covers_the_last_step():
    s = P3SSchedule()
    assert s.weight_at(0.0) == pytest.approx(1.2)
    assert s.weight_at(1.0) == pytest.approx(0.7)


def test_explicit_progress_overrides_the_window_position():
    s = P3SSchedule(start_percent=0.5, end_percent=1.0)
    assert s.weight_at(0.9, progress=0.7) == pytest.approx(eq10(0.9))  # curve from t, window from p
    assert s.weight_at(0.1, progress=0.2) == 0.0


def test_weight_field_is_also_a_number():
    s = P3SSchedule(mode="fixed", weight=0.8)
    assert s.weight == 0.8 and s.weight + 1 == pytest.approx(1.8)
    assert s.weight_at(0.3) == pytest.approx(0.8)
    assert s.weight_at(0.3) == pytest.approx(0.8)
    assert dataclasses.replace(s, weight=0.3).curve(0.5) == pytest.approx(0.3)
    assert copy.deepcopy(s) == s


def test_schedule_is_immutable():
    s = P3SSchedule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.alpha = 1.0  # type: ignore[misc]


def test_t_over_T_outside_unit_interval_raises():
    s = P3SSchedule()
    with pytest.raises(ScheduleError, match="t_over_T"):
        s.weight_at(999.0)
    with pytest.raises(ScheduleError, match="t_over_T"):
        s.curve(float("nan"))
    assert s.curve(1.0 + 1e-9) == pytest.approx(0.7)  # rounding overshoot is clamped


def test_timestep_to_t_over_T():
    assert timestep_to_t_over_T(999) == 1.0
    assert timestep_to_t_over_T(0) == 0.0
    assert timestep_to_t_over_T(333, 1000) == pytest.approx(333 / 999)
    with pytest.raises(ScheduleError):
        timestep_to_t_over_T(5000)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"mode": "linear"}, "mode"),
        ({"start_percent": 0.5, "end_percent": 0.5}, "start_percent"),
        ({"start_percent": 0.7, "end_percent": 0.2}, "start_percent"),
        ({"start_percent": -0.1}, "start_percent"),
        ({"end_percent": 1.5}, "end_percent"),
        ({"mode": "custom", "values": []}, "values"),
        ({"mode": "custom", "values": [0.1, float("nan")]}, "values[1]"),
        ({"mode": "custom", "values": [0.1, float("inf")]}, "values[1]"),
        ({"mode": "custom", "values": [0.5, -0.1]}, "values[1]"),
        ({"mode": "custom", "values": "0.1,0.2"}, "values"),
        ({"mode": "fixed", "weight": -1.0}, "weight"),
        ({"strength": -0.5}, "strength"),
        ({"strength": float("nan")}, "strength"),
        ({"k": 0.0}, "k"),
        ({"k": -2.0}, "k"),
        ({"alpha": 2.0}, "alpha"),  # 1 - 2 + 0.2 < 0 at t = T
        ({"mode": "quadratic_decreasing", "low": -0.1}, "low"),
        ({"mode": "quadratic_increasing", "low": 1.0, "high": 0.5}, "high"),
        ({"alpha": "abc"}, "alpha"),
    ],
)
def test_validate_names_the_bad_field(kwargs, field_name):
    with pytest.raises(ScheduleError) as info:
        P3SSchedule(**kwargs)
    assert info.value.input_name == field_name
    assert isinstance(info.value, P3SError) and isinstance(info.value, ValueError)
    assert "Fix:" in str(info.value)


def test_validate_returns_self_for_good_schedules():
    for mode in MODES:
        s = P3SSchedule(mode=mode, values=[0.5, 1.0])
        assert s.validate() is s


def test_numbers_are_coerced_to_float():
    s = P3SSchedule(mode="custom", values=[0, "1", 2], alpha=1, start_percent=0)
    assert s.values == (0.0, 1.0, 2.0)
    assert type(s.alpha) is float and type(s.start_percent) is float


# ---------------------------------------------------------------- (de)serialisation
@pytest.mark.parametrize("mode", MODES)
def test_to_dict_from_dict_roundtrip_through_json(mode):
    s = P3SSchedule(mode=mode, alpha=0.4, beta=0.1, k=1.5, weight=0.9, low=0.1, high=1.3,
                    values=[0.2, 0.9, 1.1], start_percent=0.1, end_percent=0.9, strength=0.8)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["version"] == 1 and d["values"] == [0.2, 0.9, 1.1]
    back = P3SSchedule.from_dict(d)
    assert back == s
    assert [back.weight_at(x) for x in GRID] == [s.weight_at(x) for x in GRID]


def test_from_dict_fills_defaults_and_rejects_unknown_or_newer():
    assert P3SSchedule.from_dict({"mode": "fixed", "weight": 0.5}) == P3SSchedule(mode="fixed",
                                                                                  weight=0.5)
    with pytest.raises(ScheduleError, match="unknown"):
        P3SSchedule.from_dict({"mode": "paper", "gamma": 1})
    with pytest.raises(ScheduleError, match="newer"):
        P3SSchedule.from_dict({"version": 99})
    with pytest.raises(ScheduleError):
        P3SSchedule.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ScheduleError) as info:
        P3SSchedule.from_dict({"start_percent": 0.9, "end_percent": 0.1})
    assert info.value.input_name == "start_percent"


# ---------------------------------------------------------------- sampling and plotting
def test_sample_curve_covers_progress_and_applies_window():
    s = P3SSchedule(start_percent=0.25, end_percent=0.75)
    pts = s.sample_curve(5)
    assert [p for p, _ in pts] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [w for _, w in pts] == pytest.approx([0.0, eq10(0.75), eq10(0.5), eq10(0.25), 0.0])
    assert len(P3SSchedule().sample_curve()) == 100
    with pytest.raises(ScheduleError):
        s.sample_curve(1)


def test_plot_curve_draws_window_and_curve():
    s = P3SSchedule(start_percent=0.3, end_percent=0.7)
    img = plot_curve(s, width=320, height=160)
    assert img.shape == (160, 320, 3) and img.dtype == np.uint8
    # plot area spans x in [40, 308]: shading inside the window differs from outside
    y = 100
    inside, outside = img[y, int(40 + 0.5 * 268)], img[y, int(40 + 0.1 * 268)]
    assert tuple(inside) != tuple(outside)
    # the orange curve is drawn somewhere
    orange = (img[..., 0] > 200) & (img[..., 1] > 120) & (img[..., 1] < 220) & (img[..., 2] < 100)
    assert orange.sum() > 100
    # a different schedule yields a different picture
    assert not np.array_equal(img, plot_curve(P3SSchedule(mode="fixed", weight=0.3), 320, 160))
    with pytest.raises(ScheduleError):
        plot_curve(s, width=10, height=10)
    with pytest.raises(ScheduleError):
        plot_curve({"mode": "paper"})  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    mode=st.sampled_from(MODES),
    a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0), k=st.floats(0.1, 4.0),
    lo=st.floats(0.0, 1.0), span=st.floats(0.0, 1.0),
    vals=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=6),
    start=st.floats(0.0, 0.9), width=st.floats(0.01, 1.0),
    x=st.floats(0.0, 1.0), strength=st.floats(0.0, 3.0),
)
def test_weights_are_finite_non_negative_and_zero_outside_window(mode, a, b, k, lo, span, vals,
                                                                  start, width, x, strength):
    end = min(1.0, start + width)
    s = P3SSchedule(mode=mode, alpha=a, beta=b, k=k, low=lo, high=lo + span, values=vals,
                    start_percent=start, end_percent=end, strength=strength)
    w = s.weight_at(x)
    assert math.isfinite(w) and w >= 0.0
    p = 1.0 - x
    slack = 1e-9  # documented boundary slack of P3SSchedule.in_window
    if p < start - slack or p > end + slack:
        assert w == 0.0
    else:
        assert w == pytest.approx(s.curve(x))


def test_the_window_is_closed_at_both_ends_in_the_scheduler_and_in_sampling():
    """One definition: a step exactly on start_percent or end_percent is on, in ``weight_at`` (the
    scheduler's plot) and in the diffusers injector's sampling window (ComfyUI's is checked through
    the real sampler in tests/integration/test_fidelity.py)."""
    import types

    from p3s_core.diffusers_engine.attention import P3SDiffusersInjector

    s = P3SSchedule(start_percent=0.25, end_percent=0.75)
    fake = types.SimpleNamespace(strength=1.0, schedule=s, num_timesteps=1000)
    for progress in (0.25, 0.75):
        t = (1.0 - progress) * 999
        in_sampling = P3SDiffusersInjector.step_weight(fake, t) > 0
        in_scheduler = s.weight_at(t / 999.0, progress=progress) > 0
        assert in_sampling and in_scheduler, progress
    for progress in (0.2, 0.8):
        t = (1.0 - progress) * 999
        assert P3SDiffusersInjector.step_weight(fake, t) == 0.0 == s.weight_at(t / 999.0, progress=progress)
