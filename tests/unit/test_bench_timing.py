"""The sampling benchmark's statistics (issue 24 item 3): interleaving order, per-step time as an
N-step minus a 1-step sample, ratio to plain with its spread, the spread in the rendered block, and
the noise criterion on the committed result file (P3S at weight 0 within 0.97–1.03× of plain).

Fast: standard library and the committed JSON only (no ComfyUI, no torch).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))
import readme_figures  # noqa: E402
import timing  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
bench_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)

RESULT = json.loads(readme_figures.RESULTS.read_text())
VARIANTS = ["plain", "p3s", "p3s weight 0"]


# --- interleaving ---------------------------------------------------------------------------------
def test_a_round_runs_each_variants_long_and_short_sample_once():
    for rnd in range(4):
        order = timing.round_order(VARIANTS, rnd, 3)
        assert sorted(order) == sorted((v, n) for v in VARIANTS for n in (3, 1))


def test_the_order_is_reversed_every_other_round_so_positions_balance():
    """ABBA: over two rounds every sample's mean position is the same, so a linear drift of the
    machine's speed adds the same time to every variant."""
    a, b = timing.round_order(VARIANTS, 0, 3), timing.round_order(VARIANTS, 1, 3)
    assert b == a[::-1] and a[0][0] == "plain" and b[0][0] == "p3s weight 0"
    assert timing.round_order(VARIANTS, 2, 3) == a
    pos = {}
    for seq in (a, b):
        for i, sample in enumerate(seq):
            pos.setdefault(sample, []).append(i)
    assert len({sum(p) for p in pos.values()}) == 1, pos
    drift = {v: sum(i for seq in (a, b) for i, s in enumerate(seq) if s[0] == v) for v in VARIANTS}
    assert len(set(drift.values())) == 1, drift


def test_round_order_refuses_a_long_sample_not_longer_than_the_short_one():
    with pytest.raises(ValueError, match="long_steps"):
        timing.round_order(VARIANTS, 0, 1)


# --- per-step time and ratios ---------------------------------------------------------------------
def test_per_step_time_cancels_what_a_sample_costs_once():
    step = 0.8
    for fixed in (0.0, 0.5, 7.0):
        for n in (2, 3, 5):
            assert timing.per_step(fixed + n * step, fixed + step, n) == pytest.approx(step)
    # the whole-sample time divided by N would not: this is what the difference removes
    assert (2.0 + 3 * step) / 3 != pytest.approx(step)


def test_ratio_is_the_median_of_per_round_ratios_with_min_max_and_iqr():
    per_round = {"plain": [10.0, 12.0, 11.0, 10.0, 20.0],
                 "p3s": [13.0, 15.0, 14.3, 14.0, 26.0],
                 "p3s weight 0": [10.0, 12.6, 10.45, 10.0, 20.0]}
    st = timing.ratio_stats(per_round)
    assert st["plain"]["ratio_to_plain"] == 1.0 and st["plain"]["ratio_spread"] == [1.0, 1.0]
    assert st["p3s"]["ratio_rounds"] == pytest.approx([1.3, 1.25, 1.3, 1.4, 1.3])
    assert st["p3s"]["ratio_to_plain"] == pytest.approx(1.3)
    assert st["p3s"]["ratio_spread"] == pytest.approx([1.25, 1.4])
    assert st["p3s"]["ratio_iqr"] == pytest.approx([1.3, 1.3])
    w0 = st["p3s weight 0"]
    assert w0["ratio_to_plain"] == pytest.approx(1.0) and w0["ratio_spread"] == pytest.approx([0.95, 1.05])
    # the slow fifth round (the machine busy: 20 s for plain) does not move the ratio
    assert st["p3s"]["median"] == 14.3 and st["p3s"]["n"] == 5
    for s in st.values():
        lo, hi = s["ratio_spread"]
        assert lo <= s["ratio_iqr"][0] <= s["ratio_to_plain"] <= s["ratio_iqr"][1] <= hi


def test_ratio_stats_refuses_rounds_that_do_not_pair():
    with pytest.raises(ValueError, match="rounds"):
        timing.ratio_stats({"plain": [1.0, 1.0], "p3s": [1.2]})


@pytest.mark.parametrize("ratio,ok", [(0.969, False), (0.97, True), (1.0, True), (1.03, True), (1.031, False)])
def test_weight0_band(ratio, ok):
    assert timing.weight0_within_band({"p3s weight 0": {"ratio_to_plain": ratio}}) is ok
    assert bench_run.goals({"plain": {"ratio_to_plain": 1.0}, "p3s weight 0": {"ratio_to_plain": ratio}}
                           )["weight0_within_3pct"] is ok


def test_goals_of_variants_not_run_are_none_and_render_as_a_dash():
    g = bench_run.goals({"plain": {"ratio_to_plain": 1.0}, "p3s": {"ratio_to_plain": 1.2},
                         "p3s weight 0": {"ratio_to_plain": 1.0}})
    assert g["p3s_le_1.3"] is True and g["p3s_below_controlnet"] is None and g["additive_bound"] is None
    assert readme_figures._yes(None) == "–" and readme_figures._yes(False) == "**no**"


# --- skipped sections are carried over, marked ------------------------------------------------------
def test_a_skipped_profile_is_kept_from_the_previous_file_with_its_origin():
    previous = {"date": "2026-11-30 21:01 UTC", "command": "scripts/bench.sh --sizes 512",
                "machine": {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2},
                "runs": [{"attention": "sdpa", "size": 512, "profile": {"copy_s": 1.5}, "output_effects": {"x": 1}},
                         {"attention": "sdpa", "size": 256, "profile": {"copy_s": 0.7}}]}
    row = bench_run.carry_over({"attention": "sdpa", "size": 512, "steps_per_variant": {}}, previous)
    assert row["profile"] == {"copy_s": 1.5} and row["output_effects"] == {"x": 1}
    assert row["profile_from"] == {"date": "2026-11-30 21:01 UTC", "command": "scripts/bench.sh --sizes 512",
                                   "machine": {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2}}
    measured = bench_run.carry_over({"attention": "sdpa", "size": 256, "profile": {"copy_s": 9.0}}, previous)
    assert measured["profile"] == {"copy_s": 9.0} and "profile_from" not in measured
    assert "profile" not in bench_run.carry_over({"attention": "sdpa", "size": 128}, previous)


# --- the committed result file and its rendering --------------------------------------------------
def _timed_runs():
    return [r for r in RESULT["runs"] if "error" not in r]


def test_committed_runs_are_like_for_like_interleaved_differences():
    """Only SDPA (sub-quad would compare two kernels, README 'Attention'); every run has its rounds
    (N-step and 1-step samples, N >= 2) and at least 3 of them."""
    assert RESULT.get("method") and RESULT["steps"] >= 2
    runs = _timed_runs()
    assert runs and {r["attention"] for r in runs} == {"sdpa"}
    for r in runs:
        assert len(r["rounds"]) >= 3
        for rnd in r["rounds"]:
            assert set(rnd["seconds"]) == {f"{v} x{n}" for v in rnd["order"] for n in (RESULT["steps"], 1)}
            for v in rnd["order"]:
                assert rnd["seconds"][f"{v} x{RESULT['steps']}"] > rnd["seconds"][f"{v} x1"]


def test_committed_weight0_noise_check_is_computed_and_printed():
    """The committed 512² SDPA run carries the noise check (P3S at weight 0 within 0.97–1.03× of
    plain) as computed from its own ratio, and the README block prints that verdict."""
    run = next(r for r in _timed_runs() if (r["attention"], r["size"]) == ("sdpa", 512))
    w0 = run["steps_per_variant"]["p3s weight 0"]
    assert w0["ratio_to_plain"] == pytest.approx(statistics.median(w0["ratio_rounds"]))
    ok = 0.97 <= w0["ratio_to_plain"] <= 1.03
    assert run["goals"]["weight0_within_3pct"] is ok
    verdict = "yes" if ok else "**no**"
    block = readme_figures.render(RESULT)
    assert f"| noise check: weight 0 within 0.97–1.03× | {verdict} |" in block
    assert ("Noise check failed (512², SDPA)" in block) is not ok


def test_the_rendered_block_prints_the_spread_beside_every_ratio():
    block = readme_figures.render(RESULT)
    for r in _timed_runs():
        for name, s in r["steps_per_variant"].items():
            if name == "plain":
                assert f"1.00×, {s['median']:.2f} s ({s['min']:.2f}–{s['max']:.2f} s)" in block
            else:
                lo, hi = s["ratio_spread"]
                assert f"{s['ratio_to_plain']:.2f}× ({lo:.2f}–{hi:.2f}), {s['median']:.2f} s" in block, name
    assert "noise check: weight 0 within 0.97–1.03×" in block and "sub-quad" not in block.split("\n")[0]


def test_a_changed_spread_changes_the_block():
    changed = copy.deepcopy(RESULT)
    s = _timed_runs_of(changed)[0]["steps_per_variant"]["p3s"]
    s["ratio_spread"] = [s["ratio_spread"][0] - 0.111, s["ratio_spread"][1] + 0.222]
    after = readme_figures.render(changed)
    assert after != readme_figures.render(RESULT)
    assert f"({s['ratio_spread'][0]:.2f}–{s['ratio_spread'][1]:.2f})" in after


def _timed_runs_of(result):
    return [r for r in result["runs"] if "error" not in r]


# --- samples disturbed by other work on the machine ------------------------------------------------
def _fake(samples):
    it = iter(samples)
    return lambda: next(it)


def test_core_share_and_floor_come_from_the_process_own_warm_up():
    assert timing.core_share(10.0, 19.0) == pytest.approx(1.9)
    assert timing.core_share(0.0, 1.0) == 0.0
    assert timing.contention_floor([1.5, 1.9, 1.8]) == pytest.approx(0.85 * 1.9)
    assert timing.contention_floor([]) == 0.0


def test_a_disturbed_sample_is_repeated_and_the_clean_one_kept():
    """Wall 20 s at 1 core's worth (another process took a core), then 10 s at 1.9: the clean one counts."""
    got = timing.measure(_fake([(20.0, 20.0), (10.0, 19.0), (99.0, 1.0)]), floor=1.6, retries=2)
    assert got["wall_s"] == 10.0 and not got["disturbed"] and len(got["attempts"]) == 2


def test_retries_are_bounded_and_a_still_disturbed_sample_is_marked():
    got = timing.measure(_fake([(20.0, 20.0), (18.0, 17.0), (16.0, 15.0), (9.0, 18.0)]), floor=1.6, retries=2)
    assert got["wall_s"] == 16.0 and got["disturbed"] and len(got["attempts"]) == 3
    clean = timing.measure(_fake([(10.0, 19.0), (1.0, 1.0)]), floor=1.6, retries=2)
    assert clean["wall_s"] == 10.0 and len(clean["attempts"]) == 1
    never = timing.measure(_fake([(20.0, 1.0), (1.0, 1.0)]), floor=0.0, retries=0)
    assert never["wall_s"] == 20.0 and not never["disturbed"]


def test_the_block_says_how_many_samples_were_repeated():
    changed = copy.deepcopy(RESULT)
    run = _timed_runs_of(changed)[0]
    run["rounds"] = run["rounds"][:1]  # one round: the counts below are of its samples only
    for r in _timed_runs_of(changed)[1:]:
        for other in r["rounds"]:
            other.pop("attempts", None)
            other.pop("disturbed", None)
    rnd = run["rounds"][0]
    names = list(rnd["seconds"])
    rnd["attempts"] = {k: [{"wall_s": 1.0, "cpu_s": 1.9, "cores": 1.9}] for k in names}
    rnd["attempts"][names[0]] = [{"wall_s": 2.0, "cpu_s": 1.0, "cores": 0.5},
                                 {"wall_s": 1.0, "cpu_s": 1.9, "cores": 1.9}]
    rnd["disturbed"] = [names[1]]
    block = readme_figures.render(changed)
    assert f"other work took the cores (CPU time / wall time under the floor): 1 of {len(names)}; " \
           "still disturbed after the retries: 1." in block


def test_the_committed_512_sdpa_run_holds_p3s_at_weight_0_within_3_percent_of_plain():
    """Issue 24 item 3: P3S at weight 0 installs nothing, so a like-for-like benchmark must read it as
    plain within ±3 % (median over rounds); the committed 512² SDPA run is checked, with its spread."""
    result = json.loads((REPO / "benchmarks" / "results" / "bench.json").read_text())
    run = next(r for r in result["runs"] if r.get("attention") == "sdpa" and r.get("size") == 512 and "error" not in r)
    w0 = run["steps_per_variant"]["p3s weight 0"]
    assert 0.97 <= w0["ratio_to_plain"] <= 1.03, w0
    lo, hi = w0["ratio_spread"]
    assert lo <= w0["ratio_to_plain"] <= hi and len(w0["per_step_s"]) >= 3
