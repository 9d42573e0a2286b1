"""The pure pieces of the fleet plan: how many replicas each group gets, and one group switching at a time.

* :func:`size_groups` turns demand per group (e.g. tokens the router steered to it over the last window) into
  replica counts that fill the available slots (one replica per GPU/CPU slot), proportional to demand, with a
  floor per group and hysteresis so that noise in the demand does not make replicas flap between groups.
* :class:`SwitchGate` lets one group change placement at a time: a switch drains and reloads replicas, and
  two groups doing it at once could take most of the fleet's capacity away together.  Changes wanted while
  another group switches are deferred (latest wins per group) and handed out later, never dropped.

Pure Python: the brain calls these and turns the answers into deployment changes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = ["size_groups", "SwitchGate", "SwitchInProgress"]


def _check_sizing(demand: dict[str, float], slots: int, current: dict[str, int], min_per_group: int,
                  hysteresis: float) -> None:
    if not demand:
        raise ValueError("size_groups needs at least one group in demand")
    for name, value in demand.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"group names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"demand of group {name!r} must be a finite number >= 0, got {value!r}")
    for label, v in (("slots", slots), ("min_per_group", min_per_group)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{label} must be an integer, got {v!r}")
    if min_per_group < 0:
        raise ValueError(f"min_per_group must be >= 0, got {min_per_group}")
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if slots < min_per_group * len(demand):
        raise ValueError(f"{slots} slots cannot give {len(demand)} groups at least {min_per_group} replica(s) each")
    if isinstance(hysteresis, bool) or not isinstance(hysteresis, (int, float)) or not math.isfinite(hysteresis) \
            or hysteresis < 0:
        raise ValueError(f"hysteresis must be a finite number >= 0, got {hysteresis!r}")
    for name, count in current.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"current replicas of group {name!r} must be an integer >= 0, got {count!r}")


def _quotas(demand: dict[str, float], slots: int, min_per_group: int) -> dict[str, float]:
    """Ideal (unrounded) replica counts: proportional to demand, raised to the floor where demand is small.

    Groups whose proportional quota falls below ``min_per_group`` are fixed at the floor and the rest of the
    slots are shared again among the others (water-filling), so the floor is paid for by the big groups.
    No demand at all (a cold start) shares the slots equally.
    """
    fixed: dict[str, float] = {}
    free = list(demand)
    while True:
        room = slots - min_per_group * len(fixed)
        total = sum(demand[g] for g in free)
        share = {g: room * demand[g] / total if total > 0 else room / len(free) for g in free}
        low = [g for g in free if share[g] < min_per_group]
        if not low:  # cannot empty `free`: the free quotas sum to room >= min_per_group * len(free)
            return {**fixed, **share}
        for g in low:
            fixed[g] = float(min_per_group)
            free.remove(g)


def _keeps(current: dict[str, int], quotas: dict[str, float], slots: int, min_per_group: int,
           hysteresis: float) -> bool:
    """Whether ``current`` still fits the demand: no group's wanted share moved by more than ``hysteresis`` of
    its current share, plus half a replica of rounding slack (without it, 3 slots at 49/51 demand would flip
    2:1 <-> 1:2 on every wobble around 50/50)."""
    if set(current) != set(quotas) or sum(current.values()) != slots:
        return False
    if any(n < min_per_group for n in current.values()):
        return False
    return all(abs(quotas[g] - n) <= hysteresis * n + 0.5 for g, n in current.items())


def size_groups(demand: dict[str, float], slots: int, current: dict[str, int], min_per_group: int = 1,
                hysteresis: float = 0.2) -> dict[str, int]:
    """Replicas per group: proportional to ``demand``, each >= ``min_per_group``, summing to ``slots``.

    Rounding is largest-remainder (floors first, the leftover slots to the largest fractional parts; ties to the
    larger demand, then the name, so the answer is deterministic).  ``current`` comes back unchanged unless the
    groups or the slots changed, a group is below the floor, or some group's wanted share moved by more than
    ``hysteresis`` of its current share (plus half a replica of rounding slack).  Raises ``ValueError`` on
    malformed input, with the reason.
    """
    _check_sizing(demand, slots, current, min_per_group, hysteresis)
    quotas = _quotas(demand, slots, min_per_group)
    if _keeps(current, quotas, slots, min_per_group, hysteresis):
        return dict(current)
    counts = {g: int(math.floor(q + 1e-9)) for g, q in quotas.items()}
    left = slots - sum(counts.values())
    order = sorted(quotas, key=lambda g: (-(quotas[g] - counts[g]), -demand[g], g))
    for g in order[:left]:
        counts[g] += 1
    return counts


# ----------------------------------------------------------------------------------------------- switching
class SwitchInProgress(RuntimeError):
    """``begin`` was called while another group is mid-switch (and that switch has not timed out)."""


@dataclass(frozen=True)
class _Active:
    group: str
    version: int
    started: float


class SwitchGate:
    """One group switching placement at a time; deferred changes queue up (latest wanted placement per group).

    The brain asks ``may_switch(group, now)`` before moving a group; if not, it ``defer``s the wanted placement.
    When a switch is ``done`` (all the group's live replicas report the version), ``next_ready(now)`` hands out
    the oldest deferred group, which the brain then ``begin``s.  A switch older than ``timeout_s`` no longer
    blocks the others (a replica that never reports must not freeze the fleet).  The group that is switching
    may switch again at once: its replicas follow the newest version anyway.
    """

    def __init__(self, timeout_s: float = 180.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self._active: _Active | None = None
        self._pending: OrderedDict[str, Any] = OrderedDict()
        self.timeouts = 0  # switches given up on because they ran past timeout_s

    @property
    def active(self) -> dict[str, Any] | None:
        """The switch in progress: group, version and start time."""
        a = self._active
        return None if a is None else {"group": a.group, "version": a.version, "started": a.started}

    @property
    def pending(self) -> dict[str, Any]:
        """Deferred changes, oldest first: group -> the latest placement wanted for it."""
        return dict(self._pending)

    def may_switch(self, group: str, now: float) -> bool:
        """True unless *another* group is mid-switch and its switch is younger than ``timeout_s``."""
        a = self._active
        return a is None or a.group == group or now - a.started >= self.timeout_s

    def begin(self, group: str, version: int, now: float) -> None:
        """Record that ``group`` starts moving to ``version``; its deferred change (if any) is now applied."""
        if not self.may_switch(group, now):
            a = self._active
            assert a is not None
            raise SwitchInProgress(f"group {a.group!r} is mid-switch to version {a.version} since "
                                   f"{now - a.started:.1f}s; defer {group!r} (timeout {self.timeout_s:g}s)")
        if self._active is not None and self._active.group != group:
            self.timeouts += 1
        self._active = _Active(group, version, now)
        self._pending.pop(group, None)

    def done(self, group: str, version: int) -> bool:
        """The group's live replicas all report ``version`` (or newer): its switch is over.  False when that is
        not the switch in progress (an old version, another group, or one already finished)."""
        a = self._active
        if a is not None and a.group == group and version >= a.version:
            self._active = None
            return True
        return False

    def defer(self, group: str, placement: Any) -> None:
        """Remember that ``group`` should move to ``placement``; a later call replaces it (latest wins) and the
        group keeps its place in the queue."""
        self._pending[group] = placement

    def discard(self, group: str) -> None:
        """Forget a deferred change (the group is wanted where it already is again)."""
        self._pending.pop(group, None)

    def next_ready(self, now: float) -> tuple[str, Any] | None:
        """The oldest deferred change that may start now, without removing it (``begin`` does): a change the
        caller fails to apply stays queued."""
        for group, placement in self._pending.items():
            if self.may_switch(group, now):
                return group, placement
        return None

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state for the status page (placements as given to ``defer``)."""
        return {"active": self.active, "pending": self.pending, "timeouts": self.timeouts,
                "timeout_s": self.timeout_s}
