"""The policy on recorded real telemetry: tests/data/traces/chat_then_code.jsonl holds profile-mode records of
SmolLM2-135M and Gemma 3 270M on 20 held-out ShareGPT chats then 20 HumanEval prompts (16 tokens each,
recorded by scripts/record_traces.py)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from helios_ray.control import SLO, Controller, Hardware, PolicyConfig, read_trace, simulate
from helios_ray.control.controller import Placement
from helios_ray.control.trace import TraceToken

TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "chat_then_code.jsonl"
MODELS = ["smollm2-135m", "gemma3-270m"]


@pytest.fixture(scope="module")
def records():
    return read_trace(TRACE)


@pytest.fixture(scope="module")
def candidates():
    from helios_ray.tuning.profiling import candidate_info
    from helios_ray.models.repository import ModelRepository

    repo = ModelRepository()
    return [candidate_info(repo, n) for n in MODELS]


def test_trace_is_real_and_complete(records):
    toks = [r for r in records if isinstance(r, TraceToken)]
    assert {r.model for r in toks} == set(MODELS)
    assert {r.kind for r in toks} == {"chat", "code"}
    # every token carries the full depth as an exit, and the full depth agrees with the final layer
    for r in toks:
        full = max(r.exits)
        assert r.exits[full].token == r.final


def test_decisions_are_deterministic(records, candidates):
    a = simulate(records, SLO("throughput"), PolicyConfig(), candidates=candidates)
    b = simulate(records, SLO("throughput"), PolicyConfig(), candidates=candidates)
    strip = lambda res: [d.model_dump(exclude={"numbers"}) for d in res.decisions]  # noqa: E731
    assert strip(a) == strip(b) and a.decisions


def test_stable_real_workload_triggers_no_change_over_1000_requests(records, candidates):
    """Real chat telemetry cycled to 1,000 requests.  At threshold 0.9 both models breach on >80% of tokens even
    at full depth, so storms do come - and the policy must answer them with keep, not ping-pong switches."""
    chat = [r for r in records if r.kind == "chat"]
    reqs = sorted({r.request for r in chat})
    by_req = collections.defaultdict(list)
    for r in chat:
        by_req[r.request].append(r)
    stable = [r.model_copy(update={"request": n}) for n in range(1000) for r in by_req[reqs[n % len(reqs)]]]
    res = simulate(stable, SLO("throughput"), PolicyConfig(), candidates=candidates)
    actions = collections.Counter(d.action for d in res.decisions)
    assert actions["extend"] == 0 and actions["switch"] == 0, actions
    assert any(d.trigger == "storm" for d in res.decisions)  # the storms were real, and were kept


def test_easy_to_hard_shift_on_real_telemetry_triggers_a_change_within_the_window(records, candidates):
    """Gemma 3 at 13 layers with threshold 0.5: real requests whose breach rate there is low (easy) are served
    first, then real requests whose breach rate is high (hard).  Placement pinned as an operator would; the
    Controller then sees the served confidences token by token, exactly as the router feeds it."""
    model, depth, threshold = "gemma3-270m", 13, 0.5
    by_req = collections.defaultdict(list)
    for r in records:
        if isinstance(r, TraceToken) and r.model == model:
            by_req[r.request].append(r)
    rate = {q: sum(t.exits[depth].confidence < threshold for t in ts) / len(ts) for q, ts in by_req.items()}
    easy = sorted(q for q in rate if rate[q] <= 0.3)
    hard = sorted(q for q in rate if rate[q] >= 0.7)
    assert easy and hard
    cfg = PolicyConfig(confidence_threshold=threshold, profile_prompts=1, reassess_every=10_000,
                       hysteresis_requests=5)
    ctl = Controller(candidates, SLO("throughput"), Hardware(device="cpu", memory_budget_bytes=2 << 30), cfg)
    ctl.start()
    seq = [easy[i % len(easy)] for i in range(70)] + [hard[i % len(hard)] for i in range(20)]
    token = 0
    shift_token = None
    changes: list[tuple[int, int, str]] = []
    for n, q in enumerate(seq):
        if n == 10:  # past the first profiling plan: pin the shallow placement
            ctl.current = Placement(model=model, depth=depth)
            ctl.breaches.reset()
            pinned_at = token
        if n == 70:
            shift_token = token
        ctl.begin_request()
        for t in by_req[q]:
            token += 1
            cur = ctl.current
            conf = t.exits[cur.depth].confidence if cur.depth in t.exits else t.exits[max(t.exits)].confidence
            d = ctl.observe_token(cur.model, cur.depth, conf)
            if d is not None and d.action in ("extend", "switch"):
                changes.append((n, token, d.action))
        ctl.observe_request(ctl.current.model, ctl.current.depth, output_tokens=len(by_req[q]), seconds=1.0)
    after_pin = [c for c in changes if c[1] > pinned_at]
    assert after_pin, "the hard workload never triggered an extend or a switch"
    first = after_pin[0]
    assert first[1] > shift_token, f"changed during the easy part: {after_pin}"
    assert first[1] - shift_token <= cfg.breach_window, f"reacted {first[1] - shift_token} tokens after the shift"
