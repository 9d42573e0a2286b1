"""The one bench harness: what every ``helios-ray bench`` command (and the serve tests) share.

* **ports** - :func:`free_port`;
* **a local cluster** - :class:`LocalCluster`, a private Ray cluster with Serve on loopback for one run;
* **readiness** - :func:`status`, :func:`wait_ready`, :func:`settle`: when a deployed application may be measured;
* **scoring** - :class:`Scorer`, teacher-forced agreement and perplexity under a model's full-depth self, and
  :func:`perplexity` of a log-prob sum;
* **memory arithmetic** - :func:`max_concurrency`, the one memory model's admission rule;
* **small helpers** - :func:`pct` (a percentile of raw samples), :func:`stat` (a figure of a ``loadgen``
  summary), :func:`ratio`, :func:`on_cuda`, :func:`machine`.

Nothing heavy is imported at module level (Ray, torch and httpx load inside the functions that need them), so a
test's ``conftest`` or the CLI's parser can import this module for free.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helios_ray.memory import Footprint


# ------------------------------------------------------------------------------------------------ ports
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; racy in principle, fine for tests and
    one-machine benches, which bind it right away)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- cluster
class LocalCluster:
    """A private Ray cluster + Serve on loopback for the run; shut down through the API.

    Its own temp dir, short because Ray's socket paths have a length limit, removed afterwards; HTTP on loopback
    only.  The proxy's ready-check timeout is raised because on a loaded 2-core host the proxy can start slowly
    (the serve tests' cluster does the same).
    """

    def __init__(self, grpc_servicers: list[str] | None = None):
        self.grpc_servicers = grpc_servicers  # Serve's gRPC proxy too (fuzz, soak), on a free port
        self.grpc_target: str | None = None

    def __enter__(self) -> LocalCluster:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        import ray
        from ray import serve

        self.tmp = tempfile.mkdtemp(prefix="hrb", dir="/tmp")  # short: Ray's socket paths have a length limit
        ray.init(num_cpus=max(4, os.cpu_count() or 1), _temp_dir=self.tmp, object_store_memory=100 * 2**20,
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        self.port = free_port()
        grpc: dict[str, Any] = {}
        if self.grpc_servicers:
            gport = free_port()
            grpc = {"grpc_options": {"port": gport, "grpc_servicer_functions": self.grpc_servicers}}
            self.grpc_target = f"127.0.0.1:{gport}"
        serve.start(http_options={"host": "127.0.0.1", "port": self.port}, **grpc)
        self.base = f"http://127.0.0.1:{self.port}"
        return self

    def deploy_file(self, path: str | Path, args: dict[str, Any] | None = None) -> str:
        """Deploy a Serve config file's applications as ``serve run FILE`` would (``deployments:`` overrides and
        all), the helios application's args updated with ``args``; returns the helios application's base URL (not
        waited for: :func:`wait_ready`).  Its HTTP/gRPC options are this cluster's, not the file's."""
        from ray.serve.context import _get_global_client

        from helios_ray.serve.launch import BUILDER, load_deploy_config

        config = load_deploy_config(Path(path))
        apps = [a for a in config.applications if a.import_path == BUILDER]
        if not apps:
            raise ValueError(f"{path}: no application built by {BUILDER}")
        apps[0].args = {**(apps[0].args or {}), **(args or {})}
        _get_global_client().deploy_apps(config, _blocking=False)
        self.app = apps[0].name
        return self.base + (apps[0].route_prefix or "/").rstrip("/")

    def __exit__(self, *exc: object) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(self.tmp, ignore_errors=True)


# -------------------------------------------------------------------------------------------- readiness
def status(base: str, api_key: str | None = None) -> dict[str, Any]:
    """The application's status document (``GET {base}/v1/helios/status``)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{base}/v1/helios/status", headers=headers, timeout=30, trust_env=False)  # loopback: no proxy
    r.raise_for_status()
    return r.json()


def on_current_placement(st: dict[str, Any]) -> bool:
    """A replica reports the (default group's) current placement version - one model, one group."""
    v = st["placement"]["version"]
    return any(r.get("placement_version") in (None, v) for r in st.get("replicas", []))


def wait_ready(base: str, timeout: float = 600, ready: Callable[[dict[str, Any]], bool] = on_current_placement,
               what: str = "become ready", api_key: str | None = None) -> dict[str, Any]:
    """Health, then a status for which ``ready(status)`` holds (default: :func:`on_current_placement`).

    ``/health`` answers once the Router is up, long before a replica has loaded its model, so health alone would
    start the clock on a deployment that cannot serve yet; the status says when replicas report."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5, trust_env=False).status_code == 200:
                st = status(base, api_key)
                if ready(st):
                    return st
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base} did not {what} in {timeout:.0f}s")


def settle(base: str, timeout: float = 120) -> dict[str, Any]:
    """helios after its warm-up: wait until the profiler has drained the mirrored prompts, so that profiling does
    not share the CPU with the measured run.  Gives up quietly after ``timeout`` (the run then measures a busy
    profiler, which the status it returns shows)."""
    deadline = time.time() + timeout
    st = status(base)
    while time.time() < deadline:
        prof = st.get("profiler") or {}
        if not prof.get("queued") and not prof.get("busy"):
            return st
        time.sleep(2)
        st = status(base)
    return st


# ---------------------------------------------------------------------------------------------- scoring
class Scorer:
    """Teacher-forced agreement and perplexity of generated tokens under the full model.

    Teacher-forced on the system's own output: each generated token is compared with the full model's greedy
    choice *given the same prefix*, so one early divergence does not count every later token as wrong.  Loaded in
    float32 with all CPU threads, after the cluster is gone (the reference, not a serving configuration)."""

    def __init__(self, model: str):
        import torch

        from helios_ray.models.early_exit import load_model

        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
        self.m = load_model(model, exits="shared", dtype="float32")

    def prompt_ids(self, req: Any) -> list[int]:
        return self.m.encode(req.prompt, req.messages)  # the replicas' own encoding (models/prompts.py)

    def score(self, prompt: list[int], out: list[int]) -> tuple[int, int, float]:
        """(tokens scored, tokens equal to the full model's argmax, sum of log-probs)."""
        import torch

        if not out:
            return 0, 0, 0.0
        ids = torch.tensor([prompt + out])
        with torch.inference_mode():
            cache = self.m.new_cache()
            h = self.m.lm(ids, torch.arange(ids.shape[1])[None], cache)
            logits = self.m.lm.logits(h[0, len(prompt) - 1: len(prompt) - 1 + len(out)]).float()
        target = torch.tensor(out)
        logp = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
        return len(out), int((logits.argmax(-1) == target).sum()), float(logp.sum())


def perplexity(logp_sum: float, tokens: int) -> float | None:
    """``exp(-mean log p)`` over ``tokens`` scored tokens (``None`` for none)."""
    return round(math.exp(-logp_sum / tokens), 4) if tokens else None


# ----------------------------------------------------------------------------------------------- memory
def max_concurrency(stats: dict[str, Any], budget_bytes: int, seq_len: int, block_size: int | None) -> int:
    """By whole blocks as the engine admits (``block_size``), else by tokens (``generate()`` has no blocks) - the
    one memory model's rule, so a bench's figure is the number the engine would admit."""
    fp = Footprint(int(stats["weight_bytes"]), int(stats["kv_bytes_per_token"]))
    return fp.max_sequences(budget_bytes, seq_len, block_size)


# ---------------------------------------------------------------------------------------------- helpers
def pct(xs: list[float | None], q: float, default: float | None = None) -> float | None:
    """The ``q`` quantile of raw samples (``None`` skipped): the sorted sample at index ``int(q * n)``, the last
    one for ``q`` near 1 - no interpolation, so the figure is a value that was measured.  ``default`` for none."""
    s = sorted(x for x in xs if x is not None)
    return s[min(len(s) - 1, int(q * len(s)))] if s else default


def stat(summary: dict[str, Any], metric: str, key: str) -> float | None:
    """``summary[metric][key]`` of a ``loadgen`` summary (e.g. ``ttft_ms``, ``median``), rounded; ``None`` when
    the run had no such figure (e.g. TPOT of one-token answers)."""
    v = (summary.get(metric) or {}).get(key)
    return round(v, 2) if isinstance(v, (int, float)) else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded; ``None`` when either side is missing or zero (a system that did not run or failed)."""
    return round(a / b, 3) if a and b else None


def on_cuda() -> bool:
    """Whether torch sees a GPU (``False`` when torch itself cannot load): the ``auto`` serving dtype, and so the
    weights a bench budgets with, depend on it."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def machine() -> dict[str, Any]:
    """The machine a bench ran on, for its JSON: CPU count, the CPU's model name and the vector units that decide
    the engine's speed (AVX2 / AVX-512 / bf16 / AMX), and ``cpu``/``cuda``."""
    model, isa = None, []
    try:
        text = open("/proc/cpuinfo").read()
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
        flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "isa": isa, "device": "cuda" if on_cuda() else "cpu"}
