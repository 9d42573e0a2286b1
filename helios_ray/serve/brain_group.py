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
from helios_ray.control.quality import QualityGate, ResolvedFloor, meets_floor
from helios_ray.errors import InvalidRequestError, UnknownModelError


#: A request class below this share of a group's recent traffic no longer binds its placement (a stray request
#: must not pin a group to a slower model; the router still sends it only where its floor is met).
MIN_CLASS_SHARE = 0.05


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
                 baseline: bool, floors: dict[str, ResolvedFloor] | None = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.candidates = [c for c in candidates if c.name in (spec.candidates or [])]
        self.by_name = {c.name: c for c in self.candidates}
        # Until traffic shows what this group serves, its placement must meet every floor (the conservative start).
        self.floors = floors or {}
        self.mix: dict[str, float] = {}  # decayed requests per class steered here
        self.chats = 0.0  # decayed chats (requests with messages) among them
        self.controller = Controller(self.candidates, cfg.slo, hw, cfg.policy,
                                     quality=QualityGate(floors=self.floors) if self.floors else None)
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

    def observe_class(self, kind: str, chat: bool, decay: float = 0.98) -> bool:
        """One request steered here; returns True when the traffic's classes changed enough that the gate was
        renewed (a class appeared or faded out, or chats started or stopped)."""
        for k in self.mix:
            self.mix[k] *= decay
        self.mix[kind] = self.mix.get(kind, 0.0) + 1.0
        self.chats = decay * self.chats + (1.0 if chat else 0.0)
        if not self.floors:
            return False
        total = sum(self.mix.values())
        serves = {k: v / total for k, v in self.mix.items() if v / total >= MIN_CLASS_SHARE}
        chats = self.chats / total >= MIN_CLASS_SHARE
        old = self.controller.quality
        if old is not None and set(old.mix) == set(serves) and old.chat == chats:
            return False
        self.controller.set_quality(QualityGate(floors=self.floors, mix=serves, chat=chats))
        return True

    def quality_view(self) -> dict[str, Any]:
        """Per request class: the current placement's measured value against the floor, and the traffic share."""
        cand = self.by_name[self.placement["model"]]
        values = cand.quality.get(int(self.placement["depth"]), {})
        total = sum(self.mix.values()) or 1.0
        rows = {}
        for c in sorted(set(values) | set(self.floors) | set(self.mix)):
            floor = self.floors[c].value if c in self.floors else None
            rows[c] = {"value": values.get(c), "floor": floor, "meets": meets_floor(values.get(c), floor),
                       "traffic_share": round(self.mix.get(c, 0.0) / total, 3)}
        return {"chat_capable": cand.chat_capable, "chat_share": round(self.chats / total, 3), "classes": rows}

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

