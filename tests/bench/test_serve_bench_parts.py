"""The pure parts of ``bench serve``: the accuracy scorer, the memory arithmetic, the ratios, the CLI's errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helios_bench.serve_bench import Scorer, max_concurrency, ratios
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


@pytest.mark.parametrize("args, needle", [
    (["--systems", "helios,nope"], "systems"),
    (["--rates", "fast"], "--rates must be"),
    (["--edition", "1", "--model", "nope"], "unknown model 'nope'"),
    (["--candidates", "smollm2-135m,nope"], "unknown model 'nope'"),
    (["--model", "smollm2-135m"], "--model is the first edition's option"),
])
def test_cli_rejects_bad_options_without_a_traceback(args, needle):
    r = subprocess.run([sys.executable, "-m", "helios_ray.cli", "bench", "serve", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr
