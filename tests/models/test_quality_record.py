"""Quality records (``helios-ray quality``): the chat score is what the reference model would have said, on one
scale for every model; the records merge safely; the shipped ones cover every servable depth; the policy reads
them through ``candidate_info``."""

from __future__ import annotations

import json

import pytest

from helios_data import Conversation
from helios_ray.tuning.quality import answer_overlap, chat_answers, chat_score, reference_scores, write_quality

pytestmark = pytest.mark.slow

PROMPTS = [Conversation(id="a", messages=({"role": "user", "content": "What is the capital of France?"},)),
           Conversation(id="b", messages=({"role": "user", "content": "Name three colours."},))]


def test_the_reference_agrees_with_its_own_answers_and_not_with_noise(smollm2_full):
    answers = chat_answers(smollm2_full, PROMPTS, max_tokens=12)
    assert set(answers) == {"a", "b"} and all(answers.values())
    own = reference_scores(smollm2_full, PROMPTS, answers)
    # its own greedy answers, re-tokenized and teacher-forced: (nearly) every token is its top-1 choice
    assert own["agreement"] >= 0.9 and own["tokens_scored"] > 10
    noise = reference_scores(smollm2_full, PROMPTS, {"a": "zebra quantum lantern; 7 7 7 purple", "b": "???? ok ok"})
    assert noise["agreement"] < own["agreement"] - 0.5 and noise["perplexity"] > 10 * own["perplexity"]
    silent = reference_scores(smollm2_full, PROMPTS, {"a": "", "b": "   "})
    assert silent["agreement"] == 0.0 and silent["empty_answers"] == 2  # saying nothing is not an answer
    # the chat score: overlap with the reference's own answer - its own answers score 1, noise and silence 0
    assert chat_score(answers, answers) == 1.0
    assert chat_score({"a": "zebra lantern", "b": ""}, answers) == 0.0


def test_the_chat_score_ranks_an_answer_above_an_echo_and_small_talk():
    """What teacher-forced agreement got wrong on the bundled models (docs/quality.md): a base model that echoes
    the prompt or talks about something else is what a language model predicts best; the overlap with the
    reference's own answer ranks a real answer above both."""
    ref = ("Quantum computing is a type of computing that uses quantum bits, or qubits, to perform calculations. "
           "Unlike classical computers, which use bits, quantum computers use qubits that can be 0 and 1 at once.")
    answer = ("Quantum computing is a field of computer science that leverages the principles of quantum mechanics "
              "to perform calculations faster than classical computers.")
    echo = "Explain quantum computing in simple terms"
    small_talk = "I'm going to be a little late, but I'll be back in a few minutes."
    assert answer_overlap(answer, ref) > answer_overlap(echo, ref) > answer_overlap(small_talk, ref)
    assert answer_overlap(ref, ref) == 1.0 and answer_overlap("", ref) == 0.0


def test_base_model_answers_stop_at_the_next_turn(tmp_path):
    """A base model answers a chat through the plain-turn rendering and stops at the next turn marker, as a
    replica serves it: the record measures what users would get."""
    from helios_ray.models.early_exit import load_model

    gemma = load_model("gemma3-270m", dtype="float32", exits="shared")
    answers = chat_answers(gemma, PROMPTS[:1], max_tokens=24)
    assert "\nUser:" not in answers["a"] and "\nAssistant:" not in answers["a"]


def test_records_merge_by_protocol_and_restart_on_a_new_one(tmp_path):
    proto = {"code": {"problems": 164}, "chat": {"reference": "r", "prompts": 40}}
    rep = {"model": "m", "protocol": proto, "placements": {"30": {"code": {"pass_at_1": 0.1}}}, "seconds": 1}
    write_quality(tmp_path, rep)
    write_quality(tmp_path, {**rep, "placements": {"24": {"code": {"pass_at_1": 0.05}}}}, command="x")
    rec = json.loads((tmp_path / "quality.json").read_text())
    assert list(rec["placements"]) == ["24", "30"] and rec["command"] == "x" and "seconds" not in rec
    other = {**rep, "protocol": {**proto, "chat": {"reference": "other", "prompts": 40}},
             "placements": {"20": {"code": {"pass_at_1": 0.0}}}}
    write_quality(tmp_path, other)  # another judge: old values would not compare, so they are dropped
    assert list(json.loads((tmp_path / "quality.json").read_text())["placements"]) == ["20"]


def test_shipped_records_cover_every_servable_depth_and_reach_the_policy():
    from helios_ray.models.repository import ModelRepository
    from helios_ray.tuning.profiling import candidate_info

    repo = ModelRepository()
    for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"):
        rec = repo.quality(name)
        assert rec is not None, f"{name} ships no quality record (scripts/measure_quality.sh)"
        info = repo.info(name)
        servable = {str(d) for d in (*info.exits.trained, info.num_layers)}
        assert servable <= set(rec["placements"]), (name, sorted(rec["placements"]))
        assert rec["protocol"]["code"]["problems"] == 164 and rec["protocol"]["chat"]["prompts"] >= 40
        for d, p in rec["placements"].items():
            assert 0.0 <= p["code"]["pass_at_1"] <= 1.0 and p["code"]["problems"] == 164
            assert 0.0 <= p["chat"]["score"] <= 1.0
        cand = candidate_info(repo, name)
        assert cand.quality[info.num_layers]["code"] == rec["placements"][str(info.num_layers)]["code"]["pass_at_1"]
        assert cand.chat_capable == (name != "gemma3-270m")  # the base model answers chats only when declared


def test_quality_command_rejects_bad_input_in_one_line(capsys):
    from helios_ray.cli import main

    assert main(["quality", "smollm2-135m", "--depths", "31"]) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and len(err.strip().splitlines()) == 1
    assert main(["quality", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_online_chat_scores_below_the_floor_move_the_group(tmp_path):
    """What the brain does with the profiler's online scores: once a placement has enough of them they replace its
    offline chat record, and a group serving it re-plans if it now misses the floor (like a breach storm)."""
    from helios_ray.control import Hardware
    from helios_ray.control.quality import QualityGate
    from helios_ray.control.controller import Controller
    from helios_ray.models.repository import ModelRepository
    from helios_ray.serve.brain_quality import FleetQuality
    from helios_ray.serve.config import ServeConfig
    from helios_ray.tuning.profiling import candidate_info

    cfg = ServeConfig(candidates=["smollm2-135m", "qwen2.5-coder-0.5b"],
                      quality={"chat": 0.15, "online_min_samples": 4}, policy={"hysteresis_requests": 0})
    repo = ModelRepository()
    cands = [candidate_info(repo, n) for n in cfg.candidates]
    fq = FleetQuality(cfg, repo, cands)
    assert fq.reference == "qwen2.5-coder-0.5b" and fq.floors["chat"].value == 0.15
    ctl = Controller(cands, cfg.slo, Hardware(device="cpu", memory_budget_bytes=6 << 30), cfg.policy,
                     quality=QualityGate(floors=fq.floors, mix={"chat": 1.0}))
    ctl.start()
    first = ctl.current.model
    assert first == "smollm2-135m"  # its offline chat score (0.19) meets 0.15 and it is the faster
    assert [fq.observe(first, 30, "chat", 0.05) for _ in range(4)] == [False, False, False, True]
    assert fq.status()["online"][f"{first}@30"]["in_use"] is True
    decision = ctl.quality_breached()
    assert decision is not None and decision.trigger == "quality" and decision.model == "qwen2.5-coder-0.5b"
