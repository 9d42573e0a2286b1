"""bfloat16: chosen by ``auto`` only where the CPU has bf16 units, and close to the float32 model when used."""

from __future__ import annotations

import pytest
import torch

from helios_ray.dtypes import cpu_flags, cpu_has_bf16, serving_dtype
from helios_ray.engine.engine import EngineConfig, LLMEngine
from helios_ray.engine.sequence import SamplingParams
from helios_ray.models.early_exit import load_model
from helios_ray.models.loading import pick_dtype

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain recursion in one sentence.", "List three uses of copper and why it is chosen for each."]


def test_auto_dtype_follows_the_cpu_flags():
    assert cpu_has_bf16({"avx2", "avx512_bf16"}) and cpu_has_bf16({"amx_bf16"})
    assert not cpu_has_bf16({"avx2", "fma", "avx512f"})
    assert serving_dtype("auto", cuda=False, flags={"avx2"}) == "float32"
    assert serving_dtype("auto", cuda=False, flags={"amx_bf16"}) == "bfloat16"
    assert serving_dtype("auto", cuda=True, flags=set()) == "bfloat16"
    assert serving_dtype("float32", cuda=True) == "float32"
    assert cpu_flags("processor : 0\nflags : fpu avx2 fma\n") == {"fpu", "avx2", "fma"}
    expected = torch.bfloat16 if cpu_has_bf16() else torch.float32  # this host: no bf16 units -> float32
    assert pick_dtype("auto", torch.device("cpu")) == expected


@pytest.fixture(scope="module")
def pair():
    return load_model("smollm2-135m", exits="shared", dtype="float32"), \
        load_model("smollm2-135m", exits="shared", dtype="bfloat16")


def test_bf16_teacher_forced_top1_agreement_with_fp32(pair):
    """Each prompt plus the fp32 model's own 48-token greedy continuation, scored by both models in one forward:
    the share of continuation positions where bf16's argmax equals fp32's."""
    f32, b16 = pair
    assert b16.lm.dtype == torch.bfloat16 and b16.param_bytes * 2 == f32.param_bytes
    same = total = 0
    for q in QUESTIONS:
        ids = f32.encode(messages=[{"role": "user", "content": q}])
        cont = [t.token for t in f32.generate_stream(ids, 48)]
        seq = torch.tensor([ids + cont])
        pos = torch.arange(seq.shape[1])[None]
        a = f32.forward_exit(seq, pos, f32.new_cache(), last_only=False)[0, len(ids) - 1:-1].argmax(-1)
        b = b16.forward_exit(seq, pos, b16.new_cache(), last_only=False)[0, len(ids) - 1:-1].float().argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
    # measured 118/120 (98.3%) on an AVX512-BF16 host and 117/120 (97.5%) on an AMX host (its tiles round
    # differently); the bound leaves two tokens of margin below the lowest
    assert same / total >= 0.96, same / total


def test_the_engine_serves_bf16_with_bf16_kv(pair):
    _, b16 = pair
    eng = LLMEngine(b16, EngineConfig(memory_budget=1 << 30))
    assert eng.kv.dtype == torch.bfloat16 and eng.layout.dtype_bytes == 2
    s = eng.add_request(b16.encode(messages=[{"role": "user", "content": QUESTIONS[0]}]),
                        SamplingParams(max_tokens=8, temperature=0.0))
    while eng.scheduler.has_work:
        eng.step()
    assert "Paris" in s.text
