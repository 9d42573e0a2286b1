"""``helios-ray bench engine`` and ``bench memory``: our engine against what a user would otherwise run.

Both sides run in one process, on the same model, prompts, output lengths, threads and seed:

* **engine** - our continuous-batching engine with ``max_num_seqs = B``; all requests submitted at once.
* **transformers** - ``generate()`` in static batches of B (left-padded, greedy).  It cannot stop each
  sequence at its own length, so a batch runs to its longest request; only each request's own tokens count.

Output lengths come from the ShareGPT reply lengths (capped), with EOS ignored on both sides - the usual
serving-benchmark convention, so that both produce exactly the same number of tokens.  Accuracy stands next
to speed: the share of generated tokens where the engine's greedy output equals ``generate()``'s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from helios_bench.harness import pct
from helios_ray.engine.engine import EngineConfig, LLMEngine
from helios_ray.engine.sequence import SamplingParams
from helios_ray.models.early_exit import EarlyExitLM


def sharegpt_requests(model: EarlyExitLM, n: int, seed: int, max_prompt_tokens: int, max_output_tokens: int,
                      min_output_tokens: int = 4, min_prompt_tokens: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) pairs from ShareGPT: first user turn through the chat template (prompts of
    ``[min_prompt_tokens, max_prompt_tokens]`` tokens), output length = the recorded reply's token count, clipped
    to [min_output_tokens, max_output_tokens]."""
    from helios_data import load_sharegpt

    out: list[tuple[list[int], int]] = []
    for conv in load_sharegpt(limit=None, seed=seed, min_len=8, max_len=4 * max_prompt_tokens):
        msgs = conv.prompt_messages
        if model.has_chat_template:
            ids = model.encode(messages=msgs)
        else:
            ids = model.encode(prompt=conv.prompt)
        if not min_prompt_tokens <= len(ids) <= max_prompt_tokens:
            continue
        reply = next((m["content"] for m in conv.messages[len(msgs):] if m["role"] == "assistant"), "")
        n_out = len(model.tokenizer(reply, add_special_tokens=False)["input_ids"]) if reply else max_output_tokens
        out.append((ids, max(min_output_tokens, min(max_output_tokens, n_out))))
        if len(out) == n:
            break
    return out


def run_engine(model: EarlyExitLM, reqs: list[tuple[list[int], int]], batch: int, budget: int,
               decode_attention: str = "auto") -> tuple[float, list[list[int]], dict[str, Any]]:
    eng = LLMEngine(model, EngineConfig(memory_budget=budget, max_num_seqs=batch, decode_attention=decode_attention))
    seqs = [eng.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)) for p, n in reqs]
    t0 = time.perf_counter()
    while eng.scheduler.has_work:
        eng.step()
    dt = time.perf_counter() - t0
    ttft = [(s.first_token_at or 0) - t0 for s in seqs]
    return dt, [s.output_ids for s in seqs], {"steps": eng.totals.steps, "preemptions": eng.totals.preemptions,
                                              "tokens_in": eng.totals.tokens_in,
                                              "ttft_p50_s": round(pct(ttft, 0.5, 0.0), 3)}


def run_transformers(hf: Any, reqs: list[tuple[list[int], int]], batch: int, pad_id: int
                     ) -> tuple[float, list[list[int]]]:
    outs: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        T = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, (p, _) in enumerate(chunk):
            ids[j, T - len(p):] = torch.tensor(p)
            mask[j, T - len(p):] = 1
        with torch.inference_mode():
            gen = hf.generate(ids, attention_mask=mask, max_new_tokens=max(n for _, n in chunk), min_new_tokens=max(
                n for _, n in chunk), do_sample=False, pad_token_id=pad_id)
        for j, (_, n) in enumerate(chunk):
            outs.append(gen[j, T:T + n].tolist())
    return time.perf_counter() - t0, outs


def bench_prefill(model: EarlyExitLM, hf: Any, n_prompts: int, seed: int, budget: int, pad: int,
                  decode_attention: str = "auto") -> dict[str, Any]:
    """Prompt tokens/s on long (384-512-token) ShareGPT prompts: the engine (its dtype and default chunking, all
    prompts submitted at once, one output token each) vs ``generate()`` fp32 one prompt at a time with one new
    token, as a user runs it; A-B-B-A.  Agreement: the first generated token of each prompt."""
    reqs = [(p, 1) for p, _ in sharegpt_requests(model, n_prompts, seed, 512, 1, min_output_tokens=1,
                                                  min_prompt_tokens=384)]
    tokens = sum(len(p) for p, _ in reqs)
    t_hf1, out_hf = run_transformers(hf, reqs, 1, pad)
    t_en1, out_en, _ = run_engine(model, reqs, len(reqs), budget, decode_attention)
    t_en2 = run_engine(model, reqs, len(reqs), budget, decode_attention)[0]
    t_hf2 = run_transformers(hf, reqs, 1, pad)[0]
    t_hf, t_en = (t_hf1 + t_hf2) / 2, (t_en1 + t_en2) / 2
    return {"prompts": len(reqs), "prompt_tokens": tokens,
            "prompt_tokens_min_max": [min(len(p) for p, _ in reqs), max(len(p) for p, _ in reqs)],
            "engine_prompt_tokens_per_s": round(tokens / t_en, 1),
            "transformers_prompt_tokens_per_s": round(tokens / t_hf, 1),
            "ratio_engine_over_transformers": round(t_hf / t_en, 3),
            "first_token_agreement": round(agreement(out_en, out_hf), 4),
            "seconds_per_repeat": {"engine": [round(t_en1, 2), round(t_en2, 2)],
                                   "transformers": [round(t_hf1, 2), round(t_hf2, 2)]}}


def _in_place(model: EarlyExitLM, mode: str) -> bool:
    from helios_ray.engine import paged_attention

    return paged_attention.resolve(mode, model.device, model.lm.dtype)


def gemm_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0) -> float:
    """Measured matmul peak of this process (current torch threads): the best of repeated n x n x n products.
    The yardstick for "how much of the machine does a decode step use"."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def matmul_flops(model: EarlyExitLM, tokens_in: int, tokens_out: int) -> int:
    """Weight-matmul FLOPs of a run: 2 x layer weights per token run through the layers (prompt and decode
    inputs), 2 x LM head per sampled token.  Attention over the context is not counted, so the fraction of peak
    derived from it is a lower bound.  Counted from the projections' shapes, whatever their storage (plain,
    oneDNN-packed, int8/int4 buffers)."""
    from helios_ray.models.healed import projections

    lm = model.lm
    layer = sum(m.in_features * m.out_features for m in projections(lm.layers[0]).values())
    return 2 * (tokens_in * lm.depth * layer + tokens_out * lm.spec.vocab_size * lm.spec.hidden_size)


def _dtype_name(model: EarlyExitLM) -> str:
    """The serving dtype as resolved: ``bfloat16``, or ``int8/bfloat16`` for int8 weights with bf16 activations."""
    act = str(model.lm.dtype).removeprefix("torch.")
    return f"{model.lm.quant}/{act}" if model.lm.quant else act


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, b):
        total += len(x)
        same += sum(p == q for p, q in zip(x, y))
    return same / total if total else 0.0


def bench_engine(model_name: str, batches: list[int], requests_per_batch: int, max_prompt_tokens: int,
                 max_output_tokens: int, budget_mb: int, seed: int, threads: int, progress: bool = True,
                 repeats: int = 2, dtype: str = "float32", decode_attention: str = "auto",
                 compare_gather: bool = False, prefill_prompts: int = 8) -> dict[str, Any]:
    """``compare_gather`` adds the engine with ``decode_attention: gather`` to every batch, between the two
    runs of the configured engine (hf, engine, gather, gather, engine, hf), and reports the ratio of the two."""
    from transformers import AutoModelForCausalLM

    from helios_ray.models.early_exit import load_model

    torch.set_num_threads(threads)
    model = load_model(model_name, exits="shared", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(model.ckpt_dir), dtype=torch.float32).eval()
    # generate() at the engine's activation dtype too (bf16 for bf16/int8/int4 engines): what a user gets by just
    # asking transformers for the same dtype, so the engine's own contribution is visible apart from the dtype's
    same = (AutoModelForCausalLM.from_pretrained(str(model.ckpt_dir), dtype=model.lm.dtype).eval()
            if model.lm.dtype != torch.float32 else None)
    pad = model.spec.pad_token_id if model.spec.pad_token_id is not None else 0
    peak = gemm_peak_gflops(model.lm.dtype)
    results: dict[str, Any] = {"model": model_name, "device": str(model.device), "threads": threads,
                               "engine_dtype": _dtype_name(model),
                               "transformers_dtype": "float32",
                               "budget_mb": budget_mb, "seed": seed, "workload": "sharegpt",
                               "decode_attention": decode_attention,
                               "decode_attention_in_place": _in_place(model, decode_attention),
                               "gemm_peak_gflops": round(peak, 2), "runs": []}
    for b in batches:
        n_req = max(b, requests_per_batch if b > 1 else max(2, requests_per_batch // 4))
        reqs = sharegpt_requests(model, n_req, seed, max_prompt_tokens, max_output_tokens)
        n_tokens = sum(n for _, n in reqs)
        if progress:
            print(f"[bench engine] batch {b}: {len(reqs)} requests, {n_tokens} output tokens ...", flush=True)
        run_transformers(hf, reqs[:1], 1, pad)  # warm-up both paths (allocator, first-call overheads)
        run_engine(model, reqs[:1], 1, budget_mb << 20)
        # A-B-B-A: anything else using the CPU during the run is shared by both sides instead of biasing one.
        t_hf1, out_hf = run_transformers(hf, reqs, b, pad)
        t_en1, out_en, extra = run_engine(model, reqs, b, budget_mb << 20, decode_attention)
        if compare_gather:
            t_g1, out_g, _ = run_engine(model, reqs, b, budget_mb << 20, "gather")
            t_g2 = run_engine(model, reqs, b, budget_mb << 20, "gather")[0] if repeats > 1 else t_g1
        if same is not None:
            t_s1, out_s = run_transformers(same, reqs, b, pad)
            t_s2 = run_transformers(same, reqs, b, pad)[0] if repeats > 1 else t_s1
        t_en2, _, _ = (run_engine(model, reqs, b, budget_mb << 20, decode_attention) if repeats > 1
                       else (t_en1, None, None))
        t_hf2, _ = run_transformers(hf, reqs, b, pad) if repeats > 1 else (t_hf1, None)
        t_hf, t_en = (t_hf1 + t_hf2) / 2, (t_en1 + t_en2) / 2
        lens = sorted(n for _, n in reqs)
        padded = sum(max(n for _, n in reqs[i:i + b]) * len(reqs[i:i + b]) for i in range(0, len(reqs), b))
        run = {
            "batch": b, "requests": len(reqs), "output_tokens": n_tokens,
            "prompt_tokens_mean": round(sum(len(p) for p, _ in reqs) / len(reqs), 1),
            "output_tokens_min_median_max": [lens[0], pct(lens, 0.5), lens[-1]],
            "static_batch_decode_slots_wasted": round(1 - n_tokens / padded, 3),
            "engine_tokens_per_s": round(n_tokens / t_en, 2),
            "transformers_tokens_per_s": round(n_tokens / t_hf, 2),
            "ratio_engine_over_transformers": round(t_hf / t_en, 3),
            "engine_fraction_of_gemm_peak": round(matmul_flops(model, extra["tokens_in"], n_tokens) / t_en / 1e9 / peak,
                                                  3),
            "token_agreement_with_transformers": round(agreement(out_en, out_hf), 4),
            "engine_seconds": round(t_en, 2), "transformers_seconds": round(t_hf, 2),
            "seconds_per_repeat": {"engine": [round(t_en1, 2), round(t_en2, 2)],
                                   "transformers": [round(t_hf1, 2), round(t_hf2, 2)]}, **extra,
        }
        if same is not None:
            t_s = (t_s1 + t_s2) / 2
            run["transformers_same_dtype"] = {
                "dtype": str(model.lm.dtype).removeprefix("torch."), "tokens_per_s": round(n_tokens / t_s, 2),
                "seconds": [round(t_s1, 2), round(t_s2, 2)], "ratio_engine_over_it": round(t_s / t_en, 3),
                "token_agreement_with_engine": round(agreement(out_en, out_s), 4),
                "token_agreement_with_fp32": round(agreement(out_s, out_hf), 4)}
        if compare_gather:
            t_g = (t_g1 + t_g2) / 2
            run["gather"] = {"engine_tokens_per_s": round(n_tokens / t_g, 2), "seconds": [round(t_g1, 2), round(t_g2, 2)],
                             "ratio_engine_over_gather": round(t_g / t_en, 3),
                             "token_agreement_with_engine": round(agreement(out_en, out_g), 4),
                             "token_agreement_with_transformers": round(agreement(out_g, out_hf), 4)}
        if b == 1:
            _llama_cpp_side_by_side(model_name, reqs, threads, t_en, out_hf, run)
        results["runs"].append(run)
        if progress:
            print(f"[bench engine] batch {b}: engine {run['engine_tokens_per_s']} tok/s, transformers "
                  f"{run['transformers_tokens_per_s']} tok/s, ratio {run['ratio_engine_over_transformers']}x, "
                  f"agreement {run['token_agreement_with_transformers']:.1%}", flush=True)
    if prefill_prompts:
        if progress:
            print(f"[bench engine] prefill: {prefill_prompts} prompts of 384-512 tokens ...", flush=True)
        results["prefill"] = bench_prefill(model, hf, prefill_prompts, seed, budget_mb << 20, pad, decode_attention)
    return results


def _llama_cpp_side_by_side(model_name: str, reqs: list[tuple[list[int], int]], threads: int, t_engine: float,
                            out_hf: list[list[int]], run: dict[str, Any]) -> None:
    """Batch 1 only (llama-cpp-python serves one sequence per context): its tok/s on the GGUF the model was
    converted from, in the same run, next to its agreement with fp32 ``generate()``."""
    from helios_ray.models.repository import ModelRepository

    try:
        gguf = str(ModelRepository().source_file(model_name))
    except Exception:  # noqa: BLE001 - a model without a GGUF source has no llama.cpp peer
        run["llama_cpp"] = "no GGUF source for this model"
        return
    from helios_bench import llama_cpp_peer

    got = llama_cpp_peer.run(gguf, reqs, threads)
    if "error" in got:
        run["llama_cpp"] = got["error"]
        return
    t_cpp, out_cpp = float(got["seconds"]), got["outputs"]
    n_tokens = sum(n for _, n in reqs)
    run["llama_cpp"] = {"gguf": Path(gguf).name, "tokens_per_s": round(n_tokens / t_cpp, 2), "seconds": round(t_cpp, 2),
                        "ratio_engine_over_llama_cpp": round(t_cpp / t_engine, 3),
                        "token_agreement_with_transformers": round(agreement(out_cpp, out_hf), 4)}


def bench_memory(model_name: str, budget_mb: int, depths: list[int], seq_len: int, block_size: int,
                 dtype: str = "auto") -> dict[str, Any]:
    """Admit as many ``seq_len``-token sequences as the scheduler will, at each depth, in one budget."""
    from helios_ray.models.early_exit import load_model

    model = load_model(model_name, depth=max(depths), exits="auto", dtype=dtype)
    out: dict[str, Any] = {"model": model_name, "budget_mb": budget_mb, "seq_len": seq_len, "block_size": block_size,
                           "dtype": _dtype_name(model), "depths": {}}
    for d in sorted(depths, reverse=True):
        model.set_depth(d)
        eng = LLMEngine(model, EngineConfig(memory_budget=budget_mb << 20, block_size=block_size,
                                            max_num_seqs=1 << 20, max_num_batched_tokens=1 << 40))
        limit = eng.max_concurrent(seq_len) + 1
        for _ in range(limit):
            eng.scheduler.add(_probe_sequence(seq_len))
        admitted, _ = eng.scheduler.schedule()
        out["depths"][d] = {
            "weight_bytes": model.param_bytes, "kv_bytes_per_token": eng.layout.bytes_per_token,
            "kv_blocks": eng.scheduler.blocks.num_blocks, "max_concurrent_sequences": len(admitted),
        }
    hi, lo = max(depths), min(depths)
    out["ratio_max_concurrency"] = round(out["depths"][lo]["max_concurrent_sequences"] /
                                         max(1, out["depths"][hi]["max_concurrent_sequences"]), 3)
    return out


def _probe_sequence(n: int):  # noqa: ANN202 - n prompt tokens: exactly n KV slots
    from helios_ray.engine.sequence import Sequence

    return Sequence([1] * n, SamplingParams(max_tokens=1))
