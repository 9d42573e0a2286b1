"""The driver of ``helios-ray bench serve``: runs every system at every measured budget on one cluster, scores
the answers once the cluster is gone, and assembles the JSON (:mod:`fleet_serve` has the why).

JSON: ``helios``, ``baseline`` (= the best single model at full depth with token-level exits), ``plain`` and
``ratios`` (helios vs baseline vs plain, :func:`ratios`) - taken at the headline budget (tight when measured);
plus ``best_single`` (every candidate), ``best_single_model``, per-class figures inside each system
(``per_class``: chat / code speed and quality), ``budgets`` (the arithmetic), ``roomy`` (the roomy budget's
systems when measured), ``ratios`` gains the four against the best single model at the tight budget,
``ratios_roomy`` the same four at the roomy budget, and ``routing_timeline`` the fleet's split.  With one
candidate (the one-model preset) the best single model is that model, so ``baseline`` is it at full depth.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from helios_bench import harness
from helios_bench.fleet_serve import FleetBenchConfig, app_args, budget_plan, run_app, summarize
from helios_bench.fleet_workload import describe, mixed_requests

NEW_RATIOS = ("throughput_helios_vs_best_single", "tpot_p50_best_single_over_helios",
              "max_concurrency_helios_vs_best_single", "pass_at_1_delta")


def spread(workload: list[Any], n: int) -> list[Any]:
    """``n`` requests evenly spaced over ``workload`` in order, so a short sweep still crosses the shift."""
    n = min(n, len(workload))
    return [workload[(i * len(workload)) // n] for i in range(n)]


def pick_best(singles: dict[str, dict[str, Any]], by: str) -> str | None:
    """The best single model for the SLO: highest output tokens/s, or lowest p50 TPOT."""
    ok = {m: s for m, s in singles.items() if s.get("completed")}
    if not ok:
        return None
    if by == "tpot":
        return min(ok, key=lambda m: ok[m]["tpot_ms"]["p50"] or float("inf"))
    return max(ok, key=lambda m: ok[m]["output_throughput"] or 0.0)


def ratios(res: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """helios over the others (throughput, max concurrency) and the others over helios (latencies), so > 1 always
    means helios is better; a pair is left out when either system did not run."""
    h, b, p = res.get("helios"), res.get("baseline"), res.get("plain")
    out: dict[str, float | None] = {}
    if h and b:
        out["throughput_helios_vs_baseline"] = harness.ratio(h["output_throughput"], b["output_throughput"])
        out["tpot_p50_baseline_over_helios"] = harness.ratio(b["tpot_ms"]["p50"], h["tpot_ms"]["p50"])
        out["ttft_p50_baseline_over_helios"] = harness.ratio(b["ttft_ms"]["p50"], h["ttft_ms"]["p50"])
        out["max_concurrency_helios_vs_baseline"] = harness.ratio(h["max_concurrency"], b["max_concurrency"])
    if h and p:
        out["throughput_helios_vs_plain"] = harness.ratio(h["output_throughput"], p["output_throughput"])
        out["tpot_p50_plain_over_helios"] = harness.ratio(p["tpot_ms"]["p50"], h["tpot_ms"]["p50"])
        out["max_concurrency_helios_vs_plain"] = harness.ratio(h["max_concurrency"], p["max_concurrency"])
    if b and p:
        out["throughput_baseline_vs_plain"] = harness.ratio(b["output_throughput"], p["output_throughput"])
    return out


def vs_best(h: dict[str, Any] | None, b: dict[str, Any] | None, budget_mb: int | None = None) -> dict[str, Any]:
    """The four ratios against the best single model; ``budget_mb`` = arithmetic only at that budget (a budget
    whose runs were not measured: max concurrency from the replicas' sizes, the rest ``None``)."""
    if not h or not b:
        return {k: None for k in NEW_RATIOS}
    if budget_mb is not None:
        mc = lambda s: (s.get("max_concurrency_by_budget_mb") or {}).get(str(budget_mb))  # noqa: E731
        return {NEW_RATIOS[0]: None, NEW_RATIOS[1]: None, NEW_RATIOS[2]: harness.ratio(mc(h), mc(b)),
                NEW_RATIOS[3]: None, "measured": False}
    pa, pb = h.get("pass_at_1"), b.get("pass_at_1")
    return {NEW_RATIOS[0]: harness.ratio(h["output_throughput"], b["output_throughput"]),
            NEW_RATIOS[1]: harness.ratio(b["tpot_ms"]["p50"], h["tpot_ms"]["p50"]),
            NEW_RATIOS[2]: harness.ratio(h["max_concurrency"], b["max_concurrency"]),
            NEW_RATIOS[3]: round(pa - pb, 4) if pa is not None and pb is not None else None, "measured": True}


def routing_timeline(records: list[Any], workload: list[Any]) -> dict[str, Any]:
    """Per request of the fleet's saturation run: send time, class, phase and the model that served it; and
    the split per phase and class."""
    rows, split = [], {}
    for r in sorted(records, key=lambda r: r.start_s or 0.0):
        if not r.success:
            continue
        phase = int(workload[r.index % len(workload)].meta.get("phase", 0))
        rows.append([round(r.start_s or 0.0, 3), r.kind, r.model, phase])
        d = split.setdefault(str(phase), {}).setdefault(r.kind, {})
        d[r.model] = d.get(r.model, 0) + 1
    return {"columns": ["start_s", "kind", "model", "phase"], "rows": rows, "split_by_phase": split}


def bench_fleet(cfg: FleetBenchConfig, progress: bool = True, log: Any = None, cluster: Any = None
                ) -> dict[str, Any]:
    """Run the benchmark; ``cluster`` (with ``.base``) reuses a running local cluster (the test suite's)."""
    from helios_bench.quality import Scorers, score_records
    from helios_ray.dtypes import serving_dtype
    from helios_ray.models.repository import ModelRepository

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    repo = ModelRepository()
    for name in cfg.candidates:
        repo.checkpoint_dir(name)  # unknown/unprepared -> a clear error before any cluster starts
    t_start = time.perf_counter()
    plan = budget_plan(cfg, serving_dtype("auto", harness.on_cuda()))
    wl_kw = dict(chat_share_first=cfg.chat_share_first, chat_share_second=cfg.chat_share_second,
                 max_prompt_tokens=cfg.max_prompt_tokens, chat_output_cap=cfg.chat_output_cap,
                 code_max_tokens=cfg.code_max_tokens)
    workload = mixed_requests(cfg.requests, cfg.seed, **wl_kw)
    warm = mixed_requests(cfg.warmup_requests, cfg.seed, offset=cfg.requests, **wl_kw) if cfg.warmup_requests > 1 \
        else []
    sweep_wl = spread(workload, cfg.sweep_requests)
    n_single = cfg.single_replicas or len(cfg.candidates)

    def t() -> str:
        return f"[{time.perf_counter() - t_start:6.0f}s]"

    raw: dict[tuple[str, str], dict[str, Any]] = {}
    best: dict[str, str] = {}
    with (contextlib.nullcontext(cluster) if cluster is not None else harness.LocalCluster()) as cl:
        def go(budget: str, key: str, system: str, model: str | None, n: int) -> None:
            mb = plan[f"{budget}_mb"]
            log(f"{t()} {budget} {mb} MiB: {key} deploying")
            args = app_args(cfg, system, mb, model)
            raw[(budget, key)] = r = run_app(cfg, cl, f"{budget}-{key}", args, n, warm, workload, sweep_wl,
                                              progress)
            h = r["head"].summary
            log(f"{t()} {budget}: {key}: {h['output_throughput']:.1f} tok/s, {h['completed']}/{h['num_requests']} ok")

        for budget in cfg.budgets:
            if "single" in cfg.systems:
                for c in cfg.candidates:
                    go(budget, f"single:{c}", "single", c, n_single)
                heads = {c: {"completed": raw[(budget, f"single:{c}")]["head"].summary["completed"],
                             "output_throughput": raw[(budget, f"single:{c}")]["head"].summary["output_throughput"],
                             "tpot_ms": {"p50": harness.stat(raw[(budget, f"single:{c}")]["head"].summary,
                                                             "tpot_ms", "median")}} for c in cfg.candidates}
                best[budget] = pick_best(heads, cfg.best_by) or cfg.candidates[0]
            if "plain" in cfg.systems and budget == cfg.budgets[0]:
                go(budget, "plain", "plain", best.get(budget, cfg.candidates[0]), n_single)
            if "helios" in cfg.systems:
                go(budget, "helios", "helios", None, len(cfg.candidates))
    log(f"{t()} scoring: every answer under its serving model's full depth, HumanEval tests in a sandbox")
    scorers = Scorers(cfg.code_timeout_s)
    res: dict[tuple[str, str], dict[str, Any]] = {}
    for (budget, key), r in raw.items():
        mode = "helios" if key == "helios" else "plain" if key == "plain" else "early_exit"
        default = key.split(":", 1)[1] if key.startswith("single:") else best.get(budget, cfg.candidates[0])
        t0, sb0 = time.perf_counter(), scorers.sandbox_s
        q = score_records(scorers, workload, r["head"].records, default)
        ph = r.setdefault("phases_s", {})
        ph["scoring"], ph["scoring_sandbox"] = round(time.perf_counter() - t0, 1), round(scorers.sandbox_s - sb0, 1)
        log(f"{t()} scored {budget} {key} in {ph['scoring']} s ({ph['scoring_sandbox']} s running tests, "
            f"{scorers.timeouts} timeouts so far)")
        res[(budget, key)] = summarize(cfg, mode, r, q, plan, plan[f"{budget}_mb"])

    def systems(budget: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if (budget, "helios") in res:
            out["helios"] = res[(budget, "helios")]
        if budget in best:
            out["baseline"] = res[(budget, f"single:{best[budget]}")]
            out["best_single_model"] = best[budget]
            out["best_single"] = {c: res[(budget, f"single:{c}")] for c in cfg.candidates}
        if (budget, "plain") in res:
            out["plain"] = res[(budget, "plain")]
        return out

    head_budget = cfg.budgets[0]
    top = systems(head_budget)
    out: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"), "machine": harness.machine(),
        "workload": {**describe(workload), "sweep_requests": len(sweep_wl), "warmup_requests": len(warm)},
        "budgets": plan, "headline_budget": head_budget, **top,
    }
    rs = ratios({k: v for k, v in top.items() if k in ("helios", "baseline", "plain")})
    tight = systems("tight") if "tight" in cfg.budgets else {}
    rs.update({k: v for k, v in vs_best(tight.get("helios"), tight.get("baseline")).items() if k != "measured"})
    out["ratios"] = rs
    if "roomy" in cfg.budgets:
        roomy = systems("roomy")
        out["roomy"] = roomy
        out["ratios_roomy"] = vs_best(roomy.get("helios"), roomy.get("baseline"))
    else:  # not measured: the memory arithmetic of the measured replicas at the roomy budget
        out["ratios_roomy"] = vs_best(top.get("helios"), top.get("baseline"), plan["roomy_mb"])
    out["max_concurrency_sweep"] = {k: top[k]["max_concurrency_by_budget_mb"] for k in ("helios", "baseline", "plain")
                                    if k in top}
    if (head_budget, "helios") in raw:
        out["routing_timeline"] = routing_timeline(raw[(head_budget, "helios")]["head"].records, workload)
    out["energy_j_per_token"] = {k: (top[k]["energy_j_per_token"] if top[k]["energy_j_per_token"] is not None
                                     else "n/a") for k in ("helios", "baseline", "plain") if k in top}
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    if cfg.out_dir is not None:
        from helios_bench.fleet_report import plot_combined

        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            out["png"] = str(plot_combined(out, cfg.out_dir / "bench_serve.png"))
        except Exception as e:  # the numbers are in the JSON
            log(f"note: the plot was skipped ({type(e).__name__}: {e})")
    return out
