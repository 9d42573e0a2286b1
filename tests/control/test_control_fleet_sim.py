"""Steering over groups replayed on the recorded real trace (tests/data/traces/chat_then_code.jsonl): the reported
numbers must equal a recount from the raw records, and the oracle must bound every single group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helios_ray.cli import main
from helios_ray.control.fleet_sim import parse_fleet, simulate_steering
from helios_ray.control.simulate import SimulationError
from helios_ray.control.trace import TraceRequest, TraceToken, read_trace

TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "chat_then_code.jsonl"
FLEET = [("smollm2-135m", 30), ("gemma3-270m", 18)]


@pytest.fixture(scope="module")
def records():
    return read_trace(TRACE)


def recount(records, model: str, depth: int, threshold: float = 0.9) -> dict[int, dict[str, float]]:
    """Per request: tokens, early, breaches, agree, exit layers and scaled seconds of one group, from scratch."""
    full = max(d for r in records if isinstance(r, TraceToken) and r.model == model for d in r.exits)
    out: dict[int, dict[str, float]] = {}
    for r in records:
        if isinstance(r, TraceToken) and r.model == model:
            c = out.setdefault(r.request, dict(tokens=0, early=0, breaches=0, agree=0, layers=0))
            exit_at = depth
            for d in sorted(r.exits):
                if d <= depth and r.exits[d].confidence >= threshold:
                    exit_at = d
                    break
            c["tokens"] += 1
            c["early"] += exit_at < full
            c["breaches"] += r.exits[exit_at].confidence < threshold
            c["agree"] += r.exits[exit_at].token == r.final
            c["layers"] += exit_at
    for r in records:
        if isinstance(r, TraceRequest) and r.model == model:
            c = out[r.request]
            c["seconds"] = r.seconds * (c["layers"] / c["tokens"]) / full
            c["kind"] = r.kind
    return out


def test_fleet_sim_numbers_equal_a_recount_of_the_real_trace(records):
    res = simulate_steering(records, FLEET, threshold=0.9, seed=0)
    per = {f"{m}@{d}": recount(records, m, d) for m, d in FLEET}
    requests = sorted(per["smollm2-135m@30"])
    assert res.requests == len(requests) == 40 and res.groups == list(per)
    for s in res.single:
        c = per[s.name]
        assert s.tokens == sum(c[q]["tokens"] for q in requests)
        assert s.early == sum(c[q]["early"] for q in requests)
        assert s.breaches == sum(c[q]["breaches"] for q in requests)
        assert s.agree == sum(c[q]["agree"] for q in requests)
        assert s.seconds == pytest.approx(sum(c[q]["seconds"] for q in requests))
        assert s.routed == {s.name: {"chat": 20, "code": 20}}
    # steering: the totals are the chosen group's numbers, request by request
    assert len(res.steered) == 40
    for key in ("tokens", "early", "breaches", "agree"):
        assert getattr(res.steering, key) == sum(per[g][q][key] for g, q in zip(res.steered, requests))
    routed: dict[str, dict[str, int]] = {}
    for g, q in zip(res.steered, requests):
        kinds = routed.setdefault(g, {})
        kinds[per[g][q]["kind"]] = kinds.get(per[g][q]["kind"], 0) + 1
    assert res.steering.routed == routed and sum(res.routes.values()) == 40
    assert 0 < res.mae["samples"] < 40 and 0 <= res.mae["breach_rate"] <= 1
    # the oracle takes, request by request, the most early exits: it bounds every single group
    assert res.oracle.early == sum(max(per[g][q]["early"] for g in per) for q in requests)
    for s in res.single:
        assert res.oracle.early >= s.early and res.oracle.early_share >= s.early_share
    best = max(res.single, key=lambda s: (s.early_share, s.confident_tokens_per_s))
    assert res.best_single == best.name
    assert res.delta_early == pytest.approx(res.steering.early_share - best.early_share)
    assert res.oracle_delta_early >= 0
    assert ("does not beat" in res.verdict) == (res.delta_early <= 0)


def test_fleet_sim_is_deterministic_and_learns_with_repeats(records):
    a = simulate_steering(records, FLEET, seed=3)
    assert a.steered == simulate_steering(records, FLEET, seed=3).steered
    long = simulate_steering(records, FLEET, seed=3, repeat=5)
    assert long.requests == 200 and long.single[0].tokens == 5 * a.single[0].tokens
    assert long.routes["predicted"] > a.routes["predicted"]  # trust is earned once the warm-up is behind


def test_fleet_sim_rejects_bad_groups(records):
    with pytest.raises(SimulationError, match="not a recorded exit"):
        simulate_steering(records, [("smollm2-135m", 17)])
    with pytest.raises(SimulationError, match="no token records"):
        simulate_steering(records, [("no-such-model", 4)])
    with pytest.raises(SimulationError, match="MODEL@DEPTH"):
        parse_fleet("smollm2-135m")
    assert parse_fleet("a@1, b-c@24") == [("a", 1), ("b-c", 24)]


def test_simulate_fleet_command(capsys):
    rc = main(["simulate", "--fleet", "smollm2-135m@30,gemma3-270m@18", str(TRACE), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["best_single"] in res["groups"] and res["single"][0]["early_share"] > 0
    rc = main(["simulate", "--fleet", "smollm2-135m@30,gemma3-270m@18", str(TRACE)])
    out, _ = capsys.readouterr()
    assert rc == 0 and "best single group:" in out and "oracle" in out and "verdict:" in out
    rc = main(["simulate", "--fleet", "smollm2-135m@31", str(TRACE)])
    _, err = capsys.readouterr()
    assert rc == 2 and "not a recorded exit" in err and len(err.strip().splitlines()) == 1
    rc = main(["simulate", "--slo", "throughput"])
    _, err = capsys.readouterr()
    assert rc == 2 and "give one trace" in err
