"""``helios-ray bench serve``: the one-model preset (``--model M``) end to end, small, on the session's cluster (two
systems deployed one after the other behind the same API on a chat-then-code workload, every generated token
scored under the full model, ratios computed); the pure parts (mixed workload, budgets, concurrency arithmetic,
ratios, routing timeline, table and plot) as fast unit tests."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


@pytest.mark.slow
def test_bench_serve_one_model_end_to_end(cluster):
    """The one-model preset (``--model smollm2-135m``: helios vs the model at full depth with token exits) on a
    small mixed workload - chats, then one code task in the second phase - so one run covers what the bench does
    end to end: deploy each system behind the same API, drive it, score every token under the full model per class
    (pass@1 for the code), the sweep, the routing timeline across the shift, the ratios and the table.  Two
    deployments: the third system, plain ``generate()``, is served end to end by tests/serve/test_baselines.py and
    its ratios are arithmetic (tests/bench)."""
    from helios_bench.fleet_report import format_table
    from helios_bench.fleet_run import bench_fleet
    from helios_bench.fleet_serve import FleetBenchConfig, one_model

    cfg = FleetBenchConfig(**{**one_model("smollm2-135m"), "systems": ["single", "helios"], "chat_share_second": 0.5},
                           requests=4, concurrency=3, max_prompt_tokens=128, chat_output_cap=8, code_max_tokens=8,
                           rates=[4.0], sweep_requests=2, warmup_requests=0, budgets=["tight"])
    res = bench_fleet(cfg, progress=False, log=lambda _: None, cluster=SimpleNamespace(base=cluster["base"]))
    json.dumps(res)  # the --json object is plain JSON
    assert res["workload"]["phases"] == [{"chat": 2, "code": 0}, {"chat": 1, "code": 1}]
    assert res["best_single_model"] == "smollm2-135m" and list(res["best_single"]) == ["smollm2-135m"]
    assert "plain" not in res and res["budgets"]["tight_mb"] < 400
    for s in ("helios", "baseline"):
        r = res[s]
        assert r["completed"] == r["requests"] == 4 and r["failed"] == 0
        assert r["output_tokens"] == 4 * 8  # ignore_eos + max_tokens = 8 each
        assert r["tokens_scored"] > 0 and set(r["per_class"]) == {"chat", "code"}
        assert r["per_class"]["code"]["problems"] == 1 and r["per_class"]["chat"]["tokens_scored"] > 0
        assert len(r["curve"]) == 1 and r["curve"][0]["completed"] == 2
        assert r["energy_j_per_token"] is None  # CPU: n/a
        assert r["model"] == "smollm2-135m" and r["served_by_model"] == {"smollm2-135m": {"chat": 3, "code": 1}}
        assert r["replicas"][0]["model"] == "smollm2-135m" and r["replicas"][0]["weight_bytes"] > 0
    assert [res[s]["mode"] for s in ("helios", "baseline")] == ["helios", "early_exit"]
    # helios at the default guard keeps the full model for SmolLM2 (no exit reaches 90% agreement): exact.
    assert res["helios"]["depth"] == 30 and res["helios"]["per_class"]["chat"]["agreement"] == 1.0
    assert set(res["baseline"]["exit_layer_histogram"]) <= {"20", "24", "30"}
    assert res["baseline"]["token_exits"] == [20, 24]
    # Two block exit heads cost the baseline weights and KV: helios (same depth, no exit heads) holds more.
    assert res["helios"]["max_concurrency"] > res["baseline"]["max_concurrency"] > 0
    r = res["ratios"]
    for key in ("throughput_helios_vs_baseline", "tpot_p50_baseline_over_helios",
                "max_concurrency_helios_vs_baseline"):
        assert isinstance(r[key], float) and r[key] > 0
    assert r["throughput_helios_vs_best_single"] == r["throughput_helios_vs_baseline"]  # one model: the same pair
    assert sorted(row[3] for row in res["routing_timeline"]["rows"]) == [0, 0, 1, 1]  # before / after the shift
    table = format_table(res)
    assert "throughput_helios_vs_baseline" in table and "helios (fleet)" in table


def test_the_one_model_preset_is_the_current_bench_on_chats():
    from helios_bench.fleet_serve import FleetBenchConfig, one_model

    cfg = FleetBenchConfig(**one_model("gemma3-270m"))
    assert cfg.candidates == ["gemma3-270m"] and cfg.chat_share_first == cfg.chat_share_second == 1.0


# ------------------------------------------------------------------------------------------ the parts
def test_mixed_workload_shifts_from_chat_to_code():
    from helios_bench.fleet_run import spread
    from helios_bench.fleet_workload import describe, mixed_requests, phase_counts

    assert phase_counts(8, 0.75, 0.25) == [(3, 1), (1, 3)]
    assert phase_counts(7, 1.0, 0.0) == [(3, 0), (0, 4)]
    kw = dict(max_prompt_tokens=256, chat_output_cap=16, code_max_tokens=24)
    reqs = mixed_requests(12, 3, **kw)
    assert describe(reqs)["phases"] == [{"chat": 4, "code": 2}, {"chat": 2, "code": 4}]
    assert [r.id for r in reqs] == [str(i) for i in range(12)]
    for r in reqs:
        assert r.meta["phase"] == (0 if int(r.id) < 6 else 1)
        assert r.prompt_tokens <= 256
        if r.kind == "code":  # completion-style, with what pass@1 needs
            assert r.messages is None and r.max_tokens == 24 and r.meta["test"] and r.meta["entry_point"]
        else:
            assert r.kind == "chat" and r.messages and r.max_tokens <= 16
    again = mixed_requests(12, 3, **kw)
    assert [(r.source, r.kind) for r in again] == [(r.source, r.kind) for r in reqs]  # seeded
    warm = mixed_requests(4, 3, offset=12, **kw)
    assert not {r.source for r in warm} & {r.source for r in reqs}
    sub = spread(reqs, 4)
    assert [r.id for r in sub] == ["0", "3", "6", "9"] and {r.meta["phase"] for r in sub} == {0, 1}


def test_budgets_and_concurrency_arithmetic():
    from helios_bench.fleet_serve import FleetBenchConfig, budget_plan, concurrency

    cfg = FleetBenchConfig(candidates=["smollm2-135m", "gemma3-270m"], tight_headroom_mb=32)
    plan = budget_plan(cfg, "bfloat16")
    per = plan["candidates"]
    assert plan["largest_weight_bytes"] == max(v["early_exit_weight_bytes"] for v in per.values())
    assert per["smollm2-135m"]["token_exits"] == [20, 24]  # the baseline's heads count against the budget
    assert per["smollm2-135m"]["early_exit_weight_bytes"] > per["smollm2-135m"]["weight_bytes"]
    assert 0 <= plan["tight_mb"] * 2**20 - plan["largest_weight_bytes"] - (32 << 20) < 2**20
    assert plan["roomy_mb"] > plan["tight_mb"] and plan["sweep_mb"][0] == plan["tight_mb"]
    reps = [{"model": "a", "depth": 30, "weight_bytes": 100 << 20, "kv_bytes_per_token": 1024},
            {"model": "b", "depth": 18, "weight_bytes": 300 << 20, "kv_bytes_per_token": 2048}]
    mc = concurrency(reps, 400 << 20, 1000, 16)
    # a: (400 - 100) MiB / 16 KiB blocks = 19200 blocks, 63 blocks per 1000 tokens -> 304; b: 100 MiB -> 3200 // 63
    assert mc["total"] == 19200 // 63 + 3200 // 63 and len(mc["arithmetic"]) == 2
    assert concurrency(reps, 200 << 20, 1000, None)["total"] == (100 << 20) // (1024 * 1000)  # b does not fit


def test_ratios_against_the_best_single_model():
    from helios_bench.fleet_run import pick_best, vs_best

    def s(tps, tpot, mc, p1, by_mb=None):
        return {"completed": 1, "output_throughput": tps, "tpot_ms": {"p50": tpot}, "max_concurrency": mc,
                "pass_at_1": p1, "max_concurrency_by_budget_mb": by_mb or {}}

    singles = {"a": s(10.0, 50.0, 4, 0.1), "b": s(8.0, 40.0, 2, 0.3)}
    assert pick_best(singles, "throughput") == "a" and pick_best(singles, "tpot") == "b"
    r = vs_best(s(16.0, 25.0, 16, 0.05), singles["a"])
    assert r == {"throughput_helios_vs_best_single": 1.6, "tpot_p50_best_single_over_helios": 2.0,
                 "max_concurrency_helios_vs_best_single": 4.0, "pass_at_1_delta": -0.05, "measured": True}
    only = vs_best(s(1.0, 1.0, 1, None, {"900": 30}), s(1.0, 1.0, 1, None, {"900": 10}), 900)
    assert only["max_concurrency_helios_vs_best_single"] == 3.0 and only["measured"] is False
    assert only["throughput_helios_vs_best_single"] is None and vs_best(None, singles["a"])["pass_at_1_delta"] is None


def test_routing_timeline_table_and_plot(tmp_path):
    from helios_bench.fleet_report import format_table, plot_combined
    from helios_bench.fleet_run import routing_timeline
    from loadgen.metrics import RequestRecord
    from loadgen.workloads import Request

    wl = [Request(id=str(i), kind="chat" if i < 2 else "code", prompt="p", max_tokens=4, meta={"phase": i // 2})
          for i in range(4)]
    recs = [RequestRecord(index=i, id=str(i), kind=wl[i].kind, start_s=float(i), success=True,
                          model="m1" if i % 2 else "m2") for i in range(4)]
    tl = routing_timeline(recs, wl)
    assert tl["split_by_phase"] == {"0": {"chat": {"m2": 1, "m1": 1}}, "1": {"code": {"m2": 1, "m1": 1}}}
    assert tl["rows"][2] == [2.0, "code", "m2", 1]

    def sysres(model, tps):
        return {"model": model, "replicas": [{"model": model, "depth": 30, "token_exits": None}],
                "output_throughput": tps, "ttft_ms": {"p50": 1.0, "p99": 2.0}, "tpot_ms": {"p50": 3.0, "p99": 4.0},
                "max_concurrency": 5, "pass_at_1": 0.5, "energy_j_per_token": None, "completed": 4, "requests": 4,
                "per_class": {"chat": {"output_throughput": 1.0, "agreement": 1.0, "perplexity": 1.5},
                              "code": {"passed": 1, "problems": 2}},
                "served_by_model": {model: {"chat": 2}}, "exit_share_by_model": {model: {"30": 1.0}},
                "max_concurrency_arithmetic": ["x"], "max_concurrency_by_budget_mb": {"600": 5},
                "curve": [{"rate": 1.0, "output_throughput": tps, "tpot_median": 3.0, "ttft_median": 1.0}]}

    res = {"budgets": {"tight_mb": 600, "roomy_mb": 1600, "dtype": "bfloat16", "rule": "r"}, "headline_budget": "tight",
           "config": {"best_by": "throughput"}, "helios": sysres("m1+m2", 9.0), "baseline": sysres("m1", 8.0),
           "best_single": {"m1": sysres("m1", 8.0)}, "best_single_model": "m1", "plain": sysres("m1", 4.0),
           "ratios": {"throughput_helios_vs_best_single": 1.125}, "ratios_roomy": {"measured": False},
           "max_concurrency_sweep": {"helios": {"600": 5}}, "routing_timeline": tl, "wall_s": 1.0}
    text = format_table(res)
    assert "throughput_helios_vs_best_single: 1.125" in text and "single m1 *" in text and "pass@1" in text
    png = plot_combined(res, tmp_path / "b.png")
    assert png.stat().st_size > 1000


def test_quality_scores_each_answer_under_its_serving_model_and_runs_the_tests():
    """Fake scorers (no weights): per class, per serving model, HumanEval pass@1 through the real sandbox, the
    stop sequences applied, identical answers scored once."""
    from types import SimpleNamespace as NS

    from helios_bench.quality import Scorers, score_records
    from helios_data import load_humaneval
    from loadgen.metrics import RequestRecord
    from loadgen.workloads import Request

    prob = load_humaneval(limit=1)[0]
    solution = prob.meta["canonical_solution"]
    wl = [Request(id="0", kind="chat", prompt="hi", max_tokens=2, messages=[{"role": "user", "content": "hi"}]),
          Request(id="1", kind="code", prompt=prob.text, max_tokens=2,
                  meta={"task_id": prob.id, "test": prob.meta["test"], "entry_point": prob.meta["entry_point"]})]
    calls = []

    def fake(model, agree_all):
        def score(prompt, out):
            calls.append(model)
            return len(out), len(out) if agree_all else 0, -0.1 * len(out)
        texts = {(1, 2): solution + "\ndef unrelated():\n    return 1/0\n", (3, 4): "    return True\n"}
        return NS(prompt_ids=lambda req: [0], score=score,
                  m=NS(tokenizer=NS(decode=lambda ids, skip_special_tokens=True: texts[tuple(ids)])))

    sc = Scorers(timeout=20)
    sc.by_model = {"a": fake("a", True), "b": fake("b", False)}
    rec = lambda i, model, ids: RequestRecord(index=i, id=str(i), kind=wl[i].kind, success=True, model=model,  # noqa
                                              output_tokens=2, token_ids=ids, exit_layers=[30, 20])
    q = score_records(sc, wl, [rec(0, "a", [1, 2]), rec(1, "a", [1, 2]), rec(1, "b", [3, 4]), rec(1, "a", [1, 2])],
                      "a")
    assert q["per_class"]["code"]["problems"] == 3 and q["per_class"]["code"]["passed"] == 2  # the stop cut the 1/0
    assert q["per_class"]["code"]["pass_at_1"] == round(2 / 3, 4)
    assert q["per_class"]["chat"]["agreement"] == 1.0 and q["per_class"]["code"]["agreement"] == round(4 / 6, 4)
    assert q["served_by_model"] == {"a": {"chat": 1, "code": 2}, "b": {"code": 1}}
    assert q["exit_share_by_model"]["a"] == {"20": 0.5, "30": 0.5}
    assert sorted(calls) == ["a", "a", "b"]  # the repeated answer of model a to request 1 was scored once


def test_cli_rejects_bad_options_before_any_cluster_starts():
    from helios_ray.cli import main

    assert main(["bench", "serve", "--rates", "1,x"]) == 2
    assert main(["bench", "serve", "--budgets", "tight,huge"]) == 2
    assert main(["bench", "serve", "--model", "smollm2-135m", "--rates", "x"]) == 2  # the preset: the same checks
