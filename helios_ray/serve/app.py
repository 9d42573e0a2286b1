"""``build_app(args)``: the Serve application behind ``deployments/helios.yaml`` and ``helios-fleet.yaml``.

The deployments (names are what ``deployments:`` overrides in a Serve config refer to):

* ``Router`` - ingress: OpenAI HTTP + helios.v1 gRPC, steering, token relay, telemetry, mirroring (no CPU);
* ``EarlyExitReplica`` (the ``default`` group) or ``EarlyExitReplica-<group>`` - one deployment per replica group
  of the fleet, one truncated early-exit engine per replica (``replica_num_cpus``/``replica_num_gpus``);
* ``HeliosBrain`` - the policy and the versioned placement (one replica);
* ``HeliosProfiler`` - profile-mode evaluation of candidates on mirrored prompts (one replica).

``mode: early_exit`` and ``mode: plain`` build the two baselines of ``helios-ray bench serve`` behind the same
Router: the first candidate pinned at full depth with token-level exit (``EarlyExitReplica``), or ``transformers``
``generate()`` (``PlainReplica``); neither has a profiler, and the brain never moves their placement.

Why one Serve deployment per group (and not one deployment with a custom ``RequestRouter`` or multiplexed model
ids): a group is a unit of placement - its replicas load one (model, depth) and move together - so each needs its
own replica count, resources (GPU or CPU slot), admission bounds and rolling restarts, which are exactly a
deployment's knobs.  Serve's model multiplexing loads models lazily per request into an LRU, which fights a
placement the policy chose on purpose; a custom ``RequestRouter`` picks among replicas of *one* deployment and
sees only that deployment's stats.  Steering needs the request's features, every group's live placement and
the learned predictor in one place - the router - which then calls the chosen group's handle; inside a group
Serve's own power-of-two-choices router balances the replicas.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from helios_ray.serve.config import ServeConfig, replica_deployment_name
from helios_ray.errors import HeliosError
from helios_ray.serve.brain import Brain
from helios_ray.serve.fleet_scaling import autoscaling_config
from helios_ray.serve.plain_replica import PlainReplica
from helios_ray.serve.profiler import Profiler
from helios_ray.serve.replica import EarlyExitReplica
from helios_ray.serve.router import Router


#: Router, brain and profiler reserve no CPU and live on the head node, with the GCS and the HTTP/gRPC proxy
#: (``proxy_location: HeadOnly``): losing a worker node then costs only the replicas on it, whose streams the
#: router resumes elsewhere.  Ray gives every head node the ``node:__internal_head__`` resource.
ON_HEAD: dict[str, Any] = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}


def load_config(args: dict[str, Any] | None) -> ServeConfig:
    try:
        cfg = ServeConfig.model_validate(args or {})
    except ValidationError as e:
        errs = e.errors()
        loc = ".".join(str(x) for x in errs[0].get("loc", ()))
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise HeliosError(f"invalid helios application args: {loc}: {errs[0].get('msg')}{more}") from None
    from helios_ray.models.repository import ModelRepository

    repo = ModelRepository(extra=cfg.models, models_file=cfg.models_file)
    for name in cfg.candidates:
        repo.checkpoint_dir(name)  # unknown or unprepared candidates fail here, with the fix in the message
    if cfg.initial is not None and cfg.initial.model not in cfg.candidates:
        raise HeliosError(f"initial model {cfg.initial.model!r} is not among the candidates")
    for g in cfg.fleet():
        if g.initial is not None and g.initial.depth is not None:
            layers = repo.info(g.initial.model).num_layers or 0
            if g.initial.depth > layers:
                raise HeliosError(f"group {g.name!r}: initial depth {g.initial.depth} is out of range for "
                                  f"{g.initial.model!r} (1..{layers} layers)")
    if cfg.mode != "helios" and len(cfg.candidates) != 1:
        raise HeliosError(f"mode {cfg.mode!r} serves one model: give exactly one candidate "
                          f"(got {', '.join(cfg.candidates)})")
    if cfg.mode == "early_exit":
        from helios_ray.serve.replica import resolve_token_exits

        name = cfg.candidates[0]
        info = repo.info(name)
        exits = resolve_token_exits(cfg, repo, name, info.num_layers or 0)
        trained = (info.exits.trained if info.exits else []) or []
        bad = [d for d in exits if d not in trained]
        if bad:
            raise HeliosError(f"token_exits {bad}: {name!r} has trained exits at {trained or 'none'}")
    return cfg


def build_app(args: dict[str, Any] | None = None) -> Application:
    cfg = load_config(args)
    conf = cfg.model_dump(mode="json")
    # Its in-flight requests are placement long-polls, safe to cut: a short graceful shutdown.
    # A killed brain is replaced within seconds (health checks every 2 s) and restores its checkpoint.
    brain = serve.deployment(Brain, name="HeliosBrain", num_replicas=1, max_ongoing_requests=100_000,
                             health_check_period_s=2, health_check_timeout_s=30,
                             graceful_shutdown_timeout_s=1, graceful_shutdown_wait_loop_s=0.5,
                             ray_actor_options=ON_HEAD).bind(conf)
    profiler = None
    if cfg.profiler and cfg.mode == "helios":
        profiler = serve.deployment(Profiler, name="HeliosProfiler", num_replicas=1, max_ongoing_requests=1000,
                                    ray_actor_options=ON_HEAD).bind(conf, brain)
    cls = PlainReplica if cfg.mode == "plain" else EarlyExitReplica
    groups = {
        g.name: serve.deployment(
            cls, name=replica_deployment_name(g.name, cfg.mode),
            # an elastic group is sized by the brain's fleet plan, through Serve's autoscaler (fleet_scaling.py)
            **({"num_replicas": "auto", "autoscaling_config": autoscaling_config(g.replicas, g.max_replicas or 1)}
               if g.elastic else {"num_replicas": g.replicas}),
            # Bounded admission (AdmissionConfig): running + queued per replica, then a bounded router-side queue;
            # past both, Serve raises BackPressureError and the relay answers 503 + Retry-After.
            max_ongoing_requests=cfg.engine.max_num_seqs + cfg.admission.max_waiting_per_replica,
            max_queued_requests=cfg.admission.max_queued,
            health_check_period_s=1, health_check_timeout_s=30,
            graceful_shutdown_timeout_s=30,
            ray_actor_options={"num_cpus": g.replica_num_cpus, "num_gpus": g.replica_num_gpus},
        ).bind(conf, brain, g.name)
        for g in cfg.fleet()
    }
    ingress = serve.deployment(Router, name="Router", num_replicas=1,
                               max_ongoing_requests=cfg.max_ongoing_requests,
                               ray_actor_options=ON_HEAD).bind(conf, groups, brain, profiler)
    return ingress
