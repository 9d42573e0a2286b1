"""The controller's whole state as one serialisable value, so the brain survives a restart.

Without it a restarted brain starts over - empty PHT, placement back to its first choice at version 1 - and the
replicas follow it into an unplanned model switch.  The state is everything the policy decides from: the PHT,
the breach window, the decision log, the current placement and the counters that pace profiling windows,
re-assessment and hysteresis.  Pure data; where it is stored (Ray's internal KV) is the serving layer's business.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .breach import BreachCounter
from .controller import Controller, Placement
from .decision import Decision
from .pht import PHT


class BreachState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flags: list[bool] = Field(default_factory=list, description="The window, oldest first.")
    total: int = 0
    total_breaches: int = 0


class ControllerState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pht: str = Field(description="PHT.to_json()")
    current: Placement | None = None
    shortlisted: list[str] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)
    breaches: BreachState = Field(default_factory=BreachState)
    tokens_served: int = 0
    requests_started: int = 0
    requests_done: int = 0
    suppressed_storm_tokens: int = 0
    quiet_until: int | None = None
    planned: bool = False
    profile_targets: list[str] = Field(default_factory=list)


def snapshot(ctl: Controller, max_decisions: int = 200) -> ControllerState:
    flags, total, total_breaches = ctl.breaches.window_state()
    return ControllerState(
        pht=ctl.pht.to_json(), current=ctl.current, shortlisted=list(ctl.shortlisted),
        decisions=list(ctl.decisions[-max_decisions:]),
        breaches=BreachState(flags=flags, total=total, total_breaches=total_breaches),
        tokens_served=ctl.tokens_served, requests_started=ctl.requests_started, requests_done=ctl.requests_done,
        suppressed_storm_tokens=ctl.suppressed_storm_tokens, quiet_until=ctl._quiet_until, planned=ctl._planned,
        profile_targets=list(ctl._profile_targets),
    )


def restore(ctl: Controller, state: ControllerState) -> None:
    """Put ``state`` into a freshly built controller (same candidates and config)."""
    ctl.pht = PHT.from_json(state.pht, clock=ctl.pht.clock)  # keep the controller's (injected) clock
    ctl.current = state.current
    ctl.shortlisted = list(state.shortlisted)
    ctl.decisions = list(state.decisions)
    ctl.breaches = BreachCounter.from_config(ctl.config)
    ctl.breaches.load_window_state(state.breaches.flags, state.breaches.total, state.breaches.total_breaches)
    ctl.tokens_served, ctl.requests_started = state.tokens_served, state.requests_started
    ctl.requests_done, ctl.suppressed_storm_tokens = state.requests_done, state.suppressed_storm_tokens
    ctl._quiet_until, ctl._planned = state.quiet_until, state.planned
    ctl._profile_targets = list(state.profile_targets)
