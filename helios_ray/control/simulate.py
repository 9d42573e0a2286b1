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

``configure_parser``/``run`` implement ``helios-ray simulate``; the CLI module wires them in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from .config import SLO, CandidateInfo, Hardware, PolicyConfig
from .controller import Controller, Placement
from .costs import cost_unit, token_cost
from .decision import Decision, NoFeasiblePlacement
from .storm import CostModel
from .trace import TraceError, TraceRequest, TraceToken, read_trace

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
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``helios-ray simulate``."""
    parser.add_argument("--trace", help="JSONL trace (token/request records); or give it as TRACE")
    parser.add_argument("trace_file", nargs="?", metavar="TRACE", help="the trace, when --trace is not given")
    parser.add_argument(
        "--slo",
        default=SLO.THROUGHPUT.value,
        help=f"objective: {', '.join(s.value for s in SLO)} (default: throughput)",
    )
    parser.add_argument(
        "--candidates",
        help="JSON list of CandidateInfo (or {'candidates': [...], 'hardware': {...}}); "
        "default: derived from the trace",
    )
    parser.add_argument("--config", help="JSON PolicyConfig (unknown keys are errors)")
    parser.add_argument("--cost-model", help="JSON CostModel for extend-vs-switch")
    parser.add_argument(
        "--memory-budget-bytes",
        type=int,
        default=None,
        help=f"replica memory budget (default {DEFAULT_MEMORY_BUDGET_BYTES})",
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    from .fleet_sim import add_arguments  # here, not at import: fleet_sim imports this module

    add_arguments(parser)


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


def _load_model(path: str, model: type[BaseModel]) -> Any:
    data = _load_json(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SimulationError(f"{path}: {_validation_message(exc)}") from None


def _load_candidates(path: str) -> tuple[list[CandidateInfo], Hardware | None]:
    data = _load_json(path)
    hardware_data = None
    if isinstance(data, dict):
        hardware_data = data.get("hardware")
        data = data.get("candidates")
    if not isinstance(data, list) or not data:
        raise SimulationError(f"{path}: expected a non-empty list of candidates")
    try:
        cands = [CandidateInfo.model_validate(item) for item in data]
        hardware = Hardware.model_validate(hardware_data) if hardware_data is not None else None
    except ValidationError as exc:
        raise SimulationError(f"{path}: {_validation_message(exc)}") from None
    return cands, hardware


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_human(result: SimulationResult) -> None:
    print(f"slo: {result.slo.value}   cost unit: {result.cost_unit}   candidates: "
          f"{', '.join(c.name for c in result.candidates)} ({result.candidates_source})")
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"requests {result.requests}, tokens served {result.tokens_served}, breaches "
        f"{result.breaches}, agreement {_fmt(result.agreement)}, storm decisions "
        f"{result.storm_decisions}"
    )
    print("served:")
    for s in result.served:
        print(
            f"  {s.model}@{s.depth}: {s.requests} requests, {s.tokens} tokens, "
            f"agreement {_fmt(s.agreement)}, breaches {s.breaches}"
        )
    print("decisions:")
    for d in result.decisions:
        print(
            f"  [req {d.request_index} tok {d.token_index}] {d.trigger}: {d.action} "
            f"{d.model}@{d.depth} — {d.reason}"
        )


def run(args: argparse.Namespace) -> int:
    """Run ``helios-ray simulate``; bad input gives one line on stderr and exit code 2."""
    trace = args.trace or args.trace_file
    if not trace or (args.trace and args.trace_file and args.trace != args.trace_file):
        _error("give one trace: --trace FILE or TRACE")
        return 2
    if args.fleet:
        from .fleet_sim import run_fleet

        return run_fleet(args, trace)
    try:
        try:
            slo = SLO(args.slo)
        except ValueError:
            raise SimulationError(
                f"unknown SLO {args.slo!r} (choose from {', '.join(s.value for s in SLO)})"
            ) from None
        config = _load_model(args.config, PolicyConfig) if args.config else PolicyConfig()
        costs = _load_model(args.cost_model, CostModel) if args.cost_model else None
        candidates = hardware = None
        if args.candidates:
            candidates, hardware = _load_candidates(args.candidates)
        if args.memory_budget_bytes is not None:
            try:
                hardware = Hardware(
                    device=hardware.device if hardware else "cpu",
                    memory_budget_bytes=args.memory_budget_bytes,
                    gpu_name=hardware.gpu_name if hardware else None,
                )
            except ValidationError as exc:
                raise SimulationError(f"--memory-budget-bytes: {_validation_message(exc)}") from None
        records = read_trace(trace)
        result = simulate(records, slo, config, candidates, hardware=hardware, cost_model=costs)
    except FileNotFoundError as exc:
        _error(f"file not found: {exc.filename}")
        return 2
    except (TraceError, SimulationError, OSError, ValueError) as exc:
        _error(str(exc))
        return 2
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        _print_human(result)
    return 0


def _error(message: str) -> None:
    one_line = " ".join(message.split())
    print(f"helios-ray simulate: error: {one_line}", file=sys.stderr)
