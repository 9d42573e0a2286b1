"""Operators move the fleet over HTTP: ``POST /v1/helios/placements`` (and ``helios-ray fleet``), with the API key,
the admin key (a user's key gets 403), clear 4xx for unknown groups, models and depths, and the change visible in the status and the metrics - live,
while requests keep completing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def _post(c, path: str, body, headers=None) -> httpx.Response:
    return httpx.post(f"{c['base']}{path}", headers=c["admin_headers"] if headers is None else headers, timeout=60,
                      **({"content": body} if isinstance(body, str) else {"json": body}))


@pytest.mark.parametrize("body, headers, status, needle", [
    ({"model": "smollm2-135m", "depth": 24}, {}, 401, "admin key"),
    ({"model": "smollm2-135m", "depth": 24}, {"Authorization": "Bearer test-key-123"}, 403, "not a user API key"),
    ({"group": "chat", "model": "smollm2-135m"}, None, 404, "unknown group 'chat'"),
    ({"model": "nope"}, None, 404, "'nope' is not a candidate"),
    ({"model": "smollm2-135m", "depth": 99}, None, 400, "depth 99 is out of range"),
    ({"model": "smollm2-135m", "depth": "24"}, None, 400, "depth"),
    ({"model": "smollm2-135m", "colour": "red"}, None, 400, "colour"),
    ("{not json", None, 400, "not valid JSON"),
])
def test_bad_placement_requests_are_clear_4xx(cluster, body, headers, status, needle):
    r = _post(cluster, "/v1/helios/placements", body, headers)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def _fleet(c, *args: str) -> subprocess.CompletedProcess:
    admin = ["--admin-key", c["admin_key"]] if args[0] != "show" else []
    return subprocess.run([sys.executable, "-m", "helios_ray.cli", "fleet", *args, "--url", c["base"],
                           "--api-key", c["key"], *admin], capture_output=True, text=True, timeout=120)


def test_moving_the_group_live_shows_in_status_and_metrics(cluster):
    start = httpx.get(f"{cluster['base']}/v1/helios/status", headers=cluster["headers"], timeout=30).json()
    failures: list[str] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                r = httpx.post(f"{cluster['base']}/v1/completions", headers=cluster["headers"], timeout=120,
                               json={"model": "helios", "prompt": "Hello", "max_tokens": 8, "stream": True})
                if r.status_code != 200 or "[DONE]" not in r.text or '"error"' in r.text:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
            except Exception as e:  # a dropped connection is a failed request too
                failures.append(repr(e))

    t = threading.Thread(target=load)
    t.start()
    try:
        moved = _fleet(cluster, "set", "smollm2-135m", "--depth", "24")
        assert moved.returncode == 0 and "default: smollm2-135m@24" in moved.stdout, moved.stderr
        deadline, st = time.time() + 120, {}
        while time.time() < deadline:
            st = httpx.get(f"{cluster['base']}/v1/helios/status", headers=cluster["headers"], timeout=30).json()
            if any(r["depth"] == 24 for r in st["replicas"]):
                break
            time.sleep(1)
        assert st["placement"]["depth"] == 24 and st["pinned"] is True
        assert st["changes"][-1]["trigger"] == "operator"
        shown = _fleet(cluster, "show")
        assert "default: smollm2-135m@24" in shown.stdout and "pinned" in shown.stdout, shown.stderr
        deadline, text = time.time() + 60, ""
        while time.time() < deadline and 'kind="depth"' not in text:
            time.sleep(2)
            text = httpx.get(cluster["metrics"], timeout=10).text
        assert "ray_helios_placement_changes_total" in text and 'kind="depth"' in text
    finally:
        done.set()
        t.join(timeout=180)
        assert _fleet(cluster, "unpin").returncode == 0
        p = start["placement"]
        _post(cluster, "/v1/helios/placements", {"model": p["model"], "depth": p["depth"], "pin": False})
    assert failures == []
