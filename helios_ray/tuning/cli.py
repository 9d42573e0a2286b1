"""``helios-ray tune-exits`` and ``helios-ray eval-exits``: argument parsing only.

This module is imported whenever the CLI parser is built, so it must stay light: torch and the tuner are
imported inside the ``run`` functions.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name (see `helios-ray models`)")
    p.add_argument("--exits", required=True,
                   help="exit layers, e.g. 12,16,20,24; D:KIND sets one exit's head kind (e.g. 16:linear,20,24); "
                        "D:healed (or D:healedK) heals the last K layers of a model truncated at D")
    p.add_argument("--data", default="sharegpt",
                   help="sharegpt, humaneval or a JSONL file of {text}/{messages}/{prompt,kind} records")
    p.add_argument("--tokens", type=int, default=140_000, help="training tokens to cache (default 140000)")
    p.add_argument("--head", default="block", choices=["linear", "block", "healed"], help="head kind (default block)")
    p.add_argument("--heal-layers", type=int, default=2,
                   help="layers a healed exit fine-tunes below D (default 2; D:healedK overrides per exit)")
    p.add_argument("--heal-rank", type=int, default=32, help="rank of a healed layer's low-rank deltas (default 32)")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="teacher pass and training compute (auto: bfloat16 on CPUs with bf16 units, ~3x faster)")
    p.add_argument("--rank", type=int, default=None, help="low-rank size of linear heads (default: square)")
    p.add_argument("--out", default=None,
                   help="output folder for exits.safetensors + exits.json (default: the cache, "
                        "~/.cache/helios-ray/exits/MODEL, which the runtime loads automatically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per head (default: from the epochs)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the cache for block heads (default 3)")
    p.add_argument("--linear-epochs", type=float, default=1.0, help="passes over the cache for linear heads (default 1)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (cache and finished heads)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training row (a block head attends over it)")
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--topk", type=int, default=32, help="teacher distribution kept per token")
    p.add_argument("--ce-weight", type=float, default=0.0, help="extra cross-entropy to the final argmax")
    p.add_argument("--vocab", default="sampled", choices=["sampled", "full"],
                   help="softmax over the batch's teacher tokens + random negatives (fast) or the full vocabulary")
    p.add_argument("--negatives", type=int, default=4096)
    p.add_argument("--block-init", default="last-zero", choices=["last-zero", "next-zero", "next"],
                   help="block head start: the last layer / layer D with zeroed output projections (= the logit "
                        "lens), or an exact copy of layer D (next)")
    p.add_argument("--eval-conversations", type=int, default=100, help="held-out conversations for the exit card")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per held-out conversation")
    p.add_argument("--eval-stride", type=int, default=2,
                   help="score every n-th held-out position (the head still sees every position)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the stored heads (bfloat16 halves the file; the card measures the stored heads)")
    p.add_argument("--cache-dtype", default="auto", choices=["auto", "float16", "float32"],
                   help="storage of cached hidden states (auto: float16 unless the activations need float32)")
    p.add_argument("--work-dir", default=None, help="cache folder (default ~/.cache/helios-ray/tuning/MODEL-HASH)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the exit card as JSON")
    p.add_argument("--models-file")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from helios_ray.tuning import run as tuning
    from helios_ray.tuning.config import TuneConfig, parse_exits

    tuning.environment_threads(args.threads)
    cfg = TuneConfig(
        model=args.model, exits=parse_exits(args.exits, args.head, args.rank, args.heal_layers, args.heal_rank),
        data=args.data, compute_dtype=args.compute_dtype,
        tokens=args.tokens, seq_len=args.seq_len, topk=args.topk, steps=args.steps, epochs=args.epochs,
        linear_epochs=args.linear_epochs,
        batch_tokens=args.batch_tokens, lr=args.lr, ce_weight=args.ce_weight, vocab=args.vocab,
        negatives=args.negatives, block_init=args.block_init, seed=args.seed,
        eval_conversations=args.eval_conversations, eval_seq_len=args.eval_seq_len,
        eval_stride=args.eval_stride, cache_dtype=args.cache_dtype,
        out=Path(args.out) if args.out else None, work_dir=Path(args.work_dir) if args.work_dir else None,
        resume=args.resume, save_dtype=args.save_dtype, models_file=args.models_file,
        progress=not args.no_progress,
        command="helios-ray tune-exits " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 2 and sys.argv[1] == "tune-exits" else None,
    )
    card = tuning.tune_exits(cfg)
    if args.json:
        print(json.dumps(card, indent=2))
    else:
        print(tuning.card_table(card))
    return 0


# --------------------------------------------------------------------------------------------- eval
def eval_configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name")
    p.add_argument("--prompts", required=True,
                   help="JSONL of {prompt, kind?, chat?} (or {text}/{messages}) records; 'sharegpt'/'humaneval' also work")
    p.add_argument("--max-tokens", type=int, default=16, help="greedy tokens generated per prompt")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--exits", default=None, help="exit layers to evaluate (default: every trained exit)")
    p.add_argument("--heads", default=None, help="exit heads file (default: the model's registered/shipped heads)")
    p.add_argument("--split", default="all", choices=["all", "heldout", "train"],
                   help="restrict the prompts to one side of the train/held-out hash split")
    p.add_argument("--humaneval", type=int, default=10, metavar="N",
                   help="also report HumanEval pass@1 on the first N problems (default 10; 0 disables): greedy raw "
                        "completion of each prompt, its tests run in a sandboxed subprocess")
    p.add_argument("--pass-at-1-depths", default=None,
                   help="depths for pass@1 (default: the evaluated exits); full depth is always included")
    p.add_argument("--humaneval-max-tokens", type=int, default=256, help="token limit per completion (default 256)")
    p.add_argument("--humaneval-timeout", type=float, default=10.0, help="seconds per test program (default 10)")
    p.add_argument("--update-card", action="store_true",
                   help="write the measured pass@1 per depth into the exit card next to the heads file, where the "
                        "policy reads it (PolicyConfig.guard_metric: pass_at_1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--models-file")


def eval_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from helios_ray.tuning.exit_eval import evaluate_exits, report_table
    from helios_ray.tuning.run import environment_threads
    from helios_ray.tuning.config import parse_exits

    environment_threads(args.threads)
    exits = [e.depth for e in parse_exits(args.exits, "block")] if args.exits else None
    report = evaluate_exits(
        args.model, args.prompts, max_tokens=args.max_tokens, limit=args.limit, exits=exits,
        heads_path=Path(args.heads) if args.heads else None, split=args.split, models_file=args.models_file,
        progress=not args.no_progress, humaneval=args.humaneval,
        pass_at_1_depths=[e.depth for e in parse_exits(args.pass_at_1_depths, "block")] if args.pass_at_1_depths else None,
        humaneval_max_tokens=args.humaneval_max_tokens, humaneval_timeout=args.humaneval_timeout,
    )
    if args.update_card:
        from helios_ray.tuning.exit_eval import update_card

        path = update_card(report, "helios-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        print(f"updated {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report_table(report))
    return 0
