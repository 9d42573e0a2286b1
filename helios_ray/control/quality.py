"""Quality floors: what a placement must deliver for a request class before its speed counts.

HELIOS's accuracy guard compares a model only with its own full depth, so every model passes at full depth and a
choice by speed sends code to the model that fails it.  Here every request has a class (``code``, ``chat``,
``text`` or an operator's), every placement (model, depth) has a measured quality record per class that is
comparable across models (:mod:`helios_ray.tuning.quality`: HumanEval pass@1 for code, the chat score under one
reference model for chat), and the SLO carries a floor per class.  Floors are

* absolute (``0.30``: pass@1 at least 30%), or
* relative to the best *registered* placement for that class (``"best - 0.05"``): resolved once against every
  candidate of the application, so a group of small models cannot lower the bar by having no good one.

A :class:`QualityGate` is the resolved floors plus what one decision must serve (the classes of a group's
traffic, and whether chats are among them).  The policy keeps only placements the gate passes and picks the
fastest of those; when none passes, the best-quality one (the decision says so).  The router applies the same
floors per request (:mod:`.steering`).  Unmeasured quality never passes a floor: the system does not assume a
placement is good enough.  Pure Python, like the rest of ``control/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["QualityFloor", "QualityFloors", "ResolvedFloor", "QualityGate", "QualityVerdict", "resolve_floors",
           "quality_of", "meets_floor", "DEFAULT_FLOORS", "OnlineQuality"]

_RELATIVE = re.compile(r"^\s*best\s*(?:-\s*(?P<delta>\d*\.?\d+))?\s*$")

#: Conservative defaults, used when a deployment names no floors: a placement may lose at most 5 points of
#: HumanEval pass@1 (8 of 164 problems) against the best registered placement for code, and 0.05 of the chat score
#: against the best chat-capable placement other than the reference model's own (docs/quality.md has the arithmetic
#: on the bundled models).  ``text`` (plain completions that are not code) has no floor.
DEFAULT_FLOORS: dict[str, str] = {"code": "best - 0.05", "chat": "best - 0.05"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


class QualityFloor(_Strict):
    """One class's floor: ``minimum`` (absolute) or ``below_best`` (relative to the best registered placement)."""

    minimum: float | None = Field(default=None, ge=0.0, le=1.0)
    below_best: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("a floor is a number in [0, 1] or 'best - X'")
        if isinstance(v, (int, float)):
            return {"minimum": float(v)}
        if isinstance(v, str):
            m = _RELATIVE.match(v)
            if m:
                return {"below_best": float(m.group("delta") or 0.0)}
            try:
                return {"minimum": float(v)}
            except ValueError:
                raise ValueError(f"floor {v!r}: expected a number in [0, 1] or 'best - X' (e.g. 'best - 0.05')")
        return v

    @model_validator(mode="after")
    def _one(self) -> "QualityFloor":
        if (self.minimum is None) == (self.below_best is None):
            raise ValueError("a floor is either absolute (a number) or relative ('best - X'), not both")
        return self

    def __str__(self) -> str:
        return f"{self.minimum:g}" if self.minimum is not None else f"best - {self.below_best:g}"


class QualityFloors(_Strict):
    """The ``quality:`` block of a deployment: a floor per request class (``{code: 'best - 0.05', chat: 0.6}``).

    ``reference_excluded`` (default true) leaves the chat reference model's own answers out of "best" for the
    chat class: the reference judges its own answers as perfect by construction, so "best" would be a ceiling no
    other model can reach."""

    floors: dict[str, QualityFloor] = Field(default_factory=lambda: {k: QualityFloor.model_validate(v)
                                                                     for k, v in DEFAULT_FLOORS.items()})
    reference_excluded: bool = True
    online_sample: float = Field(0.05, ge=0.0, le=1.0, description="Share of served chat answers the profiler scores "
                                 "under the chat reference, online (0: offline records only).")
    online_min_samples: int = Field(8, ge=1, description="Scored answers of a placement before its online chat "
                                    "score replaces the offline record.")
    online_max_tokens: int = Field(64, ge=1, description="Length of the reference's answer an online score compares "
                                   "with (the offline records use 64).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        # `quality: {code: 0.3, chat: best - 0.1}` is the floors themselves; `quality: {floors: {...}}` is explicit.
        knobs = {"reference_excluded", "online_sample", "online_min_samples", "online_max_tokens"}
        if isinstance(v, Mapping) and "floors" not in v and not set(v) <= knobs:
            out: dict[str, Any] = {"floors": {k: x for k, x in v.items() if k not in knobs}}
            out.update({k: x for k, x in v.items() if k in knobs})
            return out
        return v

    @field_validator("floors")
    @classmethod
    def _names(cls, v: dict[str, QualityFloor]) -> dict[str, QualityFloor]:
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name):
                raise ValueError(f"request class {name!r}: lower-case letters, digits, '-' or '_'")
        return v


class ResolvedFloor(_Strict):
    """A floor as a number, with how it was obtained (shown in the status and in decisions)."""

    value: float
    source: str


def meets_floor(value: float | None, floor: float | None) -> bool:
    """The one rule: no floor is met by anything; a floor is met by a measured value at or above it (unmeasured
    never meets one)."""
    return floor is None or (value is not None and value >= floor - 1e-12)


def quality_of(record: Mapping[int, Mapping[str, float]] | None, depth: int, cls: str) -> float | None:
    """A placement's measured value for ``cls`` at ``depth``, or None when it was not measured there."""
    if not record:
        return None
    return (record.get(depth) or {}).get(cls)


def resolve_floors(spec: QualityFloors, candidates: Iterable[Any], reference: str | None = None
                   ) -> dict[str, ResolvedFloor]:
    """Absolute floors from ``spec`` against every registered placement's record (``candidate.quality``:
    ``{depth: {class: value}}``).  A relative floor whose class nobody measured resolves to no floor (said in
    its source), so a class without records never blocks a deployment."""
    cands = list(candidates)
    out: dict[str, ResolvedFloor] = {}
    for cls, floor in spec.floors.items():
        if floor.minimum is not None:
            out[cls] = ResolvedFloor(value=floor.minimum, source=f"{floor.minimum:g} (absolute)")
            continue
        best, where = None, None
        for c in cands:
            if cls == "chat" and (not getattr(c, "chat_capable", True)
                                  or (spec.reference_excluded and c.name == reference)):
                continue
            for depth, values in (c.quality or {}).items():
                v = values.get(cls)
                if v is not None and (best is None or v > best):
                    best, where = v, f"{c.name}@{depth}"
        if best is None:
            continue
        value = round(max(0.0, best - (floor.below_best or 0.0)), 6)
        out[cls] = ResolvedFloor(value=value, source=f"best {best:g} ({where}) - {floor.below_best:g}")
    return out


class QualityVerdict(_Strict):
    """Whether a placement meets the gate, and the numbers behind it."""

    ok: bool
    failed: list[str] = Field(default_factory=list, description="classes whose floor it misses (or 'chat-capable')")
    failed_share: float = Field(0.0, description="share of the traffic in failed classes (what ranks near misses)")
    deficit: float = Field(0.0, description="sum over failed classes of floor - value (unmeasured: the floor)")
    values: dict[str, float | None] = Field(default_factory=dict)

    def describe(self) -> str:
        if self.ok:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in self.values.items() if v is not None)
            return f"meets every floor ({shown})" if shown else "no floor applies"
        return "misses " + ", ".join(self.failed)


class QualityGate(_Strict):
    """Resolved floors and what a decision must serve.

    ``mix``: the request classes the placement serves, with their share of its traffic (empty: every class with
    a floor, equally - the conservative start before any traffic is seen).  ``chat``: whether chats (requests
    with messages) are among them, which needs a chat-capable model."""

    floors: dict[str, ResolvedFloor] = Field(default_factory=dict)
    mix: dict[str, float] = Field(default_factory=dict)
    chat: bool = True

    def required(self) -> dict[str, float]:
        if self.mix:
            total = sum(self.mix.values()) or 1.0
            return {k: v / total for k, v in self.mix.items() if k in self.floors and v > 0}
        return {k: 1.0 / len(self.floors) for k in self.floors} if self.floors else {}

    def check(self, candidate: Any, depth: int) -> QualityVerdict:
        failed: list[str] = []
        share = deficit = 0.0
        values: dict[str, float | None] = {}
        if self.chat and not getattr(candidate, "chat_capable", True):
            failed.append("chat-capable")
            share += 1.0
        for cls, weight in self.required().items():
            v = quality_of(candidate.quality, depth, cls)
            values[cls] = v
            floor = self.floors[cls].value
            if not meets_floor(v, floor):
                failed.append(f"{cls} {'unmeasured' if v is None else f'{v:.3f}'} < {floor:.3f}")
                share += weight
                deficit += floor - (v or 0.0)
        return QualityVerdict(ok=not failed, failed=failed, failed_share=round(share, 6),
                              deficit=round(deficit, 6), values=values)

    def snapshot(self) -> dict[str, Any]:
        return {"floors": {k: f.model_dump() for k, f in self.floors.items()}, "serves": self.required(),
                "chat": self.chat}


class OnlineQuality:
    """Quality measured on served traffic (the profiler scores a sample of chat answers under the reference): a
    decayed mean per (model, depth, class).  Once a placement has ``min_samples`` scores its online value replaces
    the offline record, so a placement whose real traffic scores below its floor is moved like a breach storm
    (:meth:`helios_ray.control.controller.Controller.quality_breached`)."""

    def __init__(self, min_samples: int = 8, decay: float = 0.95) -> None:
        self.min_samples, self.decay = min_samples, decay
        self._stats: dict[tuple[str, int, str], list[float]] = {}  # -> [decayed weight, decayed sum, count]

    def observe(self, model: str, depth: int, cls: str, value: float) -> float | None:
        """Record one score; returns the placement's online value (None while it has too few samples)."""
        w = self._stats.setdefault((model, int(depth), cls), [0.0, 0.0, 0.0])
        w[0] = self.decay * w[0] + 1.0
        w[1] = self.decay * w[1] + float(value)
        w[2] += 1
        return self.value(model, depth, cls)

    def value(self, model: str, depth: int, cls: str) -> float | None:
        w = self._stats.get((model, int(depth), cls))
        return round(w[1] / w[0], 4) if w and w[2] >= self.min_samples else None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {f"{m}@{d}": {"class": c, "mean": round(w[1] / w[0], 4), "samples": int(w[2]),
                             "in_use": w[2] >= self.min_samples} for (m, d, c), w in sorted(self._stats.items())}
