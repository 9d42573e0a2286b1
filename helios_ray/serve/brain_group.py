"""One replica group as the brain holds it: its own policy loop, its versioned placement and its operator pin.

Each group runs the HELIOS loop (:class:`~helios_ray.control.Controller`) on the telemetry of the requests the
router steered to it, so a group that receives mostly code re-plans for code, and its profiling windows mirror
*its* requests.  That is how the fleet plans per request class without a class label anywhere: the router's
steering decides which traffic a group sees, and the group's policy follows that traffic.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from helios_ray.serve.config import GroupSpec, ServeConfig
from helios_ray.control import checkpoint
from helios_ray.control.config import CandidateInfo, Hardware
from helios_ray.control.controller import Controller, Placement
from helios_ray.control.decision import NoFeasiblePlacement
from helios_ray.errors import InvalidRequestError, UnknownModelError


class GroupCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    placement: dict[str, Any]
    operator_pin: bool = False
    changed_at: float
    controller: checkpoint.ControllerState


class Group:
    """A replica group: ``placement`` {model, depth} at ``version``; replicas long-poll the version."""

    def __init__(self, spec: GroupSpec, cfg: ServeConfig, candidates: list[CandidateInfo], hw: Hardware,
                 baseline: bool) -> None:
        self.name = spec.name
        self.spec = spec
        self.candidates = [c for c in candidates if c.name in (spec.candidates or [])]
        self.by_name = {c.name: c for c in self.candidates}
        self.controller = Controller(self.candidates, cfg.slo, hw, cfg.policy)
        self.baseline = baseline  # early_exit/plain modes: the first candidate at full depth, never moved
        self.operator_pin = False
        self.version = 1
        self.changed_at = time.time()
        self.placement: dict[str, Any] = {}
        self.first_decision: Any = None

    def start(self) -> None:
        """The first placement: a baseline's fixed model, the configured ``initial``, or the policy's choice."""
        first = None
        if not self.baseline:
            try:
                first = self.controller.start()
            except NoFeasiblePlacement:
                if self.spec.initial is None:
                    raise  # nothing to start with: the brain's start fails with the policy's reason
                # the operator's `initial` stands; the policy plans once profiling gives it evidence
        self.first_decision = first
        if self.baseline:
            c = self.candidates[0]
            self.placement = {"model": c.name, "depth": c.num_layers}
        elif self.spec.initial is not None:
            m = self.spec.initial.model
            self.placement = {"model": m, "depth": self.spec.initial.depth or self.by_name[m].num_layers}
        else:
            assert first is not None
            self.placement = {"model": first.model, "depth": int(first.depth)}
        self.controller.current = Placement(**self.placement)

    @property
    def pinned(self) -> bool:
        return self.baseline or self.operator_pin

    def snapshot(self) -> dict[str, Any]:
        return {"version": self.version, **self.placement}

    def check(self, model: str, depth: int | None) -> int:
        """The depth an operator's (model, depth) means here, or the refusal (404 model, 400 depth / baseline)."""
        if model not in self.by_name:
            raise UnknownModelError(f"{model!r} is not a candidate of group {self.name!r} "
                                    f"(candidates: {', '.join(self.by_name)})")
        layers = self.by_name[model].num_layers
        depth = layers if depth is None else depth
        if not 1 <= depth <= layers:
            raise InvalidRequestError(f"depth {depth} is out of range for {model!r} (1..{layers} layers)")
        if self.baseline:
            raise InvalidRequestError("this application serves a fixed baseline; its placement cannot move")
        return depth

    def move(self, model: str, depth: int) -> dict[str, Any] | None:
        """Set the placement (a new version); returns the old one, or None when nothing changed."""
        new = {"model": model, "depth": int(depth)}
        if new == self.placement:
            return None
        old, self.placement = self.placement, new
        self.version += 1
        self.changed_at = time.time()
        self.controller.current = Placement(**new)
        return old

    def save(self) -> GroupCheckpoint:
        return GroupCheckpoint(version=self.version, placement=self.placement, operator_pin=self.operator_pin,
                               changed_at=self.changed_at, controller=checkpoint.snapshot(self.controller))

    def restore(self, st: GroupCheckpoint) -> None:
        checkpoint.restore(self.controller, st.controller)
        self.version, self.placement, self.operator_pin = st.version, dict(st.placement), st.operator_pin
        self.changed_at = st.changed_at

