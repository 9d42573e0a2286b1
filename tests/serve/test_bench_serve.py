"""``helios-ray bench serve`` end to end, small, on the session's cluster: three systems deployed one after the
other behind the same API, every generated token scored under the full model, ratios computed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from helios_ray.bench.serve_bench import ServeBenchConfig, bench_serve, format_table

pytestmark = pytest.mark.slow


def test_bench_serve_small_run(cluster):
    cfg = ServeBenchConfig(requests=3, concurrency=3, max_prompt_tokens=128, max_output_tokens=8, rates=[4.0],
                           sweep_requests=2, warmup_requests=1, memory_budget_mb=1024)
    res = bench_serve(cfg, progress=False, log=lambda _: None, cluster=SimpleNamespace(base=cluster["base"]))
    json.dumps(res)  # the --json object is plain JSON
    for s in ("helios", "baseline", "plain"):
        r = res[s]
        assert r["completed"] == r["requests"] == 3 and r["failed"] == 0
        assert r["output_tokens"] == 3 * 8  # ignore_eos + max_tokens = 8 each
        assert r["tokens_scored"] == r["output_tokens"] > 0
        assert len(r["curve"]) == 1 and r["curve"][0]["completed"] == 2
        assert r["energy_j_per_token"] is None  # CPU: n/a
    # helios at the default guard keeps the full model for SmolLM2 (no exit reaches 90% agreement): exact.
    assert res["helios"]["depth"] == 30 and res["helios"]["agreement"] == 1.0
    assert res["plain"]["agreement"] >= 0.95  # generate() in a left-padded static batch: float noise only
    assert set(res["baseline"]["exit_layer_histogram"]) <= {"20", "24", "30"}
    assert res["baseline"]["token_exits"] == [20, 24]
    # Two block exit heads cost the baseline weights and KV: helios (same depth, no exit heads) holds more.
    assert res["helios"]["max_concurrency"] > res["baseline"]["max_concurrency"] > 0
    r = res["ratios"]
    for key in ("throughput_helios_vs_baseline", "tpot_p50_baseline_over_helios",
                "max_concurrency_helios_vs_baseline", "throughput_helios_vs_plain"):
        assert isinstance(r[key], float) and r[key] > 0
    assert "throughput_helios_vs_baseline" in format_table(res)
