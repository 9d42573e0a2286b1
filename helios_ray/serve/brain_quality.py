"""The fleet's quality state as the brain holds it: the resolved floors, the chat reference, and the online scores.

Floors are resolved once against every candidate of the application (not per group: a group of small models must
not lower the bar).  Online chat scores (the profiler scores a sample of served answers under the reference)
replace a placement's offline record once there are enough of them; the candidates are the very objects the
groups' controllers hold, so the floors see the new value at once.
"""

from __future__ import annotations

from typing import Any

from helios_ray.control.config import CandidateInfo
from helios_ray.control.quality import OnlineQuality, ResolvedFloor, resolve_floors
from helios_ray.serve.config import ServeConfig
from helios_ray.tuning.quality import recorded_reference


class FleetQuality:
    def __init__(self, cfg: ServeConfig, repo: Any, candidates: list[CandidateInfo]) -> None:
        self.cfg, self.candidates = cfg, candidates
        self.reference = recorded_reference(repo, cfg.candidates)
        self.floors: dict[str, ResolvedFloor] = resolve_floors(cfg.quality, candidates, self.reference)
        self.online = OnlineQuality(cfg.quality.online_min_samples)
        self.offline = {c.name: {d: dict(v) for d, v in c.quality.items()} for c in candidates}

    def observe(self, model: str, depth: int, cls: str, value: float) -> bool:
        """One score measured online; True when it changed the value the floors are checked against."""
        online = self.online.observe(model, depth, cls, value)
        cand = next((c for c in self.candidates if c.name == model), None)
        if online is None or cand is None:
            return False
        cand.quality.setdefault(int(depth), {})[cls] = online
        return True

    def status(self) -> dict[str, Any]:
        return {"floors": {c: f.model_dump() for c, f in self.floors.items()}, "reference": self.reference,
                "classes": [r.model_dump(exclude_none=True) for r in self.cfg.classes],
                "records": {c.name: {str(d): v for d, v in sorted(c.quality.items())} for c in self.candidates},
                "offline": {n: {str(d): v for d, v in sorted(r.items())} for n, r in self.offline.items()},
                "online": self.online.snapshot(),
                "chat_capable": {c.name: c.chat_capable for c in self.candidates}}
