"""Policy rules with hand-made telemetry."""

from __future__ import annotations

import math

import pytest
from control_synth import token

from helios_ray.control import (
    PHT,
    SLO,
    CandidateInfo,
    CostModel,
    ExitPrior,
    Hardware,
    NoFeasiblePlacement,
    PolicyConfig,
    TraceRequest,
    choose,
    choose_depth,
    on_storm,
    shortlist,
)
from helios_ray.control.config import CalibrationPoint
from helios_ray.control.costs import cost_unit, max_batch, token_cost

BIG = Hardware(memory_budget_bytes=10**12)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fill(
    pht: PHT,
    model: str,
    exits: list[int],
    share: dict[int, float],
    agree: dict[int, float] | None = None,
    *,
    n: int = 100,
    disagree_logprob: float | None = None,
) -> None:
    """n profiled tokens: token i is confident at exit d iff i < share[d] * n (so the share of
    tokens confident by d is exactly share[d]) and agrees at d iff i < agree[d] * n."""
    agree = agree or {}
    for i in range(n):
        ex: dict[int, tuple[int, float] | tuple[int, float, float]] = {}
        for d in exits:
            confident = i < round(share.get(d, 0.0) * n)
            agrees = i < round(agree.get(d, 1.0) * n)
            conf = 0.95 if confident else 0.5
            if agrees:
                ex[d] = (7, conf)
            elif disagree_logprob is not None:
                ex[d] = (8, conf, disagree_logprob)
            else:
                ex[d] = (8, conf)
        pht.observe_token(token(model, 0, i, ex, final=7, final_logprob=-0.5), depth=max(exits))


def cand(name: str, layers: int = 30, exits: list[int] | None = None, **kw: object) -> CandidateInfo:
    return CandidateInfo(name=name, num_layers=layers, exits=exits or [], **kw)  # type: ignore[arg-type]


def timed(pht: PHT, model: str, depth: int, tokens_per_s: float, n: int = 3) -> None:
    for i in range(n):
        pht.observe_request(
            TraceRequest(model=model, request=i, output_tokens=100, seconds=100 / tokens_per_s),
            depth=depth,
        )


# --------------------------------------------------------------------------- depth choice
EXITS = [12, 16, 20, 24, 30]
ALPHA = cand("alpha", 30, [12, 16, 20, 24], flops_per_token_per_layer=10, head_flops_per_token=5)


def test_depth_is_the_smallest_meeting_exit_share() -> None:
    pht = PHT()
    fill(pht, "alpha", EXITS, {12: 0.1, 16: 0.4, 20: 0.6, 24: 0.8, 30: 0.9})
    entry = pht.get("alpha", 30)
    assert choose_depth(ALPHA, entry, PolicyConfig()).depth == 20
    assert choose_depth(ALPHA, entry, PolicyConfig(exit_share=0.35)).depth == 16
    assert choose_depth(ALPHA, entry, PolicyConfig(exit_share=0.6)).depth == 20  # >= is enough
    assert choose_depth(ALPHA, entry, PolicyConfig(exit_share=0.85)).depth == 30
    choice = choose_depth(ALPHA, entry, PolicyConfig())
    assert choice.exit_share == pytest.approx(0.6) and choice.evidence == "pht"


def test_accuracy_guard_rejects_a_fast_but_wrong_depth() -> None:
    pht = PHT()
    fill(pht, "alpha", EXITS, {12: 0.1, 16: 0.8, 20: 0.9, 24: 0.95}, {12: 0.3, 16: 0.6, 20: 0.95})
    entry = pht.get("alpha", 30)
    choice = choose_depth(ALPHA, entry, PolicyConfig())
    assert choice.depth == 20 and choice.agreement == pytest.approx(0.95)
    # The same data without the guard would take 16: the guard is what moved it.
    assert choose_depth(ALPHA, entry, PolicyConfig(min_agreement=0.5)).depth == 16
    decision = choose([ALPHA], SLO.THROUGHPUT, BIG, pht, PolicyConfig())
    assert (decision.model, decision.depth) == ("alpha", 20)
    assert decision.numbers["agreement"] == pytest.approx(0.95)


def test_perplexity_guard_applies_when_logprobs_are_known() -> None:
    pht = PHT()
    # 92% agreement at 16 passes the agreement guard, but the 8% wrong tokens are very unlikely
    # under the full model: perplexity rises far beyond +10%.
    fill(
        pht, "alpha", EXITS, {16: 0.8, 20: 0.9, 24: 0.95}, {12: 0.3, 16: 0.92, 20: 0.99},
        disagree_logprob=-6.0,
    )  # fmt: skip
    entry = pht.get("alpha", 30)
    assert entry is not None
    assert entry.ppl_increase(16) is not None and entry.ppl_increase(16) > 0.1  # type: ignore[operator]
    assert choose_depth(ALPHA, entry, PolicyConfig()).depth == 20
    assert choose_depth(ALPHA, entry, PolicyConfig(max_ppl_increase=10.0)).depth == 16


def test_the_guard_can_check_task_quality_instead_of_agreement() -> None:
    """Agreement overstates code quality: with guard_metric pass_at_1 a depth whose tokens agree 95% but whose
    programs pass 10 points less is refused, and one that loses <= 2 points is taken."""
    cal = [CalibrationPoint(threshold=0.9, coverage=0.7, agreement=0.99)]
    c = cand("coder", 24, [20, 22], exit_prior={
        20: ExitPrior(agreement=0.95, calibration=cal, pass_at_1_drop=0.10),
        22: ExitPrior(agreement=0.97, calibration=cal, pass_at_1_drop=0.02),
    })
    assert choose_depth(c, None, PolicyConfig()).depth == 20  # agreement alone takes 20
    quality = PolicyConfig(guard_metric="pass_at_1")
    choice = choose_depth(c, None, quality)
    assert choice.depth == 22 and "pass@1 drop +0.020" in choice.reason
    strict = choose_depth(c, None, quality.model_copy(update={"max_pass_at_1_drop": 0.0}))
    assert strict.depth == 24 and "20: pass@1 drop 0.100 > max_pass_at_1_drop 0.0;" in strict.reason
    # not measured: the quality guard refuses the depth rather than guessing
    unmeasured = cand("coder", 24, [22], exit_prior={22: ExitPrior(agreement=0.97, calibration=cal)})
    assert choose_depth(unmeasured, None, quality).depth == 24
    with pytest.raises(ValueError):
        PolicyConfig(guard_metric="bleu")  # type: ignore[arg-type]


def test_unknown_evidence_falls_back_to_full_depth_unless_optimistic() -> None:
    choice = choose_depth(ALPHA, None, PolicyConfig())
    assert (choice.depth, choice.evidence, choice.agreement) == (30, "full", 1.0)
    assert "agreement with the full model unknown" in choice.reason
    assert choose_depth(ALPHA, None, PolicyConfig(), optimistic=True).depth == 12


def test_too_few_samples_are_not_trusted() -> None:
    pht = PHT()
    fill(pht, "alpha", EXITS, {12: 0.9, 16: 0.9}, n=20)
    entry = pht.get("alpha", 30)
    assert choose_depth(ALPHA, entry, PolicyConfig(min_samples=32)).depth == 30
    assert choose_depth(ALPHA, entry, PolicyConfig(min_samples=20)).depth == 12


def test_exit_card_priors_are_used_without_history() -> None:
    with_prior = ALPHA.model_copy(
        update={
            "exit_prior": {
                16: ExitPrior(agreement=0.8),  # fails the guard
                20: ExitPrior(
                    agreement=0.95,
                    calibration=[CalibrationPoint(threshold=0.9, coverage=0.55, agreement=0.99)],
                ),
            }
        }
    )
    choice = choose_depth(with_prior, None, PolicyConfig())
    assert (choice.depth, choice.evidence, choice.exit_share) == (20, "prior", 0.55)
    assert choose_depth(with_prior, None, PolicyConfig(exit_share=0.6)).depth == 30


def test_share_is_unknown_when_profiled_at_another_threshold() -> None:
    pht = PHT(threshold=0.5)  # every token of fill() is "confident" at 0.5
    fill(pht, "alpha", EXITS, {12: 0.1, 16: 0.1, 20: 0.1, 24: 0.1})
    entry = pht.get("alpha", 30)
    assert entry is not None and entry.exit_share(12) == 1.0
    assert choose_depth(ALPHA, entry, PolicyConfig(confidence_threshold=0.9)).depth == 30


# --------------------------------------------------------------------------- shortlist
def test_shortlist_ties_are_broken_by_name_whatever_the_input_order() -> None:
    pool = [cand(n, 24) for n in ("delta", "bravo", "alpha", "charlie")]
    cfg = PolicyConfig(top_k=3)
    for order in (pool, list(reversed(pool))):
        names = [c.name for c in shortlist(order, SLO.THROUGHPUT, BIG, None, cfg)]
        assert names == ["alpha", "bravo", "charlie"]
    assert choose(list(reversed(pool)), "latency", BIG, None, cfg).model == "alpha"


def test_shortlist_excludes_candidates_that_do_not_fit() -> None:
    small = cand("small", 24, layer_bytes=10, kv_bytes_per_token_per_layer=1)
    huge = cand("a-huge", 24, layer_bytes=10**9, kv_bytes_per_token_per_layer=1)
    hw = Hardware(memory_budget_bytes=10**6)
    assert [c.name for c in shortlist([huge, small], SLO.BATCH_SIZE, hw, None, PolicyConfig())] == [
        "small"
    ]
    with pytest.raises(NoFeasiblePlacement):
        choose([huge], SLO.THROUGHPUT, hw, None, PolicyConfig())


def test_shortlist_checks_fit_at_the_minimum_useful_depth() -> None:
    # Fits only when truncated to 12 layers: worth profiling, though choose() may not use it yet.
    c = cand("deep", 30, [12], layer_bytes=1000, kv_bytes_per_token_per_layer=0)
    hw = Hardware(memory_budget_bytes=20_000)
    assert [x.name for x in shortlist([c], SLO.THROUGHPUT, hw, None, PolicyConfig())] == ["deep"]
    with pytest.raises(NoFeasiblePlacement):
        choose([c], SLO.THROUGHPUT, hw, None, PolicyConfig())  # unverified 12 -> full 30 -> no fit


def test_measured_history_overrides_static_ranking() -> None:
    a, b = cand("a", 24), cand("b", 24)
    pht = PHT()
    timed(pht, "a", 24, 10.0)
    timed(pht, "b", 24, 20.0)
    assert [c.name for c in shortlist([a, b], SLO.THROUGHPUT, BIG, pht, PolicyConfig())] == ["b", "a"]
    decision = choose([a, b], SLO.LATENCY, BIG, pht, PolicyConfig())
    assert decision.model == "b" and decision.numbers["basis"] == "measured"
    assert decision.numbers["seconds_per_token"] == pytest.approx(0.05)


def test_measurements_are_not_mixed_with_static_estimates() -> None:
    a, b = cand("a", 24), cand("b", 24)
    pht = PHT()
    timed(pht, "b", 24, 1000.0)  # only b measured: compare statically, a wins the tie by name
    decision = choose([a, b], SLO.THROUGHPUT, BIG, pht, PolicyConfig())
    assert decision.model == "a" and decision.numbers["basis"] == "static"


def test_stale_history_is_ignored_and_flagged() -> None:
    clock = FakeClock(0.0)
    a, b = cand("a", 24), cand("b", 24)
    pht = PHT(stale_after_s=600)
    pht.set_clock(clock)
    timed(pht, "a", 24, 10.0)
    timed(pht, "b", 24, 20.0)
    assert choose([a, b], SLO.THROUGHPUT, BIG, pht, PolicyConfig()).model == "b"
    clock.now = 601.0
    decision = choose([a, b], SLO.THROUGHPUT, BIG, pht, PolicyConfig())
    assert decision.model == "a" and decision.numbers["basis"] == "static"
    assert decision.numbers["stale_ignored"] == "a@24,b@24"
    assert "ignored stale history" in decision.reason


def test_stale_profile_does_not_justify_a_shallow_depth() -> None:
    clock = FakeClock(0.0)
    pht = PHT(stale_after_s=600)
    pht.set_clock(clock)
    fill(pht, "alpha", EXITS, {12: 0.9})
    assert choose([ALPHA], SLO.THROUGHPUT, BIG, pht, PolicyConfig()).depth == 12
    clock.now = 10_000.0
    assert choose([ALPHA], SLO.THROUGHPUT, BIG, pht, PolicyConfig()).depth == 30


def test_serving_timings_do_not_refresh_an_old_profile() -> None:
    clock = FakeClock(0.0)
    pht = PHT(stale_after_s=600)
    pht.set_clock(clock)
    fill(pht, "alpha", EXITS, {12: 0.9})
    clock.now = 10_000.0
    timed(pht, "alpha", 30, 10.0)  # the full-depth entry is fresh again, its profile is not
    entry = pht.get("alpha", 30)
    assert entry is not None and entry.exits
    decision = choose([ALPHA], SLO.THROUGHPUT, BIG, pht, PolicyConfig())
    assert decision.depth == 30 and decision.numbers["stale_ignored"] == "alpha@30"
    assert decision.numbers["basis"] == "measured"  # the timings themselves are used


# --------------------------------------------------------------------------- SLO scores
def _slo_pair() -> list[CandidateInfo]:
    # x: cheap per token, fat KV cache (small batch); y: 1.5x the work per token, thin KV.
    x = cand("x", 10, flops_per_token_per_layer=10, layer_bytes=10**7,
             kv_bytes_per_token_per_layer=10_000)  # fmt: skip
    y = cand("y", 10, flops_per_token_per_layer=15, layer_bytes=10**7,
             kv_bytes_per_token_per_layer=100)  # fmt: skip
    return [x, y]


@pytest.mark.parametrize(
    ("slo", "winner"),
    [("throughput", "y"), ("latency", "x"), ("energy", "x"), ("batch_size", "y")],
)
def test_each_slo_has_its_own_winner(slo: str, winner: str) -> None:
    hw = Hardware(memory_budget_bytes=10**9)
    x, y = _slo_pair()
    assert max_batch(x, 10, hw, PolicyConfig()) == (10**9 - 10**8) // (10 * 10_000 * 1024)
    decision = choose([x, y], slo, hw, None, PolicyConfig())
    assert decision.model == winner, decision.reason
    assert decision.slo == SLO(slo)


def test_batch_size_grows_with_truncation() -> None:
    c = cand("m", 30, [15], layer_bytes=10**6, kv_bytes_per_token_per_layer=1000)
    hw = Hardware(memory_budget_bytes=10**8)
    cfg = PolicyConfig(typical_seq_len=100)
    assert max_batch(c, 15, hw, cfg) == (10**8 - 15 * 10**6) // (15 * 1000 * 100)
    assert max_batch(c, 15, hw, cfg) > max_batch(c, 30, hw, cfg)


def test_cost_unit_falls_back_from_flops_to_bytes_to_layers() -> None:
    f = cand("f", 10, flops_per_token_per_layer=3, head_flops_per_token=4, layer_bytes=5)
    b = cand("b", 10, layer_bytes=5, head_bytes=7)
    n = cand("n", 10)
    assert cost_unit([f]) == "flops" and token_cost(f, 10, "flops") == 34
    assert cost_unit([f, b]) == "bytes" and token_cost(b, 10, "bytes") == 57
    assert cost_unit([f, b, n]) == "layers" and token_cost(n, 7, "layers") == 7


# --------------------------------------------------------------------------- storms
BETA = cand("beta", 24, [16], flops_per_token_per_layer=12, head_flops_per_token=6)


def _storm_pht(agree_24: float = 0.95) -> PHT:
    pht = PHT()
    fill(pht, "alpha", EXITS, {20: 0.7, 24: 0.9}, {12: 0.3, 16: 0.5, 20: 0.95, 24: agree_24})
    fill(pht, "beta", [16, 24], {16: 0.8, 24: 0.9}, {16: 0.95})
    return pht


def test_extend_or_switch_follows_the_cheaper_cost_model() -> None:
    pht = _storm_pht()
    cfg = PolicyConfig()
    per_layer = {"alpha": 0.001, "beta": 0.001}
    # Long horizon, cheap switch: beta@16 runs 16 layers/token instead of alpha@24's 24.
    cheap_switch = CostModel(horizon_tokens=2000, seconds_per_layer_token=per_layer)
    d = on_storm("alpha", 20, [ALPHA, BETA], pht, cheap_switch, cfg)
    assert (d.action, d.model, d.depth) == ("switch", "beta", 16)
    assert d.numbers["switch[beta@16]_cost_s"] == pytest.approx(2 + 16 * 0.05 + 2000 * 16 * 0.001)
    assert d.numbers["extend_cost_s"] == pytest.approx(4 * 0.05 + 2000 * 24 * 0.001)
    # Expensive switch (e.g. a big model to fetch): extending the loaded model is cheaper.
    dear_switch = CostModel(
        horizon_tokens=2000, seconds_per_layer_token=per_layer, switch_seconds={"beta": 100.0}
    )
    d = on_storm("alpha", 20, [ALPHA, BETA], pht, dear_switch, cfg)
    assert (d.action, d.model, d.depth) == ("extend", "alpha", 24)
    assert d.previous_model == "alpha" and d.previous_depth == 20 and d.trigger == "storm"
    # Short horizon: only load time matters, and 4 layers load faster than a switch.
    d = on_storm("alpha", 20, [ALPHA, BETA], pht, CostModel(horizon_tokens=0), cfg)
    assert d.action == "extend"


def test_extend_skips_exits_that_fail_the_guard() -> None:
    pht = _storm_pht(agree_24=0.6)
    d = on_storm("alpha", 20, [ALPHA], pht, CostModel(), PolicyConfig())
    assert (d.action, d.depth) == ("extend", 30)
    assert "24: agreement 0.600" in str(d.numbers["extend_skipped"])


def test_storm_at_full_depth_without_a_better_candidate_keeps() -> None:
    pht = _storm_pht()
    d = on_storm("alpha", 30, [ALPHA], pht, CostModel(), PolicyConfig())
    assert (d.action, d.model, d.depth) == ("keep", "alpha", 30)
    assert "already at full depth" in d.reason
    # beta is profiled as 80% confident by 16: better than the 40% confident seen now.
    d = on_storm("alpha", 30, [ALPHA, BETA], pht, CostModel(), PolicyConfig(), breach_rate=0.6)
    assert (d.action, d.model) == ("switch", "beta")
    # ... but not better than 90% confident now.
    d = on_storm("alpha", 30, [ALPHA, BETA], pht, CostModel(), PolicyConfig(), breach_rate=0.1)
    assert d.action == "keep"


def test_switch_targets_must_fit_memory() -> None:
    pht = _storm_pht()
    fat_beta = BETA.model_copy(update={"layer_bytes": 10**9})
    hw = Hardware(memory_budget_bytes=10**8)
    costs = CostModel(seconds_per_layer_token={"alpha": 0.001, "beta": 0.001})
    d = on_storm("alpha", 20, [ALPHA, fat_beta], pht, costs, PolicyConfig(), hardware=hw)
    assert d.action == "extend"
    assert d.numbers["switch[beta@16]_skipped"] == "does not fit memory"


def test_measured_timings_set_the_per_layer_cost() -> None:
    pht = _storm_pht()
    timed(pht, "alpha", 30, tokens_per_s=10.0)  # 0.1 s/token over 30 layers
    d = on_storm("alpha", 20, [ALPHA], pht, CostModel(horizon_tokens=100), PolicyConfig())
    assert d.numbers["extend_layer_s"] == pytest.approx(0.1 / 30)
    assert d.numbers["extend_layer_s_source"] == "measured TPOT"
    assert d.numbers["extend_cost_s"] == pytest.approx(4 * 0.05 + 100 * 24 * 0.1 / 30)


def test_storm_for_an_unknown_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="not among the candidates"):
        on_storm("ghost", 10, [ALPHA], None, None, PolicyConfig())


def test_scores_are_finite_or_minus_infinity() -> None:
    d = choose([ALPHA, BETA], SLO.THROUGHPUT, BIG, None, PolicyConfig())
    assert math.isfinite(float(d.numbers["score"]))  # type: ignore[arg-type]
