"""Teacher-forced top-1 agreement with the fp32 model: bf16; int8 and int4 weights with bf16 activations; int8
and int4 with fp32 activations.

Run: PYTHONPATH=. python scripts/quant_vs_fp32.py   (SmolLM2-135M, 1 thread, 8 chat prompts, 48 fp32 greedy tokens
each, scored by every model in one forward).  Separates the quantized weights' error from the bf16 activations'.
"""
import json

import torch

from helios_ray.models.early_exit import EarlyExitLM, load_model
from helios_ray.models.loading import load_decoder

torch.set_num_threads(1)
f32 = load_model("smollm2-135m", exits="shared", dtype="float32")
b16 = load_model("smollm2-135m", exits="shared", dtype="bfloat16")
q8 = load_model("smollm2-135m", exits="shared", dtype="int8")  # int8/bfloat16 on bf16 CPUs
q4 = load_model("smollm2-135m", exits="shared", dtype="int4")
lm, _ = load_decoder(f32.ckpt_dir, dtype=torch.float32, weights="int8")
q8f = EarlyExitLM("int8/float32", lm, {}, f32.tokenizer)
lm, _ = load_decoder(f32.ckpt_dir, dtype=torch.float32, weights="int4")
q4f = EarlyExitLM("int4/float32", lm, {}, f32.tokenizer)
Q = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one sentence.",
     "List three uses of copper and why it is chosen for each.", "How do I reverse a list in Python?",
     "Give me a recipe for pancakes.", "What causes the seasons on Earth?",
     "Summarize the plot of Hamlet in two sentences."]
models = {"bf16": b16, "int8/bf16": q8, "int8/fp32": q8f, "int4/bf16": q4, "int4/fp32": q4f}
res = {k: [0, 0] for k in models}
for i, q in enumerate(Q):
    ids = f32.encode(messages=[{"role": "user", "content": q}])
    cont = [t.token for t in f32.generate_stream(ids, 48)]
    seq = torch.tensor([ids + cont])
    pos = torch.arange(seq.shape[1])[None]
    a = f32.forward_exit(seq, pos, f32.new_cache(), last_only=False)[0, len(ids) - 1:-1].argmax(-1)
    for k, m in models.items():
        b = m.forward_exit(seq, pos, m.new_cache(), last_only=False)[0, len(ids) - 1:-1].float().argmax(-1)
        res[k][0] += int((a == b).sum())
        res[k][1] += a.numel()
    if i == 3:
        print("first 4 prompts (the test's):", json.dumps(res), flush=True)
print("all 8 prompts:", json.dumps(res))
