"""One real local Ray cluster for the whole serve test session, running deployments/helios.yaml's application."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import yaml

from helios_bench.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
ADMIN_KEY = "test-admin-456"


def pytest_collection_modifyitems(config, items):
    """Every test on the session's cluster runs in one xdist worker (``--dist loadgroup``): one cluster per run."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray-cluster"))


def _start_ray(ray) -> tuple[str, int]:
    """The session's local cluster.  Ray gives a starting raylet a fixed 30 s to register, and the other test worker
    (or a port taken between choosing it and Ray binding it) can make a start fail on a loaded 2-core host: one more
    try, in a fresh temp dir with fresh ports, after shutting the failed start down through the API."""
    for attempt in (1, 2):
        tmp = tempfile.mkdtemp(prefix="hr", dir="/tmp")  # short: Ray's socket paths have a length limit
        metrics_port = free_port()
        try:
            ray.init(num_cpus=4, _temp_dir=tmp, object_store_memory=100 * 2**20, include_dashboard=False,
                     _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000},
                     logging_level="WARNING", log_to_driver=False)  # worker logs stay in the temp dir
            return tmp, metrics_port
        except Exception as e:  # noqa: BLE001 - any failed start gets the one retry; the second one raises
            if attempt == 2:
                raise
            warnings.warn(f"the test cluster did not start ({e}); retrying once", stacklevel=1)
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "60"  # 2 loaded cores: the proxy can start slowly
    os.environ["HELIOS_TEST_API_KEY"] = API_KEY  # inherited by the cluster's workers (the Router reads it)
    os.environ["HELIOS_TEST_ADMIN_KEY"] = ADMIN_KEY
    import ray
    from ray import serve

    from helios_ray.serve.app import build_app

    tmp, metrics_port = _start_ray(ray)
    http_port, grpc_port = free_port(), free_port()
    # HeadOnly, as deployments/helios.yaml: test_two_nodes.py adds a second node on this same host, whose own proxy
    # would share the port and take connections with it when that node dies.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [
                    "helios_proto.servicer.add_HeliosServiceServicer_to_server"]})
    cfg = yaml.safe_load((ROOT / "deployments" / "helios.yaml").read_text())
    app_cfg = cfg["applications"][0]
    args = dict(app_cfg["args"])
    # Same application as the YAML; test-sized knobs: a small breach window so a storm is quick to provoke,
    # starting at a shallow SmolLM2 depth where the logit lens is unconfident (a real, not simulated, storm).
    args.update({
        "api_key_env": "HELIOS_TEST_API_KEY", "admin_key_env": "HELIOS_TEST_ADMIN_KEY", "mirror_fraction": 0.0,
        # float32 on every host: the tests compare streams token for token (a resumed stream, two replicas on two
        # nodes), and bf16 greedy decoding - what `auto` picks on a CPU with AVX512-BF16 - depends on the batch.
        "dtype": "float32",
        "engine": {**args.get("engine", {}), "memory_budget": "1GiB"},
        "initial": {"model": "smollm2-135m", "depth": 30},
        "policy": {**args.get("policy", {}), "breach_window": 20, "breach_limit": 10, "profile_prompts": 2,
                   "reassess_every": 1000, "hysteresis_requests": 2, "min_agreement": 0.0},
    })
    serve.run(build_app(args), name=app_cfg["name"], route_prefix=app_cfg["route_prefix"], blocking=False)
    base = f"http://127.0.0.1:{http_port}"
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield {"base": base, "grpc": f"127.0.0.1:{grpc_port}", "metrics": f"http://127.0.0.1:{metrics_port}",
           "headers": {"Authorization": f"Bearer {API_KEY}"}, "key": API_KEY, "app": app_cfg["name"],
           "admin_headers": {"Authorization": f"Bearer {ADMIN_KEY}"}, "admin_key": ADMIN_KEY, "http_port": http_port,
           "grpc_port": grpc_port}
    serve.shutdown()
    ray.shutdown()
    keep = os.environ.get("HELIOS_KEEP_RAY_LOGS")  # debugging a failed run: keep the cluster's logs there
    if keep:
        shutil.copytree(Path(tmp) / "session_latest" / "logs", keep, dirs_exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
