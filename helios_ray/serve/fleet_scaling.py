"""Group sizes, from the brain's fleet plan to Serve: a custom autoscaling policy that reads the plan.

The brain decides how many replicas each elastic group (``max_replicas`` set) should run - its share of the
demand, within ``fleet_slots``, with hysteresis (:func:`helios_ray.control.fleet.size_groups`) - and writes the
number into Ray's internal KV.  Serve's controller calls :func:`group_replicas` for each such group's deployment
every control-loop tick, and it answers with that number.  So the decision stays in one place (the brain, which
sees the demand), Serve does what it is good at (starting, placing and stopping replicas, bounded by the
deployment's min/max), and nothing calls Serve's deployment API from inside the application.
"""

from __future__ import annotations

import logging
from typing import Any

from helios_ray.serve.config import group_of_deployment

log = logging.getLogger("ray.serve")
NAMESPACE = "helios"
POLICY = "helios_ray.serve.fleet_scaling:group_replicas"


def _key(app: str, group: str) -> bytes:
    return f"fleet/{app}/{group}/replicas".encode()


def publish(app: str, sizes: dict[str, int]) -> None:
    """Write the planned replica count of each group (the brain; no-op outside a Ray cluster)."""
    try:
        from ray.experimental import internal_kv

        if not internal_kv._internal_kv_initialized():
            return
        for group, n in sizes.items():
            internal_kv._internal_kv_put(_key(app, group), str(int(n)).encode(), overwrite=True, namespace=NAMESPACE)
    except Exception:
        log.warning("helios brain: could not publish the group sizes", exc_info=True)


def planned(app: str, group: str) -> int | None:
    try:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(_key(app, group), namespace=NAMESPACE)
    except Exception:
        return None
    return int(raw) if raw else None


def group_replicas(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Serve autoscaling policy (runs in the Serve controller): the brain's planned size of this group, or the
    current target while the brain has not planned one.  Serve bounds it by the deployment's min/max."""
    want = planned(ctx.app_name or "", group_of_deployment(ctx.deployment_name))
    return (ctx.target_num_replicas if want is None else want), ctx.policy_state


def autoscaling_config(replicas: int, max_replicas: int) -> dict[str, Any]:
    """The deployment's ``autoscaling_config`` for an elastic group: our policy, Serve's bounds, and short delays
    (the brain's plan already has hysteresis; Serve's default 600 s downscale delay would hold a slot for ten
    minutes after the plan gave it to another group)."""
    return {"min_replicas": 1, "initial_replicas": replicas, "max_replicas": max_replicas,
            "upscale_delay_s": 1.0, "downscale_delay_s": 5.0, "metrics_interval_s": 2.0, "look_back_period_s": 4.0,
            "policy": {"policy_function": POLICY}}
