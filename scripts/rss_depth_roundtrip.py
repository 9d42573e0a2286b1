#!/usr/bin/env python3
"""RSS of one Qwen2.5-Coder-0.5B engine (bf16, 3 GiB, KV prefaulted) across three 24 -> 22 -> 24 depth round trips,
and the time for the same requests: the figures in docs/security.md ("Every depth change left ~200 MB behind").

    python scripts/rss_depth_roundtrip.py                               # with the engine's malloc_trim
    MALLOC_MMAP_THRESHOLD_=65536 python scripts/rss_depth_roundtrip.py  # the alternative measured beside it
"""
import os, sys, time, psutil, torch
torch.set_num_threads(1)
from helios_ray.models.early_exit import load_model
from helios_ray.engine.engine import EngineConfig, LLMEngine
from helios_ray.engine.sequence import SamplingParams
from helios_data import load_dataset
m = load_model("qwen2.5-coder-0.5b", dtype="bfloat16")
eng = LLMEngine(m, EngineConfig(memory_budget=3 << 30, max_num_seqs=16, prefault_kv=True))
convs = load_dataset("sharegpt", split="heldout", limit=64, seed=0)
P = psutil.Process()
def run(n):
    for c in convs[:n]:
        ids = m.encode(messages=c.prompt_messages)[:300]
        eng.add_request(ids, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    while eng.scheduler.has_work: eng.step()
out=[]; t0=time.time()
run(16); out.append(("24 warm", P.memory_info().rss >> 20))
for i in range(3):
    eng.set_depth(22); run(16); out.append((f"22 #{i}", P.memory_info().rss >> 20))
    eng.set_depth(24); run(16); out.append((f"24 #{i}", P.memory_info().rss >> 20))
print(os.environ.get("MALLOC_MMAP_THRESHOLD_", "default"), round(time.time()-t0,1), "s", out)
