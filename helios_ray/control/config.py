"""Configuration and static metadata for the HELIOS control plane.

Everything the policy can be tuned with lives in :class:`PolicyConfig`, with the HELIOS paper's
defaults (arXiv 2504.10724): shortlist K=3, profile on 5 prompts, confidence threshold 0.9, a breach
storm is more than 50 breaches in 100 tokens, re-profile every 150 requests. The models here are
strict (``extra="forbid"``) because a typo in a knob should fail loudly at start-up rather than
silently fall back to a default while the cluster serves traffic.

:class:`CandidateInfo` is what the model repository tells the policy about one model; the policy
never touches weights, only these numbers, so it stays pure Python and simulation-testable.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from helios_ray.memory import Footprint, ModelParts
from helios_ray.memory import footprint as memory_footprint

__all__ = [
    "SLO",
    "PolicyConfig",
    "CalibrationPoint",
    "ExitPrior",
    "CandidateInfo",
    "Hardware",
]


class SLO(str, Enum):
    """The service-level objective the policy optimises.

    ``throughput`` maximises generated tokens/s, ``latency`` minimises the per-token time (TPOT),
    ``energy`` minimises joules per token, ``batch_size`` maximises the number of sequences that fit
    the memory budget at once (the HELIOS batch-size headline).
    """

    THROUGHPUT = "throughput"
    LATENCY = "latency"
    ENERGY = "energy"
    BATCH_SIZE = "batch_size"

    def __str__(self) -> str:  # argparse/help text and f-strings show the plain value
        return self.value


class _Strict(BaseModel):
    """Base for every config model: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PolicyConfig(_Strict):
    """All knobs of the control loop. Defaults are the paper's where the paper gives one."""

    top_k: int = Field(
        3, ge=1, description="Shortlist size K: how many candidates are profiled and considered."
    )
    profile_prompts: int = Field(
        5, ge=1, description="Requests mirrored to every shortlisted candidate per profiling round."
    )
    confidence_threshold: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="A token exits confidently at an exit when its max softmax prob >= this; "
        "a served token below it is a confidence breach.",
    )
    breach_window: int = Field(100, ge=1, description="Sliding window of served tokens for breaches.")
    breach_limit: int = Field(
        50,
        ge=0,
        description="A breach storm is MORE than this many breaches within the window.",
    )
    reassess_every: int = Field(
        150, ge=1, description="Re-profile and re-choose every this many completed requests (RI)."
    )
    min_agreement: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Accuracy guard: minimum token agreement with the full-depth model at a depth.",
    )
    guard_metric: Literal["agreement", "pass_at_1"] = Field(
        "agreement",
        description="What the accuracy guard checks besides perplexity: token agreement with the full model "
        "(min_agreement), or task quality - the drop in HumanEval pass@1 from the exit card "
        "(max_pass_at_1_drop; a depth without a measured pass@1 fails the guard).",
    )
    max_pass_at_1_drop: float = Field(
        0.02, ge=0.0, le=1.0,
        description="Accuracy guard with guard_metric pass_at_1: largest allowed pass@1 drop (0.02 = 2 points).",
    )
    max_ppl_increase: float = Field(
        0.1,
        ge=0.0,
        description="Accuracy guard: maximum relative perplexity increase under the full model "
        "(0.1 = +10%), checked only where log-probs are known.",
    )
    exit_share: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Share of tokens that must exit confidently at or before a depth to choose it.",
    )
    hysteresis_requests: int = Field(
        50,
        ge=0,
        description="After a change of placement (or a storm decision), no new extend/switch for "
        "this many requests.",
    )
    stale_after_s: float = Field(
        600.0, gt=0.0, description="Performance-history entries older than this are ignored."
    )
    # Beyond the paper: knobs the formulas need. Documented in docs/control-plane.md.
    typical_seq_len: int = Field(
        1024,
        ge=1,
        description="Tokens (prompt + output) one sequence holds in KV memory, for batch sizing.",
    )
    max_batch: int = Field(
        256,
        ge=1,
        description="Cap on concurrent sequences (vLLM's max_num_seqs default); memory freed "
        "beyond it does not raise throughput.",
    )
    min_samples: int = Field(
        32,
        ge=1,
        description="Profiled tokens an entry needs before its exit statistics are trusted.",
    )
    reassess_margin: float = Field(
        0.05,
        ge=0.0,
        description="A periodic re-assessment only moves a healthy placement when the new one "
        "scores at least this much better (relative).",
    )
    confidence_bins: int = Field(20, ge=2, le=1000, description="Bins of confidence histograms.")
    reservoir_size: int = Field(
        512, ge=1, description="Recent samples kept for latency percentiles (TTFT, TPOT)."
    )

    @model_validator(mode="after")
    def _check_relations(self) -> "PolicyConfig":
        if self.breach_limit >= self.breach_window:
            raise ValueError(
                f"breach_limit ({self.breach_limit}) must be smaller than breach_window "
                f"({self.breach_window}): a storm is more than breach_limit breaches within the "
                "window, so a limit >= window could never fire"
            )
        if self.profile_prompts > self.reassess_every:
            raise ValueError(
                f"profile_prompts ({self.profile_prompts}) must not exceed reassess_every "
                f"({self.reassess_every}): each re-assessment profiles the requests just before it"
            )
        return self


class CalibrationPoint(_Strict):
    """One row of an exit card's calibration table: at this confidence threshold, this share of
    tokens is confident (``coverage``) and those tokens agree with the full model this often."""

    threshold: float = Field(gt=0.0, le=1.0)
    coverage: float = Field(ge=0.0, le=1.0)
    agreement: float = Field(ge=0.0, le=1.0)


class ExitPrior(_Strict):
    """What an exit card says about one exit before any live profiling: the overall argmax agreement
    with the full model (what greedy exit at this depth serves) and a calibration table."""

    agreement: float = Field(ge=0.0, le=1.0)
    calibration: list[CalibrationPoint] = Field(default_factory=list)
    pass_at_1_drop: float | None = Field(
        None, ge=-1.0, le=1.0,
        description="Task quality: full-depth HumanEval pass@1 minus pass@1 with greedy exit here (eval-exits "
                    "--update-card); None = not measured.",
    )

    def coverage_at(self, threshold: float) -> float | None:
        """A conservative estimate of the share of tokens confident at ``threshold``.

        Coverage falls as the threshold rises, so the row with the smallest threshold that is still
        >= ``threshold`` gives a lower bound. ``None`` when the card has no such row: the policy then
        treats the share as unknown instead of guessing upwards.
        """
        rows = [p for p in self.calibration if p.threshold >= threshold - 1e-12]
        if not rows:
            return None
        return min(rows, key=lambda p: p.threshold).coverage


class CandidateInfo(_Strict):
    """Static metadata of one model the policy can choose, as the model repository reports it.

    Byte counts may be 0 when unknown (e.g. candidates derived from a trace); the cost model then
    falls back from FLOPs to bytes to plain layer counts (see :func:`helios_ray.control.costs.cost_unit`).
    """

    name: str = Field(min_length=1)
    num_layers: int = Field(ge=1)
    embed_bytes: int = Field(0, ge=0)
    layer_bytes: int = Field(0, ge=0, description="Weights of one decoder layer.")
    head_bytes: int = Field(0, ge=0, description="Final norm + lm_head (as the repository counts it).")
    exit_head_bytes: int = Field(
        0, ge=0, description="Extra weights of one trained exit head (0 for a shared head)."
    )
    kv_bytes_per_token_per_layer: int = Field(0, ge=0)
    exit_kv_bytes_per_token: int = Field(
        0,
        ge=0,
        description="KV bytes per token of an exit head that is itself a decoder block (0 otherwise).",
    )
    exits: list[int] = Field(default_factory=list)
    free_exits: list[int] = Field(
        default_factory=list,
        description="Exits whose head costs no weights or KV when served (healed exits: merged into the loaded "
                    "layers); every other depth below the full one pays exit_head_bytes (+ exit KV).",
    )
    exit_prior: dict[int, ExitPrior] = Field(default_factory=dict)
    flops_per_token_per_layer: int | None = Field(None, ge=0)
    head_flops_per_token: int | None = Field(None, ge=0)
    load_seconds_per_layer: float | None = Field(None, ge=0.0)
    quality: dict[int, dict[str, float]] = Field(
        default_factory=dict,
        description="Measured quality per depth and request class ({depth: {'code': pass@1, 'chat': score}}), "
                    "comparable across models (helios-ray quality); what the quality floors are checked against.")
    chat_capable: bool = Field(True, description="Whether it may answer chats (a base model only when declared).")

    @model_validator(mode="after")
    def _normalise_exits(self) -> "CandidateInfo":
        bad = [d for d in self.exits if not 1 <= d <= self.num_layers]
        if bad:
            raise ValueError(
                f"exits {bad} of candidate {self.name!r} are outside 1..num_layers ({self.num_layers})"
            )
        # The full depth is always an exit: the model's own head. Sorted and unique so that
        # "next exit deeper than D" is a simple scan.
        normalised = sorted(set(self.exits) | {self.num_layers})
        if normalised != self.exits:
            object.__setattr__(self, "exits", normalised)
        unknown = sorted(set(self.exit_prior) - set(normalised))
        if unknown:
            raise ValueError(
                f"exit_prior of candidate {self.name!r} names depths {unknown} that are not exits "
                f"{normalised}"
            )
        return self

    def _check_depth(self, depth: int) -> None:
        if not 1 <= depth <= self.num_layers:
            raise ValueError(f"depth {depth} outside 1..{self.num_layers} for {self.name!r}")

    def footprint(self, depth: int) -> Footprint:
        """Weights and KV per token with layers [0, depth) and the exit at ``depth`` loaded, by the one memory
        model the engine admits by (:mod:`helios_ray.memory`).  A trained exit head is only needed below the
        full depth; at the full depth the model's own head is the exit (and a block head's KV goes with it)."""
        self._check_depth(depth)
        below = depth < self.num_layers and depth not in self.free_exits
        parts = ModelParts(num_layers=self.num_layers, embed_bytes=self.embed_bytes, layer_bytes=self.layer_bytes,
                           head_bytes=self.head_bytes, kv_bytes_per_token_per_layer=self.kv_bytes_per_token_per_layer,
                           exit_head_bytes=self.exit_head_bytes)
        fp = memory_footprint(parts, depth, exit_heads=1 if below else 0, attending_exit_heads=0)
        # a block exit head attends: one more layer of KV per token, carried here as its own byte count
        return Footprint(fp.weight_bytes, fp.kv_bytes_per_token + (self.exit_kv_bytes_per_token if below else 0))

    def weight_bytes(self, depth: int) -> int:
        """Resident weights when layers [0, depth) and the exit at ``depth`` are loaded."""
        return self.footprint(depth).weight_bytes

    def kv_bytes_per_token(self, depth: int) -> int:
        """KV-cache bytes one token occupies with ``depth`` layers loaded (plus a block exit head)."""
        return self.footprint(depth).kv_bytes_per_token

    def exits_above(self, depth: int) -> list[int]:
        """Exit depths strictly deeper than ``depth``, shallowest first."""
        return [d for d in self.exits if d > depth]


class Hardware(_Strict):
    """Where a replica runs: the memory budget bounds weights + KV cache of one replica."""

    device: Literal["cpu", "cuda"] = "cpu"
    memory_budget_bytes: int = Field(gt=0)
    gpu_name: str | None = None

    @field_validator("device", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
