"""Percentiles, summaries and goodput on known numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadgen import LoadgenError, RequestRecord, meets_slos, parse_slos, stats, summarize


def test_percentiles_on_known_arrays():
    s = stats(range(1, 101))
    assert s["n"] == 100
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)   # linear interpolation: rank 0.90 * 99 = 89.1 -> 90.1
    assert s["p99"] == pytest.approx(99.01)
    assert (s["min"], s["max"]) == (1.0, 100.0)
    s = stats([4, 1, 3, 2])
    assert s["median"] == pytest.approx(2.5)
    assert s["p99"] == pytest.approx(3.97)   # rank 0.99 * 3 = 2.97 between 3 and 4
    assert stats([7.0])["p99"] == 7.0
    assert stats([0.1, 0.2], scale=1000)["mean"] == pytest.approx(150.0)
    assert stats([10, 20, 30], percentiles=(25, 75)) == pytest.approx(
        {"n": 3, "mean": 20.0, "std": float(np.std([10, 20, 30])), "min": 10.0, "max": 30.0, "median": 20.0,
         "p25": 15.0, "p75": 25.0})


def test_empty_and_none_values():
    s = stats([])
    assert s["n"] == 0 and s["mean"] is None and s["median"] is None and s["p99"] is None
    assert stats([None, 2.0, None])["n"] == 1


def _rec(i, ttft, tpot, e2e, n_out=5, ok=True, kind="chat", layers=(), itl=()):
    return RequestRecord(index=i, id=str(i), kind=kind, start_s=float(i), ttft_s=ttft, tpot_s=tpot, e2e_s=e2e,
                         output_tokens=n_out, success=ok, error=None if ok else "boom", itl_s=list(itl),
                         exit_layers=list(layers), confidences=[0.9] * len(layers))


def test_summary_throughput_goodput_and_breakdown():
    recs = [
        _rec(0, 0.10, 0.020, 0.18, layers=(3, 3, 5), itl=(0.02, 0.02)),
        _rec(1, 0.40, 0.020, 0.48, layers=(5,), itl=(0.03,)),                    # TTFT misses 300 ms
        _rec(2, 0.20, 0.050, 0.40, kind="code", layers=(6, 6)),                  # TPOT misses 40 ms
        _rec(3, 0.25, None, 0.25, n_out=1, kind="code"),                         # one token: no TPOT, good
        _rec(4, None, None, None, n_out=0, ok=False),                            # failed
    ]
    s = summarize(recs, duration_s=2.0, slos=["ttft:300", "tpot:40"])
    assert (s["num_requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["total_output_tokens"] == 16
    assert s["output_throughput"] == pytest.approx(8.0)
    g = s["goodput"]
    assert g["good"] == 2 and g["request_goodput"] == pytest.approx(1.0) and g["fraction"] == pytest.approx(0.4)
    assert g["output_goodput"] == pytest.approx((5 + 1) / 2.0)
    assert s["ttft_ms"]["median"] == pytest.approx(225.0)
    assert s["tpot_ms"]["n"] == 3 and s["tpot_ms"]["mean"] == pytest.approx(30.0)
    assert s["itl_ms"]["n"] == 3 and s["itl_ms"]["mean"] == pytest.approx(70 / 3)
    assert s["exit_layer"]["histogram"] == {"3": 2, "5": 2, "6": 2}
    assert s["exit_layer"]["mean"] == pytest.approx(28 / 6)
    assert s["errors"] == {"boom": 1}
    assert s["by_kind"]["code"]["completed"] == 2 and s["by_kind"]["chat"]["num_requests"] == 3
    assert math.isclose(s["by_kind"]["code"]["exit_layer_mean"], 6.0)


def test_meets_slos_edges():
    assert meets_slos(_rec(0, 0.5, 0.1, 1.0), {"ttft": 500, "tpot": 100, "e2e": 1000})  # <= is a pass
    assert not meets_slos(_rec(0, 0.5, 0.1, 1.001), {"e2e": 1000})
    assert not meets_slos(_rec(0, None, None, 0.1, n_out=0), {"ttft": 500})  # no token: misses a TTFT SLO
    assert meets_slos(_rec(0, 0.1, None, 0.1, n_out=1), {"tpot": 1})
    assert not meets_slos(_rec(0, 0.1, 0.01, 0.2, ok=False), {})


def test_parse_slos():
    assert parse_slos(["ttft:500", "tpot:100"]) == {"ttft": 500.0, "tpot": 100.0}
    assert parse_slos(["ttft:500,e2el:2000"]) == {"ttft": 500.0, "e2e": 2000.0}
    assert parse_slos({"tpot": 50}) == {"tpot": 50.0}
    assert parse_slos(None) == {}
    for bad in (["ttft"], ["foo:1"], ["ttft:x"], ["ttft:-5"]):
        with pytest.raises(LoadgenError):
            parse_slos(bad)


def test_summary_duration_from_records():
    recs = [_rec(0, 0.1, 0.01, 0.5), _rec(2, 0.1, 0.01, 1.0)]  # start 0 and 2, ends 0.5 and 3.0
    s = summarize(recs)
    assert s["duration_s"] == pytest.approx(3.0)
    assert s["goodput"] is None
