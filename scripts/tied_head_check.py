#!/usr/bin/env python3
"""Qwen2.5-Coder-0.5B loaded with one LM head (tied, the default) against both matrices as stored (untied):
parameter bytes, and the tied load's agreement with the untied one on held-out ShareGPT prompts - teacher-forced
(the tied model's greedy token at every position of the untied model's greedy answer) and free-running (answers
identical token for token).  The figures in docs/engine.md come from:

    python scripts/tied_head_check.py --prompts 48 --max-tokens 64 --dtype bfloat16 --json

(pass@1 of the tied load: `helios-ray quality qwen2.5-coder-0.5b --depths 24 --code 164 --code-max-tokens 256
--chat 0 --threads 1`; the untied load's is the shipped record, HELIOS_TIED_HEAD=untied reproduces it.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _load(name: str, how: str, dtype: str):  # noqa: ANN202
    from helios_ray.models.early_exit import load_model

    os.environ["HELIOS_TIED_HEAD"] = how
    return load_model(name, exits="shared", dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from helios_data import load_dataset

    from helios_ray.engine.sequence import SamplingParams
    from helios_ray.tuning.exit_eval import generate_greedy

    t0 = time.time()
    convs = load_dataset("sharegpt", split="heldout", limit=4 * a.prompts, seed=0)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0)
    out: dict = {"model": a.model, "dtype": a.dtype, "max_tokens": a.max_tokens}
    answers, models = {}, {}
    for how in ("untied", "tied"):
        m = _load(a.model, how, a.dtype)
        if how == "untied":  # the first --prompts held-out chats whose prompt fits 384 tokens, the same for both
            enc = {c.id: m.encode(messages=c.prompt_messages) for c in convs}
            keep = [k for k, ids in enc.items() if len(ids) <= 384][: a.prompts]
        reqs = {k: (enc[k], params) for k in keep}
        seqs = generate_greedy(m, reqs, batch=16)
        answers[how] = {k: list(s.output_ids) for k, s in seqs.items()}
        out[f"param_bytes_{how}"] = m.param_bytes
        models[how] = m if how == "tied" else None
        if how == "untied":
            ref_inputs = {k: reqs[k][0] for k in reqs}
            del m
    tied = models["tied"]
    same = total = exact = 0
    for k, ids in ref_inputs.items():
        ref = answers["untied"][k]
        if not ref:
            continue
        x = torch.tensor([ids + ref[:-1]])
        pos = torch.arange(x.shape[1])[None]
        with torch.no_grad():
            logits = tied.forward_exit(x, pos, tied.new_cache(), last_only=False)
        pred = logits[0, len(ids) - 1:].argmax(-1).tolist()
        same += sum(p == r for p, r in zip(pred, ref))
        total += len(ref)
        exact += answers["tied"][k] == ref
    out.update(prompts=len(ref_inputs), teacher_forced_agreement=round(same / total, 4), tokens=total,
               identical_answers=f"{exact}/{len(ref_inputs)}", seconds=round(time.time() - t0, 1),
               bytes_saved=out["param_bytes_untied"] - out["param_bytes_tied"])
    print(json.dumps(out, indent=2) if a.json else
          f"{a.model} {a.dtype}: parameters {out['param_bytes_untied'] / 1e9:.3f} GB untied -> "
          f"{out['param_bytes_tied'] / 1e9:.3f} GB tied; agreement {out['teacher_forced_agreement']:.2%} over "
          f"{total} tokens; identical answers {out['identical_answers']}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
