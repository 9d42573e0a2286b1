"""The serving config: ``args`` of a Serve deployment file (``deployments/*.yaml``), read by every deployment.

Every config a user writes is a pydantic model with ``extra="forbid"`` so that a typo is an error, not a silently
ignored knob (model registrations: :mod:`helios_ray.models.spec`).  The serving config embeds the
schemas of the parts it configures - the policy's :class:`~helios_ray.control.config.PolicyConfig` and the
engine's :class:`~helios_ray.engine.config.EngineConfig`, both pure pydantic - rather than copying their
fields, so a knob has one name, one default and one validator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from helios_ray.control.config import SLO, PolicyConfig
from helios_ray.control.quality import QualityFloors
from helios_ray.control.request_features import ClassRule
from helios_ray.control.steering import SteeringConfig
from helios_ray.engine.config import EngineConfig
from helios_ray.models.spec import ModelSpec, StrictModel

DeviceName = Literal["auto", "cpu", "cuda"]


class PlacementSpec(StrictModel):
    """A fixed (model, depth) to start with, instead of the policy's first choice."""

    model: str
    depth: int | None = Field(default=None, ge=1)


class GroupSpec(StrictModel):
    """One replica group of the fleet: replicas that all run one (model, depth) at a time.

    The policy moves each group on its own (from the telemetry of the requests steered to it), the router steers
    every request to the group expected to serve it best, and an operator can move or pin a group by name.
    ``candidates`` limits the models this group may move between (default: all of the application's).
    """

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$",
                      description="The group's name (admin API, metrics, deployment name); DNS-label style.")
    replicas: int = Field(default=1, ge=1, description="Replicas it starts with (and keeps, without max_replicas).")
    max_replicas: int | None = Field(
        default=None, ge=1, description="Let the fleet plan resize this group between 1 and this many replicas, by "
                                        "its share of the demand (within the app's fleet_slots).")
    candidates: list[str] | None = Field(default=None, min_length=1,
                                         description="Models this group may serve (default: the app's candidates).")
    initial: PlacementSpec | None = Field(default=None, description="Where it starts (default: the policy's choice).")
    replica_num_cpus: float | None = Field(default=None, ge=0, description="Default: the app's replica_num_cpus.")
    replica_num_gpus: float | None = Field(default=None, ge=0, description="Default: the app's replica_num_gpus.")

    @model_validator(mode="after")
    def _check_max(self) -> "GroupSpec":
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"group {self.name!r}: max_replicas {self.max_replicas} < replicas {self.replicas}")
        return self

    @property
    def elastic(self) -> bool:
        """Whether the fleet plan sizes this group (it has room between 1 and max_replicas)."""
        return self.max_replicas is not None and self.max_replicas > 1


def group_of_deployment(deployment: str) -> str:
    """The group a replica deployment serves (inverse of :func:`replica_deployment_name`)."""
    for base in ("EarlyExitReplica", "PlainReplica"):
        if deployment == base:
            return DEFAULT_GROUP
        if deployment.startswith(base + "-"):
            return deployment[len(base) + 1:]
    return deployment


def replica_deployment_name(group: str, mode: str = "helios") -> str:
    """The Serve deployment of a group's replicas.  The default group keeps the one-group name, so a Serve config's
    ``deployments: [{name: EarlyExitReplica, ...}]`` override written for a one-group app keeps working."""
    base = "PlainReplica" if mode == "plain" else "EarlyExitReplica"
    return base if group == DEFAULT_GROUP else f"{base}-{group}"


DEFAULT_GROUP = "default"


class AdmissionConfig(StrictModel):
    """How much waiting the cluster accepts before it sheds load, and how long a request waits out a switch.

    Bounded everywhere: a replica holds ``engine.max_num_seqs`` running plus ``max_waiting_per_replica`` queued
    requests; beyond that the router holds at most ``max_queued`` more; anything past both gets HTTP 503 (gRPC
    RESOURCE_EXHAUSTED) with ``Retry-After: retry_after_s`` at once, instead of waiting in an unbounded queue.
    """

    max_waiting_per_replica: int = Field(default=32, ge=0, description="Queued requests inside each replica.")
    max_queued: int = Field(default=64, ge=0, description="Requests the router holds while every replica is full.")
    switch_wait_s: float = Field(default=120.0, gt=0,
                                 description="How long a request arriving during a model swap waits for it "
                                             "before a 503 with Retry-After.")
    retry_after_s: float = Field(default=2.0, gt=0, description="The Retry-After a shed request is given.")
    resume_timeout_s: float = Field(default=60.0, gt=0,
                                    description="How long a stream whose replica died waits for a live replica "
                                                "(another, or the restarted one) to resume it before an error event.")


class ServeConfig(StrictModel):
    """Everything ``build_app(args)`` needs; the ``args`` of ``deployments/helios.yaml`` are this model.

    Each knob lives in exactly one place: the policy's (the confidence threshold included) in ``policy``, the
    engine's (the memory budget included) in ``engine``.  Replicas, the brain, the profiler and the bench all read
    them from here, so they cannot disagree.
    """

    mode: Literal["helios", "early_exit", "plain"] = Field(
        default="helios",
        description="helios: the HELIOS loop (policy, profiling, partial loading). early_exit: the first candidate "
                    "at full depth with token-level exit at `token_exits` (how EE-LLM frameworks serve; the "
                    "baseline of `helios-ray bench serve`). plain: transformers generate() in static batches, full "
                    "model, no exits.  The last two pin one model and never change it.",
    )
    token_exits: list[int] | None = Field(
        default=None,
        description="early_exit mode: the trained exits tokens may leave at.  None = every trained exit whose "
                    "exit card says tokens confident at policy.confidence_threshold agree with the full model at "
                    "least policy.min_agreement of the time.",
    )
    inner_exits: Literal["auto", "off"] = Field(
        default="auto",
        description="helios mode: a replica loaded to depth D also lets tokens leave at trained exits below D "
                    "(token-level exit, as the paper's HELIOS does) where the exit card trusts them and the cost "
                    "model says a check saves more than it costs (auto); off = greedy exit at D only.",
    )
    candidates: list[str] = Field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"], min_length=1)
    models: list[ModelSpec] = Field(default_factory=list, description="Extra model registrations.")
    models_file: Path | None = None
    slo: SLO = SLO.THROUGHPUT
    policy: PolicyConfig = Field(default_factory=PolicyConfig,
                                 description="The HELIOS policy's knobs (paper defaults), the confidence threshold "
                                             "included.")
    initial: PlacementSpec | None = None
    served_model_name: str = Field(default="helios", description="The OpenAI `model` id that lets HELIOS choose.")
    replicas: int = Field(default=1, ge=1)
    replica_num_cpus: float = Field(default=1.0, ge=0)
    replica_num_gpus: float = Field(default=0.0, ge=0)
    device: DeviceName = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8", "int4"] = Field(
        default="auto", description="Weights and KV dtype; auto = bfloat16 on CUDA and on CPUs with bf16 units "
                                    "(AVX512-BF16/AMX), float32 elsewhere; int8 = int8 weights (per-channel "
                                    "scales) with activations and KV at what auto picks; int4 = int4 layer "
                                    "weights in groups of 32, int8 LM head (docs/engine.md).")
    engine: EngineConfig = Field(default_factory=EngineConfig,
                                 description="Per replica: memory budget, batch and context caps, threads.")
    mirror_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    profiler: bool = True
    profile_max_tokens: int = Field(default=16, ge=1)
    profile_queue: int = Field(default=8, ge=1, description="Mirrored prompts waiting beyond this are dropped.")
    telemetry_every_tokens: int = Field(default=16, ge=1)
    api_key_env: str | None = Field(default="HELIOS_API_KEY",
                                    description="Env var holding the users' API key; unset or empty = no key, and "
                                                "then only callers on this host are answered (docs/security.md).")
    admin_key_env: str | None = Field(
        default="HELIOS_ADMIN_KEY",
        description="Env var holding the operators' key for /v1/helios/placements; a users' key gets 403 there.  "
                    "Unset: the operator endpoints answer only a keyless server's own host.")
    allow_unauthenticated: bool = Field(
        default=False,
        description="Serve callers on other hosts without a users' key (an HTTP host off the loopback without a key "
                    "refuses to start otherwise); the status and the live page then say so.")
    max_ongoing_requests: int = Field(default=256, ge=1, description="Requests one router replica handles at once.")
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    groups: list[GroupSpec] | None = Field(
        default=None, min_length=1,
        description="The fleet: replica groups served at once, each at its own (model, depth).  Unset = one group "
                    "named `default` with `replicas` and `initial`.")
    fleet_slots: int | None = Field(
        default=None, ge=1, description="Replica slots (one per GPU / CPU slot) the fleet may fill in all when it "
                                        "resizes groups with max_replicas; default: the sum of the groups' replicas.")
    steering: SteeringConfig = Field(default_factory=SteeringConfig,
                                     description="How the router learns which group serves a request best.")
    quality: QualityFloors = Field(
        default_factory=QualityFloors,
        description="A quality floor per request class (`{code: 'best - 0.05', chat: 0.6}`), checked against each "
                    "placement's measured record (helios-ray quality): the policy and the router choose the fastest "
                    "placement that meets the floor of what it serves.  Default: code 'best - 0.05', chat "
                    "'best - 0.05' (docs/quality.md).")
    classes: list[ClassRule] = Field(
        default_factory=list,
        description="Operator request classes, first match wins (endpoint, metadata or pattern); unmatched "
                    "requests keep the built-in class: code, chat or text.")

    @model_validator(mode="after")
    def _check_classes(self) -> "ServeConfig":
        known = ["code", "chat", "text", *(r.name for r in self.classes)]
        dup = sorted({n for n in known if known.count(n) > 1})
        if dup:
            raise ValueError(f"classes: {', '.join(dup)} named twice (code, chat and text are built in)")
        unknown = sorted(set(self.quality.floors) - set(known))
        if unknown:
            raise ValueError(f"quality: a floor for {', '.join(unknown)}, which names no request class "
                             f"(known: {', '.join(known)})")
        return self

    @model_validator(mode="after")
    def _check_groups(self) -> "ServeConfig":
        if self.groups is None:
            return self
        # (checked by value, not by fields set: a dumped-and-revalidated config carries every field)
        both = [f for f, given in (("initial", self.initial is not None), ("replicas", self.replicas != 1)) if given]
        if both:
            raise ValueError(f"with `groups`, set {' and '.join(both)} per group (groups[].{both[0]}), not at the top")
        names = [g.name for g in self.groups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate group names: {', '.join(dup)}")
        if self.mode != "helios" and len(self.groups) > 1:
            raise ValueError(f"mode {self.mode!r} serves one fixed model: it has one group")
        for g in self.groups:
            bad = [m for m in (g.candidates or []) if m not in self.candidates]
            if g.initial is not None and g.initial.model not in (g.candidates or self.candidates):
                bad.append(g.initial.model)
            if bad:
                raise ValueError(f"group {g.name!r}: {', '.join(sorted(set(bad)))} not among the candidates "
                                 f"({', '.join(g.candidates or self.candidates)})")
        return self

    def fleet(self) -> list[GroupSpec]:
        """The replica groups, resolved: the configured ones (each knob defaulting to the app's), or the one group
        ``default`` that a config without ``groups`` describes."""
        groups = self.groups or [GroupSpec(name=DEFAULT_GROUP, replicas=self.replicas, initial=self.initial)]
        return [g.model_copy(update={
            "candidates": g.candidates or list(self.candidates),
            "replica_num_cpus": self.replica_num_cpus if g.replica_num_cpus is None else g.replica_num_cpus,
            "replica_num_gpus": self.replica_num_gpus if g.replica_num_gpus is None else g.replica_num_gpus,
        }) for g in groups]

    def group(self, name: str) -> GroupSpec:
        for g in self.fleet():
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def total_replicas(self) -> int:
        """Replicas the fleet may run at most (admission bounds are sized from it)."""
        fleet = self.fleet()
        most = sum((g.max_replicas or g.replicas) for g in fleet)
        return min(most, self.fleet_slots) if self.fleet_slots else most

    @property
    def threshold(self) -> float:
        """The confidence threshold (``policy.confidence_threshold``): below it a token is a breach."""
        return self.policy.confidence_threshold
