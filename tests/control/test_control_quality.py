"""Quality floors in the pure control plane: parsing, resolution across candidates, the gate, the policy's choice
(quality first, then speed), storms that never answer by lowering quality, and per-request steering."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from helios_ray.control import SLO, CalibrationPoint, CandidateInfo, ExitPrior, Hardware, PolicyConfig
from helios_ray.control.controller import Controller
from helios_ray.control.policy import choose
from helios_ray.control.quality import QualityFloor, QualityFloors, QualityGate, resolve_floors
from helios_ray.control.steering import GroupView, Outcome, Steering, request_features

MB = 1 << 20
HW = Hardware(device="cpu", memory_budget_bytes=4096 * MB)


def cand(name: str, layers: int, layer_mb: float, quality: dict, chat: bool = True, exits=()) -> CandidateInfo:
    # every trained exit agrees well enough for the accuracy guard: here only the quality floors decide depth
    prior = {d: ExitPrior(agreement=0.95, calibration=[CalibrationPoint(threshold=0.9, coverage=0.8, agreement=0.97)])
             for d in exits}
    return CandidateInfo(name=name, num_layers=layers, embed_bytes=50 * MB, layer_bytes=int(layer_mb * MB),
                         head_bytes=50 * MB, kv_bytes_per_token_per_layer=4096, exits=list(exits), exit_prior=prior,
                         flops_per_token_per_layer=int(layer_mb * MB), head_flops_per_token=10 * MB,
                         quality=quality, chat_capable=chat)


# A small fast chat model that fails code, a base model (no chat), and a slower coder: the bundled ladder's shape.
SMALL = cand("small", 30, 8, {30: {"code": 0.0, "chat": 0.55}})
BASE = cand("base", 18, 10, {18: {"code": 0.02, "chat": 0.20}}, chat=False)
CODER = cand("coder", 24, 30, {24: {"code": 0.60, "chat": 0.62}, 22: {"code": 0.52, "chat": 0.58}}, exits=[22])


def test_floors_parse_absolute_and_relative_and_refuse_nonsense():
    q = QualityFloors.model_validate({"code": "best - 0.05", "chat": 0.5, "sql": "best"})
    assert q.floors["code"].below_best == 0.05 and q.floors["chat"].minimum == 0.5
    assert q.floors["sql"].below_best == 0.0
    assert str(q.floors["code"]) == "best - 0.05"
    for bad in ("better - 1", "best + 0.1", 1.5, True):
        with pytest.raises(ValidationError):
            QualityFloor.model_validate(bad)
    with pytest.raises(ValidationError):
        QualityFloors.model_validate({"Code!": 0.3})
    assert set(QualityFloors().floors) == {"code", "chat"}  # the conservative defaults


def test_relative_floors_resolve_against_every_registered_placement():
    floors = resolve_floors(QualityFloors.model_validate({"code": "best - 0.05", "chat": "best - 0.1"}),
                            [SMALL, BASE, CODER], reference="coder")
    assert floors["code"].value == pytest.approx(0.55) and "coder@24" in floors["code"].source
    # chat: the reference's own answers are left out of "best" (it judges them perfect by construction), and so
    # is a base model; the best chat-capable other placement is small's 0.55
    assert floors["chat"].value == pytest.approx(0.45) and "small@30" in floors["chat"].source
    with_ref = resolve_floors(QualityFloors.model_validate({"chat": "best", "reference_excluded": False}),
                              [SMALL, CODER], reference="coder")
    assert with_ref["chat"].value == pytest.approx(0.62)
    # a class nobody measured has no floor (it cannot block a deployment), an absolute one always applies
    assert resolve_floors(QualityFloors.model_validate({"sql": "best - 0.1", "text": 0.2}), [SMALL]) == {
        "text": resolve_floors(QualityFloors.model_validate({"text": 0.2}), [])["text"]}


def test_gate_checks_capability_and_every_served_class():
    floors = resolve_floors(QualityFloors.model_validate({"code": 0.5, "chat": 0.5}), [])
    gate = QualityGate(floors=floors, mix={"code": 3, "chat": 1})
    assert gate.check(CODER, 24).ok and gate.check(CODER, 22).ok
    miss = gate.check(SMALL, 30)
    assert not miss.ok and miss.failed_share == pytest.approx(0.75) and "code 0.000 < 0.500" in miss.failed[0]
    assert gate.check(BASE, 18).failed[0] == "chat-capable"
    assert not gate.check(CODER, 20).ok  # unmeasured never passes
    code_only = QualityGate(floors=floors, mix={"code": 1}, chat=False)
    assert code_only.required() == {"code": 1.0} and code_only.check(CODER, 24).ok


def test_policy_picks_the_fastest_placement_that_meets_the_floors():
    cfg = PolicyConfig()
    floors = resolve_floors(QualityFloors.model_validate({"code": "best - 0.05", "chat": "best - 0.1"}),
                            [SMALL, BASE, CODER], reference="coder")
    # without a gate, speed decides: the small model
    assert choose([SMALL, CODER], SLO.THROUGHPUT, HW, None, cfg).model == "small"
    # code traffic: the floor (0.55) excludes the faster small model, and the coder's truncated depth 22 (0.52)
    code = choose([SMALL, CODER], SLO.THROUGHPUT, HW, None, cfg, gate=QualityGate(floors=floors, mix={"code": 1}))
    assert (code.model, code.depth) == ("coder", 24)
    assert code.numbers["meets_floors"] is True and "quality: coder@24 meets every floor" in code.reason
    # chat traffic: small meets the chat floor and is faster; the base model may not answer chats at all
    chat = choose([SMALL, BASE, CODER], SLO.THROUGHPUT, HW, None, cfg,
                  gate=QualityGate(floors=floors, mix={"chat": 1}))
    assert chat.model == "small"
    # nothing meets the floors: the least miss, and the reason says so
    none = choose([SMALL, BASE], SLO.THROUGHPUT, HW, None, cfg,
                  gate=QualityGate(floors=floors, mix={"code": 1}, chat=False))
    assert none.model == "base" and none.numbers["meets_floors"] is False
    assert "no placement meets the floors" in none.reason


def test_a_storm_is_never_answered_below_the_floor():
    cfg = PolicyConfig(breach_window=10, breach_limit=2, hysteresis_requests=0)
    floors = resolve_floors(QualityFloors.model_validate({"code": 0.5}), [])
    ctl = Controller([SMALL, CODER], SLO.THROUGHPUT, HW, cfg, quality=QualityGate(floors=floors, mix={"code": 1}))
    first = ctl.start()
    assert (first.model, first.depth) == ("coder", 22)  # 0.52 meets an absolute 0.5: truncation allowed
    decisions = [d for d in (ctl.observe_token("coder", 22, 0.1) for _ in range(5)) if d is not None]
    d = decisions[0]
    assert d.trigger == "storm" and (d.action, d.model, d.depth) == ("extend", "coder", 24)
    # the faster model was an option by cost, but it is below the code floor: never a switch there
    assert d.numbers["switch[small@30]_skipped"].startswith("quality: misses code")


def test_controller_replans_when_the_traffic_mix_moves_its_placement_below_a_floor():
    cfg = PolicyConfig(hysteresis_requests=0)
    floors = resolve_floors(QualityFloors.model_validate({"code": 0.5, "chat": 0.5}), [])
    ctl = Controller([SMALL, CODER], SLO.THROUGHPUT, HW, cfg, quality=QualityGate(floors=floors, mix={"chat": 1}))
    assert ctl.start().model == "small"
    assert ctl.quality_breached() is None  # small meets the chat floor
    ctl.set_quality(QualityGate(floors=floors, mix={"chat": 1, "code": 1}))
    d = ctl.quality_breached()
    assert d is not None and d.trigger == "quality" and d.model == "coder" and d.action == "switch"
    assert ctl.status()["quality"]["current"]["ok"] is True


# --------------------------------------------------------------------------------------------- the router
def view(group: str, model: str, quality: dict, chat: bool = True, tps: float | None = None, busy: int = 0):
    return GroupView(group=group, model=model, depth=24, total_layers=24, slots=8, busy=busy, quality=quality,
                     chat_capable=chat, prior_tps=tps)


CODE_REQ = request_features("def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", None)
CHAT_REQ = request_features(None, [{"role": "user", "content": "What is the capital of France?"}])


def test_a_floor_that_excludes_the_faster_group_sends_it_no_request_of_that_class():
    st = Steering(SLO.THROUGHPUT, rng=random.Random(0))
    st.set_floors({"code": 0.5, "chat": 0.4})
    fast, coder = view("fast", "small", {"code": 0.0, "chat": 0.55}), view("coder", "coder", {"code": 0.6, "chat": 0.6})
    for _ in range(30):  # the fast group delivers far more tokens/s, and steering learns it...
        for g, tps in ((fast, 100.0), (coder, 10.0)):
            st.observe(CODE_REQ, g, Outcome(tokens=20, breaches=0, mean_exit_layer=24, seconds=20 / tps), None)
            st.observe(CHAT_REQ, g, Outcome(tokens=20, breaches=0, mean_exit_layer=24, seconds=20 / tps), None)
    routes = [st.choose(CODE_REQ, [fast, coder]) for _ in range(50)]
    assert {r.group for r in routes} == {"coder"} and all(r.eligible == ["coder"] for r in routes)
    chats = [st.choose(CHAT_REQ, [fast, coder]) for _ in range(20)]
    assert {r.group for r in chats} == {"fast"} and chats[0].reason == "predicted"  # both meet chat: speed decides


def test_chats_never_go_to_a_base_model_and_misses_are_counted():
    st = Steering(SLO.THROUGHPUT, rng=random.Random(0))
    st.set_floors({"code": 0.9})
    base, small = view("base", "base", {"code": 0.1}, chat=False), view("small", "small", {"code": 0.0})
    assert {st.choose(CHAT_REQ, [base, small]).group for _ in range(20)} == {"small"}
    r = st.choose(CODE_REQ, [base, small])  # nobody meets 0.9: the best quality there is, counted
    assert r.reason == "below_floor" and r.group == "base" and r.eligible == []
    snap = st.snapshot()
    assert snap["below_floor"] == {"code": 1} and snap["routes"]["below_floor"] == 1 and snap["floors"] == {"code": 0.9}


def test_steering_starts_from_prior_speed_and_does_not_explore_a_known_slow_group():
    st = Steering(SLO.THROUGHPUT, rng=random.Random(0))
    fast, slow = view("fast", "small", {}, tps=100.0), view("slow", "big", {}, tps=5.0)
    for _ in range(10):  # fast becomes trusted for chat
        st.observe(CHAT_REQ, fast, Outcome(tokens=20, breaches=0, mean_exit_layer=24, seconds=0.2), None)
    routes = [st.choose(CHAT_REQ, [fast, slow]) for _ in range(20)]
    assert {r.group for r in routes} == {"fast"}  # slow's prior (5 tok/s) cannot win against ~100: not explored
    snap = st.snapshot()
    assert snap["exploration_share"] == 0.0
    unknown = view("new", "other", {}, tps=None)
    assert st.choose(CHAT_REQ, [fast, unknown]).reason == "explore"  # no prior: it could still win


def test_operator_classes_by_endpoint_metadata_and_pattern():
    from helios_ray.control.request_features import ClassRule

    rules = [ClassRule(name="sql", pattern=r"(?i)\bselect\b.+\bfrom\b"),
             ClassRule(name="support", metadata={"tenant": "acme"}, endpoint="chat"),
             ClassRule(name="completion", endpoint="completions")]
    msgs = [{"role": "user", "content": "Why is my invoice late?"}]
    assert request_features(None, msgs, rules=rules).kind == "chat"  # no rule: the built-in class
    assert request_features(None, msgs, metadata={"tenant": "acme"}, rules=rules).kind == "support"
    assert request_features("SELECT name FROM users", None, rules=rules).kind == "sql"  # first match wins
    assert request_features("Once upon a time", None, rules=rules).kind == "completion"
    assert request_features("Once upon a time", None).kind == "text"
    with pytest.raises(ValidationError):
        ClassRule(name="nothing")  # a rule needs a condition
    with pytest.raises(ValidationError):
        ClassRule(name="bad", pattern="(unclosed")
    st = Steering(SLO.THROUGHPUT, rng=random.Random(0))
    st.set_floors({"sql": 0.7})
    weak, strong = view("weak", "a", {"sql": 0.2}), view("strong", "b", {"sql": 0.9})
    route = st.choose(request_features("SELECT 1 FROM t", None, rules=rules), [weak, strong])
    assert route.group == "strong" and route.kind == "sql"  # an operator's class has a floor like any other


def test_online_scores_replace_the_offline_record_once_there_are_enough():
    from helios_ray.control.quality import OnlineQuality

    online = OnlineQuality(min_samples=3, decay=0.5)
    assert online.observe("m", 24, "chat", 0.2) is None and online.observe("m", 24, "chat", 0.2) is None
    assert online.observe("m", 24, "chat", 0.5) == pytest.approx((0.2 * 0.25 + 0.2 * 0.5 + 0.5) / 1.75, abs=1e-4)
    assert online.value("m", 22, "chat") is None  # another placement: nothing measured
    snap = online.snapshot()["m@24"]
    assert snap["samples"] == 3 and snap["in_use"] is True
