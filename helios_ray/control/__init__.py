"""HELIOS control plane: pure Python (no Ray, no torch), testable by simulation and traces.

* :mod:`.config` -- SLO, PolicyConfig, CandidateInfo, Hardware
* :mod:`.trace` -- the per-token telemetry (JSONL) format, reader and writer
* :mod:`.reservoir` -- bounded latency samples (mean, p50, p99)
* :mod:`.pht_entry` -- one PHT row: exit statistics and timings of one (model, depth)
* :mod:`.pht` -- the performance history table (PHT): staleness, merging, persistence
* :mod:`.breach` -- the confidence-breach counter whose storms trigger extend-or-switch
* :mod:`.decision` -- the records the policy returns (DepthChoice, Estimate, Decision)
* :mod:`.costs` -- per-token cost units, batch room and measured timings of a placement
* :mod:`.depth` -- evidence per exit, the accuracy guard, choose the depth of one model
* :mod:`.policy` -- shortlist and choose (model, depth) for an SLO
* :mod:`.storm` -- extend-vs-switch on a breach storm, priced by a CostModel
* :mod:`.controller` -- the stateful loop the router and the simulator drive
* :mod:`.simulate` -- trace replay and the ``helios-ray simulate`` subcommand
* :mod:`.steering` -- per-request steering across replica groups (online ridge predictor)
* :mod:`.fleet_sim` -- steering over groups replayed on a recorded trace (``simulate --fleet``)
* :mod:`.fleet` -- replicas per group (``size_groups``) and one group switching at a time (``SwitchGate``)

See ``docs/control-plane.md``.
"""

from .config import SLO, CalibrationPoint, CandidateInfo, ExitPrior, Hardware, PolicyConfig
from .controller import Controller, Placement
from .breach import BreachCounter
from .decision import Decision, DepthChoice, Estimate, NoFeasiblePlacement
from .depth import choose_depth
from .pht import PHT
from .pht_entry import PHTEntry
from .policy import choose, shortlist
from .simulate import SimulationResult, simulate
from .storm import CostModel, on_storm
from .steering import GroupView, Outcome, Prediction, RequestFeatures, Route, Steering, SteeringConfig, request_features
from .fleet import SwitchGate, SwitchInProgress, size_groups
from .fleet_sim import FleetSimResult, simulate_steering
from .trace import TraceError, TraceRequest, TraceToken, read_trace, write_trace

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
    "TraceRequest",
    "TraceToken",
    "TraceError",
    "read_trace",
    "write_trace",
    "Steering",
    "SteeringConfig",
    "RequestFeatures",
    "request_features",
    "GroupView",
    "Outcome",
    "Prediction",
    "Route",
    "size_groups",
    "SwitchGate",
    "SwitchInProgress",
    "FleetSimResult",
    "simulate_steering",
]
