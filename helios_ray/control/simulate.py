"""Replay a recorded profile-mode trace through the :class:`Controller`.

The trace says, for every generated token of every request, what each model's every exit would
have produced. The simulator serves requests one after another: the replica's current (model,
depth) picks ``exits[depth]`` of that model's token records (greedy exit), those confidences feed
the breach counter, profiling windows feed the mirrored candidates' full records into the PHT, and
the controller's decisions move the placement. A request keeps the placement it started with (the
runtime snapshots its config per request), so a change takes effect from the next request.

Simulated time advances by each served request's recorded ``seconds`` (scaled by the cost ratio
when the record was measured at a different depth), so PHT staleness behaves as in a sequential
deployment and two runs of the same trace give identical results.

``helios-ray simulate`` is :mod:`.simulate_cli`; steering over groups is :mod:`.fleet_sim`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from .config import SLO, CandidateInfo, Hardware, PolicyConfig
from .controller import Controller, Placement
from .costs import cost_unit, token_cost
from .decision import Decision, NoFeasiblePlacement
from .storm import CostModel
from .trace import TraceRequest, TraceToken

__all__ = [
    "ServedStats",
    "SimulationResult",
    "SimulationError",
    "candidates_from_trace",
    "simulate",
    "configure_parser",
    "run",
]

DEFAULT_MEMORY_BUDGET_BYTES = 16 * 1024**3


class SimulationError(ValueError):
    """The inputs cannot be simulated (empty trace, candidates missing from the trace, ...)."""


class ServedStats(BaseModel):
    """What one placement served during the replay."""

    model: str
    depth: int
    requests: int = 0
    tokens: int = 0
    agree_known: int = 0
    agree: int = 0
    breaches: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agree / self.agree_known if self.agree_known else None


class SimulationResult(BaseModel):
    """Decisions and a summary of a replay."""

    slo: SLO
    config: PolicyConfig
    candidates: list[CandidateInfo]
    candidates_source: Literal["given", "derived"]
    cost_unit: str
    hardware: Hardware
    requests: int
    tokens_served: int
    tokens_skipped: int = Field(description="Served tokens whose record lacks the served exit.")
    requests_missing: int = Field(description="Requests with no token records for the model served.")
    breaches: int
    storm_decisions: int
    suppressed_storm_tokens: int
    agreement: float | None
    served: list[ServedStats]
    tokens_by_kind: dict[str, int]
    decisions: list[Decision]
    final_placement: Placement | None
    notes: list[str]
    pht: list[dict[str, Any]]

    def changes(self) -> list[Decision]:
        """Decisions that moved the placement (after the initial deployment)."""
        return [d for d in self.decisions if d.trigger != "start" and d.changes_placement]


def candidates_from_trace(records: Iterable[TraceToken | TraceRequest]) -> list[CandidateInfo]:
    """Minimal candidates from a trace: every model seen, with the exit depths it recorded; the
    deepest recorded exit is taken as the full depth. Sizes are unknown (0), so costs fall back to
    equal cost per layer."""
    exits: dict[str, set[int]] = {}
    for rec in records:
        if isinstance(rec, TraceToken):
            exits.setdefault(rec.model, set()).update(rec.exits)
    return [
        CandidateInfo(name=name, num_layers=max(depths), exits=sorted(depths))
        for name, depths in exits.items()
    ]


class _SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    trace_records: Sequence[TraceToken | TraceRequest],
    slo: SLO | str,
    config: PolicyConfig | None = None,
    candidates: Sequence[CandidateInfo] | None = None,
    *,
    hardware: Hardware | None = None,
    cost_model: CostModel | None = None,
    default_request_seconds: float = 0.0,
) -> SimulationResult:
    """Replay ``trace_records`` through a fresh :class:`Controller` (see the module docstring).

    ``default_request_seconds`` advances simulated time for requests without a request record.
    """
    slo = SLO(slo)
    config = config or PolicyConfig()
    notes: list[str] = []

    order: list[int] = []
    tokens: dict[int, dict[str, list[TraceToken]]] = {}
    requests: dict[int, dict[str, TraceRequest]] = {}
    kinds: dict[int, str] = {}
    for rec in trace_records:
        if rec.request not in tokens:
            order.append(rec.request)
            tokens[rec.request] = {}
            requests[rec.request] = {}
        if isinstance(rec, TraceToken):
            tokens[rec.request].setdefault(rec.model, []).append(rec)
            if rec.kind is not None:
                kinds.setdefault(rec.request, rec.kind)
        else:
            requests[rec.request][rec.model] = rec
    if not any(tokens[r] for r in order):
        raise SimulationError("the trace has no token records")
    for per_model in tokens.values():
        for recs in per_model.values():
            recs.sort(key=lambda r: r.pos)

    if candidates is None:
        candidate_list = candidates_from_trace(trace_records)
        source: Literal["given", "derived"] = "derived"
        notes.append(
            "candidates derived from the trace (models and exit depths seen, deepest exit taken as "
            "full depth); layer sizes unknown: equal cost per layer, every depth fits memory"
        )
    else:
        candidate_list = list(candidates)
        source = "given"
        seen = {m for per_model in tokens.values() for m in per_model}
        missing = [c.name for c in candidate_list if c.name not in seen]
        if len(missing) == len(candidate_list):
            raise SimulationError(
                f"none of the candidates ({', '.join(missing)}) has token records in the trace"
            )
        if missing:
            notes.append(f"candidates without token records in the trace: {', '.join(missing)}")
    if hardware is None:
        hardware = Hardware(device="cpu", memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES)
        if source == "given":
            notes.append(f"no hardware given: memory budget {DEFAULT_MEMORY_BUDGET_BYTES} bytes")
    unit = cost_unit(candidate_list)
    by_name = {c.name: c for c in candidate_list}

    clock = _SimClock()
    controller = Controller(
        candidate_list, slo, hardware, config, cost_model=cost_model, clock=clock
    )
    try:
        controller.start()
    except NoFeasiblePlacement as exc:
        raise SimulationError(str(exc)) from None

    served: dict[tuple[str, int], ServedStats] = {}
    tokens_by_kind: dict[str, int] = {}
    skipped = missing_requests = 0

    for rid in order:
        targets = controller.begin_request()
        placement = controller.current
        assert placement is not None
        model, depth = placement.model, placement.depth
        stats = served.setdefault((model, depth), ServedStats(model=model, depth=depth))
        stats.requests += 1
        recs = tokens[rid].get(model, [])
        if not recs:
            missing_requests += 1
        kind = kinds.get(rid, "unknown")
        for rec in recs:
            obs = rec.served(depth)
            if obs is None:
                skipped += 1
                continue
            stats.tokens += 1
            tokens_by_kind[kind] = tokens_by_kind.get(kind, 0) + 1
            if obs.confidence < config.confidence_threshold:
                stats.breaches += 1
            if rec.final is not None:
                stats.agree_known += 1
                stats.agree += obs.token == rec.final
            controller.observe_token(model, depth, obs.confidence, request=rid, pos=rec.pos)

        for target in targets:
            for rec in tokens[rid].get(target, []):
                controller.observe_profile_token(rec)
            req = requests[rid].get(target)
            if req is not None:
                controller.observe_profile_request(req)

        # Time and timings of the served request.
        req = requests[rid].get(model)
        seconds: float | None = None
        elapsed = default_request_seconds
        if req is not None and model in by_name:
            cand = by_name[model]
            measured_depth = req.depth or cand.num_layers
            if measured_depth == depth:
                seconds = req.seconds
                elapsed = req.seconds
            else:
                ratio = token_cost(cand, depth, unit) / max(
                    token_cost(cand, measured_depth, unit), 1e-300
                )
                elapsed = req.seconds * ratio
        clock.now += elapsed
        profiled_here = model in targets and depth == by_name[model].num_layers
        controller.observe_request(
            model,
            depth,
            output_tokens=req.output_tokens if req is not None else len(recs),
            seconds=None if profiled_here else seconds,
            ttft_s=req.ttft_s if req is not None and seconds is not None else None,
            energy_j=req.energy_j if req is not None and seconds is not None else None,
            prompt_tokens=req.prompt_tokens if req is not None else 0,
            request=rid,
        )

    if skipped:
        notes.append(f"{skipped} served tokens skipped: their records lack the served exit")
    if missing_requests:
        notes.append(f"{missing_requests} requests had no token records for the model served")
    served_list = sorted(served.values(), key=lambda s: (s.model, s.depth))
    known = sum(s.agree_known for s in served_list)
    return SimulationResult(
        slo=slo,
        config=config,
        candidates=candidate_list,
        candidates_source=source,
        cost_unit=unit,
        hardware=hardware,
        requests=len(order),
        tokens_served=sum(s.tokens for s in served_list),
        tokens_skipped=skipped,
        requests_missing=missing_requests,
        breaches=sum(s.breaches for s in served_list),
        storm_decisions=sum(1 for d in controller.decisions if d.trigger == "storm"),
        suppressed_storm_tokens=controller.suppressed_storm_tokens,
        agreement=(sum(s.agree for s in served_list) / known) if known else None,
        served=served_list,
        tokens_by_kind=tokens_by_kind,
        decisions=list(controller.decisions),
        final_placement=controller.current,
        notes=notes,
        pht=controller.pht.summary(),
    )


# --------------------------------------------------------------------------- CLI


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


def _load_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SimulationError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
