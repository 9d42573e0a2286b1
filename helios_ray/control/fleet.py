"""PLACEHOLDER until the fleet branch lands."""
from __future__ import annotations
from typing import Any


class SwitchGate:
    def __init__(self, timeout_s: float = 180.0) -> None:
        self.timeout_s = timeout_s
        self.active: dict[str, tuple[int, float]] = {}
        self.pending: dict[str, dict[str, Any]] = {}

    def begin(self, group: str, version: int, now: float) -> None:
        self.active[group] = (version, now)

    def done(self, group: str, version: int) -> None:
        if group in self.active and self.active[group][0] <= version:
            del self.active[group]

    def may_switch(self, group: str, now: float) -> bool:
        return not any(g != group and now - t < self.timeout_s for g, (_, t) in self.active.items())

    def defer(self, group: str, want: dict[str, Any]) -> None:
        self.pending[group] = want

    def drop(self, group: str) -> None:
        self.pending.pop(group, None)

    def next_ready(self, now: float) -> tuple[str, dict[str, Any]] | None:
        for g in list(self.pending):
            if self.may_switch(g, now):
                return g, self.pending.pop(g)
        return None

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"active": {g: {"version": v, "since_s": round(now - t, 1)} for g, (v, t) in self.active.items()},
                "deferred": dict(self.pending)}
