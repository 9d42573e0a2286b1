"""PLACEHOLDER (replaced by the steering branch): the interface the router uses."""
from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SteeringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_observations: int = Field(default=8, ge=0)
    ridge: float = Field(default=1.0, gt=0)
    decay: float = Field(default=0.98, gt=0, le=1)
    max_uncertainty: float = Field(default=0.35, gt=0)
    full_load: float = Field(default=1.0, gt=0)


class RequestFeatures(BaseModel):
    chat: bool
    code: float
    prompt_chars: int

    @property
    def kind(self) -> str:
        return "code" if self.code >= 0.5 else "chat" if self.chat else "text"


def request_features(prompt: str | None, messages: list[dict] | None) -> RequestFeatures:
    text = prompt or " ".join(str(m.get("content", "")) for m in messages or [])
    return RequestFeatures(chat=messages is not None, code=1.0 if "def " in text else 0.0, prompt_chars=len(text))


class GroupView(BaseModel):
    group: str
    model: str
    depth: int
    total_layers: int
    slots: int
    busy: int

    @property
    def key(self) -> str:
        return f"{self.model}@{self.depth}"

    @property
    def load(self) -> float:
        return self.busy / max(1, self.slots)


class Outcome(BaseModel):
    tokens: int
    breaches: int
    mean_exit_layer: float
    seconds: float


class Prediction(BaseModel):
    group: str
    key: str
    n: int = 0
    breach_rate: float | None = None
    exit_fraction: float | None = None
    tokens_per_s: float | None = None
    value: float | None = None
    uncertainty: float | None = None
    trusted: bool = False


class Route(BaseModel):
    group: str
    kind: str
    reason: Literal["only", "predicted", "explore", "capacity"]
    predictions: list[Prediction] = Field(default_factory=list)
    value: float | None = None


class Steering:
    def __init__(self, slo: Any, config: SteeringConfig | None = None, rng: random.Random | None = None):
        self.rng = rng or random.Random(0)
        self.split: dict[str, dict[str, int]] = {}

    def choose(self, feats: RequestFeatures, groups: list[GroupView]) -> Route:
        g = min(groups, key=lambda g: (g.load, self.rng.random()))
        return Route(group=g.group, kind=feats.kind, reason="only" if len(groups) == 1 else "explore",
                     predictions=[Prediction(group=g.group, key=g.key)])

    def observe(self, feats: RequestFeatures, group: GroupView, outcome: Outcome, predicted: Prediction | None
                ) -> None:
        d = self.split.setdefault(group.group, {})
        d[feats.kind] = d.get(feats.kind, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {"split": self.split}
