"""The fleet plan's pure pieces: replicas per group (size_groups) and one group switching at a time (SwitchGate)."""

from __future__ import annotations

import math
import random

import pytest

from helios_ray.control.fleet import SwitchGate, SwitchInProgress, _quotas, size_groups


def test_size_groups_is_proportional_with_largest_remainder():
    assert size_groups({"a": 3.0, "b": 1.0}, 8, {}) == {"a": 6, "b": 2}
    assert size_groups({"a": 1.0, "b": 1.0, "c": 1.0}, 10, {}) == {"a": 4, "b": 3, "c": 3}  # tie: the name
    assert size_groups({"a": 1.0, "b": 2.0, "c": 2.0}, 7, {}) == {"a": 1, "b": 3, "c": 3}
    assert size_groups({"a": 0.0, "b": 0.0}, 4, {}) == {"a": 2, "b": 2}  # no demand yet: equal shares
    # the floor is paid for by the big groups
    assert size_groups({"a": 100.0, "b": 0.0, "c": 1.0}, 5, {}) == {"a": 3, "b": 1, "c": 1}
    assert size_groups({"a": 100.0, "b": 0.0}, 5, {}, min_per_group=0) == {"a": 5, "b": 0}


def test_size_groups_properties_on_random_demand():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 6)
        mins = rng.randint(0, 2)
        slots = rng.randint(max(1, n * mins), 40)
        demand = {f"g{i}": rng.choice([0.0, rng.uniform(0, 1000)]) for i in range(n)}
        fresh = size_groups(demand, slots, {}, min_per_group=mins)
        quotas = _quotas(demand, slots, mins)
        assert sum(fresh.values()) == slots and set(fresh) == set(demand)
        assert all(fresh[g] >= mins and abs(fresh[g] - quotas[g]) < 1 for g in demand)
        assert size_groups(demand, slots, fresh, min_per_group=mins) == fresh  # a fixed point: no flapping
        assert math.isclose(sum(quotas.values()), slots)


def test_size_groups_hysteresis_keeps_small_moves_and_follows_big_ones():
    current = {"a": 4, "b": 4}
    assert size_groups({"a": 55.0, "b": 45.0}, 8, current) == current
    assert size_groups({"a": 80.0, "b": 20.0}, 8, current) == {"a": 6, "b": 2}
    assert size_groups({"a": 55.0, "b": 45.0}, 8, current, hysteresis=0.0) == {"a": 4, "b": 4}
    assert size_groups({"a": 70.0, "b": 30.0}, 8, current, hysteresis=0.0) == {"a": 6, "b": 2}
    # wobbling around 50/50 on 3 slots does not flip 2:1 <-> 1:2
    state = size_groups({"a": 51.0, "b": 49.0}, 3, {})
    for wobble in (49.0, 51.0, 48.0, 52.0):
        state = size_groups({"a": wobble, "b": 100 - wobble}, 3, state)
    assert state == {"a": 2, "b": 1}
    # a group added or removed, or a slot added, always re-plans
    assert size_groups({"a": 1.0, "b": 1.0, "c": 1.0}, 9, {"a": 5, "b": 4}) == {"a": 3, "b": 3, "c": 3}
    assert size_groups({"a": 1.0, "b": 1.0}, 10, current) == {"a": 5, "b": 5}


@pytest.mark.parametrize("args, message", [
    (({}, 4, {}), "at least one group"),
    (({"a": -1.0}, 4, {}), "finite number >= 0"),
    (({"a": float("nan")}, 4, {}), "finite number >= 0"),
    (({"a": 1.0, "b": 1.0}, 1, {}), "1 slots cannot give 2 groups"),
    (({"a": 1.0}, 0, {}), "slots must be >= 1"),
    (({"a": 1.0}, 2.5, {}), "slots must be an integer"),
    (({"a": 1.0}, 4, {"a": -2}), "integer >= 0"),
])
def test_size_groups_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        size_groups(*args)
    with pytest.raises(ValueError, match="hysteresis"):
        size_groups({"a": 1.0}, 2, {}, hysteresis=-0.1)


def test_switch_gate_one_group_at_a_time_and_nothing_lost():
    gate = SwitchGate(timeout_s=180)
    assert gate.may_switch("a", 0) and gate.next_ready(0) is None
    gate.begin("a", 1, now=0)
    assert not gate.may_switch("b", 10) and gate.may_switch("a", 10)
    with pytest.raises(SwitchInProgress, match="'a' is mid-switch"):
        gate.begin("b", 1, now=10)
    gate.defer("b", {"model": "m", "depth": 12})
    gate.defer("c", {"model": "m", "depth": 8})
    gate.defer("b", {"model": "m", "depth": 16})  # latest wins, b keeps its place in the queue
    assert list(gate.pending) == ["b", "c"] and gate.pending["b"]["depth"] == 16
    assert gate.next_ready(20) is None
    assert not gate.done("a", 0) and not gate.done("b", 1)  # an old version, another group
    assert gate.done("a", 2)  # a newer version also means the switch is over
    assert gate.next_ready(30) == ("b", {"model": "m", "depth": 16})
    assert gate.next_ready(30) == ("b", {"model": "m", "depth": 16})  # peeking loses nothing
    gate.begin("b", 1, now=30)
    assert gate.pending == {"c": {"model": "m", "depth": 8}} and gate.next_ready(100) is None
    # b never finishes: after the timeout it no longer blocks c
    assert gate.next_ready(30 + 180) == ("c", {"model": "m", "depth": 8})
    gate.begin("c", 7, now=30 + 180)
    assert gate.timeouts == 1 and gate.active == {"group": "c", "version": 7, "started": 210}
    gate.defer("a", "x")
    gate.discard("a")
    assert gate.snapshot()["pending"] == {} and gate.done("c", 7) and gate.active is None
    with pytest.raises(ValueError):
        SwitchGate(timeout_s=0)
