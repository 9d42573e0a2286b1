"""The records the policy returns: a depth with its evidence, a scored placement, a decision.

They carry the numbers that justified each outcome so the router can log and export them and a human
can audit why a placement was chosen; they hold no logic beyond naming those numbers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .config import SLO
from .costs import CostUnit

__all__ = [
    "Action",
    "Trigger",
    "EvidenceSource",
    "Number",
    "NoFeasiblePlacement",
    "DepthChoice",
    "Estimate",
    "Decision",
]

Action = Literal["deploy", "extend", "switch", "keep"]
Trigger = Literal["start", "profile", "reassess", "storm", "slo_change", "hardware_change", "plan", "quality"]
EvidenceSource = Literal["pht", "prior", "none", "full"]
"""Where a depth's exit statistics came from: the PHT, the exit card's priors, nowhere, or the full
depth (which needs no evidence: it *is* the full model)."""
Number = float | int | str | bool | None


class NoFeasiblePlacement(ValueError):
    """No candidate fits the memory budget at any depth the accuracy guard allows."""


class DepthChoice(BaseModel):
    """A depth with the evidence that allowed it."""

    model: str
    depth: int
    exit_share: float | None
    agreement: float | None
    ppl_increase: float | None
    evidence: EvidenceSource
    reason: str
    guard_ok: bool = True
    """False only for a depth evaluated as-is (the current placement) whose guard no longer holds."""


class Estimate(BaseModel):
    """One (model, depth) scored for an SLO."""

    model: str
    depth: int
    fits: bool
    batch: int
    weight_bytes: int
    cost: float
    cost_unit: CostUnit
    seconds_per_token: float | None
    tokens_per_s: float | None
    energy_j_per_token: float | None
    basis: Literal["measured", "static"]
    score: float
    choice: DepthChoice
    stale: list[str] = Field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.model}@{self.depth}"


class Decision(BaseModel):
    """One decision of the control loop, with the numbers that justified it."""

    action: Action
    model: str | None
    depth: int | None
    trigger: Trigger = "plan"
    reason: str
    slo: SLO | None = None
    previous_model: str | None = None
    previous_depth: int | None = None
    batch_size: int | None = Field(None, description="Max concurrent sequences at the placement.")
    token_index: int | None = Field(None, description="Served tokens observed before it.")
    request_index: int | None = Field(None, description="Requests completed before it.")
    request: int | None = Field(None, description="Request id whose token triggered it.")
    pos: int | None = Field(None, description="Position of that token in its request.")
    numbers: dict[str, Number] = Field(default_factory=dict)

    @property
    def changes_placement(self) -> bool:
        return self.action != "keep" and (
            (self.model, self.depth) != (self.previous_model, self.previous_depth)
        )
