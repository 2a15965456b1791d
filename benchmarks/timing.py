"""The statistics of the sampling benchmark (issue 24 item 3): the interleaving order of a round, the
per-step time of a round (an N-step sample minus a 1-step sample, so fixed costs cancel) and the ratio
to plain with its spread across rounds. Standard library only (no ComfyUI, no torch), so
``tests/unit/test_bench_timing.py`` checks it fast.
"""
from __future__ import annotations

import statistics

#: The noise criterion: P3S at weight 0 installs nothing, so its ratio to plain must land here.
WEIGHT0_BAND = (0.97, 1.03)


def round_order(variants: list[str], rnd: int, long_steps: int, short_steps: int = 1) -> list[tuple[str, int]]:
    """The ``(variant, steps)`` samples of round ``rnd``, in order: each variant's long then short
    sample, the whole sequence reversed every other round, so no variant always runs first or last
    (ABBA: a linear drift of the machine's speed cancels over two rounds)."""
    if long_steps <= short_steps:
        raise ValueError(f"long_steps ({long_steps}) must be more than short_steps ({short_steps})")
    seq = [(v, n) for v in variants for n in (long_steps, short_steps)]
    return seq if rnd % 2 == 0 else seq[::-1]


def per_step(t_long: float, t_short: float, long_steps: int, short_steps: int = 1) -> float:
    """Seconds per sampling step: ``(t_N - t_1) / (N - 1)``; what a sample costs once (noise, model
    preparation, the sampler's set-up) is in both and cancels."""
    return (t_long - t_short) / (long_steps - short_steps)


def _quartiles(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


def ratio_stats(per_round: dict[str, list[float]], ref: str = "plain") -> dict[str, dict]:
    """Per variant, from its per-step times of each round (``per_round[name][k]``, round ``k``): the
    ratio of each round to ``ref`` of the same round, their median (the reported ratio), the spread
    min–max and the IQR across rounds, and the median s/step."""
    base = per_round[ref]
    out = {}
    for name, times in per_round.items():
        if len(times) != len(base) or not times:
            raise ValueError(f"{name}: {len(times)} rounds, {ref}: {len(base)}")
        ratios = [t / b for t, b in zip(times, base)]
        out[name] = {"per_step_s": times, "median": statistics.median(times), "min": min(times),
                     "max": max(times), "n": len(times), "ratio_rounds": ratios,
                     "ratio_to_plain": statistics.median(ratios),
                     "ratio_spread": [min(ratios), max(ratios)], "ratio_iqr": _quartiles(ratios)}
    return out


def weight0_within_band(steps: dict, band: tuple[float, float] = WEIGHT0_BAND) -> bool:
    """Whether P3S at weight 0 (the plain model) reads within ``band`` of plain: the run's noise is
    small enough for its ratios to be read to ±3 %."""
    r = steps.get("p3s weight 0", {}).get("ratio_to_plain")
    return r is not None and band[0] <= r <= band[1]


def core_share(wall_s: float, cpu_s: float) -> float:
    """Cores' worth of CPU time the process got during a sample: its CPU time (all threads) over the
    wall time. Near the thread count when it ran alone; lower when other work took the cores."""
    return cpu_s / wall_s if wall_s > 0 else 0.0


def contention_floor(warmup_shares: list[float], fraction: float = 0.85) -> float:
    """The core share below which a timed sample counts as disturbed: ``fraction`` of the best share
    of the warm-up round (the process's own figure on this machine, no assumed core count)."""
    return fraction * max(warmup_shares) if warmup_shares else 0.0


def measure(sample, floor: float, retries: int) -> dict:
    """One timed sample, repeated (at most ``retries`` more times) while the process got less than
    ``floor`` cores' worth of CPU (another process took them: wall time says nothing about the
    variant then). ``sample()`` returns ``(wall_s, cpu_s)``. The last attempt is kept either way;
    every attempt is returned, so the report can say how many were disturbed."""
    attempts = []
    for _ in range(retries + 1):
        wall, cpu = sample()
        attempts.append({"wall_s": wall, "cpu_s": cpu, "cores": core_share(wall, cpu)})
        if attempts[-1]["cores"] >= floor:
            break
    return {"wall_s": attempts[-1]["wall_s"], "disturbed": attempts[-1]["cores"] < floor, "attempts": attempts}
