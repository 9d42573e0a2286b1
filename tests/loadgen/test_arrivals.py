"""Arrival statistics (Poisson / gamma) and determinism."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from loadgen import Arrival, LoadgenError, arrival_times, arrival_times_iter, gamma_intervals


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_intervals_mean_rate_and_dispersion(burstiness):
    rate = 4.0
    x = gamma_intervals(40_000, rate, burstiness, seed=1)
    assert x.mean() == pytest.approx(1 / rate, rel=0.03)
    cv2 = x.var() / x.mean() ** 2   # gamma(k): CV^2 = 1/k; Poisson (k = 1): exponential gaps, CV = 1
    assert cv2 == pytest.approx(1 / burstiness, rel=0.08)


def test_poisson_counts_per_window():
    # a Poisson process at rate r has Poisson(r * w) counts in windows of width w: mean = variance
    t = arrival_times(40_001, rate=10.0, burstiness=1.0, seed=3)
    counts = np.histogram(t, bins=np.arange(0, t[-1], 1.0))[0]
    assert counts.mean() == pytest.approx(10.0, rel=0.03)
    assert counts.var() == pytest.approx(10.0, rel=0.1)


def test_arrival_times_seeded_and_consistent():
    a = arrival_times(3000, 2.0, 1.0, seed=7)
    assert a[0] == 0.0 and np.all(np.diff(a) > 0)
    assert (len(a) - 1) / a[-1] == pytest.approx(2.0, rel=0.06)
    assert np.array_equal(a, arrival_times(3000, 2.0, 1.0, seed=7))
    assert not np.array_equal(a, arrival_times(3000, 2.0, 1.0, seed=8))
    # the lazy iterator (generated in blocks) gives the same sequence, across block boundaries
    it = list(itertools.islice(arrival_times_iter(2.0, 1.0, seed=7, block=1024), 3000))
    assert np.allclose(it, a)
    assert list(itertools.islice(Arrival(rate=2.0, seed=7).times(), 5)) == pytest.approx(list(a[:5]))


def test_unpaced_and_validation():
    assert np.all(arrival_times(5, math.inf) == 0)
    assert np.all(gamma_intervals(5, math.inf) == 0)
    assert Arrival(max_concurrency=4).closed_loop and not Arrival(rate=1, max_concurrency=4).closed_loop
    assert Arrival().to_dict()["rate"] is None and Arrival(rate=2).to_dict()["mode"] == "open"
    for kw in ({"rate": 0}, {"rate": -1}, {"rate": float("nan")}, {"burstiness": 0}, {"max_concurrency": 0}):
        with pytest.raises(LoadgenError):
            Arrival(**kw)
