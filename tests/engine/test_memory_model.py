"""One memory model: the engine's admission, the policy's planning and the benches agree for the same inputs."""

from __future__ import annotations

import pytest

from helios_ray import memory
from helios_ray.dtypes import serving_dtype
from helios_bench.harness import max_concurrency
from helios_ray.control.config import Hardware, PolicyConfig
from helios_ray.control.costs import max_batch
from helios_ray.engine.engine import EngineConfig, LLMEngine
from helios_ray.engine.sequence import SamplingParams, Sequence
from helios_ray.models.early_exit import load_model
from helios_ray.tuning.profiling import candidate_info
from helios_ray.models.quant import Int4Linear, QuantLinear
from helios_ray.models.repository import ModelRepository

BUDGET, SEQ, BLOCK = 1 << 30, 512, 16


@pytest.fixture(scope="module", params=["float32", "int8", "int4"])
def smol_exits(request):
    # the shipped exit head at 20 (a block head); int8/int4: quantized layers + tied head, KV at the activation dtype
    return load_model("smollm2-135m", depth=20, exits="auto", dtype=request.param), request.param


def test_engine_policy_and_bench_agree(smol_exits):
    m, dtype = smol_exits
    cand = candidate_info(ModelRepository(), "smollm2-135m", serving_dtype(dtype, cuda=False))
    for depth in (20, 30):
        m.set_depth(depth)  # growing a quantized model quantizes the new layers: the same bytes per layer
        if m.lm.quant:
            assert all(isinstance(layer.mlp.down, (QuantLinear, Int4Linear)) for layer in m.lm.layers)
        fp = m.footprint
        # the policy's candidate metadata (from checkpoint shapes + exit card) prices the same bytes
        assert cand.footprint(depth) == fp, depth
        eng = LLMEngine(m, EngineConfig(memory_budget=BUDGET, block_size=BLOCK, max_num_seqs=10_000,
                                        max_num_batched_tokens=10**9))
        assert eng.scheduler.blocks.num_blocks == fp.kv_blocks(BUDGET, BLOCK)
        for _ in range(eng.max_concurrent(SEQ) + 5):
            eng.scheduler.add(Sequence([1] * SEQ, SamplingParams(max_tokens=1)))
        admitted = len(eng.scheduler.schedule()[0])
        stats = {"weight_bytes": fp.weight_bytes, "kv_bytes_per_token": fp.kv_bytes_per_token}
        assert admitted == fp.max_sequences(BUDGET, SEQ, BLOCK) == max_concurrency(stats, BUDGET, SEQ, BLOCK)
        planned = max_batch(cand, depth, Hardware(memory_budget_bytes=BUDGET), PolicyConfig(typical_seq_len=SEQ))
        assert planned == fp.max_sequences(BUDGET, SEQ)  # token granularity: >= the whole-block count
        assert admitted <= planned <= admitted + BLOCK
    m.set_depth(20)


def test_a_block_exit_head_costs_a_layer_of_kv_in_every_copy():
    kinds = ModelRepository().info("smollm2-135m").exits.kinds
    assert kinds.get(20) == "block"
    cand = candidate_info(ModelRepository(), "smollm2-135m")
    per_layer = memory.kv_bytes_per_token(1, 3, 64, "float32")
    assert cand.kv_bytes_per_token(20) == 21 * per_layer and cand.kv_bytes_per_token(30) == 30 * per_layer


def test_int8_prices_weights_at_a_byte_and_kv_at_the_activation_dtype():
    act = serving_dtype("auto", cuda=False)
    cand = candidate_info(ModelRepository(), "smollm2-135m", act)
    cand8 = candidate_info(ModelRepository(), "smollm2-135m", serving_dtype("int8", cuda=False))
    for d in (20, 30):
        a, b = cand.footprint(d), cand8.footprint(d)
        assert b.kv_bytes_per_token == a.kv_bytes_per_token  # KV and exit heads stay at the activation dtype
        # about half of bf16 (a quarter of fp32): int8 matrices + scales; the exit head at 20 stays float
        assert b.weight_bytes < a.weight_bytes * (0.53 if act == "bfloat16" else 0.28), (d, b, a)
    assert cand8.flops_per_token_per_layer == cand.flops_per_token_per_layer


def test_bf16_halves_every_size():
    cand32 = candidate_info(ModelRepository(), "smollm2-135m", "float32")
    cand16 = candidate_info(ModelRepository(), "smollm2-135m", "bfloat16")
    for d in (20, 30):
        a, b = cand32.footprint(d), cand16.footprint(d)
        assert (b.weight_bytes * 2, b.kv_bytes_per_token * 2) == (a.weight_bytes, a.kv_bytes_per_token)
    assert cand16.flops_per_token_per_layer == cand32.flops_per_token_per_layer


def test_footprint_arithmetic():
    parts = memory.ModelParts(num_layers=10, embed_bytes=100, layer_bytes=10, head_bytes=5,
                              kv_bytes_per_token_per_layer=2, exit_head_bytes=7, exit_head_attends=True)
    assert memory.footprint(parts, 10) == memory.Footprint(100 + 100 + 5, 20)
    assert memory.footprint(parts, 4) == memory.Footprint(100 + 40 + 5 + 7, 10)
    fp = memory.Footprint(1000, 10)
    assert fp.kv_blocks(1000 + 16 * 10 * 3 + 5, 16) == 3
    assert fp.max_sequences(1000 + 16 * 10 * 3, 20, 16) == 1 and fp.max_sequences(1000 + 16 * 10 * 3, 20) == 2
    assert fp.max_sequences(999, 20) == 0
    with pytest.raises(ValueError):
        memory.dtype_bytes("int4")
