"""helios_ray.serve.timeline: the brain's rolling window for the live page (pure, no cluster)."""

from __future__ import annotations

import json

import pytest

from helios_ray.serve.timeline import Timeline, percentile


def test_percentile_interpolates_like_numpy_linear():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.9) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def test_tokens_are_spread_over_the_seconds_a_request_ran():
    tl = Timeline(span_s=60, interval_s=10)
    # 100 tokens over 20 s finishing at t=1000: 50 tokens in each of the buckets (980, 990] and (990, 1000].
    tl.request(1000.0, "m", 30, 100, 20.0, 0.5)
    s = tl.series(1000.0)
    assert len(s) == 6 and s[-1]["t"] == 1000.0 and s[0]["t"] == 950.0
    assert [b["tokens_per_s"] for b in s] == [0, 0, 0, 0, 5.0, 5.0]
    # It finished in the last bucket: counted once there, with its TTFT and TPOT ((20 - 0.5) / 99).
    assert [b["requests"] for b in s] == [0, 0, 0, 0, 0, 1]
    assert s[-1]["ttft_p50"] == 0.5 and s[-1]["tpot_p50"] == pytest.approx(19.5 / 99, abs=1e-4)
    assert s[-2]["ttft_p50"] is None


def test_total_tokens_are_conserved_and_partial_overlap_is_clipped():
    tl = Timeline(span_s=30, interval_s=10)
    tl.request(995.0, "m", 30, 60, 6.0, 0.1)     # all inside (990, 1000]
    tl.request(1000.0, "m", 30, 40, 40.0, 0.1)   # began at 960, before the window (970): 3/4 of it inside
    s = tl.series(1000.0)
    assert sum(b["tokens_per_s"] * 10 for b in s) == pytest.approx(60 + 30)


def test_percentiles_per_bucket_and_single_token_requests_have_no_tpot():
    tl = Timeline(span_s=20, interval_s=10)
    for i, ttft in enumerate([0.1, 0.2, 0.3, 0.4, 1.0]):
        tl.request(991.0 + i, "m", 30, 1, ttft + 0.01, ttft)
    b = tl.series(1000.0)[-1]
    assert b["requests"] == 5 and b["ttft_p50"] == 0.3 and b["ttft_p90"] == pytest.approx(0.76)
    assert b["tpot_p50"] is None


def test_window_is_bounded_in_time_and_count():
    tl = Timeline(span_s=60, interval_s=10, max_requests=5, max_events=3)
    for i in range(10):
        tl.request(float(i), "m", 30, 1, 0.1, 0.05)
    assert len(tl.requests) == 5
    tl.request(1000.0, "m", 30, 1, 0.1, 0.05)   # everything before 1000 - 70 is dropped
    assert [r.at for r in tl.requests] == [1000.0]
    for i in range(5):
        tl.decision(float(i), {"action": "keep", "trigger": "reassess", "model": "m", "depth": 30, "reason": str(i)})
    assert [e["reason"] for e in tl.events] == ["2", "3", "4"]


def test_exit_layers_histogram_per_model():
    tl = Timeline()
    tl.exits("a", [30, 30, 12])
    tl.exits("a", [12])
    tl.exits("b", [18])
    snap = tl.snapshot(0.0)
    assert snap["exit_layers"] == {"a": {"12": 2, "30": 2}, "b": {"18": 1}}


def test_events_merge_policy_decisions_and_operator_changes_by_time():
    tl = Timeline()
    tl.decision(10.0, {"action": "deploy", "trigger": "start", "model": "m", "depth": 30, "reason": "priors",
                       "previous_model": None, "previous_depth": None})
    tl.decision(30.0, {"action": "extend", "trigger": "storm", "model": "m", "depth": 24, "reason": "breaches",
                       "previous_model": "m", "previous_depth": 12})
    changes = [{"version": 2, "at": 20.0, "from": {"model": "m", "depth": 30}, "to": {"model": "m", "depth": 12},
                "action": "manual", "trigger": "operator", "reason": "set_placement"},
               {"version": 3, "at": 30.0, "from": {"model": "m", "depth": 12}, "to": {"model": "m", "depth": 24},
                "action": "extend", "trigger": "storm", "reason": "breaches"}]  # already a policy event
    evs = tl.snapshot(40.0, changes)["events"]
    assert [(e["source"], e["action"]) for e in evs] == [("policy", "deploy"), ("operator", "manual"),
                                                        ("policy", "extend")]
    assert evs[0]["from"] is None and evs[2]["from"] == {"model": "m", "depth": 12}
    assert evs[1]["to"] == {"model": "m", "depth": 12} and evs[1]["version"] == 2


def test_snapshot_is_json_and_small():
    tl = Timeline()
    for i in range(20_000):
        tl.request(1000.0 + i * 0.01, "m", 30, 16, 2.0, 0.2)
    tl.exits("m", list(range(1, 31)) * 100)
    text = json.dumps(tl.snapshot(1200.0))
    assert len(text) < 20_000  # 30 buckets, one histogram: the page polls this every 2 s


def test_bad_windows_are_refused():
    with pytest.raises(ValueError):
        Timeline(span_s=5, interval_s=10)
    with pytest.raises(ValueError):
        Timeline(interval_s=0)
