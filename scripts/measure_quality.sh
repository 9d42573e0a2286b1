#!/usr/bin/env bash
# The quality records shipped in helios_ray/assets/exits/<model>/quality.json (docs/quality.md): every bundled model
# at the depths it can be served at, HumanEval pass@1 on all 164 problems and the chat score under the reference on
# 40 held-out ShareGPT prompts.  (The shipped chat scores of the first run were re-scored from the saved answers by
# scripts/rescore_chat.py when the chat score became the overlap with the reference's answer; this script, run
# today, measures that score directly.)  One torch thread (the other core stays free); each command merges its depths into
# the record, so the script can be stopped and resumed model by model.  ~1 h on a 2-core host.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT=helios_ray/assets/exits
q() { "$PY" -m helios_ray.cli quality "$1" --depths "$2" --code 164 --code-max-tokens 256 --chat 40 \
        --chat-max-tokens 64 --threads 1 --no-progress --out "$OUT/$1" --answers "/tmp/quality-answers-$1-$2.json"; }
q qwen2.5-coder-0.5b 24,22
q smollm2-135m 30,24,20,16,12
q gemma3-270m 18,16,14,12
q qwen2.5-coder-0.5b 20,18
