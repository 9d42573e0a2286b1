"""The fake servers' status document (tests/loadgen/servers.py) against the real control plane: every placement
change must be a :class:`Decision` the real policy can produce, in exactly the shape the real ``Brain``
deployment writes into ``/v1/helios/status``.  When the policy's actions/triggers or the brain's change
entries change, these fail, and the fake (with the loadgen tests built on it) must follow."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError

from helios_ray.control.policy import Decision
from tests.loadgen.servers import SWITCH, Behavior


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


def test_fake_entries_have_the_shape_the_real_brain_writes():
    from helios_ray.serve.brain import Brain

    # Only the brain's placement bookkeeping runs: __init__ is skipped (it builds the policy from prepared models).
    ctl = Brain.__new__(Brain)
    ctl.pinned, ctl.placement, ctl.version, ctl.changes = False, {"model": "tiny", "depth": 6}, 1, []

    async def apply() -> None:
        ctl._cond = asyncio.Condition()
        await ctl._maybe_apply(SWITCH)

    asyncio.run(apply())
    real, fake_doc = ctl.changes[-1], _switched_doc()
    fake = fake_doc["changes"][-1]
    assert set(fake) == set(real)
    assert {k: v for k, v in fake.items() if k != "at"} == {k: v for k, v in real.items() if k != "at"}
    assert fake_doc["placement"] == ctl._snapshot()
