"""``helios-ray serve CONFIG`` deploys the file the way ``serve run CONFIG`` does: Serve's own schema, so a
``deployments:`` override (here a ``user_config`` pin) takes effect, and a bad file is one line, no cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helios_bench.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["helios.yaml", "helios-fleet.yaml", "helios-gpu.yaml"])
def test_every_shipped_deployment_file_is_a_valid_config(name):
    """What `serve run deployments/<name>` would deploy: Serve's schema, the helios args, every candidate prepared
    and every group's models among its candidates (no cluster needed)."""
    from helios_ray.serve.config import ServeConfig
    from helios_ray.serve.launch import load_deploy_config

    config = load_deploy_config(ROOT / "deployments" / name)
    (app,) = config.applications
    groups = ServeConfig.model_validate(app.args).fleet()
    assert len(groups) == (1 if name == "helios.yaml" else 2)


@pytest.mark.parametrize("content, needle", [
    ("applications:\n  - name: h\n    import_path: helios_ray.serve.app:build_app\n    args:\n      groups: "
     "[{name: a}, {name: a}]\n", "duplicate group names: a"),
    ("applications:\n  - name: h\n    import_path: helios_ray.serve.app:build_app\n    args:\n      replicas: 2\n"
     "      groups: [{name: a}]\n", "set replicas per group"),
    ("applications:\n  - name: h\n    import_path: helios_ray.serve.app:build_app\n    args:\n      groups: "
     "[{name: a, candidates: [nope]}]\n", "nope not among the candidates"),
    (None, "does not exist"),
    ("applications: 3\n", "is not a Serve config: applications"),
    ("applications:\n  - name: h\n    import_path: helios_ray.serve.app:build_app\n    args: {slo: fast}\n",
     "invalid helios application args: slo"),
    ("applications:\n  - name: h\n    import_path: helios_ray.serve.app:build_app\n    args: {threshold: 0.5}\n",
     "invalid helios application args: threshold: Extra inputs are not permitted"),
])
def test_bad_config_is_one_line_before_anything_starts(tmp_path, capsys, content, needle):
    """In process (the command's own ``main``; the real entry point's error path is tests/test_cli.py's): nothing may
    start, so nothing here can touch the session's cluster."""
    from helios_ray.cli import main

    path = tmp_path / "cfg.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["serve", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


@pytest.mark.slow
def test_serve_command_applies_the_files_deployments_overrides(tmp_path):
    base = yaml.safe_load((ROOT / "deployments" / "helios.yaml").read_text())
    http_port, grpc_port = free_port(), free_port()
    base["http_options"]["port"], base["grpc_options"]["port"] = http_port, grpc_port
    app = base["applications"][0]
    app["args"].update({"candidates": ["smollm2-135m"], "profiler": False, "api_key_env": None})
    app["args"]["engine"]["memory_budget"] = "1GiB"
    # What docs/serving.md documents: a user_config pins every replica's placement.  The old `helios-ray serve`
    # ignored `deployments:`; Serve's schema applies it.
    app["deployments"] = [{"name": "EarlyExitReplica", "user_config": {"model": "smollm2-135m", "depth": 24}}]
    cfg = tmp_path / "helios.yaml"
    cfg.write_text(yaml.safe_dump(base))
    tmp = tempfile.mkdtemp(prefix="hl", dir="/tmp")  # this test's own Ray temp dir (short: socket path limits)
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "helios_ray.cli", "serve", str(cfg), "--address", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline, served = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None:
            try:
                r = httpx.post(f"{url}/v1/completions", timeout=60, trust_env=False,
                               json={"model": "helios", "prompt": "Hello", "max_tokens": 2})
                if r.status_code == 200 and r.json()["helios"]["depth"] == 24:
                    served = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert served is not None, "the user_config pin (depth 24) never took effect"
        st = httpx.get(f"{url}/v1/helios/status", timeout=30, trust_env=False).json()
        assert st["placement"]["depth"] == 24 and st["changes"][-1]["trigger"] == "operator"
    finally:
        proc.send_signal(signal.SIGTERM)  # the process this test started, by PID
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "serving helios on http://127.0.0.1:" in err and "shutting down" in err
