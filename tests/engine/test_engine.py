"""The continuous-batching engine: exactness, memory arithmetic, preemption, sampling, bad input, live depth."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError

from helios_ray.engine.engine import AsyncEngine, EngineConfig, LLMEngine
from helios_ray.engine.kv_cache import KVLayout
from helios_ray.engine.sampling import _filter
from helios_ray.engine.sequence import SamplingParams
from helios_ray.errors import HeliosError, InvalidRequestError
from helios_ray.models.early_exit import EarlyExitLM, load_model
from helios_ray.models.loading import load_decoder

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion in one sentence, please, for a child who is five years old.",
]
GREEDY = dict(temperature=0.0)


def run_all(eng: LLMEngine) -> None:
    while eng.scheduler.has_work:
        eng.step()


@pytest.fixture(scope="module")
def smol() -> EarlyExitLM:
    return load_model("smollm2-135m", exits="shared", dtype="float32")  # exact against transformers fp32


@pytest.fixture(scope="module")
def prompts(smol):
    return [smol.encode(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def tiny(tiny_dir, smol) -> EarlyExitLM:
    """A tiny random Llama with SmolLM2's tokenizer (its ids < 160 are valid SmolLM2 tokens)."""
    d, _ = tiny_dir("llama")
    lm, _ = load_decoder(d)
    return EarlyExitLM("tiny", lm, {}, smol.tokenizer, ckpt_dir=d)


def test_batched_greedy_equals_transformers_generate(smol, prompts, smollm2_dir):
    from transformers import AutoModelForCausalLM

    eng = LLMEngine(smol, EngineConfig(memory_budget=1 << 30, block_size=4))
    seqs = [eng.add_request(p, SamplingParams(max_tokens=16, **GREEDY)) for p in prompts]
    run_all(eng)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    for s, p in zip(seqs, prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
        assert s.output_ids == ref[: len(s.output_ids)]
        assert len(s.output_ids) == 16 or s.output_ids[-1] in smol.eos_ids
    assert "Paris" in seqs[0].text
    assert eng.scheduler.blocks.num_used == 0  # everything freed


def test_admission_follows_the_byte_arithmetic(smol):
    budget = 1 << 30
    admitted = {}
    for depth in (30, 20):
        smol.set_depth(depth)
        eng = LLMEngine(smol, EngineConfig(memory_budget=budget, max_num_seqs=10_000,
                                           max_num_batched_tokens=10**9))
        layout = eng.layout
        assert layout.bytes_per_token == depth * 2 * 3 * 64 * 4
        blocks = (budget - smol.param_bytes) // (16 * layout.bytes_per_token)
        assert eng.scheduler.blocks.num_blocks == blocks
        for _ in range(200):
            eng.add_request([1] * 512, SamplingParams(max_tokens=1))
        batch, prefill = eng.scheduler.schedule()
        assert prefill
        admitted[depth] = len(batch)
        assert len(batch) == blocks // 32 == eng.max_concurrent(512)
    smol.set_depth(30)
    assert admitted[20] > admitted[30]


def test_preemption_under_a_tight_budget_loses_nothing(tiny):
    params = SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY)
    prompts = [[5 + i, 17, 99, 3, 42, 7, 150, 8 + i] for i in range(6)]
    roomy = LLMEngine(tiny, EngineConfig(memory_budget=tiny.param_bytes + (1 << 24), block_size=4))
    ref = [roomy.add_request(p, params) for p in prompts]
    run_all(roomy)
    layout = KVLayout(tiny.depth, tiny.spec.num_kv_heads, tiny.spec.head_dim, 4, 4)
    # room for 24 blocks = 96 tokens; six sequences of 32 tokens need 48 blocks -> preemption must happen
    tight = LLMEngine(tiny, EngineConfig(memory_budget=tiny.param_bytes + 24 * layout.bytes_per_block,
                                         block_size=4))
    got = [tight.add_request(p, params) for p in prompts]
    run_all(tight)
    assert tight.totals.preemptions > 0
    assert [s.output_ids for s in got] == [s.output_ids for s in ref]
    assert all(s.finish_reason == "length" for s in got)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    eng = LLMEngine(tiny, EngineConfig(memory_budget=tiny.param_bytes + (1 << 24)))
    p = [5, 17, 99, 3]
    mk = lambda **kw: eng.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True, **kw))  # noqa: E731
    a, b, c = mk(temperature=1.5, seed=7), mk(temperature=1.5, seed=7), mk(temperature=1.5, seed=8)
    g, k1 = mk(temperature=0.0), mk(temperature=1.0, top_k=1)
    run_all(eng)
    assert a.output_ids == b.output_ids != c.output_ids
    assert g.output_ids == k1.output_ids


@pytest.mark.parametrize("temperature, top_p", [(1e-30, 1.0), (5e-324, 1.0), (1e-6, 1.0), (1.0, 1e-300),
                                                 (2.0, 5e-324)])
def test_a_tiny_temperature_or_top_p_samples_greedily_instead_of_failing_the_batch(temperature, top_p):
    """Found by the fuzz run: 5e-324 is a valid temperature, 0 in float32, and logits / T was 0/0 = NaN; a top_p of
    1e-300 is 0 in float32 and dropped even the top token.  Either failed the whole batch's step, batch-mates
    included.  The limit of sampling as T -> 0 (or top_p -> 0) is greedy."""
    from helios_ray.engine.sampling import sample
    from helios_ray.engine.sequence import Sequence

    logits = torch.tensor([[0.1, 3.0, -2.0, 2.9], [1.0, 0.0, 5.0, 4.0]])
    seqs = [Sequence(prompt_ids=[1], params=SamplingParams(temperature=temperature, top_p=top_p, seed=s))
            for s in (1, 2)]
    assert sample(logits, seqs) == [1, 2]


def test_prefault_makes_the_kv_pool_resident_at_allocation():
    """EngineConfig.prefault_kv: the pool's pages are resident when it is allocated (flat RSS from the start),
    where the default leaves them to be committed as tokens are written.  Measured in a fresh process: in this one,
    memory freed by earlier tests can be handed out again already resident."""
    import subprocess
    import sys

    code = """
import sys, psutil, torch
from helios_ray.engine.kv_cache import KVLayout, PagedKVCache
layout = KVLayout(num_kv_layers=1, num_kv_heads=8, head_dim=128, block_size=16, dtype_bytes=4)
kv = PagedKVCache(layout, (256 << 20) // (16 * 8 * 128 * 4 * 2), torch.device("cpu"), torch.float32,
                  prefault=sys.argv[1] == "1")
before = psutil.Process().memory_info().rss
kv._pool("layer0")
print(psutil.Process().memory_info().rss - before)
"""
    grown = {p: int(subprocess.run([sys.executable, "-c", code, str(int(p))], capture_output=True, text=True,
                                   check=True, timeout=120).stdout.split()[-1]) for p in (False, True)}
    assert grown[True] > 240 << 20 and grown[False] < 32 << 20, grown


def test_top_p_and_top_k_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(_filter(logits.clone(), 0, 0.7))
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7 so the second token is needed
    kept = torch.isfinite(_filter(logits.clone(), 3, 1.0))
    assert kept.tolist() == [True, True, True, False]


def test_stop_strings_truncate_and_finish(smol, prompts):
    eng = LLMEngine(smol, EngineConfig(memory_budget=1 << 30))
    s = eng.add_request(prompts[0], SamplingParams(max_tokens=16, stop=[" Paris"], **GREEDY))
    run_all(eng)
    assert s.finish_reason == "stop" and s.text == "The capital of France is"


def test_bad_requests_are_rejected_and_the_engine_keeps_serving(tiny):
    eng = LLMEngine(tiny, EngineConfig(memory_budget=tiny.param_bytes + (1 << 22), max_model_len=64))
    with pytest.raises(InvalidRequestError, match="exceeds the maximum context of 64"):
        eng.add_request([1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(InvalidRequestError, match=r"\[0, 160\)"):
        eng.add_request([1, 999], SamplingParams())
    for bad in ({"max_tokens": 0}, {"temperature": -0.1}, {"top_p": 0}, {"frequency_boost": 1}, {"stop": [""]}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
    small = LLMEngine(tiny, EngineConfig(memory_budget=tiny.param_bytes + 2 * 4 * 16 * 5 * 2 * 2 * 16))
    with pytest.raises(InvalidRequestError, match="KV blocks"):
        small.add_request([1] * 40, SamplingParams(max_tokens=40))
    with pytest.raises(HeliosError, match="does not hold the weights"):
        LLMEngine(tiny, EngineConfig(memory_budget=tiny.param_bytes))
    ok = eng.add_request([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    run_all(eng)
    assert len(ok.output_ids) == 3


def test_async_streaming_cancellation_frees_blocks(tiny):
    eng = LLMEngine(tiny, EngineConfig(memory_budget=tiny.param_bytes + (1 << 22), block_size=4))
    aeng = AsyncEngine(eng)

    async def main():
        async def full(p):
            return [ev async for ev in aeng.generate(p, SamplingParams(max_tokens=10, ignore_eos=True))]

        async def cancel_after_two():
            n = 0
            async for _ in aeng.generate([9, 8, 7, 6, 5], SamplingParams(max_tokens=100, ignore_eos=True)):
                n += 1
                if n == 2:
                    break
            return n

        outs = await asyncio.gather(full([1, 2, 3]), full([4, 5, 6, 7]), cancel_after_two())
        await asyncio.sleep(0.2)
        free = await aeng.run(lambda: eng.scheduler.blocks.num_free)
        return outs, free

    try:
        (a, b, n), free = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert n == 2
    assert [len(a), len(b)] == [10, 10] and a[-1].finished and a[-1].finish_reason == "length"
    assert all(ev.exit_layer == tiny.depth for ev in a)
    assert free == eng.scheduler.blocks.num_blocks


def test_live_depth_change_keeps_every_request(tiny):
    eng = LLMEngine(tiny, EngineConfig(memory_budget=tiny.param_bytes + (1 << 22), block_size=4))
    seqs = [eng.add_request([3 + i, 1, 4, 1, 5], SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
            for i in range(4)]
    for _ in range(4):
        eng.step()
    blocks_full = eng.scheduler.blocks.num_blocks
    change = eng.set_depth(2)
    assert change.preempted == 4 and change.new_depth == 2 and change.pause_seconds >= change.load_seconds
    assert eng.scheduler.blocks.num_blocks > blocks_full  # fewer layers -> more KV blocks in the same budget
    run_all(eng)
    assert all(len(s.output_ids) == 12 and s.finish_reason == "length" for s in seqs)
    grow = eng.set_depth(tiny.spec.num_layers)
    assert grow.load_seconds > 0 and eng.scheduler.blocks.num_blocks == blocks_full


def _outputs(model: EarlyExitLM, prompts: list[list[int]], **cfg) -> list[list[int]]:
    eng = LLMEngine(model, EngineConfig(memory_budget=model.param_bytes + (1 << 26), block_size=4, **cfg))
    seqs = [eng.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)) for p in prompts]
    run_all(eng)
    assert eng.scheduler.blocks.num_used == 0
    return [s.output_ids for s in seqs]


def test_chunked_prefill_equals_unchunked(smol, prompts):
    """16-token chunks (prompts are 30-45 tokens: 2-3 chunks each, mixed with other rows' decode tokens) give
    the same greedy tokens as whole-prompt packed steps and as the old one-forward-per-prompt steps."""
    old = _outputs(smol, prompts, chunked_prefill=False)
    assert _outputs(smol, prompts) == old
    assert _outputs(smol, prompts, max_num_batched_tokens=16) == old


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_chunked_prefill_equals_unchunked_other_families(tiny_dir, smol, family):
    """Sliding-window attention (Gemma 3, window 5) and biases (Qwen2) through packed, chunked steps."""
    d, _ = tiny_dir(family)
    lm, _ = load_decoder(d)
    m = EarlyExitLM(family, lm, {}, smol.tokenizer, ckpt_dir=d)
    prompts = [[(7 * i + j) % 150 + 3 for j in range(20 + 9 * i)] for i in range(4)]
    old = _outputs(m, prompts, chunked_prefill=False)
    assert _outputs(m, prompts) == old
    assert _outputs(m, prompts, max_num_batched_tokens=16) == old


def test_a_long_prompt_does_not_stall_decoding(tiny):
    """While a 100-token prompt is prefilled in 16-token chunks, the running sequence gets a token every step."""
    eng = LLMEngine(tiny, EngineConfig(memory_budget=tiny.param_bytes + (1 << 24), block_size=4,
                                       max_num_batched_tokens=16))
    first = eng.add_request([5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY))
    eng.step()
    long = eng.add_request([(3 * i) % 150 + 2 for i in range(100)],
                           SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    steps_until_long_token = 0
    while not long.output_ids:
        n = len(first.output_ids)
        eng.step()
        steps_until_long_token += 1
        assert len(first.output_ids) == n + 1  # decoding went on during the prefill
    assert steps_until_long_token == 7  # ceil(100 / 15): 15 prompt tokens + 1 decode token per step
    assert all(s.prefill for s in list(eng.totals.recent)[-7:])
    run_all(eng)
