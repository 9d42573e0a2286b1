"""Trace replay: drift, stability, determinism, and the ``helios-ray simulate`` subcommand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from control_synth import candidates, make_trace, token

from helios_ray.control import PolicyConfig, TraceRequest, simulate, write_trace
from helios_ray.control.simulate_cli import configure_parser, run

DRIFT_AT = 500
TOKENS = 20


def test_drift_triggers_extend_or_switch_within_one_breach_window() -> None:
    trace = make_trace(700, drift_at=DRIFT_AT, tokens_per_request=TOKENS)
    result = simulate(trace, "throughput", PolicyConfig(), candidates())
    storms = [d for d in result.decisions if d.trigger == "storm"]
    before = [d for d in result.decisions if d.request is not None and d.request < DRIFT_AT]
    assert not [d for d in before if d.trigger == "storm"], "no storm while the workload is chat"
    assert storms, "the shift to code must set off a storm"
    first = storms[0]
    assert first.action in ("extend", "switch")
    shift_token = DRIFT_AT * TOKENS  # every request serves TOKENS tokens, sequentially
    assert first.token_index is not None
    assert 0 < first.token_index - shift_token <= PolicyConfig().breach_window
    assert first.request is not None and first.request >= DRIFT_AT


def test_drift_story_complementary_exits() -> None:
    """alpha@20 serves chat; code makes it extend to 24; the next re-profile finds beta, which is
    confident at 16 on code, cheaper than alpha@24 and switches (HELIOS's complementary exits)."""
    trace = make_trace(700, drift_at=DRIFT_AT, tokens_per_request=TOKENS)
    result = simulate(trace, "throughput", PolicyConfig(), candidates())
    moves = [(d.trigger, d.action, d.model, d.depth) for d in result.decisions if d.action != "keep"]
    assert moves == [
        ("start", "deploy", "alpha", 20),
        ("storm", "extend", "alpha", 24),
        ("reassess", "switch", "beta", 16),
    ]
    switch = result.decisions[-1]
    assert switch.request_index == 600 and switch.numbers["basis"] == "measured"
    served = {(s.model, s.depth): s for s in result.served}
    assert served[("beta", 16)].agreement is not None and served[("beta", 16)].agreement > 0.95
    assert result.final_placement is not None and result.final_placement.model == "beta"
    assert result.tokens_by_kind == {"chat": DRIFT_AT * TOKENS, "code": 200 * TOKENS}


def test_stable_workload_triggers_nothing_over_1000_requests() -> None:
    trace = make_trace(1000, tokens_per_request=12, seed=3)
    result = simulate(trace, "throughput", PolicyConfig(), candidates())
    assert result.requests == 1000
    assert result.decisions[0].trigger == "start"
    assert (result.decisions[0].model, result.decisions[0].depth) == ("alpha", 20)
    later = result.decisions[1:]
    assert [d.trigger for d in later] == ["profile"] + ["reassess"] * (1000 // 150)
    assert all(d.action == "keep" for d in later)
    assert result.storm_decisions == 0 and result.suppressed_storm_tokens == 0
    assert result.breaches > 0  # breaches happen (~10%), they just never form a storm


def test_without_priors_the_first_profile_corrects_the_cold_start() -> None:
    trace = make_trace(1000, tokens_per_request=12, seed=3)
    result = simulate(trace, "throughput", PolicyConfig(), candidates(with_priors=False))
    first, plan = result.decisions[0], result.decisions[1]
    assert (first.model, first.depth) == ("beta", 24)  # static FLOPs only: beta@24 < alpha@30
    assert (plan.trigger, plan.action, plan.model, plan.depth) == ("profile", "switch", "alpha", 20)
    assert all(d.action == "keep" for d in result.decisions[2:])


def test_identical_results_on_two_runs() -> None:
    trace = make_trace(700, drift_at=DRIFT_AT, tokens_per_request=TOKENS)
    a = simulate(trace, "throughput", PolicyConfig(), candidates())
    b = simulate(list(trace), "throughput", PolicyConfig(), candidates())
    assert a.model_dump_json() == b.model_dump_json()


def test_candidates_can_be_derived_from_the_trace() -> None:
    trace = make_trace(700, drift_at=DRIFT_AT, tokens_per_request=TOKENS)
    result = simulate(trace, "throughput")
    assert result.candidates_source == "derived" and result.cost_unit == "layers"
    assert {c.name: c.exits for c in result.candidates} == {
        "alpha": [12, 16, 20, 24, 30],
        "beta": [8, 12, 16, 20, 24],
    }
    assert any("equal cost per layer" in n for n in result.notes)
    # Equal cost per layer and no priors: full depth first, then the profile picks alpha@20.
    assert (result.decisions[1].model, result.decisions[1].depth) == ("alpha", 20)
    assert any(d.trigger == "storm" for d in result.decisions)


def test_tokens_missing_the_served_exit_are_skipped_and_reported() -> None:
    recs = [
        token("m", r, p, {12: (1, 0.95), 24: (1, 0.99)} if p % 2 else {24: (1, 0.99)}, final=1)
        for r in range(10)
        for p in range(4)
    ]
    cfg = PolicyConfig(min_samples=4, profile_prompts=2, reassess_every=5)
    result = simulate(recs, "throughput", cfg)
    assert [(d.trigger, d.depth) for d in result.decisions][:2] == [("start", 24), ("profile", 12)]
    # from request 3 on, alpha@12 is served; half the records lack exit 12
    assert result.tokens_skipped == 8 * 2
    assert any("lack the served exit" in n for n in result.notes)


def test_empty_or_foreign_traces_are_errors() -> None:
    with pytest.raises(ValueError, match="no token records"):
        simulate([TraceRequest(model="m", request=1, output_tokens=1, seconds=1.0)], "latency")
    with pytest.raises(ValueError, match="none of the candidates"):
        simulate([token("other", 1, 0, {8: (1, 0.9)})], "latency", None, candidates())


# --------------------------------------------------------------------------- CLI
def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="helios-ray simulate")
    configure_parser(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Smaller than the library tests' trace (reading JSON is the slow part): drift at 200, the
    # re-assessment at 300 profiles code.
    path = tmp_path_factory.mktemp("trace") / "drift.jsonl"
    write_trace(path, make_trace(300, drift_at=200, tokens_per_request=10))
    return path


def test_cli_json_matches_the_library(
    trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps([c.model_dump(mode="json") for c in candidates()]))
    assert run(_args("--trace", str(trace_file), "--slo", "throughput",
                     "--candidates", str(cands), "--json")) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    moves = [(d["trigger"], d["action"], d["model"], d["depth"]) for d in out["decisions"]
             if d["action"] != "keep"]  # fmt: skip
    assert moves[-1] == ("reassess", "switch", "beta", 16)
    assert out["candidates_source"] == "given"


def test_cli_human_output_and_config_file(
    trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"breach_limit": 80}))  # a storm now needs > 80 of 100
    assert run(_args("--trace", str(trace_file), "--slo", "latency", "--config", str(cfg))) == 0
    out = capsys.readouterr().out
    assert "equal cost per layer" in out and "decisions:" in out
    assert "storm" in out  # 90% breaches on code still exceed 80


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--trace", "/nonexistent/t.jsonl"], "file not found: /nonexistent/t.jsonl"),
        (["--slo", "fastest"], "unknown SLO 'fastest'"),
        (["--config", "CFG"], "top_k: Input should be greater than or equal to 1"),
        (["--candidates", "BADJSON"], "not valid JSON"),
        (["--memory-budget-bytes", "0"], "memory_budget_bytes: Input should be greater than 0"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    trace_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    needle: str,
) -> None:
    (tmp_path / "cfg.json").write_text('{"top_k": 0}')
    (tmp_path / "bad.json").write_text("{nope")
    argv = [
        a.replace("CFG", str(tmp_path / "cfg.json")).replace("BADJSON", str(tmp_path / "bad.json"))
        for a in argv
    ]
    if "--trace" not in argv:
        argv = ["--trace", str(trace_file), *argv]
    assert run(_args(*argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert "Traceback" not in captured.err


def test_cli_bad_record_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    good = token("m", 1, 0, {8: (1, 0.9)}).model_dump_json()
    path.write_text(f"{good}\n{good}\n" + '{"type":"token","model":"m","request":1}\n')
    assert run(_args("--trace", str(path))) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}:3: bad token record" in err and len(err.splitlines()) == 1
