"""PolicyConfig / CandidateInfo / Hardware / SLO validation."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from helios_ray.control import SLO, CandidateInfo, ExitPrior, Hardware, PolicyConfig
from helios_ray.control.config import CalibrationPoint


def _message(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(exc.value)


def test_defaults_are_the_papers() -> None:
    cfg = PolicyConfig()
    assert (cfg.top_k, cfg.profile_prompts, cfg.confidence_threshold) == (3, 5, 0.9)
    assert (cfg.breach_window, cfg.breach_limit, cfg.reassess_every) == (100, 50, 150)
    assert (cfg.min_agreement, cfg.max_ppl_increase, cfg.exit_share) == (0.9, 0.1, 0.5)
    assert (cfg.hysteresis_requests, cfg.stale_after_s) == (50, 600.0)


def test_k_zero_is_rejected_with_the_field_named() -> None:
    with pytest.raises(ValidationError) as exc:
        PolicyConfig(top_k=0)
    assert "top_k" in _message(exc)
    assert "greater than or equal to 1" in _message(exc)


def test_window_below_one_is_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        PolicyConfig(breach_window=0, breach_limit=0)
    assert "breach_window" in _message(exc)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, 2])
def test_threshold_outside_open_closed_unit_interval_is_rejected(threshold: float) -> None:
    with pytest.raises(ValidationError) as exc:
        PolicyConfig(confidence_threshold=threshold)
    assert "confidence_threshold" in _message(exc)


def test_threshold_one_is_allowed() -> None:
    assert PolicyConfig(confidence_threshold=1.0).confidence_threshold == 1.0


def test_limit_must_be_below_window() -> None:
    with pytest.raises(ValidationError) as exc:
        PolicyConfig(breach_window=100, breach_limit=100)
    assert "breach_limit (100) must be smaller than breach_window (100)" in _message(exc)
    assert PolicyConfig(breach_window=100, breach_limit=99).breach_limit == 99
    with pytest.raises(ValidationError):
        PolicyConfig(breach_limit=-1)


def test_assignment_is_validated_too() -> None:
    cfg = PolicyConfig()
    with pytest.raises(ValidationError):
        cfg.breach_limit = 100


def test_profile_prompts_cannot_exceed_reassess_interval() -> None:
    with pytest.raises(ValidationError) as exc:
        PolicyConfig(profile_prompts=10, reassess_every=5)
    assert "profile_prompts (10) must not exceed reassess_every (5)" in _message(exc)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        PolicyConfig(top_K=3)  # type: ignore[call-arg]
    assert "top_K" in _message(exc) and "Extra inputs are not permitted" in _message(exc)


def test_unknown_slo_fails_with_the_choices_listed() -> None:
    with pytest.raises(ValidationError) as exc:
        TypeAdapter(SLO).validate_python("fastest")
    assert "'throughput', 'latency', 'energy' or 'batch_size'" in _message(exc)
    assert TypeAdapter(SLO).validate_python("batch_size") is SLO.BATCH_SIZE


def test_candidate_exits_are_normalised_and_checked() -> None:
    cand = CandidateInfo(name="m", num_layers=30, exits=[24, 12, 20, 12])
    assert cand.exits == [12, 20, 24, 30]  # sorted, unique, full depth added
    assert cand.exits_above(20) == [24, 30]
    with pytest.raises(ValidationError) as exc:
        CandidateInfo(name="m", num_layers=30, exits=[0, 31])
    assert "outside 1..num_layers (30)" in str(exc.value)
    with pytest.raises(ValidationError) as exc:
        CandidateInfo(name="m", num_layers=30, exits=[20], exit_prior={16: ExitPrior(agreement=1)})
    assert "names depths [16]" in str(exc.value)


def test_weight_and_kv_bytes() -> None:
    cand = CandidateInfo(
        name="m",
        num_layers=30,
        embed_bytes=1000,
        layer_bytes=100,
        head_bytes=500,
        exit_head_bytes=70,
        kv_bytes_per_token_per_layer=8,
        exit_kv_bytes_per_token=3,
        exits=[20],
    )
    assert cand.weight_bytes(20) == 1000 + 20 * 100 + 500 + 70
    assert cand.weight_bytes(30) == 1000 + 30 * 100 + 500  # the model's own head is the exit
    assert cand.kv_bytes_per_token(20) == 20 * 8 + 3
    assert cand.kv_bytes_per_token(30) == 30 * 8
    with pytest.raises(ValueError):
        cand.weight_bytes(31)


def test_exit_prior_coverage_is_conservative() -> None:
    prior = ExitPrior(
        agreement=0.8,
        calibration=[
            CalibrationPoint(threshold=0.8, coverage=0.6, agreement=0.9),
            CalibrationPoint(threshold=0.95, coverage=0.3, agreement=0.97),
        ],
    )
    # No row at 0.9: the next stricter row (0.95) bounds the coverage from below.
    assert prior.coverage_at(0.9) == 0.3
    assert prior.coverage_at(0.8) == 0.6
    assert prior.coverage_at(0.99) is None


def test_hardware() -> None:
    hw = Hardware(device="CUDA", memory_budget_bytes=10, gpu_name="H100")
    assert hw.device == "cuda"
    with pytest.raises(ValidationError):
        Hardware(device="tpu", memory_budget_bytes=10)
    with pytest.raises(ValidationError):
        Hardware(memory_budget_bytes=0)
