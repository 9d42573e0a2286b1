"""The pure parts of ``bench serve`` and the bench harness: the accuracy scorer, the memory arithmetic, the ratios,
the small helpers, the CLI's errors."""

from __future__ import annotations

import pytest

from helios_bench.fleet_run import ratios
from helios_bench.harness import Scorer, max_concurrency, pct, ratio, stat
from helios_ray.engine.engine import EngineConfig, LLMEngine
from helios_ray.engine.sequence import SamplingParams
from loadgen.workloads import Request


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer("smollm2-135m")


def test_scorer_agrees_with_the_full_models_own_greedy_output(scorer):
    req = Request(id="0", kind="chat", prompt="", max_tokens=12,
                  messages=[{"role": "user", "content": "Name three colours."}])
    p = scorer.prompt_ids(req)
    eng = LLMEngine(scorer.m, EngineConfig(memory_budget=1 << 30))
    seq = eng.add_request(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    while eng.scheduler.has_work:
        eng.step()
    n, agree, logp = scorer.score(p, seq.output_ids)
    assert n == agree == 12 and logp < 0
    wrong = [t + 1 for t in seq.output_ids]  # every token changed: none can be the argmax
    n2, agree2, logp2 = scorer.score(p, wrong)
    assert n2 == 12 and agree2 == 0 and logp2 < logp


def test_max_concurrency_matches_the_engines_admission():
    from helios_ray.models.early_exit import load_model

    m = load_model("smollm2-135m", 20)
    budget = 1 << 30
    eng = LLMEngine(m, EngineConfig(memory_budget=budget, block_size=16))
    stats = {"weight_bytes": m.param_bytes, "kv_bytes_per_token": eng.layout.bytes_per_token}
    for seq_len in (100, 512, 640):
        assert max_concurrency(stats, budget, seq_len, 16) == eng.max_concurrent(seq_len)
    assert max_concurrency(stats, m.param_bytes, 512, 16) == 0


def test_ratios_are_helios_over_the_others():
    def sys_(tps: float, tpot: float, conc: int) -> dict:
        return {"output_throughput": tps, "tpot_ms": {"p50": tpot}, "ttft_ms": {"p50": 100.0}, "max_concurrency": conc}

    r = ratios({"helios": sys_(30, 50, 40), "baseline": sys_(20, 75, 10), "plain": sys_(15, 60, 10)})
    assert r["throughput_helios_vs_baseline"] == 1.5 and r["tpot_p50_baseline_over_helios"] == 1.5
    assert r["max_concurrency_helios_vs_baseline"] == 4.0 and r["throughput_helios_vs_plain"] == 2.0


def test_small_helpers():
    assert pct([3.0, None, 1.0, 2.0], 0.5) == 2.0 and pct([1.0, 2.0], 0.99) == 2.0  # a measured value, no blend
    assert pct([], 0.5) is None and pct([None], 0.5, 0.0) == 0.0
    assert stat({"ttft_ms": {"median": 12.3456}}, "ttft_ms", "median") == 12.35
    assert stat({"ttft_ms": None}, "ttft_ms", "median") is None and stat({}, "tpot_ms", "p99") is None
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0) is None


@pytest.mark.parametrize("args, needle", [
    (["--systems", "helios,nope"], "systems"),
    (["--rates", "fast"], "--rates must be"),
    (["--model", "nope"], "unknown model 'nope'"),  # the one-model preset checks its model before any cluster
    (["--candidates", "smollm2-135m,nope"], "unknown model 'nope'"),
    (["--model", "smollm2-135m", "--candidates", "gemma3-270m"], "not both"),
    (["--edition", "1"], "--edition is gone"),  # an argparse error now, from the bench's own parser
    (["--budget-mb", "512"], "--budgets tight,roomy"),
    (["--best-by", "fastest"], "invalid choice"),
])
def test_cli_rejects_bad_options_in_one_line(args, needle, capsys):
    from helios_ray.cli import main

    try:
        rc = main(["bench", "serve", *args])
    except SystemExit as e:  # argparse's errors exit; the benches' own return 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err
