"""``helios-ray bench serve``: the fleet on a mixed workload, against the best single model at full depth with
token-level exits and against plain ``transformers``, with task quality next to speed.

One private Ray cluster (or the caller's), one machine, one workload (:mod:`helios_bench.fleet_workload`:
ShareGPT chats then HumanEval code, the mix shifting half-way), one seed and one memory budget per replica.
Systems, deployed one after the other behind the same Router and HTTP API:

* ``helios`` - ``mode: helios`` with ``groups:``, one group per candidate (each group may only serve its own
  model; the policy picks its depth under the accuracy guard, breaches and re-assessment as usual), and the
  router steering each request to the group with the best predicted confident tokens/s;
* ``single:<candidate>`` - each candidate alone, ``mode: early_exit`` at full depth with the token-level exits its
  exit card allows at the same threshold and guard (how EE-LLM frameworks serve), ``single_replicas`` replicas
  (default: as many as the fleet has groups, so both sides get the same replicas, threads and memory);
  the best of them for the SLO (``best_by``: output tokens/s or p50 TPOT of the closed-loop run) is *the best
  single model* (the JSON's ``baseline`` key);
* ``plain`` - ``mode: plain`` (``generate()``) for that best candidate, the model a user would pick.

Each system gets a short warm-up, the closed-loop saturation run (``concurrency`` clients over the mixed
workload: the headline figures) and a seeded Poisson rate sweep over its first ``sweep_requests`` requests.
Budgets: **tight** = the largest candidate's weights as the early-exit baseline loads them (serving dtype, its
token-exit heads included) plus ``tight_headroom_mb``; **roomy** = ``roomy_budget_mb`` (default: the largest
weights + 1 GiB).  ``budgets`` says which get measured runs; max concurrency is memory arithmetic over each
system's replicas for every budget of the sweep, whatever was run.

The one-model question - does helios beat the same model served at full depth with token exits, and plain
``generate()``? - is a preset of the same run, :func:`one_model` (``bench serve --model M``): one candidate, so the
fleet is one group, the best single model is that model, and a chat-only ShareGPT workload.

Cluster lifecycle, readiness waits, scoring and the memory arithmetic are :mod:`helios_bench.harness`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from helios_bench import harness

MIB = 1 << 20


class FleetBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: list[str] = Field(default_factory=lambda: ["smollm2-135m", "qwen2.5-coder-0.5b"], min_length=1)
    systems: list[Literal["helios", "single", "plain"]] = Field(
        default_factory=lambda: ["single", "plain", "helios"], min_length=1)
    threshold: float = Field(default=0.9, gt=0.0, le=1.0)
    min_agreement: float = Field(default=0.9, ge=0.0, le=1.0)
    exit_share: float = Field(default=0.5, gt=0.0, le=1.0)
    max_num_seqs: int = Field(default=32, ge=1)
    concurrency: int = Field(default=16, ge=1, description="closed-loop clients for the saturation run")
    requests: int = Field(default=24, ge=2)
    chat_share_first: float = Field(default=0.75, ge=0.0, le=1.0)
    chat_share_second: float = Field(default=0.25, ge=0.0, le=1.0)
    max_prompt_tokens: int = Field(default=512, ge=16)
    chat_output_cap: int = Field(default=64, ge=2)
    code_max_tokens: int = Field(default=64, ge=2)
    rates: list[float] = Field(default_factory=lambda: [0.5, 1.0], description="Poisson sweep, requests/s")
    sweep_requests: int = Field(default=8, ge=1)
    warmup_requests: int = Field(default=4, ge=0, description="also helios' profiling window")
    seed: int = 0
    tight_headroom_mb: int = Field(default=64, ge=1)
    roomy_budget_mb: int | None = None
    budgets: list[Literal["tight", "roomy"]] = Field(default_factory=lambda: ["tight", "roomy"], min_length=1)
    best_by: Literal["throughput", "tpot"] = "throughput"
    single_replicas: int | None = Field(default=None, ge=1)
    steering: dict[str, Any] | None = None
    code_timeout_s: float = Field(default=10.0, gt=0)
    out_dir: Path | None = None


def one_model(model: str) -> dict[str, Any]:
    """The one-model preset (``bench serve --model M``), as config fields: ``candidates = [M]`` and a chat-only
    ShareGPT workload (both phases' chat share 1.0).  helios (a one-group fleet: M at the depth its policy picks)
    vs M at full depth with the token exits its exit card allows (``single:M``, the JSON's ``baseline``) vs plain
    ``generate()`` of M - the question the first ``bench serve`` asked, now answered by the same code path."""
    return {"candidates": [model], "chat_share_first": 1.0, "chat_share_second": 1.0}


def quick(cfg: FleetBenchConfig) -> FleetBenchConfig:
    """The short variant (~6.5 min on a 2-core host with the default candidates): SmolLM2 + Gemma 3 instead of
    Qwen2.5-Coder (which decodes at ~4 tokens/s there), 8 short requests, one sweep rate, the tight budget
    measured (roomy: arithmetic only).  Given candidates (e.g. the one-model preset's) are kept."""
    cands = cfg.candidates if cfg.candidates != FleetBenchConfig().candidates else ["smollm2-135m", "gemma3-270m"]
    return cfg.model_copy(update={"candidates": cands, "requests": 8, "concurrency": 4, "chat_output_cap": 16,
                                  "code_max_tokens": 16, "max_prompt_tokens": 256, "rates": [1.0],
                                  "sweep_requests": 4, "warmup_requests": 2, "budgets": ["tight"]})


def seq_len(cfg: FleetBenchConfig) -> int:
    return cfg.max_prompt_tokens + max(cfg.chat_output_cap, cfg.code_max_tokens)


def group_name(model: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")[:32].strip("-") or "g"


# ------------------------------------------------------------------------------------------------ budgets
def budget_plan(cfg: FleetBenchConfig, dtype: str) -> dict[str, Any]:
    """Each candidate's full-depth weights at the serving dtype - alone (plain, helios at full depth) and as the
    early-exit baseline loads it (its token-exit heads too) - and the tight and roomy budgets they give."""
    from helios_ray.tuning.profiling import candidate_info, token_exits_from_card
    from helios_ray.models.repository import ModelRepository

    repo = ModelRepository()
    per = {}
    for name in cfg.candidates:
        ci = candidate_info(repo, name, dtype)
        full = ci.embed_bytes + ci.num_layers * ci.layer_bytes + ci.head_bytes
        exits = [d for d in token_exits_from_card(repo, name, cfg.threshold, cfg.min_agreement)
                 if d < ci.num_layers]
        per[name] = {"weight_bytes": full, "early_exit_weight_bytes": full + len(exits) * ci.exit_head_bytes,
                     "token_exits": exits}
    largest = max(v["early_exit_weight_bytes"] for v in per.values())
    tight = math.ceil((largest + cfg.tight_headroom_mb * MIB) / MIB)
    roomy = cfg.roomy_budget_mb or math.ceil((largest + 1024 * MIB) / MIB)
    sweep = sorted({tight, tight + 64, tight + 128, tight + 256, tight + 512, roomy})
    return {"dtype": dtype, "candidates": per, "largest_weight_bytes": largest, "tight_mb": tight,
            "roomy_mb": max(roomy, tight), "sweep_mb": sweep,
            "rule": f"tight = ceil((largest early-exit weights {largest} B + {cfg.tight_headroom_mb} MiB) / MiB)"}


def concurrency(replicas: list[dict[str, Any]], budget_bytes: int, seq: int, block: int | None) -> dict[str, Any]:
    """Max concurrent ``seq``-token sequences over the system's replicas at ``budget_bytes`` each, with the sum."""
    parts, total = [], 0
    for r in replicas:
        n = harness.max_concurrency(r, budget_bytes, seq, block)
        total += n
        blocks = f", whole {block}-token blocks" if block else ""
        parts.append(f"{r.get('model')}@{r.get('depth')}: ({budget_bytes} - {r['weight_bytes']}) B / "
                     f"({r['kv_bytes_per_token']} B x {seq} tok{blocks}) = {n}")
    return {"total": total, "arithmetic": parts}


# ------------------------------------------------------------------------------------------------ deploy
MODES = {"helios": "helios", "single": "early_exit", "plain": "plain"}


def app_args(cfg: FleetBenchConfig, system: str, budget_mb: int, model: str | None = None) -> dict[str, Any]:
    """The application of one system at ``budget_mb`` per replica: the same policy, guard, engine limits and
    budget for every system, so only the mode (and the fleet's groups) differ.  ``model``: the single model of
    ``single`` / ``plain``."""
    seq = seq_len(cfg)
    args: dict[str, Any] = {
        "mode": MODES[system], "candidates": list(cfg.candidates) if system == "helios" else [model],
        "api_key_env": None, "mirror_fraction": 0.05,
        "policy": {"confidence_threshold": cfg.threshold, "min_agreement": cfg.min_agreement,
                   "exit_share": cfg.exit_share, "profile_prompts": max(1, cfg.warmup_requests),
                   "typical_seq_len": seq},
        "engine": {"max_num_seqs": cfg.max_num_seqs, "torch_threads": 1, "memory_budget": budget_mb * MIB,
                   "max_model_len": max(1024, seq + 64)},
    }
    if system == "helios":
        args["groups"] = [{"name": group_name(c), "candidates": [c], "initial": {"model": c}} for c in cfg.candidates]
        if cfg.steering:
            args["steering"] = dict(cfg.steering)
    else:
        args["replicas"] = cfg.single_replicas or len(cfg.candidates)
    return args


def _ready(base: str, n_replicas: int, timeout: float = 600) -> dict[str, Any]:
    """Health, then ``n_replicas`` replicas reporting (every group of a fleet up)."""
    return harness.wait_ready(base, timeout, ready=lambda st: len(st.get("replicas") or []) >= n_replicas,
                              what=f"have {n_replicas} replica(s) reporting")


def run_app(cfg: FleetBenchConfig, cluster: Any, name: str, args: dict[str, Any], n_replicas: int,
            warm: list[Any], workload: list[Any], sweep_wl: list[Any], progress: bool) -> dict[str, Any]:
    from ray import serve

    from helios_ray.serve.app import build_app
    from loadgen import Arrival, HttpClient, run_load, sweep

    t0 = time.perf_counter()
    app = re.sub(r"[^a-zA-Z0-9-]+", "-", f"bench2-{name}")
    serve.run(build_app(args), name=app, route_prefix=f"/{app}", blocking=False)
    base = f"{cluster.base}/{app}"

    def client() -> Any:
        return HttpClient(base, model="helios", temperature=0.0, ignore_eos=True, seed=None)

    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        phases[name] = round(time.perf_counter() - t0 - sum(phases.values()), 1)

    try:
        _ready(base, n_replicas)
        lap("deploy")
        if warm:
            short = [dataclasses.replace(w, max_tokens=4) for w in warm]
            asyncio.run(run_load(client(), short, Arrival(max_concurrency=len(short)), progress=False,
                                 status_client=None))
        if args["mode"] == "helios":
            harness.settle(base)
        lap("warmup")
        head = asyncio.run(run_load(client(), workload, Arrival(max_concurrency=cfg.concurrency),
                                    num_requests=len(workload), progress=progress, status_interval=2.0))
        lap("closed_loop")
        sw = None
        if cfg.rates and sweep_wl:
            sw = asyncio.run(sweep(client(), sweep_wl, cfg.rates, seed=cfg.seed, num_requests=len(sweep_wl),
                                   progress=progress, status_interval=0))
        lap("sweep")
        st = harness.status(base)
    finally:
        serve.delete(app)
    lap("teardown")
    return {"status": st, "replicas": st.get("replicas") or [], "head": head, "curve": sw.curve if sw else [],
            "sweep_runs": sw.runs if sw else [], "ready_s": phases["deploy"], "phases_s": phases}


# ------------------------------------------------------------------------------------------------ summary
def _ms(xs: list[float | None], q: float) -> float | None:
    """The ``q`` quantile of per-request seconds, in milliseconds."""
    v = harness.pct(xs, q)
    return None if v is None else round(1e3 * v, 2)


def class_speed(records: list[Any], duration_s: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({r.kind for r in records}):
        rs = [r for r in records if r.kind == kind and r.success]
        toks = sum(r.output_tokens for r in rs)
        out[kind] = {"requests": sum(1 for r in records if r.kind == kind), "completed": len(rs),
                     "output_tokens": toks, "output_throughput": round(toks / duration_s, 2) if duration_s else None,
                     "ttft_ms_p50": _ms([r.ttft_s for r in rs], 0.5), "tpot_ms_p50": _ms([r.tpot_s for r in rs], 0.5)}
    return out


def summarize(cfg: FleetBenchConfig, mode: str, r: dict[str, Any], q: dict[str, Any], plan: dict[str, Any],
              budget_mb: int) -> dict[str, Any]:
    from helios_bench.quality import overall

    s = r["head"].summary
    reps = [x for x in r["replicas"] if x.get("weight_bytes")]
    block = None if mode == "plain" else 16
    seq = seq_len(cfg)
    per_class = class_speed(r["head"].records, s["duration_s"])
    for kind, v in q["per_class"].items():
        per_class.setdefault(kind, {}).update(v)
    ov = overall(q)
    mc = concurrency(reps, budget_mb * MIB, seq, block) if reps else {"total": None, "arithmetic": []}
    models = sorted({x.get("model") for x in reps if x.get("model")})
    return {
        "mode": mode, "budget_mb": budget_mb,
        "model": "+".join(models), "depth": reps[0].get("depth") if len(reps) == 1 or len(models) == 1 and reps else
        {x.get("model"): x.get("depth") for x in reps},
        "total_layers": reps[0].get("total_layers") if reps else None,
        "replicas": [{k: x.get(k) for k in ("group", "model", "depth", "token_exits", "weight_bytes",
                                            "kv_bytes_per_token")} for x in reps],
        "token_exits": reps[0].get("token_exits") if reps else None,
        "placement_changes": [{k: c.get(k) for k in ("group", "from", "to", "action", "trigger", "reason")}
                              for c in (r["status"].get("changes") or [])],
        "deploy_s": r["ready_s"], "phases_s": r.get("phases_s"),
        "requests": s["num_requests"], "completed": s["completed"], "failed": s["failed"],
        "output_tokens": s["total_output_tokens"], "duration_s": round(s["duration_s"], 2),
        "short_answers": [{"index": x.index, "kind": x.kind, "model": x.model, "output_tokens": x.output_tokens,
                           "max_tokens": x.max_tokens, "finish_reason": x.finish_reason}
                          for x in r["head"].records if x.success and x.output_tokens < x.max_tokens],
        "output_throughput": round(s["output_throughput"], 2), "request_throughput": round(s["request_throughput"], 3),
        "ttft_ms": {"p50": harness.stat(s, "ttft_ms", "median"), "p99": harness.stat(s, "ttft_ms", "p99")},
        "tpot_ms": {"p50": harness.stat(s, "tpot_ms", "median"), "p99": harness.stat(s, "tpot_ms", "p99")},
        "e2e_ms": {"p50": harness.stat(s, "e2e_ms", "median"), "p99": harness.stat(s, "e2e_ms", "p99")},
        "exit_layer_histogram": (s.get("exit_layer") or {}).get("histogram"),
        "max_concurrency": mc["total"], "max_concurrency_arithmetic": mc["arithmetic"],
        "max_concurrency_by_budget_mb": {str(b): concurrency(reps, b * MIB, seq, block)["total"]
                                         for b in plan["sweep_mb"]} if reps else None,
        "weight_bytes": sum(x["weight_bytes"] for x in reps) if reps else None,
        "kv_bytes_per_token": reps[0].get("kv_bytes_per_token") if reps else None,
        "energy_j_per_token": reps[0].get("energy_j_per_token") if reps else None,
        "agreement": ov["agreement"], "perplexity": ov["perplexity"], "tokens_scored": ov["tokens_scored"],
        "pass_at_1": (q["per_class"].get("code") or {}).get("pass_at_1"),
        "per_class": per_class, "served_by_model": q["served_by_model"],
        "exit_share_by_model": q["exit_share_by_model"],
        "routing": (r["status"].get("routing") or {}).get("steering", {}).get("split") if mode == "helios" else None,
        "curve": r["curve"],
    }
