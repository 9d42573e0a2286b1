"""Per-request steering: which replica group serves this request (the fleet's router-side brain).

HELIOS picks one model for the whole workload; a fleet holds several (model, depth) groups at once and can
exploit that exits are complementary *per request*: a request class on which one placement breaches less
(its tokens are confident early) should go there.  The router calls, for every request::

    feats = request_features(prompt, messages)          # cheap string features, no tokenizer
    route = steering.choose(feats, groups)               # which group, and why
    ...                                                  # the request runs on route.group
    steering.observe(feats, view, outcome, route.predicted())

Per placement key ``model@depth`` (not per group name: a group moved to another placement starts afresh) three
online ridge regressions over ``feats.vector()`` predict the request's breach rate, mean exit fraction and
decoding tokens/s.  Forgetting (``decay``) lets predictions follow a shifting mix, and it also makes a
request class that a placement has not served for a while *uncertain* again, so it is re-explored: that is
how the split follows when behaviour shifts even though exploitation alone would never look back.

Pure Python (no numpy): the systems are 4x4, solved by Gauss-Jordan elimination in microseconds.  Memory is
bounded (placements, groups and logs are capped).  Not thread-safe: the router calls it from one event loop.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import SLO
from .quality import meets_floor
from .steering_model import PlacementModel, _dot
from .request_features import RequestFeatures, code_score, request_features  # re-exported: the router's one import

__all__ = [
    "SteeringConfig", "RequestFeatures", "request_features", "code_score", "GroupView", "Outcome", "Prediction",
    "Route", "Steering",
]

MAX_KEYS = 64          # placements remembered (least recently used forgotten first)
MAX_GROUPS = 64        # groups in the split counters
RECENT_ROUTES = 20     # routes shown by snapshot()
_MIN_TPS = 1e-3        # floor of tokens/s before the log (a request that produced nothing)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SteeringConfig(_Strict):
    """Knobs of :class:`Steering` (embedded in the serve config as ``steering``)."""

    min_observations: int = Field(8, ge=1, description="Finished requests per (placement, kind) before its "
                                  "prediction is trusted.")
    ridge: float = Field(1.0, gt=0.0, description="L2 prior of the online ridge regressions.")
    decay: float = Field(0.98, gt=0.0, le=1.0, description="Forgetting factor per observation of a placement, "
                         "so predictions follow a shifting mix (effective memory ~ 1/(1-decay) requests).")
    max_uncertainty: float = Field(0.35, gt=0.0, description="Above this sqrt(x^T A^-1 x) the predictor is "
                                   "unsure of a placement for this request: explore / load balance.")
    full_load: float = Field(1.0, gt=0.0, description="A group with load >= this is skipped while another has "
                             "room.")


# ------------------------------------------------------------------------------------------- groups, outcomes
class GroupView(_Strict):
    """What the router knows of one replica group right now."""

    group: str = Field(min_length=1)
    model: str = Field(min_length=1)
    depth: int = Field(ge=1)
    total_layers: int = Field(ge=1)
    slots: int = Field(ge=0, description="sequences its live replicas can run at once (sum of max_num_seqs)")
    busy: int = Field(ge=0, description="running + waiting across its live replicas")
    quality: dict[str, float] = Field(default_factory=dict, description="measured quality of its placement per "
                                      "request class (helios-ray quality): what the floors are checked against")
    chat_capable: bool = Field(True, description="whether its model may answer chats (requests with messages)")
    prior_tps: float | None = Field(None, ge=0.0, description="tokens/s its placement is expected to decode at "
                                    "before this router has observed it (the brain's profiled estimate)")

    @property
    def key(self) -> str:
        """``model@depth``: predictions belong to the placement, so a moved group starts afresh."""
        return f"{self.model}@{self.depth}"

    @property
    def load(self) -> float:
        return self.busy / max(1, self.slots)


class Outcome(_Strict):
    """One finished request as the router saw it."""

    tokens: int = Field(ge=0)
    breaches: int = Field(ge=0)
    mean_exit_layer: float = Field(ge=0.0)
    seconds: float = Field(gt=0.0, description="seconds of decoding: end-to-end minus time to first token")

    @property
    def breach_rate(self) -> float:
        return min(1.0, self.breaches / self.tokens) if self.tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def exit_fraction(self, total_layers: int) -> float:
        """Mean exit layer over the model's full depth: 1.0 means no token left early."""
        return min(1.0, self.mean_exit_layer / total_layers)


class Prediction(_Strict):
    """What the predictor expects of one group for one request."""

    group: str
    key: str
    n: int = Field(description="finished requests of this kind observed on this placement")
    breach_rate: float
    exit_fraction: float
    tokens_per_s: float
    value: float = Field(description="confident tokens/s: tokens_per_s * (1 - breach_rate)")
    uncertainty: float = Field(description="sqrt(x^T A^-1 x): falls as requests like this one are observed")
    trusted: bool


class Route(_Strict):
    """The choice for one request, with every group's prediction (for the status page and the log).

    ``below_floor``: no group's placement meets the quality floor of the request's class (or none may answer a
    chat), so it went to the best-quality one - counted and shown, never silent."""

    group: str
    kind: str
    reason: Literal["only", "predicted", "explore", "capacity", "below_floor"]
    eligible: list[str] = Field(default_factory=list, description="groups meeting the request's floor")
    predictions: list[Prediction]
    value: float | None = Field(description="the chosen group's predicted value when its prediction is trusted")

    def predicted(self) -> Prediction | None:
        """The chosen group's prediction: what ``observe`` compares the outcome with."""
        return next((p for p in self.predictions if p.group == self.group), None)


# ------------------------------------------------------------------------------------------------ steering
class Steering:
    """Per-request choice of a replica group by predicted SLO value, with exploration and capacity fallbacks.

    The value is "confident tokens per second", ``tokens_per_s * (1 - breach_rate)``, for every SLO.  Why:
    a breach is a token the served exit is unsure of, which is where a truncated / early-exit placement is
    least trustworthy; so, at equal speed, the group that breaches less on a request class serves it better,
    and at equal confidence the faster one does.  ``energy`` and ``batch_size`` use the same value for now
    (no per-request energy or memory signal reaches the router yet); the SLO is kept for when they do.
    """

    def __init__(self, slo: SLO | str, config: SteeringConfig | None = None,
                 rng: random.Random | None = None) -> None:
        self.slo = SLO(slo)
        self.config = config or SteeringConfig()
        self.rng = rng or random.Random()
        self._placements: OrderedDict[str, PlacementModel] = OrderedDict()
        self._split: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._reasons: dict[str, int] = {"only": 0, "predicted": 0, "explore": 0, "capacity": 0, "below_floor": 0}
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ROUTES)
        self.floors: dict[str, float] = {}
        self._below: dict[str, int] = {}  # requests per class that no placement could serve at its floor

    def set_floors(self, floors: dict[str, float]) -> None:
        """The resolved quality floor per request class (absolute values; :mod:`.quality` resolves them)."""
        self.floors = dict(floors)

    def eligible(self, feats: RequestFeatures, groups: list[GroupView]) -> list[GroupView]:
        """Groups that may serve this request: chat-capable for a chat, and at or above its class's floor (a
        class without a floor: every group; an unmeasured placement never meets a floor)."""
        out = []
        floor = self.floors.get(feats.kind)
        for g in groups:
            if feats.chat and not g.chat_capable:
                continue
            if not meets_floor(g.quality.get(feats.kind), floor):
                continue
            out.append(g)
        return out

    # ---------------------------------------------------------------- prediction
    def predict(self, feats: RequestFeatures, group: GroupView) -> Prediction:
        """The prediction for one group (no state changes)."""
        x = feats.vector()
        state = self._placements.get(group.key)
        if state is None:
            unc = math.sqrt(_dot(x, x) / self.config.ridge)
            return Prediction(group=group.group, key=group.key, n=0, breach_rate=0.0, exit_fraction=1.0,
                              tokens_per_s=0.0, value=0.0, uncertainty=unc, trusted=False)
        breach, exit_frac, tps, unc = state.predict(x)
        n = state.n.get(feats.kind, 0)
        trusted = n >= self.config.min_observations and unc <= self.config.max_uncertainty
        return Prediction(group=group.group, key=group.key, n=n, breach_rate=breach, exit_fraction=exit_frac,
                          tokens_per_s=tps, value=tps * (1.0 - breach), uncertainty=unc, trusted=trusted)

    def _least_loaded(self, groups: list[GroupView]) -> GroupView:
        low = min(g.load for g in groups)
        return self.rng.choice([g for g in groups if g.load == low])

    def choose(self, feats: RequestFeatures, groups: list[GroupView]) -> Route:
        """Pick the group for one request.

        Quality first: only groups that meet the floor of the request's class (and may answer a chat) are
        candidates; none: the best-quality group (``below_floor``, counted).  One candidate: ``only``.  Groups
        at or above ``full_load`` are skipped while another has room (all full: the least loaded, ``capacity``).
        If a remaining group's prediction is untrusted and it could still win (its prior speed is not far below
        the best trusted prediction), the least loaded such group (``explore``): this both learns it and
        balances load while the predictor knows little.  Otherwise the highest predicted value (``predicted``;
        untrusted groups enter with their prior speed).  Ties are broken with ``rng``.
        """
        if not groups:
            raise ValueError("steering needs at least one group")
        names = [g.group for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        preds = {g.group: self.predict(feats, g) for g in groups}
        eligible = self.eligible(feats, groups)
        room: list[GroupView] = []
        scored: list[GroupView] = []  # the groups a prediction chose among (their values are logged)
        if not eligible:
            # Nothing meets the floor (or may answer this chat): the best quality there is for the class, among
            # the groups allowed to answer it at all - counted and shown, never silent.
            capable = [g for g in groups if not feats.chat or g.chat_capable] or groups
            top = max(g.quality.get(feats.kind, -1.0) for g in capable)
            pick, reason = self._least_loaded([g for g in capable if g.quality.get(feats.kind, -1.0) == top]), \
                "below_floor"
            self._below[feats.kind] = self._below.get(feats.kind, 0) + 1
        elif len(eligible) == 1:
            pick, reason = eligible[0], "only"
        else:
            room = [g for g in eligible if g.load < self.config.full_load]
            untrusted = [g for g in room if not preds[g.group].trusted and self._could_win(g, preds, room)]
            if not room:
                pick, reason = self._least_loaded(eligible), "capacity"
            elif untrusted:
                pick, reason = self._least_loaded(untrusted), "explore"
            else:
                scored = [g for g in room if preds[g.group].trusted] or room
                best = max(self._value(g, preds) for g in scored)
                pick, reason = self.rng.choice([g for g in scored if self._value(g, preds) == best]), "predicted"
        chosen = preds[pick.group]
        self._reasons[reason] += 1
        # "values": what every candidate was predicted to deliver when the router chose by prediction - so the
        # status page (and a test) can see why a request went where it did, without replaying the predictor.
        values = ({g.group: round(self._value(g, preds), 6) for g in scored} if reason == "predicted" else None)
        self._recent.append({"group": pick.group, "key": pick.key, "kind": feats.kind, "reason": reason,
                             "eligible": [g.group for g in eligible],
                             "predicted": _brief(chosen) if chosen.n else None, "values": values, "observed": None})
        return Route(group=pick.group, kind=feats.kind, reason=reason, predictions=list(preds.values()),
                     value=chosen.value if chosen.trusted else None, eligible=[g.group for g in eligible])

    @staticmethod
    def _value(g: GroupView, preds: dict[str, Prediction]) -> float:
        """A group's predicted value; before its prediction is trusted, its prior speed (the brain's profiled
        tokens/s, no breaches assumed) stands in, so steering starts from what is known instead of cold."""
        p = preds[g.group]
        return p.value if p.trusted or g.prior_tps is None else g.prior_tps

    def _could_win(self, g: GroupView, preds: dict[str, Prediction], room: list[GroupView]) -> bool:
        """Worth exploring: no prior says it is slow, or its prior (an optimistic value: no breaches) is at least
        half the best trusted prediction.  A placement known to be far slower is not explored blindly."""
        if g.prior_tps is None:
            return True
        trusted = [preds[o.group].value for o in room if preds[o.group].trusted]
        return not trusted or g.prior_tps >= 0.5 * max(trusted)

    # ---------------------------------------------------------------- learning
    def observe(self, feats: RequestFeatures, group: GroupView, outcome: Outcome,
                predicted: Prediction | None) -> None:
        """Learn from one finished request served by ``group`` (the view it was routed with).

        The error of ``predicted`` is recorded when it was a real prediction for this placement (``n > 0``:
        this kind had been seen here; a blank prior's error says nothing about the predictor).  Requests that
        produced no token update the split but teach nothing about exits or speed.
        """
        kind = feats.kind
        split = self._split.setdefault(group.group, {})
        split[kind] = split.get(kind, 0) + 1
        self._split.move_to_end(group.group)
        while len(self._split) > MAX_GROUPS:
            self._split.popitem(last=False)
        observed = {"breach_rate": outcome.breach_rate, "exit_fraction": outcome.exit_fraction(group.total_layers),
                    "tokens_per_s": outcome.tokens_per_s}
        for entry in self._recent:  # FIFO: the oldest unanswered route of this group and kind
            if entry["observed"] is None and entry["group"] == group.group and entry["kind"] == kind:
                entry["observed"] = {k: round(v, 4) for k, v in observed.items()}
                break
        if outcome.tokens == 0:
            return
        state = self._placements.get(group.key)
        if state is None:
            state = self._placements[group.key] = PlacementModel(len(feats.vector()), self.config.ridge, self.config.decay)
        self._placements.move_to_end(group.key)
        while len(self._placements) > MAX_KEYS:
            self._placements.popitem(last=False)
        if predicted is not None and predicted.n > 0 and predicted.key == group.key:
            state.errors.append((abs(predicted.breach_rate - observed["breach_rate"]),
                                 abs(predicted.exit_fraction - observed["exit_fraction"]),
                                 abs(predicted.tokens_per_s - observed["tokens_per_s"])))
        targets = (observed["breach_rate"], observed["exit_fraction"],
                   math.log(max(_MIN_TPS, observed["tokens_per_s"])))
        state.update(feats.vector(), targets, kind)

    # ---------------------------------------------------------------- reporting
    def mae(self, key: str) -> dict[str, float] | None:
        """Mean absolute prediction errors of one placement over its last ``ERROR_WINDOW`` predicted requests."""
        state = self._placements.get(key)
        if state is None or not state.errors:
            return None
        k = len(state.errors)
        return {"breach_rate": sum(e[0] for e in state.errors) / k,
                "exit_fraction": sum(e[1] for e in state.errors) / k,
                "tokens_per_s": sum(e[2] for e in state.errors) / k, "samples": float(k)}

    def observed(self, key: str) -> dict[str, dict[str, float]]:
        """What a placement actually delivered per request kind (decayed means of the outcomes): the ground the
        predictions stand on, shown next to them so an operator can check the steering's choices."""
        state = self._placements.get(key)
        if state is None:
            return {}
        return {kind: {"breach_rate": round(o[1] / o[0], 4), "tokens_per_s": round(o[2] / o[0], 3),
                       "value": round(o[3] / o[0], 3)} for kind, o in state.by_kind.items() if o[0] > 0}

    def split(self) -> dict[str, dict[str, int]]:
        """Finished requests per group and kind."""
        return {g: dict(kinds) for g, kinds in self._split.items()}

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state for the status page: the split, per placement n and errors, the last routes."""
        return {
            "slo": self.slo.value,
            "value": "confident tokens/s = tokens_per_s * (1 - breach_rate)",
            "config": self.config.model_dump(),
            "routes": dict(self._reasons),
            "exploration_share": round(self._reasons["explore"] / total, 4) if (total := sum(self._reasons.values()))
            else None,
            "floors": dict(self.floors),
            "below_floor": dict(self._below),
            "split": self.split(),
            "placements": {key: {"n": dict(state.n), "mae": self.mae(key), "observed": self.observed(key)}
                           for key, state in self._placements.items()},
            "recent": [dict(e) for e in self._recent],
        }


def _brief(p: Prediction) -> dict[str, float]:
    return {"breach_rate": round(p.breach_rate, 4), "exit_fraction": round(p.exit_fraction, 4),
            "tokens_per_s": round(p.tokens_per_s, 4), "uncertainty": round(p.uncertainty, 4)}
