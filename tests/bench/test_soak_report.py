"""The soak's report from its raw records (``helios_bench.soak``): per-minute counts and latency quantiles, RSS
drift per process after its warm-up (a replacement process measured from its own start), and the picture."""

from __future__ import annotations

from helios_bench.soak import format_report, plot, rss_drift, summarize

MB = 2**20


def _samples() -> list[dict]:
    out = []
    for t in range(0, 600, 10):
        rss = [{"proc": "router", "pid": 1, "rss": (200 + t // 60) * MB}]  # +1 MiB a minute: a slow leak
        # replica pid 10 killed at 300 s; pid 11 replaces it at 310 s, grows during its load, then flat
        rss.append({"proc": "replica:small", "pid": 10 if t < 300 else 11,
                    "rss": (900 if t < 300 else (500 if t < 400 else 950)) * MB})
        out.append({"t": float(t), "rss": rss, "resumed": 0, "placements": {}})
    return out


def test_rss_drift_is_measured_per_process_after_its_own_warmup():
    rows = {r["pid"]: r for r in rss_drift(_samples(), warmup_s=120)}  # one placement each here
    assert rows[1]["rss_after_warmup_mb"] == 202 and rows[1]["rss_last_mb"] == 209
    assert abs(rows[1]["drift"] - (209 / 202 - 1)) < 1e-3
    assert rows[10]["drift"] == 0.0  # flat while it lived
    assert rows[11]["rss_after_warmup_mb"] == 950 and rows[11]["drift"] == 0.0  # its load is inside its warm-up
    assert "drift" not in rss_drift(_samples()[:5], warmup_s=120)[0]  # too short a life to judge


def test_a_replica_moved_to_another_depth_is_compared_at_each_placement_not_across():
    samples = [{"t": float(t), "rss": [{"proc": "replica:coder", "pid": 7, "at": "q@24" if t < 300 or t >= 480 else
                                        "q@22", "rss": (1000 if t < 300 or t >= 480 else 900) * MB}]}
               for t in range(0, 600, 10)]
    rows = {r["at"]: r for r in rss_drift(samples, warmup_s=120)}
    assert rows["q@24"]["drift"] == 0.0 and rows["q@24"]["span_s"] == 470  # moved away and back: like with like
    assert rows["q@22"]["drift"] == 0.0


def test_summary_counts_failures_per_minute_and_draws_the_picture(tmp_path):
    records = [{"id": i, "t": i * 6.0, "latency_s": 1.0 + (i % 10) / 10, "ok": i != 13, "why": "" if i != 13 else
                "error event: gone", "tokens": 64, "kind": "chat"} for i in range(100)]
    res = summarize(records, _samples(), [{"t": 300.0, "kind": "kill", "group": "small", "pid": 10},
                                          {"t": 120.0, "kind": "placement", "group": "small", "status": 200}],
                    {"routing": {"resumed_streams": 3}}, config="x.yaml", minutes=10, clients=4, warmup_s=120,
                    max_tokens=64)
    assert (res["requests"], res["completed"], res["failed"], res["resumed"]) == (100, 99, 1, 3)
    assert [m["completed"] + m["failed"] for m in res["per_minute"]] == [10] * 10
    assert res["per_minute"][1]["failed"] == 1 and res["per_minute"][1]["latency_p50_s"] == 1.5
    assert res["failures"] == [{"t": 78.0, "why": "error event: gone"}]
    assert abs(res["max_abs_rss_drift"] - (209 / 202 - 1)) < 1e-3
    res["plot"] = str(plot(res, tmp_path / "soak.png"))
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    text = format_report(res)
    assert "completed 99, failed 1, resumed 3" in text and "1 replica kills, 1 placement changes" in text
