"""``helios-ray simulate``: replay a trace through the policy (:mod:`.simulate`) or, with ``--fleet``, steering over
replica groups (:mod:`.fleet_sim`).  Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import BaseModel, ValidationError

from .config import SLO, CandidateInfo, Hardware, PolicyConfig
from .fleet_sim import add_arguments, run_fleet
from .simulate import (
    DEFAULT_MEMORY_BUDGET_BYTES, SimulationError, SimulationResult, _load_json, _validation_message, simulate,
)
from .storm import CostModel
from .trace import TraceError, read_trace


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
    add_arguments(parser)


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
