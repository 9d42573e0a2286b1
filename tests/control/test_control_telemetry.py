"""Breach counter and performance history table."""

from __future__ import annotations

import math

import pytest
from control_synth import token

from helios_ray.control import PHT, BreachCounter, PolicyConfig, TraceRequest
from helios_ray.control.pht_entry import PHTEntry
from helios_ray.control.reservoir import Reservoir


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- breach counter
def test_storm_is_strictly_more_than_the_limit() -> None:
    counter = BreachCounter(window=100, limit=50, threshold=0.9)
    for _ in range(50):
        assert counter.record(0.5) is True
    for _ in range(50):
        assert counter.record(0.95) is False
    assert (counter.breaches, counter.tokens, counter.storm) == (50, 100, False)  # 50 in 100
    counter.reset()
    for _ in range(49):
        counter.record(0.95)
    for _ in range(51):
        counter.record(0.1)
    assert (counter.breaches, counter.tokens, counter.storm) == (51, 100, True)  # 51 in 100


def test_storm_fires_before_the_window_is_full() -> None:
    counter = BreachCounter(window=100, limit=50)
    for _ in range(50):
        counter.record(0.0)
    assert not counter.storm
    counter.record(0.0)
    assert counter.storm and counter.tokens == 51


def test_threshold_itself_is_confident() -> None:
    counter = BreachCounter(threshold=0.9)
    assert counter.record(0.9) is False
    assert counter.record(0.8999) is True


def test_window_slides_old_breaches_out() -> None:
    counter = BreachCounter(window=100, limit=50)
    for _ in range(51):
        counter.record(0.1)
    assert counter.storm
    for _ in range(49):  # window now full: 51 breaches + 49 clean
        counter.record(0.99)
    assert counter.storm and counter.breaches == 51
    counter.record(0.99)  # the oldest breach leaves the window
    assert counter.breaches == 50 and not counter.storm
    for _ in range(50):
        counter.record(0.99)
    assert counter.breaches == 0
    assert counter.total_breaches == 51 and counter.total_tokens == 151


def test_reset_keeps_lifetime_totals() -> None:
    counter = BreachCounter(window=10, limit=5)
    for _ in range(6):
        counter.record(0.0)
    assert counter.storm
    counter.reset()
    assert (counter.breaches, counter.tokens, counter.storm) == (0, 0, False)
    assert counter.total_breaches == 6


def test_breach_counter_validates_its_arguments() -> None:
    with pytest.raises(ValueError):
        BreachCounter(window=0, limit=0)
    with pytest.raises(ValueError):
        BreachCounter(window=10, limit=10)
    with pytest.raises(ValueError):
        BreachCounter(threshold=0.0)
    cfg = PolicyConfig(breach_window=20, breach_limit=7, confidence_threshold=0.8)
    counter = BreachCounter.from_config(cfg)
    assert (counter.window, counter.limit, counter.threshold) == (20, 7, 0.8)


# --------------------------------------------------------------------------- PHT
def _profiled_pht(clock: FakeClock) -> PHT:
    """4 tokens on a 30-layer model with exits 12/20/30."""
    pht = PHT(threshold=0.9, bins=20)
    pht.set_clock(clock)
    # first confident exit: 12, 20, 30, none (greedy at 30)
    pht.observe_token(
        token("m", 1, 0, {12: (7, 0.95), 20: (7, 0.97), 30: (7, 0.99)}, final=7, final_logprob=-0.1)
    )
    pht.observe_token(
        token("m", 1, 1, {12: (8, 0.40), 20: (7, 0.92), 30: (7, 0.95)}, final=7, final_logprob=-0.1)
    )
    pht.observe_token(
        token(
            "m", 1, 2, {12: (8, 0.10, -2.0), 20: (8, 0.50, -2.0), 30: (7, 0.91)},
            final=7, final_logprob=-0.1,
        )
    )  # fmt: skip
    pht.observe_token(
        token(
            "m", 1, 3, {12: (8, 0.05, -3.0), 20: (7, 0.60), 30: (7, 0.70)},
            final=7, final_logprob=-0.1,
        )
    )  # fmt: skip
    return pht


def test_exit_histogram_share_and_agreement() -> None:
    clock = FakeClock()
    pht = _profiled_pht(clock)
    entry = pht.get("m", 30)
    assert entry is not None and entry.tokens == 4
    assert entry.exit_hist == {12: 1, 20: 1, 30: 1}
    assert entry.greedy_exits == 1
    assert entry.exit_depth_histogram() == {12: 1, 20: 1, 30: 2}
    assert entry.exit_share(12) == 0.25 and entry.exit_share(20) == 0.5
    assert entry.exit_share(30) == 0.75  # the unconfident token is not "confident by 30"
    assert entry.agreement(12) == 0.25 and entry.agreement(20) == 0.75
    assert entry.agreement(30) == 1.0
    stats = entry.exits[12]
    assert sum(stats.conf_hist) == 4 and len(stats.conf_hist) == 20
    assert stats.conf_hist[19] == 1 and stats.conf_hist[8] == 1 and stats.conf_hist[2] == 1
    assert stats.conf_hist[1] == 1


def test_perplexity_guard_numbers() -> None:
    pht = _profiled_pht(FakeClock())
    entry = pht.get("m", 30)
    assert entry is not None
    assert entry.full_perplexity == pytest.approx(math.exp(0.1))
    # exit 12: token 1 disagrees and carries no log-prob -> perplexity unknown, not biased
    assert entry.perplexity(12) is None
    # exit 20: -0.1, -0.1, -2.0, -0.1 (token 4 agrees, so its logprob is the final's)
    assert entry.perplexity(20) == pytest.approx(math.exp((0.1 + 0.1 + 2.0 + 0.1) / 4))
    assert entry.ppl_increase(20) == pytest.approx(math.exp(2.3 / 4) / math.exp(0.1) - 1)
    assert entry.ppl_increase(30) == pytest.approx(0.0)


def test_depth_limits_what_an_entry_sees() -> None:
    pht = PHT(threshold=0.9)
    rec = token("m", 1, 0, {12: (1, 0.2), 20: (1, 0.3), 30: (1, 0.99)}, final=1)
    entry = pht.observe_token(rec, depth=20)  # a replica loaded to 20 never sees exit 30
    assert entry.depth == 20 and sorted(entry.exits) == [12, 20]
    assert entry.greedy_exits == 1 and entry.exit_depth_histogram() == {20: 1}


def test_request_timings_energy_and_percentiles() -> None:
    clock = FakeClock()
    pht = PHT(reservoir_size=4)
    pht.set_clock(clock)
    for i in range(10):
        pht.observe_request(
            TraceRequest(
                model="m", request=i, output_tokens=11, seconds=1.0 + i, ttft_s=0.5,
                energy_j=None if i < 5 else 22.0,
            ),
            depth=30,
        )  # fmt: skip
    entry = pht.get("m", 30)
    assert entry is not None
    assert entry.requests == 10
    assert entry.stream_tokens_per_s == pytest.approx(110 / sum(1.0 + i for i in range(10)))
    tpot = entry.tpot.summary()
    # TPOT = (seconds - ttft) / (tokens - 1) = (0.5 + i) / 10; mean over all ten,
    assert tpot.mean == pytest.approx(sum((0.5 + i) / 10 for i in range(10)) / 10)
    # percentiles over the four most recent (i = 6..9)
    assert tpot.p50 == pytest.approx(0.75) and tpot.p99 == pytest.approx(0.95)
    assert len(entry.tpot.samples) == 4 and tpot.count == 10
    assert entry.energy_per_token == pytest.approx(22.0 / 11)
    assert pht.get("m", 30) is not None and entry.ttft.summary().p99 == 0.5


def test_energy_unknown_is_none_not_zero() -> None:
    pht = PHT()
    pht.observe_request(TraceRequest(model="m", request=1, output_tokens=3, seconds=1.0), depth=8)
    entry = pht.get("m", 8)
    assert entry is not None and entry.energy_per_token is None


def test_request_depth_defaults_to_the_profiled_depth() -> None:
    pht = PHT()
    with pytest.raises(ValueError, match="depth of request 1"):
        pht.observe_request(TraceRequest(model="m", request=1, output_tokens=3, seconds=1.0))
    pht.observe_token(token("m", 1, 0, {12: (1, 0.5), 24: (1, 0.9)}, final=1))
    entry = pht.observe_request(TraceRequest(model="m", request=1, output_tokens=3, seconds=1.0))
    assert entry.depth == 24 and entry.requests == 1


def test_merge_throughput_is_a_weighted_mean() -> None:
    pht = PHT()
    pht.merge_throughput("m", 20, 100.0, weight=1)
    pht.merge_throughput("m", 20, 200.0, weight=3)
    entry = pht.get("m", 20)
    assert entry is not None and entry.measured_tokens_per_s == pytest.approx(175.0)
    # engine throughput wins over single-stream speed from request records
    pht.observe_request(TraceRequest(model="m", request=1, output_tokens=10, seconds=1.0), depth=20)
    assert entry.tokens_per_s == pytest.approx(175.0) and entry.stream_tokens_per_s == 10.0
    with pytest.raises(ValueError):
        pht.merge_throughput("m", 20, 0.0)


def test_stale_entries_are_hidden_and_listed() -> None:
    clock = FakeClock(1000.0)
    pht = _profiled_pht(clock)
    pht.stale_after_s = 600.0
    assert pht.get("m", 30) is not None
    clock.now += 600.0
    assert pht.get("m", 30) is not None  # exactly at the limit: still fresh
    clock.now += 1.0
    assert pht.get("m", 30) is None
    assert pht.get("m", 30, include_stale=True) is not None
    assert [(e.model, e.depth) for e in pht.stale()] == [("m", 30)]
    entry = pht.get("m", 30, include_stale=True)
    assert entry is not None and entry.age(clock.now) == pytest.approx(601.0)
    assert pht.summary()[0]["stale"] is True
    # new data refreshes it
    pht.observe_token(token("m", 2, 0, {12: (1, 0.5), 30: (1, 0.9)}, final=1))
    assert pht.get("m", 30) is not None


def test_json_round_trip() -> None:
    clock = FakeClock()
    pht = _profiled_pht(clock)
    pht.observe_request(
        TraceRequest(model="m", request=1, output_tokens=4, seconds=2.0, ttft_s=0.5, energy_j=8.0)
    )
    pht.merge_throughput("m", 20, 55.0)
    text = pht.to_json()
    back = PHT.from_json(text, clock=clock)
    assert back.to_json() == text
    entry = back.get("m", 30)
    assert entry is not None
    assert sorted(entry.exits) == [12, 20, 30]  # int keys restored
    assert entry.exit_share(20) == 0.5 and entry.agreement(20) == 0.75
    assert entry.ppl_increase(20) == pytest.approx(pht.get("m", 30).ppl_increase(20))  # type: ignore[union-attr]
    assert entry.tpot.summary() == pht.get("m", 30).tpot.summary()  # type: ignore[union-attr]
    assert back.get("m", 20).measured_tokens_per_s == 55.0  # type: ignore[union-attr]
    assert back.summary() == pht.summary()
    # the restored table keeps working (index rebuilt)
    back.observe_token(token("m", 9, 0, {12: (1, 0.95), 30: (1, 0.99)}, final=1))
    assert back.get("m", 30).tokens == 5  # type: ignore[union-attr]
    assert len(back.entries) == 2


def test_merge_two_tables() -> None:
    clock = FakeClock()
    a, b = _profiled_pht(clock), _profiled_pht(clock)
    b.observe_token(token("other", 1, 0, {4: (1, 0.95), 8: (1, 0.99)}, final=1))
    a.merge(b)
    entry = a.get("m", 30)
    assert entry is not None and entry.tokens == 8 and entry.exit_hist == {12: 2, 20: 2, 30: 2}
    assert entry.agreement(20) == 0.75
    assert a.get("other", 8) is not None


def test_reservoir_ring_buffer() -> None:
    res = Reservoir(size=3)
    for v in [5.0, 1.0, 3.0, 10.0, 20.0]:
        res.add(v)
    assert sorted(res.samples) == [3.0, 10.0, 20.0]
    assert res.mean == pytest.approx(39.0 / 5)
    assert res.percentile(50) == 10.0 and res.percentile(99) == 20.0 and res.percentile(0) == 3.0


def test_entry_rejects_merging_other_keys() -> None:
    a = PHTEntry(model="m", depth=20, threshold=0.9)
    with pytest.raises(ValueError):
        a.merge(PHTEntry(model="m", depth=24, threshold=0.9))
    with pytest.raises(ValueError):
        a.merge(PHTEntry(model="m", depth=20, threshold=0.8))
