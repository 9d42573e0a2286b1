"""The fake servers' status document (tests/loadgen/servers.py) against the real control plane: every placement
change must be a :class:`Decision` the real policy can produce, in exactly the shape the real ``Brain``
deployment writes into ``/v1/helios/status``.  When the policy's actions/triggers or the brain's change
entries change, these fail, and the fake (with the loadgen tests built on it) must follow."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from helios_ray.control.policy import Decision
from tests.loadgen.servers import Behavior


def _switched_doc() -> dict[str, Any]:
    b = Behavior(switch_after=1)
    b.enter({"prompt": "x"})
    return b.status_doc()


def _as_decision(change: dict[str, Any]) -> Decision:
    return Decision.model_validate({
        "action": change["action"], "trigger": change["trigger"], "reason": change["reason"],
        "model": change["to"]["model"], "depth": change["to"]["depth"],
        "previous_model": change["from"]["model"], "previous_depth": change["from"]["depth"],
    })


def test_fake_changes_validate_as_real_decisions():
    before, after = Behavior().status_doc(), _switched_doc()
    assert before["changes"] == [] and after["changes"]
    for change in after["changes"]:
        d = _as_decision(change)  # raises on an action or trigger the real policy cannot produce
        assert d.changes_placement
    last = after["changes"][-1]
    assert after["placement"] == {"version": last["version"], **last["to"]}
    assert before["placement"] == {"version": last["version"] - 1, **last["from"]}


@pytest.mark.parametrize("drift", [{"action": "shrink"}, {"trigger": "pht"}])
def test_the_drifted_values_are_rejected(drift):
    change = {**_switched_doc()["changes"][0], **drift}
    with pytest.raises(ValidationError):
        _as_decision(change)


def test_the_brain_writes_its_changes_with_the_function_the_fake_uses():
    """The fake's entries come from ``helios_ray.serve.brain.change_entry``; this pins that the brain itself
    writes every change through it (policy decisions and operator moves), so the two cannot drift apart."""
    import inspect

    from helios_ray.serve import brain

    src = inspect.getsource(brain.Brain)
    assert src.count("self.changes.append(change_entry(") == 1 and "self.changes.append({" not in src
    fake = _switched_doc()["changes"][-1]
    assert set(fake) == {"version", "at", "group", "from", "to", "action", "trigger", "reason"}
