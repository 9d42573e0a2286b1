"""``helios-ray serve CONFIG``: what ``serve run CONFIG`` does, with this project's local defaults.

The file is validated as Ray's own :class:`~ray.serve.schema.ServeDeploySchema` and deployed through the same
controller call ``serve run``/``serve deploy`` make, so every field - ``deployments:`` overrides, ``user_config``
pinning, ``proxy_location``, ``grpc_options`` - means exactly what it means to Serve, and the application can be
updated live later.  What this adds: token auth off for a local cluster, a proxy start timeout that survives a
busy 2-core host, helios args checked before anything starts (one clear line instead of a failed deployment
minutes later), a readiness wait that prints where to connect, and a clean shutdown through the API on Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from helios_ray.errors import HeliosError

BUILDER = "helios_ray.serve.app:build_app"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="deployments/helios.yaml", help="a Serve config file")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds to wait for the applications to be RUNNING (default 600)")


def load_deploy_config(path: Path) -> Any:
    """The file as Serve's schema; helios applications' ``args`` also checked against ``ServeConfig``."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if not path.exists():
        raise HeliosError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HeliosError(f"{path} is not valid YAML: {e}") from None
    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise HeliosError(f"{path} is not a Serve config: {loc}: {first.get('msg')}") from None
    for app in config.applications:
        if app.import_path == BUILDER:
            from helios_ray.serve.app import load_config

            from helios_ray.serve.auth import Access, exposure_problem

            cfg = load_config(app.args)
            access = Access.from_env(cfg.api_key_env, cfg.admin_key_env, cfg.allow_unauthenticated)
            problem = exposure_problem(config.http_options.host, access)
            if problem:  # the router would refuse too, minutes later, as a failed deployment
                raise HeliosError(f"{path}: application {app.name!r}: {problem}")
    return config


def _wait_ready(names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status.value if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise HeliosError("; ".join(f"application {n!r} failed: {m}" for n, m in failed.items()))
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(1.0)
    raise HeliosError(f"applications not RUNNING after {timeout_s:.0f} s: {states}")


def run(a: argparse.Namespace) -> int:
    path = Path(a.config)
    config = load_deploy_config(path)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions

    ray.init(address=a.address, namespace="serve", include_dashboard=False, logging_level="WARNING")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location,
                             grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
                             controller_options=config.controller_options)
        client.deploy_apps(config, _blocking=False)  # the call `serve run CONFIG` makes
        names = [app.name for app in config.applications]
        print(f"helios-ray: deploying {', '.join(names)} from {path} ...", file=sys.stderr)
        _wait_ready(names, a.ready_timeout)
        http = config.http_options
        print(f"helios-ray: serving {', '.join(names)} on http://{http.host}:{http.port} "
              f"(gRPC :{config.grpc_options.port}); Ctrl-C to stop", file=sys.stderr)
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("helios-ray: shutting down", file=sys.stderr)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
