"""``helios-ray bench mixed``: what chunked prefill in packed mixed steps buys, old vs new side by side.

Two measurements, each in one process on the same model, threads and data, alternating the sides (A-B-B-A)
so that other load on a shared host falls on both:

* **prefill layouts** - 2, 3 and 4 ShareGPT prompts of 100-500 tokens prefilled as (a) one forward per prompt
  (the old engine), (b) one padded ``[B, T_max]`` batch, (c) one packed ``[1, sum T]`` row with per-sequence
  attention (the new engine).  Prompt tokens per second each.
* **inter-token latency under mixed arrivals** - Poisson arrivals of ShareGPT prompts (100-512 tokens) while
  earlier requests decode, served by the old engine (prefill-first: every prompt stalls all decoding) and by
  the new one (decode tokens + prompt chunks of at most ``max_num_batched_tokens`` per step).  ITL = the gap
  between consecutive tokens of one request; p50/p99 over all gaps, plus TTFT and throughput.  Greedy output
  of both must be identical (reported as agreement).
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from helios_bench.engine_bench import agreement, sharegpt_requests
from helios_bench.harness import pct
from helios_ray.engine.config import EngineConfig
from helios_ray.engine.engine import LLMEngine
from helios_ray.engine.kv_cache import PagedKVCache
from helios_ray.engine.packed import PackedKV
from helios_ray.engine.sequence import SamplingParams, Sequence
from helios_ray.models.early_exit import EarlyExitLM


# ------------------------------------------------------------------------------------------- prefill layouts
def _prefill(model: EarlyExitLM, prompts: list[list[int]], layout: str) -> float:
    eng = LLMEngine(model, EngineConfig(memory_budget=model.param_bytes + (256 << 20), torch_threads=None))
    seqs = [Sequence(p, SamplingParams(max_tokens=1)) for p in prompts]
    for s in seqs:
        eng.scheduler.blocks.allocate(s, s.num_tokens)
    kv: PagedKVCache = eng.kv
    dev = model.device
    t0 = time.perf_counter()
    with torch.inference_mode():
        if layout == "per_prompt":
            for s in seqs:
                kv.begin_step([s], torch.arange(s.num_tokens)[None])
                model.step(torch.tensor([s.prompt_ids], device=dev), torch.arange(s.num_tokens, device=dev)[None], kv)
        elif layout == "padded":
            T = max(s.num_tokens for s in seqs)
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            pos = torch.full((len(seqs), T), -1, dtype=torch.long)
            for i, s in enumerate(seqs):  # right-aligned, so every row's last column is its last prompt token
                ids[i, T - s.num_tokens:] = torch.tensor(s.prompt_ids)
                pos[i, T - s.num_tokens:] = torch.arange(s.num_tokens)
            kv.begin_step(seqs, pos)
            model.step(ids.to(dev), pos.to(dev), kv)
        else:
            pk = PackedKV(kv, seqs, [0] * len(seqs), [s.num_tokens for s in seqs], 0)
            ids = torch.tensor([sum((s.prompt_ids for s in seqs), [])], device=dev)
            ends = torch.tensor([s.num_tokens for s in seqs]).cumsum(0) - 1
            model.step_packed(ids, pk.q_pos.to(dev), pk, ends.to(dev))
    return time.perf_counter() - t0


def bench_prefill_layouts(model: EarlyExitLM, seed: int, sizes: tuple[int, ...] = (2, 3, 4)) -> list[dict[str, Any]]:
    pool = [p for p, _ in sharegpt_requests(model, 200, seed, 500, 1) if len(p) >= 100]
    rng = random.Random(seed)
    out = []
    _prefill(model, pool[:2], "packed")  # warm-up
    for n in sizes:
        prompts = rng.sample(pool, n)
        tokens = sum(len(p) for p in prompts)
        order = ["per_prompt", "padded", "packed", "packed", "padded", "per_prompt"]
        times: dict[str, list[float]] = {}
        for layout in order:
            times.setdefault(layout, []).append(_prefill(model, prompts, layout))
        tps = {k: round(tokens / (sum(v) / len(v)), 1) for k, v in times.items()}
        out.append({"prompts": n, "prompt_lengths": [len(p) for p in prompts], "prompt_tokens": tokens,
                    "tokens_per_s": tps, "packed_over_per_prompt": round(tps["packed"] / tps["per_prompt"], 3),
                    "packed_over_padded": round(tps["packed"] / tps["padded"], 3)})
    return out


# ---------------------------------------------------------------------------------------- ITL, mixed arrivals
def run_arrivals(model: EarlyExitLM, reqs: list[tuple[list[int], int]], arrivals: list[float], cfg: EngineConfig
                 ) -> dict[str, Any]:
    """Serve ``reqs`` arriving at ``arrivals`` (seconds from start) on the synchronous engine, in real time."""
    eng = LLMEngine(model, cfg)
    times: dict[int, list[float]] = {}
    seqs: list[Sequence] = []
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(reqs) or eng.scheduler.has_work:
        now = time.perf_counter() - t0
        while nxt < len(reqs) and arrivals[nxt] <= now:
            p, n = reqs[nxt]
            s = eng.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            s.arrival = t0 + arrivals[nxt]
            seqs.append(s)
            times[s.seq_id] = []
            nxt += 1
        if not eng.scheduler.has_work:
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - t0)))
            continue
        evs = eng.step()
        t = time.perf_counter()
        for ev in evs:
            if ev.token is not None:
                times[ev.seq_id].append(t)
    wall = time.perf_counter() - t0
    itl = [b - a for s in seqs for a, b in zip(times[s.seq_id], times[s.seq_id][1:])]
    ttft = [times[s.seq_id][0] - s.arrival for s in seqs]
    n_out = sum(len(s.output_ids) for s in seqs)
    return {"outputs": [s.output_ids for s in seqs], "itl_p50_ms": round(1e3 * pct(itl, 0.5, 0.0), 1),
            "itl_p99_ms": round(1e3 * pct(itl, 0.99, 0.0), 1), "itl_max_ms": round(1e3 * max(itl, default=0.0), 1),
            "ttft_p50_s": round(pct(ttft, 0.5, 0.0), 3), "ttft_p99_s": round(pct(ttft, 0.99, 0.0), 3),
            "output_tokens_per_s": round(n_out / wall, 2), "wall_s": round(wall, 2), "steps": eng.totals.steps}


def bench_itl(model: EarlyExitLM, n_requests: int, rate: float, max_prompt_tokens: int, max_output_tokens: int,
              chunk_tokens: int, seed: int, budget_mb: int, repeats: int = 2, min_prompt_tokens: int = 100
              ) -> dict[str, Any]:
    pool = sharegpt_requests(model, 20 * n_requests, seed, max_prompt_tokens, max_output_tokens,
                             min_output_tokens=max_output_tokens // 2)
    reqs = [r for r in pool if len(r[0]) >= min_prompt_tokens][:n_requests]  # prompts that do stall decoding
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in reqs:
        arrivals.append(t)
        t += rng.expovariate(rate)
    budget = budget_mb << 20
    sides = {
        "old_prefill_first": EngineConfig(memory_budget=budget, chunked_prefill=False),
        "chunked_prefill": EngineConfig(memory_budget=budget, chunked_prefill=True,
                                        max_num_batched_tokens=chunk_tokens),
    }
    order = ["old_prefill_first", "chunked_prefill"] + (["chunked_prefill", "old_prefill_first"] if repeats > 1 else [])
    runs: dict[str, list[dict[str, Any]]] = {}
    for side in order:
        runs.setdefault(side, []).append(run_arrivals(model, reqs, arrivals, sides[side]))
    res: dict[str, Any] = {"requests": len(reqs), "rate_per_s": rate, "chunk_tokens": chunk_tokens,
                           "prompt_tokens_mean": round(sum(len(p) for p, _ in reqs) / len(reqs), 1)}
    for side, rs in runs.items():
        keys = [k for k in rs[0] if k != "outputs"]
        res[side] = {k: round(sum(r[k] for r in rs) / len(rs), 3) for k in keys}
        res[side]["per_repeat_itl_p99_ms"] = [r["itl_p99_ms"] for r in rs]
    res["token_agreement_new_vs_old"] = round(agreement(runs["chunked_prefill"][0]["outputs"],
                                                        runs["old_prefill_first"][0]["outputs"]), 4)
    res["itl_p99_old_over_new"] = round(res["old_prefill_first"]["itl_p99_ms"]
                                        / max(1e-9, res["chunked_prefill"]["itl_p99_ms"]), 3)
    return res


def bench_detok(model: EarlyExitLM, lengths: tuple[int, ...] = (250, 2000)) -> list[dict[str, Any]]:
    """Streaming text cost per token: re-decoding the whole output + ``finish_text`` (the old way) vs
    ``TextStream`` (incremental), on the same ids, with two stop strings that never match."""
    from helios_ray.engine.detok import TextStream
    from helios_ray.engine.sequence import finish_text

    tok = model.tokenizer
    text = "The quick brown fox jumps over the lazy dog, said 日本語 😀. " * 400
    ids = tok(text, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=10**6, stop=["</s>", "User:"])
    out = []
    for n in lengths:
        t0 = time.perf_counter()
        emitted = 0
        for i in range(n):
            _, _, _, emitted = finish_text(tok.decode(ids[:i + 1], skip_special_tokens=True), params, False, False,
                                           emitted)
        t1 = time.perf_counter()
        stream = TextStream(tok, params)
        for i in range(n):
            stream.add(ids[i])
        t2 = time.perf_counter()
        out.append({"output_tokens": n, "full_redecode_us_per_token": round((t1 - t0) / n * 1e6, 1),
                    "incremental_us_per_token": round((t2 - t1) / n * 1e6, 1)})
    return out


def bench_mixed(model_name: str, quick: bool, seed: int, threads: int, budget_mb: int,
                chunk_tokens: int) -> dict[str, Any]:
    from helios_ray.models.early_exit import load_model

    torch.set_num_threads(threads)
    model = load_model(model_name, exits="shared")
    out: dict[str, Any] = {"model": model_name, "device": str(model.device), "dtype": str(model.lm.dtype),
                           "threads": threads, "seed": seed}
    out["detokenize"] = bench_detok(model)
    out["prefill_layouts"] = bench_prefill_layouts(model, seed, (2, 4) if quick else (2, 3, 4))
    out["itl"] = bench_itl(model, 8 if quick else 16, 0.5, 512, 24 if quick else 48, chunk_tokens, seed, budget_mb,
                           repeats=2)
    return out


def format_table(r: dict[str, Any]) -> str:
    lines = [f"streaming text, {x['output_tokens']} tokens: re-decode {x['full_redecode_us_per_token']} us/token, "
             f"incremental {x['incremental_us_per_token']} us/token" for x in r.get("detokenize", [])]
    lines.append(f"prefill, prompt tokens/s ({r['model']}, {r['dtype']}, {r['threads']} thread(s)):")
    for x in r["prefill_layouts"]:
        t = x["tokens_per_s"]
        lines.append(f"  {x['prompts']} prompts {x['prompt_lengths']}: per-prompt {t['per_prompt']} | padded "
                     f"{t['padded']} | packed {t['packed']} ({x['packed_over_per_prompt']}x per-prompt, "
                     f"{x['packed_over_padded']}x padded)")
    i = r["itl"]
    lines.append(f"ITL under Poisson arrivals ({i['requests']} requests at {i['rate_per_s']}/s, prompts "
                 f"~{i['prompt_tokens_mean']} tokens, chunk {i['chunk_tokens']}):")
    for side in ("old_prefill_first", "chunked_prefill"):
        v = i[side]
        lines.append(f"  {side:<18} ITL p50 {v['itl_p50_ms']} ms, p99 {v['itl_p99_ms']} ms, max {v['itl_max_ms']} ms "
                     f"| TTFT p50 {v['ttft_p50_s']} s | {v['output_tokens_per_s']} tok/s")
    lines.append(f"  ITL p99 old/new {i['itl_p99_old_over_new']}x, token agreement {i['token_agreement_new_vs_old']:.1%}")
    return "\n".join(lines)
