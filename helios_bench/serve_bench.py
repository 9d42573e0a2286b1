"""``helios-ray bench serve``: helios vs the full-depth early-exit baseline vs plain ``transformers``, side by side.

One run, one machine, one workload and seed.  For each system in turn it deploys the application on a local Ray
cluster (the same Router, HTTP API and memory budget), warms it up, drives it with ``loadgen`` (closed loop at a
fixed concurrency for the headline numbers, then optionally a Poisson rate sweep), reads its replica's memory
facts, and tears it down.  Afterwards, with the cluster gone, every generated token is scored against the full
model: **agreement** is the share of generated tokens that equal the full model's greedy choice given the same
prefix (teacher-forced on the system's own output), **perplexity** is ``exp(-mean log p_full(token | prefix))``.

The three systems:

* ``helios`` - ``mode: helios``: shortlist, profiling on mirrored prompts, partial loading at the depth the policy
  chooses under its accuracy guard, breach counting and re-deployment, greedy exit at the loaded depth;
* ``baseline`` - ``mode: early_exit``: all layers loaded, token-level exit at the exits the exit card says meet
  the same accuracy guard at the same threshold (state propagation for skipped layers);
* ``plain`` - ``mode: plain``: ``transformers`` ``generate()`` in static batches, full model, no exits.

Every request uses ``ignore_eos`` and a fixed ``max_tokens`` (the ShareGPT reply length, capped), so each system
generates exactly the same number of tokens for the same prompts and throughputs compare like with like.

Max concurrency is the memory arithmetic of each replica at the same budget: ``(budget - weights) / (KV bytes
per token x sequence length)`` (block-rounded for the paged engines; ``generate()`` has no blocks), for the
budget of the run and a few tighter ones, because the ratio grows as the budget approaches the full model's
weights.  Energy per token comes from NVML on a GPU; on CPU it is ``None`` ("n/a").
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from helios_ray.memory import Footprint

SystemName = Literal["helios", "baseline", "plain"]
MODES = {"helios": "helios", "baseline": "early_exit", "plain": "plain"}


class ServeBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m"
    candidates: list[str] | None = Field(default=None, description="helios candidates; default: [model]")
    systems: list[SystemName] = Field(default_factory=lambda: ["helios", "baseline", "plain"], min_length=1)
    threshold: float = Field(default=0.9, gt=0.0, le=1.0)
    min_agreement: float = Field(default=0.9, ge=0.0, le=1.0)
    exit_share: float = Field(default=0.5, gt=0.0, le=1.0)
    memory_budget_mb: int = Field(default=1024, ge=64)
    max_num_seqs: int = Field(default=32, ge=1)
    concurrency: int = Field(default=16, ge=1, description="closed-loop clients for the headline run")
    requests: int = Field(default=32, ge=1)
    max_prompt_tokens: int = Field(default=512, ge=4)
    max_output_tokens: int = Field(default=128, ge=2)
    rates: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], description="sweep, requests/s")
    sweep_requests: int = Field(default=12, ge=1)
    warmup_requests: int = Field(default=5, ge=0, description="also helios' profiling window")
    seed: int = 0
    budgets_mb: list[int] = Field(default_factory=lambda: [640, 768, 1024, 2048])
    out_dir: Path | None = None


def quick(cfg: ServeBenchConfig) -> ServeBenchConfig:
    """The < 3-minute variant: a few short requests, no sweep."""
    return cfg.model_copy(update={"requests": 8, "concurrency": 4, "max_output_tokens": 32, "max_prompt_tokens": 256,
                                  "rates": [], "warmup_requests": 2})


# ------------------------------------------------------------------------------------------------ cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A private Ray cluster + Serve on loopback for the run; shut down through the API."""

    def __enter__(self) -> "LocalCluster":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        import ray
        from ray import serve

        self.tmp = tempfile.mkdtemp(prefix="hrb", dir="/tmp")  # short: Ray's socket paths have a length limit
        ray.init(num_cpus=max(4, os.cpu_count() or 1), _temp_dir=self.tmp, object_store_memory=100 * 2**20,
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        self.port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.base = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(self.tmp, ignore_errors=True)


def app_args(cfg: ServeBenchConfig, system: SystemName) -> dict[str, Any]:
    mode = MODES[system]
    candidates = (cfg.candidates or [cfg.model]) if system == "helios" else [cfg.model]
    return {
        "mode": mode, "candidates": candidates, "api_key_env": None, "mirror_fraction": 0.05,
        "policy": {"confidence_threshold": cfg.threshold, "min_agreement": cfg.min_agreement,
                   "exit_share": cfg.exit_share,
                   "profile_prompts": max(1, cfg.warmup_requests),
                   "typical_seq_len": cfg.max_prompt_tokens + cfg.max_output_tokens},
        "engine": {"max_num_seqs": cfg.max_num_seqs, "torch_threads": 1, "memory_budget": cfg.memory_budget_mb << 20,
                   "max_model_len": max(1024, cfg.max_prompt_tokens + cfg.max_output_tokens + 64)},
    }


def _status(base: str) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"{base}/v1/helios/status", timeout=30, trust_env=False)
    r.raise_for_status()
    return r.json()


def _on_current_placement(st: dict[str, Any]) -> bool:
    v = st["placement"]["version"]
    return any(r.get("placement_version") in (None, v) for r in st.get("replicas", []))


def _wait_ready(base: str, timeout: float = 600, ready: Any = _on_current_placement, what: str = "become ready"
                ) -> dict[str, Any]:
    """Health, then a status for which ``ready(status)`` holds (default: a replica reports the current placement
    version)."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5, trust_env=False).status_code == 200:
                st = _status(base)
                if ready(st):
                    return st
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base} did not {what} in {timeout:.0f}s")


def _settle(base: str, timeout: float = 180) -> dict[str, Any]:
    """helios after its warm-up: the profiler has drained its queue and every replica runs the current placement."""
    deadline = time.time() + timeout
    st = _status(base)
    while time.time() < deadline:
        st = _status(base)
        prof = st.get("profiler") or {}
        v = st["placement"]["version"]
        reps = st.get("replicas", [])
        if not prof.get("queued") and not prof.get("busy") and reps and all(r.get("placement_version") in (None, v)
                                                                           for r in reps):
            return st
        time.sleep(2)
    return st


# ---------------------------------------------------------------------------------------------- scoring
class Scorer:
    """Teacher-forced agreement and perplexity of generated tokens under the full model."""

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


def accuracy(scorer: Scorer, workload: list[Any], records: list[Any]) -> dict[str, Any]:
    """Scores the records of one run over ``workload`` (record ``index`` i is request ``i % len(workload)``)."""
    n = agree = 0
    lp = 0.0
    missing = 0
    for r in records:
        if not r.success:
            continue
        if len(r.token_ids) != r.output_tokens:
            missing += 1
            continue
        a, b, c = scorer.score(scorer.prompt_ids(workload[r.index % len(workload)]), r.token_ids)
        n, agree, lp = n + a, agree + b, lp + c
    return {"tokens_scored": n, "agreement": round(agree / n, 4) if n else None,
            "perplexity": round(math.exp(-lp / n), 4) if n else None, "requests_unscored": missing}


# ---------------------------------------------------------------------------------------------- memory
def max_concurrency(stats: dict[str, Any], budget_bytes: int, seq_len: int, block_size: int | None) -> int:
    """By whole blocks as the engine admits (``block_size``), else by tokens - the one memory model's rule."""
    fp = Footprint(int(stats["weight_bytes"]), int(stats["kv_bytes_per_token"]))
    return fp.max_sequences(budget_bytes, seq_len, block_size)


# ------------------------------------------------------------------------------------------------ run
def _p(s: dict[str, Any], metric: str, key: str) -> float | None:
    v = (s.get(metric) or {}).get(key)
    return round(v, 2) if isinstance(v, (int, float)) else None


def run_system(cfg: ServeBenchConfig, cluster: LocalCluster, system: SystemName, warm: list[Any],
               workload: list[Any], progress: bool) -> dict[str, Any]:
    import dataclasses

    from ray import serve

    from helios_ray.serve.app import build_app
    from loadgen import Arrival, HttpClient, run_load, sweep

    t0 = time.perf_counter()
    app = f"bench-{system}"  # its own name and route: the cluster may be serving other applications
    serve.run(build_app(app_args(cfg, system)), name=app, route_prefix=f"/{app}", blocking=False)
    base = f"{cluster.base}/{app}"
    try:
        _wait_ready(base)
        deploy_s = time.perf_counter() - t0
        client = HttpClient(base, model="helios", temperature=0.0, ignore_eos=True, seed=None)
        if warm:  # short requests: first-call overheads, and helios' profiling window
            short = [dataclasses.replace(w, max_tokens=8) for w in warm]
            asyncio.run(run_load(client, short, Arrival(max_concurrency=len(short)), progress=False,
                                 status_client=None))
        st0 = _settle(base) if system == "helios" else _status(base)
        client = HttpClient(base, model="helios", temperature=0.0, ignore_eos=True, seed=None)
        head = asyncio.run(run_load(client, workload, Arrival(max_concurrency=cfg.concurrency),
                                    num_requests=len(workload), progress=progress, status_interval=2.0))
        curve = []
        sweep_runs = []
        if cfg.rates:
            client = HttpClient(base, model="helios", temperature=0.0, ignore_eos=True, seed=None)
            sw = asyncio.run(sweep(client, workload[: cfg.sweep_requests], cfg.rates, seed=cfg.seed,
                                   num_requests=min(cfg.sweep_requests, len(workload)), progress=progress,
                                   status_interval=0))
            curve, sweep_runs = sw.curve, sw.runs
        st = _status(base)
    finally:
        serve.delete(app)
    rep = (st.get("replicas") or [{}])[0]
    return {"status_before": st0, "status": st, "replica": rep, "head": head, "curve": curve,
            "sweep_runs": sweep_runs, "deploy_s": round(deploy_s, 1)}


def summarize_system(cfg: ServeBenchConfig, system: SystemName, r: dict[str, Any], acc: dict[str, Any]
                     ) -> dict[str, Any]:
    s = r["head"].summary
    rep = r["replica"]
    seq_len = cfg.max_prompt_tokens + cfg.max_output_tokens
    bs = None if system == "plain" else 16
    changes = r["status"].get("changes") or []
    return {
        "mode": MODES[system],
        "model": rep.get("model"), "depth": rep.get("depth"), "total_layers": rep.get("total_layers"),
        "exit_head": rep.get("exit_head"), "token_exits": rep.get("token_exits"),
        "placement_changes": [{k: c.get(k) for k in ("from", "to", "action", "trigger", "reason")} for c in changes],
        "deploy_s": r["deploy_s"],
        "requests": s["num_requests"], "completed": s["completed"], "failed": s["failed"],
        "output_tokens": s["total_output_tokens"], "duration_s": round(s["duration_s"], 2),
        "output_throughput": round(s["output_throughput"], 2),
        "request_throughput": round(s["request_throughput"], 3),
        "ttft_ms": {"p50": _p(s, "ttft_ms", "median"), "p99": _p(s, "ttft_ms", "p99")},
        "tpot_ms": {"p50": _p(s, "tpot_ms", "median"), "p99": _p(s, "tpot_ms", "p99")},
        "e2e_ms": {"p50": _p(s, "e2e_ms", "median"), "p99": _p(s, "e2e_ms", "p99")},
        "exit_layer_histogram": (s.get("exit_layer") or {}).get("histogram"),
        "max_concurrency": max_concurrency(rep, cfg.memory_budget_mb << 20, seq_len, bs) if rep else None,
        "max_concurrency_by_budget_mb": {str(b): max_concurrency(rep, b << 20, seq_len, bs) for b in cfg.budgets_mb}
        if rep else None,
        "weight_bytes": rep.get("weight_bytes"), "kv_bytes_per_token": rep.get("kv_bytes_per_token"),
        "energy_j_per_token": rep.get("energy_j_per_token"),
        "agreement": acc["agreement"], "perplexity": acc["perplexity"], "tokens_scored": acc["tokens_scored"],
        "curve": r["curve"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(res: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    h, b, p = res.get("helios"), res.get("baseline"), res.get("plain")
    out: dict[str, float | None] = {}
    if h and b:
        out["throughput_helios_vs_baseline"] = _ratio(h["output_throughput"], b["output_throughput"])
        out["tpot_p50_baseline_over_helios"] = _ratio(b["tpot_ms"]["p50"], h["tpot_ms"]["p50"])
        out["ttft_p50_baseline_over_helios"] = _ratio(b["ttft_ms"]["p50"], h["ttft_ms"]["p50"])
        out["max_concurrency_helios_vs_baseline"] = _ratio(h["max_concurrency"], b["max_concurrency"])
    if h and p:
        out["throughput_helios_vs_plain"] = _ratio(h["output_throughput"], p["output_throughput"])
        out["tpot_p50_plain_over_helios"] = _ratio(p["tpot_ms"]["p50"], h["tpot_ms"]["p50"])
        out["max_concurrency_helios_vs_plain"] = _ratio(h["max_concurrency"], p["max_concurrency"])
    if b and p:
        out["throughput_baseline_vs_plain"] = _ratio(b["output_throughput"], p["output_throughput"])
    return out


def bench_serve(cfg: ServeBenchConfig, progress: bool = True, log: Any = None, cluster: Any = None
                ) -> dict[str, Any]:
    """Run the benchmark; ``cluster`` (anything with ``.base``, the Serve HTTP URL of a running local cluster)
    reuses a cluster instead of starting a private one (the test suite shares one cluster per session)."""
    import contextlib

    from helios_ray.models.repository import ModelRepository
    from loadgen.workloads import sharegpt_requests

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    repo = ModelRepository()
    for name in {cfg.model, *(cfg.candidates or [])}:
        repo.checkpoint_dir(name)  # unknown/unprepared -> a clear error before any cluster starts
    t_start = time.perf_counter()
    workload = sharegpt_requests(cfg.requests + cfg.warmup_requests, cfg.seed, max_prompt_tokens=cfg.max_prompt_tokens,
                                 min_output_tokens=8, output_cap=cfg.max_output_tokens)
    warm, workload = workload[: cfg.warmup_requests], workload[cfg.warmup_requests:]
    if len(workload) < cfg.requests:
        log(f"note: ShareGPT gave {len(workload)} requests within the length limits (asked {cfg.requests})")
    raw: dict[str, dict[str, Any]] = {}
    with (contextlib.nullcontext(cluster) if cluster is not None else LocalCluster()) as cl:
        for system in cfg.systems:
            log(f"[{time.perf_counter() - t_start:6.0f}s] {system}: deploying ({MODES[system]})")
            raw[system] = run_system(cfg, cl, system, warm, workload, progress)
            h = raw[system]["head"].summary
            log(f"[{time.perf_counter() - t_start:6.0f}s] {system}: {h['output_throughput']:.1f} tok/s, "
                f"{h['completed']}/{h['num_requests']} ok")
    log(f"[{time.perf_counter() - t_start:6.0f}s] scoring every generated token under the full model")
    scorer = Scorer(cfg.model)
    results: dict[str, dict[str, Any]] = {}
    for system in cfg.systems:
        records = raw[system]["head"].records
        results[system] = summarize_system(cfg, system, raw[system], accuracy(scorer, workload, records))
    out = {
        "config": cfg.model_dump(mode="json"),
        "machine": {"cpus": os.cpu_count(), "device": "cpu" if not _cuda() else "cuda"},
        **results,
        "ratios": ratios(results),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if cfg.out_dir is not None:
        _write_runs(cfg.out_dir, raw)
    return out


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _write_runs(out_dir: Path, raw: dict[str, dict[str, Any]]) -> None:
    """Each system's loadgen result (JSON) and plots next to the benchmark's JSON."""
    from loadgen.results import write_result

    out_dir.mkdir(parents=True, exist_ok=True)
    for system, r in raw.items():
        write_result(r["head"], out_dir / f"{system}.json")
        try:
            from loadgen.plots import plot_run

            plot_run(r["head"], out_dir / system)
        except Exception as e:  # plots are a convenience; the numbers are in the JSON
            print(f"note: plots for {system} skipped ({type(e).__name__}: {e})", file=sys.stderr)


def format_table(res: dict[str, Any]) -> str:
    systems = [s for s in ("helios", "baseline", "plain") if s in res]
    rows = [
        ("placement", lambda r: f"{r['model']}@{r['depth']}" + (f" exits {r['token_exits']}" if r.get("token_exits")
                                                                else "")),
        ("output tok/s", lambda r: f"{r['output_throughput']:.1f}"),
        ("TTFT p50 / p99 ms", lambda r: f"{r['ttft_ms']['p50']} / {r['ttft_ms']['p99']}"),
        ("TPOT p50 / p99 ms", lambda r: f"{r['tpot_ms']['p50']} / {r['tpot_ms']['p99']}"),
        ("max concurrency", lambda r: str(r["max_concurrency"])),
        ("agreement", lambda r: f"{r['agreement']:.1%}" if r["agreement"] is not None else "-"),
        ("perplexity (full)", lambda r: f"{r['perplexity']:.3f}" if r["perplexity"] is not None else "-"),
        ("energy J/token", lambda r: "n/a" if r["energy_j_per_token"] is None else f"{r['energy_j_per_token']:.4f}"),
        ("exit layers", lambda r: str(r["exit_layer_histogram"])),
        ("completed", lambda r: f"{r['completed']}/{r['requests']}"),
    ]
    w0 = max(len(k) for k, _ in rows)
    widths = [max(len(s), *(len(fn(res[s])) for _, fn in rows)) for s in systems]
    lines = ["  ".join([" " * w0] + [s.ljust(w) for s, w in zip(systems, widths)])]
    for k, fn in rows:
        lines.append("  ".join([k.ljust(w0)] + [fn(res[s]).ljust(w) for s, w in zip(systems, widths)]))
    lines.append("")
    for k, v in res["ratios"].items():
        lines.append(f"{k}: {v}")
    for s in systems:
        if res[s]["curve"]:
            lines.append(f"\n{s} rate sweep (req/s -> output tok/s, TPOT p50 ms, TTFT p50 ms):")
            for pt in res[s]["curve"]:
                def f(v: Any) -> str:
                    return "-" if v is None else f"{v:.1f}"

                lines.append(f"  {pt.get('rate')}: {f(pt.get('output_throughput'))}, {f(pt.get('tpot_median'))}, "
                             f"{f(pt.get('ttft_median'))}")
    return "\n".join(lines)
