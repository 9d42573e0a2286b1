"""Exits inside a truncated replica: the cost model checks an exit only where it saves more than it costs."""

from __future__ import annotations

import pytest

from helios_ray.control import CandidateInfo
from helios_ray.control.costs import inner_exit_gain

# a model whose LM head costs as much as 8 layers (SmolLM2's proportions), 1 FLOP unit per layer
C = CandidateInfo(name="m", num_layers=30, flops_per_token_per_layer=100, head_flops_per_token=800)


def test_gain_is_the_layers_skipped_minus_the_checks():
    # 90% of tokens leave at 10 of 30: they skip 20 layers (less a 5-unit K/V projection each); every token pays a
    # 100-unit block head, the 10% that stay also pay the LM head at D a second time
    assert inner_exit_gain(C, 30, 10, 0.9, 100, 5) == pytest.approx(0.9 * 20 * 95 - 100 - 0.1 * 800)
    assert inner_exit_gain(C, 30, 10, 0.9, 100, 5) > 0


@pytest.mark.parametrize("depth, exit_depth, coverage", [(30, 24, 0.18), (24, 20, 0.10), (30, 20, 0.5)])
def test_small_model_checks_do_not_pay_at_card_coverages(depth, exit_depth, coverage):
    assert inner_exit_gain(C, depth, exit_depth, coverage, 100, 5) < 0


def test_no_gain_without_costs_or_outside_the_loaded_layers():
    assert inner_exit_gain(CandidateInfo(name="x", num_layers=30), 30, 10, 1.0, 0, 0) == 0.0
    assert inner_exit_gain(C, 20, 20, 1.0, 0, 0) == 0.0 and inner_exit_gain(C, 20, 24, 1.0, 0, 0) == 0.0


def test_bundled_smollm2_exits_do_not_pay_inside_a_replica():
    """The shipped SmolLM2 card: both trusted exits are considered and refused, with the numbers that say why."""
    from helios_ray.tuning.profiling import inner_exits
    from helios_ray.models.repository import ModelRepository

    choice = inner_exits(ModelRepository(), "smollm2-135m", 30, 0.9, 0.9)
    assert choice["exits"] == [] and sorted(choice["considered"]) == [20, 24]
    for c in choice["considered"].values():
        assert 0 < c["coverage"] < 0.5 and c["gain_flops"] < 0 and not c["pays"]
    assert sorted(inner_exits(ModelRepository(), "smollm2-135m", 24, 0.9, 0.9)["considered"]) == [20]
