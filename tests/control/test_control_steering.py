"""Per-request steering: features on the repository's real prompts, the online predictor, and the routing rules."""

from __future__ import annotations

import json
import math
import random
import statistics
import time

import pytest

from helios_ray.control.steering_model import _invert
from helios_ray.control.steering import (
    MAX_KEYS, RECENT_ROUTES, GroupView, Outcome, RequestFeatures, Steering, SteeringConfig, code_score,
    request_features,
)


def view(group: str, model: str | None = None, depth: int = 10, busy: int = 0, slots: int = 8) -> GroupView:
    return GroupView(group=group, model=model or group.lower(), depth=depth, total_layers=20, slots=slots, busy=busy)


def feats(kind: str, chars: int = 500) -> RequestFeatures:
    return RequestFeatures(chat=kind == "chat", code=0.9 if kind == "code" else 0.0, prompt_chars=chars)


def outcome(breach_rate: float, tps: float = 20.0, tokens: int = 16) -> Outcome:
    return Outcome(tokens=tokens, breaches=round(breach_rate * tokens), mean_exit_layer=10 * (1 - breach_rate / 2),
                   seconds=tokens / tps)


# ------------------------------------------------------------------------------------------------- features
def test_features_separate_real_humaneval_prompts_from_sharegpt_chats():
    from helios_data import load_humaneval, load_sharegpt

    code = [request_features(c.prompt, None) for c in load_humaneval()]
    chats = [request_features(None, c.prompt_messages) for c in load_sharegpt(seed=None, split="heldout")]
    assert all(f.kind == "code" and not f.chat for f in code)
    assert min(f.code for f in code) >= 0.8
    assert all(f.chat for f in chats)
    assert sum(f.kind == "chat" for f in chats) / len(chats) >= 0.9  # the rest paste code into the chat
    assert statistics.median(f.code for f in chats) < 0.1


def test_code_score_needs_code_shape_not_keywords():
    prose = "try again with a funny analogy.\nlet's imagine two authors.\nFor example, if you import goods:"
    assert code_score(prose) == 0.0
    assert code_score("def f(x):\n    return x + 1\n") == 1.0
    fenced = "Why does this fail?\n```\nx = [1, 2]\nprint(x[3])\n```"
    assert code_score(fenced) == 0.8  # 4 of 5 lines: fences and what is inside
    assert request_features("", None) == RequestFeatures(chat=False, code=0.0, prompt_chars=0)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    f = request_features(None, parts)
    assert f.chat and f.kind == "chat" and f.prompt_chars == len("hello there")
    assert RequestFeatures(chat=False, code=0.2, prompt_chars=5).kind == "text"


def test_features_are_fast_on_10_kb():
    from helios_data import load_humaneval

    text = "\n\n".join(c.prompt for c in load_humaneval(limit=40))[:10_000]
    best = min(_timed(lambda: request_features(text, None)) for _ in range(20))
    assert best < 1e-3, f"{best * 1e3:.2f} ms"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- predictor
def test_inverse_and_regression_recover_a_linear_truth():
    m = [[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]]
    inv = _invert(m)
    for i in range(3):
        for j in range(3):
            assert sum(m[i][k] * inv[k][j] for k in range(3)) == pytest.approx(1.0 if i == j else 0.0, abs=1e-12)
    st = Steering("throughput", SteeringConfig(decay=1.0), rng=random.Random(0))
    g = view("A")
    rng = random.Random(1)
    for _ in range(200):
        kind = rng.choice(["chat", "code"])
        st.observe(feats(kind, rng.randint(50, 5000)), g, outcome(0.25 if kind == "chat" else 0.0625,
                                                                  tps=30.0 if kind == "chat" else 10.0), None)
    chat, code = st.predict(feats("chat"), g), st.predict(feats("code"), g)
    assert chat.breach_rate == pytest.approx(0.25, abs=0.01) and code.breach_rate == pytest.approx(0.0625, abs=0.01)
    assert chat.tokens_per_s == pytest.approx(30.0, rel=0.03) and code.tokens_per_s == pytest.approx(10.0, rel=0.03)
    assert chat.value == pytest.approx(chat.tokens_per_s * (1 - chat.breach_rate))
    assert chat.trusted and code.trusted and chat.n + code.n == 200


def test_trust_needs_min_observations_and_uncertainty_falls():
    cfg = SteeringConfig(min_observations=8)
    st = Steering("latency", cfg, rng=random.Random(0))
    g = view("A")
    seen, trusted = [], []
    for i in range(12):
        p = st.predict(feats("code"), g)
        seen.append(p.uncertainty)
        trusted.append(p.trusted)
        assert p.n == i and p.trusted == (i >= 8 and p.uncertainty <= cfg.max_uncertainty), (i, p)
        st.observe(feats("code"), g, outcome(0.1), p)
    assert all(a > b for a, b in zip(seen, seen[1:]))
    # 8 observations decayed by 0.98 weigh ~7.5, so with the defaults the uncertainty gate opens one request later
    assert trusted.index(True) == 9 and seen[8] > cfg.max_uncertainty >= seen[9]
    loose = Steering("latency", SteeringConfig(min_observations=3, max_uncertainty=10.0), rng=random.Random(0))
    for i in range(5):
        assert loose.predict(feats("code"), g).trusted == (i >= 3)
        loose.observe(feats("code"), g, outcome(0.1), None)
    assert not st.predict(feats("chat"), g).trusted  # another kind is not vouched for by code requests
    moved = view("A", model="a", depth=14)  # same group, new placement: starts afresh
    assert st.predict(feats("code"), moved).n == 0


# -------------------------------------------------------------------------------------------------- routing
def _run(st: Steering, phases: list[tuple[int, dict[tuple[str, str], float]]], seed: int = 0):
    """Requests half code, half chat; breach rate per (group, kind) from the phase; log (phase, kind, group)."""
    rng = random.Random(seed)
    groups = [view("A"), view("B")]
    log = []
    for phase, (count, rates) in enumerate(phases):
        for _ in range(count):
            f = feats(rng.choice(["code", "chat"]), rng.randint(100, 2000))
            route = st.choose(f, groups)
            g = next(x for x in groups if x.group == route.group)
            p = rates[(g.group, f.kind)]
            br = sum(rng.random() < p for _ in range(16))
            st.observe(f, g, Outcome(tokens=16, breaches=br, mean_exit_layer=8.0, seconds=16 / rng.uniform(18, 22)),
                       route.predicted())
            log.append((phase, f.kind, route.group, route.reason))
    return log


def _share(log, phase, kind, group, last):
    rows = [r for r in log if r[0] == phase][-last:]
    rows = [r for r in rows if r[1] == kind]
    return sum(r[2] == group for r in rows) / len(rows)


A_CODE = {("A", "code"): 0.1, ("A", "chat"): 0.6, ("B", "code"): 0.6, ("B", "chat"): 0.1}
A_CHAT = {("A", "code"): 0.6, ("A", "chat"): 0.1, ("B", "code"): 0.1, ("B", "chat"): 0.6}


@pytest.mark.parametrize("seed", [0, 1])
def test_learns_the_split_and_follows_a_shift_thanks_to_decay(seed):
    st = Steering("throughput", SteeringConfig(), rng=random.Random(seed))
    log = _run(st, [(400, A_CODE), (400, A_CHAT)], seed)
    assert _share(log, 0, "code", "A", 200) >= 0.7 and _share(log, 0, "chat", "B", 200) >= 0.7
    assert _share(log, 1, "code", "B", 150) >= 0.7 and _share(log, 1, "chat", "A", 150) >= 0.7
    assert {r[3] for r in log} == {"explore", "predicted"}
    split = st.snapshot()["split"]
    assert sum(n for g in split.values() for n in g.values()) == 800
    # without forgetting the stale estimates never look back: the split stays where phase 0 put it
    frozen = Steering("throughput", SteeringConfig(decay=1.0), rng=random.Random(seed))
    log = _run(frozen, [(400, A_CODE), (400, A_CHAT)], seed)
    assert _share(log, 1, "code", "A", 150) >= 0.9 and _share(log, 1, "chat", "B", 150) >= 0.9


def test_explore_goes_to_the_least_loaded_untrusted_group():
    st = Steering("throughput", rng=random.Random(0))
    a, b = view("A", busy=4), view("B", busy=1)
    route = st.choose(feats("chat"), [a, b])
    assert route.reason == "explore" and route.group == "B" and route.value is None
    for _ in range(20):
        st.observe(feats("chat"), view("A"), outcome(0.0, tps=100.0), None)
    c = view("C", busy=6)  # new and busier than A, but untrusted: it is explored first
    route = st.choose(feats("chat"), [view("A", busy=2), c])
    assert route.reason == "explore" and route.group == "C"
    st2 = Steering("throughput", rng=random.Random(0))
    picks = {st2.choose(feats("chat"), [view("A"), view("B")]).group for _ in range(30)}
    assert picks == {"A", "B"}  # equal load: ties are random, not always the first


def test_capacity_skips_full_groups_and_only_is_only():
    st = Steering("throughput", rng=random.Random(0))
    for _ in range(20):
        st.observe(feats("code"), view("A"), outcome(0.0, tps=100.0), None)
        st.observe(feats("code"), view("B"), outcome(0.5, tps=10.0), None)
    assert st.choose(feats("code"), [view("A"), view("B")]).group == "A"  # predicted: A is far better
    route = st.choose(feats("code"), [view("A", busy=8), view("B", busy=3)])
    assert route.group == "B" and route.reason == "predicted"  # A is full, B has room
    route = st.choose(feats("code"), [view("A", busy=9), view("B", busy=8)])
    assert route.group == "B" and route.reason == "capacity"  # all full: the least loaded
    route = st.choose(feats("code"), [view("A", busy=50)])
    assert route.reason == "only" and route.group == "A" and route.value is not None
    with pytest.raises(ValueError):
        st.choose(feats("code"), [])
    with pytest.raises(ValueError):
        st.choose(feats("code"), [view("A"), view("A")])


def test_observe_records_errors_and_snapshot_is_bounded_json():
    st = Steering("energy", rng=random.Random(0))
    g = view("A")
    for i in range(30):
        route = st.choose(feats("code"), [g, view("B")])
        served = g if route.group == "A" else view("B")
        st.observe(feats("code"), served, outcome(0.25, tps=20.0), route.predicted())
    snap = json.loads(json.dumps(st.snapshot()))
    assert len(snap["recent"]) == RECENT_ROUTES and all(r["observed"] for r in snap["recent"])
    decided = [r for r in snap["recent"] if r["reason"] == "predicted"]
    assert decided and all(r["values"][r["group"]] == max(r["values"].values()) and set(r["values"]) == {"A", "B"}
                           for r in decided)  # why each went where it did: every candidate's predicted value
    assert all(r["values"] is None for r in snap["recent"] if r["reason"] != "predicted")
    assert sum(snap["routes"].values()) == 30 and sum(snap["split"][k]["code"] for k in snap["split"]) == 30
    mae = snap["placements"]["a@10"]["mae"]
    # errors count only real predictions: the first code request on a placement had nothing behind it
    assert mae["samples"] == snap["placements"]["a@10"]["n"]["code"] - 1
    assert 0 <= mae["breach_rate"] < 0.05 and not math.isnan(mae["tokens_per_s"])
    for i in range(MAX_KEYS + 10):
        st.observe(feats("chat"), view("A", depth=i + 1), outcome(0.1), None)
    assert len(st.snapshot()["placements"]) == MAX_KEYS
