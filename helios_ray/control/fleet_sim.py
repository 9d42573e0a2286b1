"""Steering over replica groups, replayed on a recorded profile-mode trace (``helios-ray simulate --fleet``).

Each group is a (model, depth) placement serving with HELIOS semantics at a confidence threshold: a token
exits at the first recorded exit <= depth whose confidence >= threshold, else at ``depth`` (the last loaded
layer); a **breach** is a served token below the threshold; a token **agrees** when it equals the full-depth
model's ``final``; it is **early** when it exits before the model's full depth.

Three ways of serving the same requests, one request at a time (load 0), are compared:

* every group **alone** (it serves every request);
* **steering** (:class:`~helios_ray.control.steering.Steering`, learning online as the requests finish);
* the per-request **oracle** (for each request the group with the most early exits): the ceiling of any router.

Steering sees what a router sees: the request's kind (``chat``; ``code`` = 1.0 for code requests), its length
(``prompt_chars`` = 4 x the prompt tokens of the request's first request record in the trace) and, after the
request, its outcome.  Decoding seconds are the request record's ``seconds`` (minus TTFT when recorded)
scaled by mean exit layer / the depth the record was measured at.  Nothing here is tuned to make steering
win: the result states the best single group and steering's delta against it, whatever the sign.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence

from pydantic import BaseModel, Field, ValidationError, computed_field

from .config import SLO
from .simulate import SimulationError, _load_json, _validation_message
from .steering import GroupView, Outcome, RequestFeatures, Steering, SteeringConfig
from .trace import TraceError, TraceRequest, TraceToken, read_trace

__all__ = ["Served", "FleetSimResult", "simulate_steering", "parse_fleet", "add_arguments", "run_fleet"]


class Served(BaseModel):
    """Totals of one way of serving the trace (a group alone, steering, or the oracle)."""

    name: str
    requests: int = 0
    tokens: int = 0
    early: int = Field(0, description="tokens that exited before the model's full depth")
    agree: int = 0
    agree_known: int = 0
    breaches: int = 0
    exit_layers: int = Field(0, description="sum of the served tokens' exit layers")
    seconds: float = Field(0.0, description="decoding seconds, scaled to the layers computed")
    routed: dict[str, dict[str, int]] = Field(default_factory=dict, description="requests per group per kind")
    by_kind: dict[str, dict[str, int]] = Field(default_factory=dict, description="tokens, early and breaches "
                                               "per request kind")

    def add(self, other: "Served", group: str, kind: str) -> None:
        self.requests += other.requests
        self.tokens += other.tokens
        self.early += other.early
        self.agree += other.agree
        self.agree_known += other.agree_known
        self.breaches += other.breaches
        self.exit_layers += other.exit_layers
        self.seconds += other.seconds
        per_kind = self.routed.setdefault(group, {})
        per_kind[kind] = per_kind.get(kind, 0) + 1
        counts = self.by_kind.setdefault(kind, {"tokens": 0, "early": 0, "breaches": 0})
        counts["tokens"] += other.tokens
        counts["early"] += other.early
        counts["breaches"] += other.breaches

    @computed_field  # type: ignore[prop-decorator]
    @property
    def early_share(self) -> float:
        return self.early / self.tokens if self.tokens else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def agreement(self) -> float | None:
        return self.agree / self.agree_known if self.agree_known else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def breach_rate(self) -> float:
        return self.breaches / self.tokens if self.tokens else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def confident_tokens_per_s(self) -> float:
        """Steering's objective summed over the trace: non-breach tokens per decoding second."""
        return (self.tokens - self.breaches) / self.seconds if self.seconds > 0 else 0.0


class FleetSimResult(BaseModel):
    """Single groups, steering and the oracle on one trace, and steering against the best single group."""

    threshold: float
    slo: SLO
    seed: int
    repeat: int = Field(description="times the trace's request sequence was replayed")
    config: SteeringConfig
    groups: list[str]
    requests: int
    single: list[Served]
    steering: Served
    oracle: Served
    steered: list[str] = Field(description="the group steering chose for each replayed request, in order")
    routes: dict[str, int] = Field(description="steering's routes by reason (only/predicted/explore/capacity)")
    mae: dict[str, float] = Field(description="steering's mean absolute prediction errors over the requests "
                                  "whose chosen group had seen their kind before (breach_rate, exit_fraction, "
                                  "tokens_per_s; samples)")
    best_single: str = Field(description="the single group with the highest early share (ties: confident tok/s)")
    delta_early: float = Field(description="steering - best single, early share")
    delta_agreement: float | None
    delta_breach_rate: float
    confident_tps_ratio: float | None = Field(description="steering / best single, confident tokens/s")
    oracle_delta_early: float = Field(description="oracle - best single, early share: the room a router has")
    verdict: str = Field(description="one sentence: does steering beat the best single group, and why (not)")
    notes: list[str]


def _verdict(best: Served, singles: list[Served], steered: Served, routes: dict[str, int],
             config: SteeringConfig) -> str:
    """Say whether steering beat the best single group and the reasons this replay shows."""
    delta = 100 * (steered.early_share - best.early_share)
    head = (f"steering {'beats' if delta > 0 else 'does not beat'} the best single group {best.name} "
            f"(early share {delta:+.1f} points)")
    why = []

    def share(s: Served, kind: str) -> float:
        c = s.by_kind.get(kind, {})
        return c["early"] / c["tokens"] if c.get("tokens") else 0.0

    others = [s for s in singles if s is not best]
    if others and all(share(best, k) >= share(o, k) for o in others for k in best.by_kind):
        why.append(f"{best.name} exits at least as early as every other group on every request kind "
                   f"({', '.join(sorted(best.by_kind))}), so routing by kind can at best match it")
    total = sum(routes.values())
    if total and routes.get("explore", 0) / total > 0.1:
        why.append(f"{routes['explore']} of {total} routes were exploration (a placement is trusted after "
                   f"{config.min_observations} requests of a kind and while its uncertainty stays <= "
                   f"{config.max_uncertainty})")
    return head + (": " + "; ".join(why) if why else "")


def parse_fleet(spec: str) -> list[tuple[str, int]]:
    """``"smollm2-135m@30,gemma3-270m@18"`` -> [("smollm2-135m", 30), ("gemma3-270m", 18)]."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in spec.split(",")):
        model, at, depth = part.rpartition("@")
        if not at or not model or not depth.isdigit() or int(depth) < 1:
            raise SimulationError(f"--fleet: {part!r} is not MODEL@DEPTH (e.g. smollm2-135m@30)")
        out.append((model, int(depth)))
    if len(set(out)) != len(out):
        raise SimulationError(f"--fleet: a group is listed twice in {spec!r}")
    return out


def _serve(toks: list[TraceToken], req: TraceRequest, model: str, depth: int, full: int,
           threshold: float) -> Served:
    """One request on one group under greedy exit with confident early exits."""
    s = Served(name=f"{model}@{depth}", requests=1)
    for rec in toks:
        exit_at = next((e for e in sorted(rec.exits) if e <= depth and rec.exits[e].confidence >= threshold), depth)
        obs = rec.exits.get(exit_at)
        if obs is None:
            raise SimulationError(f"request {rec.request} pos {rec.pos} of {model} lacks exit {exit_at}")
        s.tokens += 1
        s.early += exit_at < full
        s.breaches += obs.confidence < threshold
        s.exit_layers += exit_at
        if rec.final is not None:
            s.agree_known += 1
            s.agree += obs.token == rec.final
    decode = req.seconds - (req.ttft_s or 0.0)
    if decode <= 0:
        raise SimulationError(f"request {req.request} of {model}: no decoding time recorded")
    measured = req.depth or full
    s.seconds = decode * (s.exit_layers / max(1, s.tokens)) / measured
    return s


def simulate_steering(records: Sequence[TraceToken | TraceRequest], groups: list[tuple[str, int]],
                      threshold: float = 0.9, config: SteeringConfig | None = None, slo: SLO | str = "throughput",
                      seed: int = 0, repeat: int = 1) -> FleetSimResult:
    """Replay the trace's requests in order (the whole sequence ``repeat`` times, steering learning on)
    through every group alone, steering and the oracle."""
    if not groups:
        raise SimulationError("the fleet needs at least one group")
    if repeat < 1:
        raise SimulationError(f"repeat must be >= 1, got {repeat}")
    if not 0.0 < threshold <= 1.0:
        raise SimulationError(f"threshold must be in (0, 1], got {threshold}")
    config = config or SteeringConfig()
    order: list[int] = []
    toks: dict[int, dict[str, list[TraceToken]]] = {}
    reqs: dict[int, dict[str, TraceRequest]] = {}
    first_req: dict[int, TraceRequest] = {}
    exits: dict[str, set[int]] = {}
    for rec in records:
        if rec.request not in toks:
            order.append(rec.request)
            toks[rec.request], reqs[rec.request] = {}, {}
        if isinstance(rec, TraceToken):
            toks[rec.request].setdefault(rec.model, []).append(rec)
            exits.setdefault(rec.model, set()).update(rec.exits)
        else:
            reqs[rec.request][rec.model] = rec
            first_req.setdefault(rec.request, rec)
    full = {m: max(e) for m, e in exits.items()}
    for model, depth in groups:
        if model not in exits:
            raise SimulationError(f"no token records of {model!r} in the trace (models: {', '.join(sorted(exits))})")
        if depth not in exits[model]:
            raise SimulationError(f"{model}@{depth}: depth {depth} is not a recorded exit of {model} "
                                  f"({', '.join(map(str, sorted(exits[model])))})")
    names = [f"{m}@{d}" for m, d in groups]

    served: dict[int, dict[str, Served]] = {}
    kinds: dict[int, str] = {}
    for rid in order:
        req0 = first_req.get(rid)
        if req0 is None:
            raise SimulationError(f"request {rid} has no request record")
        kinds[rid] = req0.kind or "text"
        served[rid] = {}
        for (model, depth), name in zip(groups, names):
            t, r = toks[rid].get(model), reqs[rid].get(model)
            if not t or r is None:
                raise SimulationError(f"request {rid} lacks token or request records of {model}")
            served[rid][name] = _serve(sorted(t, key=lambda x: x.pos), r, model, depth, full[model], threshold)

    single = {n: Served(name=n) for n in names}
    oracle, steered = Served(name="oracle"), Served(name="steering")
    steering = Steering(slo, config, rng=random.Random(seed))
    views = {n: GroupView(group=n, model=m, depth=d, total_layers=full[m], slots=1, busy=0)
             for (m, d), n in zip(groups, names)}
    errors: list[tuple[float, float, float]] = []
    chosen: list[str] = []
    for rid in order * repeat:
        kind = kinds[rid]
        for n in names:
            single[n].add(served[rid][n], n, kind)
        best = max(names, key=lambda n: (served[rid][n].early, -served[rid][n].breaches, served[rid][n].agree))
        oracle.add(served[rid][best], best, kind)
        req0 = first_req[rid]
        feats = RequestFeatures(chat=kind == "chat", code=1.0 if kind == "code" else 0.0,
                                prompt_chars=4 * req0.prompt_tokens)
        route = steering.choose(feats, list(views.values()))
        got = served[rid][route.group]
        chosen.append(route.group)
        steered.add(got, route.group, kind)
        view = views[route.group]
        outcome = Outcome(tokens=got.tokens, breaches=got.breaches, seconds=got.seconds,
                          mean_exit_layer=got.exit_layers / max(1, got.tokens))
        predicted = route.predicted()
        if predicted is not None and predicted.n > 0 and got.tokens:
            errors.append((abs(predicted.breach_rate - outcome.breach_rate),
                           abs(predicted.exit_fraction - outcome.exit_fraction(view.total_layers)),
                           abs(predicted.tokens_per_s - outcome.tokens_per_s)))
        steering.observe(feats, view, outcome, predicted)

    singles = [single[n] for n in names]
    best_single = max(singles, key=lambda s: (s.early_share, s.confident_tokens_per_s))
    mae = {"samples": float(len(errors))}
    if errors:
        for i, k in enumerate(("breach_rate", "exit_fraction", "tokens_per_s")):
            mae[k] = sum(e[i] for e in errors) / len(errors)
    notes = [
        "one request at a time (load 0): steering never takes the capacity fallback here",
        "decoding seconds come from profile-mode request records (every exit head evaluated), scaled by mean exit "
        "layer / measured depth: they rank the groups, they are not serving speeds",
    ]
    return FleetSimResult(
        threshold=threshold, slo=SLO(slo), seed=seed, config=config, groups=names, requests=len(order) * repeat,
        repeat=repeat,
        single=singles, steering=steered, oracle=oracle, steered=chosen,
        routes=steering.snapshot()["routes"], mae=mae,
        best_single=best_single.name,
        delta_early=steered.early_share - best_single.early_share,
        delta_agreement=(None if steered.agreement is None or best_single.agreement is None
                         else steered.agreement - best_single.agreement),
        delta_breach_rate=steered.breach_rate - best_single.breach_rate,
        confident_tps_ratio=(steered.confident_tokens_per_s / best_single.confident_tokens_per_s
                             if best_single.confident_tokens_per_s > 0 else None),
        oracle_delta_early=oracle.early_share - best_single.early_share,
        verdict=_verdict(best_single, singles, steered, steering.snapshot()["routes"], config),
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--fleet`` options of ``helios-ray simulate``."""
    parser.add_argument("--fleet", help="replay steering over groups MODEL@DEPTH,MODEL@DEPTH,... instead of "
                        "the single-placement policy")
    parser.add_argument("--threshold", type=float, default=0.9, help="--fleet: confidence threshold (default 0.9)")
    parser.add_argument("--steering-config", help="--fleet: JSON SteeringConfig (unknown keys are errors)")
    parser.add_argument("--seed", type=int, default=0, help="--fleet: seed of steering's tie-breaks")
    parser.add_argument("--repeat", type=int, default=1, help="--fleet: replay the request sequence this many "
                        "times (steering keeps learning; default 1)")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_table(res: FleetSimResult) -> str:
    """A readable table: one row per way of serving, then the verdict."""
    head = f"{'':<22} {'early':>7} {'agree':>7} {'breach':>7} {'conf tok/s':>10}  routed (requests per kind)"
    times = f" ({res.repeat} passes)" if res.repeat > 1 else ""
    lines = [f"fleet {', '.join(res.groups)} on {res.requests} requests{times}, threshold {res.threshold}, "
             f"slo {res.slo.value} (value: confident tokens/s)", head]
    for s in [*res.single, res.steering, res.oracle]:
        routed = "; ".join(f"{g}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                           for g, kinds in s.routed.items())
        label = s.name if s.name in ("steering", "oracle") else f"{s.name} alone"
        lines.append(f"{label:<22} {_pct(s.early_share):>7} {_pct(s.agreement):>7} {_pct(s.breach_rate):>7} "
                     f"{s.confident_tokens_per_s:>10.2f}  {routed}")
    for s in res.single:
        lines.append(f"  {s.name} by kind: " + "; ".join(
            f"{k} early {_pct(c['early'] / c['tokens'] if c['tokens'] else None)}, breach "
            f"{_pct(c['breaches'] / c['tokens'] if c['tokens'] else None)}" for k, c in sorted(s.by_kind.items())))
    routes = ", ".join(f"{k} {v}" for k, v in res.routes.items() if v)
    mae = (", ".join(f"{k} {res.mae[k]:.3f}" for k in ("breach_rate", "exit_fraction", "tokens_per_s")
                     if k in res.mae) + f" over {int(res.mae['samples'])} predicted requests")
    ratio = "-" if res.confident_tps_ratio is None else f"{res.confident_tps_ratio:.2f}x"
    lines += [f"steering routes: {routes}", f"steering prediction MAE: {mae}",
              f"best single group: {res.best_single}; steering vs it: early {100 * res.delta_early:+.1f} points, "
              f"breach rate {100 * res.delta_breach_rate:+.1f} points, confident tok/s {ratio}; "
              f"oracle vs it: early {100 * res.oracle_delta_early:+.1f} points"]
    lines += [f"verdict: {res.verdict}"] + [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


def run_fleet(args: argparse.Namespace, trace: str) -> int:
    """``helios-ray simulate --fleet ...``: bad input is one line on stderr and exit code 2."""
    try:
        groups = parse_fleet(args.fleet)
        config = SteeringConfig()
        if args.steering_config:
            try:
                config = SteeringConfig.model_validate(_load_json(args.steering_config))
            except ValidationError as exc:
                raise SimulationError(f"{args.steering_config}: {_validation_message(exc)}") from None
        try:
            slo = SLO(args.slo)
        except ValueError:
            raise SimulationError(f"unknown SLO {args.slo!r}") from None
        res = simulate_steering(read_trace(trace), groups, threshold=args.threshold, config=config, slo=slo,
                                seed=args.seed, repeat=args.repeat)
    except FileNotFoundError as exc:
        print(f"helios-ray simulate: error: file not found: {exc.filename}", file=sys.stderr)
        return 2
    except (TraceError, SimulationError, OSError, ValueError) as exc:
        print(f"helios-ray simulate: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(res.model_dump(mode="json"), indent=2) if args.json else format_table(res))
    return 0
