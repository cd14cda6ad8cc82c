"""The arithmetic of benchmarks/probe_jobs.py, which sizes the GPU run's fig6 sweep (how many runs at once)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location(
    "probe_jobs", Path(__file__).resolve().parents[1] / "benchmarks" / "probe_jobs.py"
)
assert _spec is not None and _spec.loader is not None
probe_jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_jobs)

# (start, fixed, epoch, evaluation) seconds
ONE = (5.0, 0.5, 0.1, 0.2)


def test_endpoints_are_the_measurements():
    many = (20.0, 1.0, 0.5, 0.3)
    sweep = probe_jobs.plan(190, 100, 10, ONE, many, 16)
    assert sorted(sweep) == list(range(1, 17))
    assert sweep[1] == pytest.approx(5.0 + 190 * (0.5 + 100 * 0.1 + 10 * 0.2))
    assert sweep[16] == pytest.approx(20.0 + 12 * (1.0 + 100 * 0.5 + 10 * 0.3))  # ceil(190 / 16) = 12
    # halfway between 1 and 16 workers, every time is halfway between its two measurements
    half = probe_jobs.plan(190, 100, 10, ONE, many, 3)[2]
    assert half == pytest.approx(12.5 + 95 * (0.75 + 100 * 0.3 + 10 * 0.25))


def test_perfect_scaling_takes_every_worker_that_shortens_the_sweep():
    sweep = probe_jobs.plan(190, 100, 10, ONE, ONE, 16)
    assert probe_jobs.choose(sweep) == 16
    # 190 runs: 15 workers need 13 rounds, 16 need 12; with 19 workers allowed, 19 (10 rounds) wins
    assert probe_jobs.choose(probe_jobs.plan(190, 100, 10, ONE, ONE, 19)) == 19
    # 20 runs: 10 to 19 workers all need 2 rounds, 20 need 1; capped at 15 the fewest of the equals is taken
    assert probe_jobs.choose(probe_jobs.plan(20, 100, 10, ONE, ONE, 15)) == 10


def test_no_gain_from_sharing_keeps_one_worker():
    cap = 8
    many = (ONE[0], ONE[1] * cap, ONE[2] * cap, ONE[3] * cap)  # n workers at once each run n times slower
    assert probe_jobs.choose(probe_jobs.plan(190, 100, 10, ONE, many, cap)) == 1


@given(
    runs=st.integers(1, 400),
    cap=st.integers(1, 32),
    slowdown=st.floats(1.0, 40.0),
)
def test_estimates_match_a_direct_count(runs, cap, slowdown):
    """Each estimate: start + (rounds of n runs) * (one run's time), with every time interpolated linearly."""
    many = tuple(t * slowdown for t in ONE)
    sweep = probe_jobs.plan(runs, 7, 3, ONE, many, cap)
    for n, seconds in sweep.items():
        w = 0.0 if cap == 1 else (n - 1) / (cap - 1)
        start, fixed, epoch, evaluation = ((1 - w) * a + w * b for a, b in zip(ONE, many, strict=True))
        rounds = -(-runs // n)
        assert rounds == math.ceil(runs / n)
        assert seconds == pytest.approx(start + rounds * (fixed + 7 * epoch + 3 * evaluation))
    best = probe_jobs.choose(sweep)
    assert all(sweep[best] <= s for s in sweep.values())
    assert all(sweep[n] > sweep[best] for n in sweep if n < best)
