"""Record the real per-token traces under tests/data/traces/ (profile mode, bundled models).

    python scripts/record_traces.py --out tests/data/traces/chat_then_code.jsonl

Requests 0..N-1 are held-out ShareGPT chats, N..2N-1 HumanEval code prompts: a workload shift half-way, on
every candidate, so the simulator can replay placements, extends and switches on real exit behaviour.
"""

from __future__ import annotations

import argparse
import json

import torch

from helios_data import load_humaneval, load_sharegpt
from helios_ray.models.early_exit import load_model
from helios_ray.tuning.profiling import profile_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(1)
    chats = load_sharegpt(limit=a.per_kind, seed=0, split="heldout", min_len=8, max_len=600)
    code = load_humaneval(limit=a.per_kind)
    prompts = [{"request": i, "kind": "chat", "prompt": c.prompt, "messages": c.prompt_messages}
               for i, c in enumerate(chats)]
    prompts += [{"request": a.per_kind + i, "kind": "code", "prompt": c.prompt} for i, c in enumerate(code)]
    records = []
    for name in a.models.split(","):
        model = load_model(name, exits="all")
        records += profile_prompts(model, prompts, a.max_tokens, progress=True)
    records.sort(key=lambda r: (r["request"], r["model"], r["type"] == "request", r.get("pos", 0)))
    with open(a.out, "w") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    print(f"wrote {len(records)} records to {a.out}")


if __name__ == "__main__":
    main()
