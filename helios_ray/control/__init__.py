"""HELIOS control plane: pure Python (no Ray, no torch), testable by simulation and traces.

* :mod:`.config` -- SLO, PolicyConfig, CandidateInfo, Hardware
* :mod:`.trace` -- the per-token telemetry (JSONL) format, reader and writer
* :mod:`.telemetry` -- performance history table (PHT) and confidence-breach counter
* :mod:`.policy` -- shortlist, choose (model, depth), extend-vs-switch on a breach storm
* :mod:`.controller` -- the stateful loop the router and the simulator drive
* :mod:`.simulate` -- trace replay and the ``helios-ray simulate`` subcommand

See ``docs/control-plane.md``.
"""

from .config import SLO, CalibrationPoint, CandidateInfo, ExitPrior, Hardware, PolicyConfig
from .controller import Controller, Placement
from .policy import (
    CostModel,
    Decision,
    DepthChoice,
    Estimate,
    NoFeasiblePlacement,
    choose,
    choose_depth,
    on_storm,
    shortlist,
)
from .simulate import SimulationResult, simulate
from .telemetry import PHT, BreachCounter, PHTEntry
from .trace import RequestRecord, TokenRecord, TraceError, read_trace, write_trace

__all__ = [
    "SLO",
    "CalibrationPoint",
    "CandidateInfo",
    "ExitPrior",
    "Hardware",
    "PolicyConfig",
    "Controller",
    "Placement",
    "CostModel",
    "Decision",
    "DepthChoice",
    "Estimate",
    "NoFeasiblePlacement",
    "choose",
    "choose_depth",
    "on_storm",
    "shortlist",
    "SimulationResult",
    "simulate",
    "PHT",
    "PHTEntry",
    "BreachCounter",
    "RequestRecord",
    "TokenRecord",
    "TraceError",
    "read_trace",
    "write_trace",
]
