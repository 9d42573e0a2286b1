"""Two Ray nodes on this machine: replicas are placed on both, requests succeed, and when the second node's raylet
is killed its replica moves to the first while the requests in flight keep completing (resumed streams).

The second node is a real raylet joined with ``ray start --address`` (its own CPU and a marker resource), ended
by the PIDs this test started; the head is the session cluster of conftest.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import httpx
import psutil
import pytest

from tests.serve.waits import wait_until

pytestmark = pytest.mark.slow
APP = "twonode"


#: Ray's command line from the running interpreter's environment, not from PATH: a virtual environment used through
#: its own ``bin/python`` (not activated) has no ``ray`` on PATH, and a ``ray`` found there may belong to another one.
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def _replicas(url: str) -> list[dict]:
    try:
        r = httpx.get(f"{url}/v1/helios/status", timeout=30)
        return r.json()["replicas"] if r.status_code == 200 else []
    except httpx.HTTPError:
        return []


def test_replicas_span_two_nodes_and_survive_losing_one(cluster):
    import ray
    from ray import serve

    from helios_ray.serve.app import build_app

    before = {n["NodeID"] for n in _alive_nodes()}
    tmp = tempfile.mkdtemp(prefix="hn2", dir="/tmp")
    node2 = subprocess.Popen(
        [*RAY_CLI, "start", "--address", ray.get_runtime_context().gcs_address, "--num-cpus", "1",
         "--resources", '{"helios_test_node2": 1}', "--object-store-memory", str(80 * 2**20), "--block",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RAY_TMPDIR": tmp})
    url = f"{cluster['base']}/{APP}"
    try:
        wait_until(lambda: len(_alive_nodes()) == len(before) + 1, 120, "the second node never joined")
        (second,) = {n["NodeID"] for n in _alive_nodes()} - before
        args = {"candidates": ["smollm2-135m"], "profiler": False, "api_key_env": None, "mirror_fraction": 0.0,
                "replicas": 2, "engine": {"memory_budget": "1GiB", "max_num_seqs": 8}}
        serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
        wait_until(lambda: len({r["node_id"] for r in _replicas(url)}) == 2, 300, "replicas not on two nodes")
        assert second in {r["node_id"] for r in _replicas(url)}

        results: list[tuple[int, str]] = []
        done = threading.Event()

        def client() -> None:
            while not done.is_set():
                try:
                    r = httpx.post(f"{url}/v1/completions", timeout=300, json={
                        "model": "helios", "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True,
                        "temperature": 0})
                    results.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200
                                    else r.text))
                except Exception as e:  # a dropped connection is a lost request: the assertion below reports it
                    results.append((0, repr(e)))

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(results) >= 2, 300, "no requests completed on two nodes")
            raylets = [p for p in psutil.Process(node2.pid).children(recursive=True) if p.name() == "raylet"]
            assert len(raylets) == 1
            raylets[0].send_signal(signal.SIGKILL)  # the second node's raylet, started by this test
            wait_until(lambda: second not in {n["NodeID"] for n in _alive_nodes()}, 120, "node loss not noticed")
            wait_until(lambda: len(_replicas(url)) == 2 and {r["node_id"] for r in _replicas(url)} <= before, 300,
                  "the lost replica was not moved to the first node")
            n = len(results)
            wait_until(lambda: len(results) >= n + 2, 300, "no requests completed after the node loss")
        finally:
            done.set()
            for t in threads:
                t.join(timeout=300)
        assert results and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
        assert len({text for _, text in results}) == 1  # greedy: the same text, resumed streams included
    finally:
        try:
            serve.delete(APP)
        finally:
            for p in [node2, *psutil.Process(node2.pid).children(recursive=True)] if node2.poll() is None else []:
                try:
                    p.kill()  # only processes this test started
                except (psutil.NoSuchProcess, ProcessLookupError):
                    pass
            node2.wait(timeout=60)
            shutil.rmtree(tmp, ignore_errors=True)
