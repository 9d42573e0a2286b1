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
from .request_features import RequestFeatures, code_score, request_features  # re-exported: the router's one import

__all__ = [
    "SteeringConfig", "RequestFeatures", "request_features", "code_score", "GroupView", "Outcome", "Prediction",
    "Route", "Steering",
]

MAX_KEYS = 64          # placements remembered (least recently used forgotten first)
MAX_GROUPS = 64        # groups in the split counters
RECENT_ROUTES = 20     # routes shown by snapshot()
ERROR_WINDOW = 100     # prediction errors per placement behind the reported mean absolute error
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
    """The choice for one request, with every group's prediction (for the status page and the log)."""

    group: str
    kind: str
    reason: Literal["only", "predicted", "explore", "capacity"]
    predictions: list[Prediction]
    value: float | None = Field(description="the chosen group's predicted value when its prediction is trusted")

    def predicted(self) -> Prediction | None:
        """The chosen group's prediction: what ``observe`` compares the outcome with."""
        return next((p for p in self.predictions if p.group == self.group), None)


# ------------------------------------------------------------------------------------------ online regression
def _invert(matrix: list[list[float]]) -> list[list[float]]:
    """Gauss-Jordan inverse with partial pivoting (the matrix is symmetric positive definite: ridge > 0)."""
    n = len(matrix)
    aug = [row[:] + [1.0 if i == j else 0.0 for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(aug[r][col]))
        aug[col], aug[pivot] = aug[pivot], aug[col]
        p = aug[col][col]
        aug[col] = [v / p for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0.0:
                f = aug[r][col]
                aug[r] = [a - f * b for a, b in zip(aug[r], aug[col])]
    return [row[n:] for row in aug]


def _matvec(m: list[list[float]], v: list[float]) -> list[float]:
    return [sum(a * b for a, b in zip(row, v)) for row in m]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


class _Placement:
    """Three ridge regressions (breach rate, exit fraction, log tokens/s) sharing one decayed design matrix.

    A = ridge*I + S with S = decay*S + x x^T; b_t = decay*b_t + y_t x.  The prior is centred on the placement's
    own decayed mean of each target (on the intercept), not on 0, so shrinkage does not pull tokens/s towards
    exp(0) = 1 for a placement seen only a few times; the prior itself never decays, so A stays invertible.
    """

    def __init__(self, dim: int, config: SteeringConfig) -> None:
        self.cfg = config
        self.s = [[0.0] * dim for _ in range(dim)]
        self.b = [[0.0] * dim for _ in range(3)]
        self.weight = 0.0
        self.sums = [0.0, 0.0, 0.0]
        self.n: dict[str, int] = {}
        self.by_kind: dict[str, list[float]] = {}  # kind -> decayed [weight, breach rate, tokens/s, value] sums
        self.errors: deque[tuple[float, float, float]] = deque(maxlen=ERROR_WINDOW)
        self._inv: list[list[float]] | None = None
        self._w: list[list[float]] | None = None

    def update(self, x: list[float], targets: tuple[float, float, float], kind: str) -> None:
        d = self.cfg.decay
        for i, xi in enumerate(x):
            row = self.s[i]
            for j, xj in enumerate(x):
                row[j] = d * row[j] + xi * xj
        for t, y in enumerate(targets):
            self.b[t] = [d * bi + y * xi for bi, xi in zip(self.b[t], x)]
            self.sums[t] = d * self.sums[t] + y
        self.weight = d * self.weight + 1.0
        self.n[kind] = self.n.get(kind, 0) + 1
        tps = math.exp(targets[2])
        obs = self.by_kind.setdefault(kind, [0.0, 0.0, 0.0, 0.0])
        for i, y in enumerate((1.0, targets[0], tps, tps * (1.0 - targets[0]))):
            obs[i] = d * obs[i] + y
        self._inv = self._w = None

    def _solve(self) -> tuple[list[list[float]], list[list[float]]]:
        if self._inv is None or self._w is None:
            r = self.cfg.ridge
            a = [[v + (r if i == j else 0.0) for j, v in enumerate(row)] for i, row in enumerate(self.s)]
            self._inv = _invert(a)
            self._w = []
            for t in range(3):
                mean = self.sums[t] / self.weight if self.weight > 0 else 0.0
                rhs = self.b[t][:]
                rhs[0] += r * mean
                self._w.append(_matvec(self._inv, rhs))
        return self._inv, self._w

    def predict(self, x: list[float]) -> tuple[float, float, float, float]:
        """(breach rate, exit fraction, tokens/s, uncertainty) for features ``x``."""
        inv, w = self._solve()
        unc = math.sqrt(max(0.0, _dot(x, _matvec(inv, x))))
        breach = min(1.0, max(0.0, _dot(w[0], x)))
        exit_frac = min(1.0, max(0.0, _dot(w[1], x)))
        tps = math.exp(min(50.0, _dot(w[2], x)))
        return breach, exit_frac, tps, unc


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
        self._placements: OrderedDict[str, _Placement] = OrderedDict()
        self._split: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._reasons: dict[str, int] = {"only": 0, "predicted": 0, "explore": 0, "capacity": 0}
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ROUTES)

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

        One group: ``only``.  Groups at or above ``full_load`` are skipped while another has room (all full:
        the least loaded, ``capacity``).  If any remaining group's prediction is untrusted, the least loaded
        untrusted one (``explore``): this both learns it and balances load while the predictor knows little.
        Otherwise the highest predicted value (``predicted``).  Ties are broken with ``rng``.
        """
        if not groups:
            raise ValueError("steering needs at least one group")
        names = [g.group for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        preds = {g.group: self.predict(feats, g) for g in groups}
        if len(groups) == 1:
            pick, reason = groups[0], "only"
        else:
            room = [g for g in groups if g.load < self.config.full_load]
            untrusted = [g for g in room if not preds[g.group].trusted]
            if not room:
                pick, reason = self._least_loaded(groups), "capacity"
            elif untrusted:
                pick, reason = self._least_loaded(untrusted), "explore"
            else:
                best = max(preds[g.group].value for g in room)
                pick, reason = self.rng.choice([g for g in room if preds[g.group].value == best]), "predicted"
        chosen = preds[pick.group]
        self._reasons[reason] += 1
        # "values": what every candidate was predicted to deliver when the router chose by prediction - so the
        # status page (and a test) can see why a request went where it did, without replaying the predictor.
        values = ({g.group: round(preds[g.group].value, 6) for g in room} if reason == "predicted" else None)
        self._recent.append({"group": pick.group, "key": pick.key, "kind": feats.kind, "reason": reason,
                             "predicted": _brief(chosen) if chosen.n else None, "values": values, "observed": None})
        return Route(group=pick.group, kind=feats.kind, reason=reason, predictions=list(preds.values()),
                     value=chosen.value if chosen.trusted else None)

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
            state = self._placements[group.key] = _Placement(len(feats.vector()), self.config)
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
            "split": self.split(),
            "placements": {key: {"n": dict(state.n), "mae": self.mae(key), "observed": self.observed(key)}
                           for key, state in self._placements.items()},
            "recent": [dict(e) for e in self._recent],
        }


def _brief(p: Prediction) -> dict[str, float]:
    return {"breach_rate": round(p.breach_rate, 4), "exit_fraction": round(p.exit_fraction, 4),
            "tokens_per_s": round(p.tokens_per_s, 4), "uncertainty": round(p.uncertainty, 4)}
