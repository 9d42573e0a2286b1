"""Token-level early exit in the batched engine (the full-depth baseline ``bench serve`` compares against).

Each token leaves at its first confident exit; the rows that exited drop out of the rest of the batch and their
KV above the exit is filled by state propagation. The extremes have exact oracles: nothing confident = the full
model, everything confident = the model truncated at the first exit. In between, a request's output must not
depend on which other requests share its batch.
"""

from __future__ import annotations

import pytest

from helios_ray.engine.engine import EngineConfig, LLMEngine
from helios_ray.engine.sequence import SamplingParams
from helios_ray.errors import HeliosError
from helios_ray.models.early_exit import EarlyExitLM, load_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and say why they are prime.",
]
EXITS = [20, 24]  # SmolLM2's shipped block heads
N = 20


@pytest.fixture(scope="module")
def ee() -> EarlyExitLM:
    return load_model("smollm2-135m", token_exits=EXITS, dtype="float32")


@pytest.fixture(scope="module")
def prompts(ee):
    return [ee.encode(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]


def _run(model: EarlyExitLM, prompts: list[list[int]], threshold: float, poison: bool = False
         ) -> list[tuple[list[int], list[int]]]:
    """(output ids, exit layers) per prompt, all prompts in one batch.  ``poison`` fills every KV slot with NaN
    first, so reading a slot nobody wrote (a skipped layer without state propagation) poisons the output."""
    model.threshold = threshold
    eng = LLMEngine(model, EngineConfig(memory_budget=700 << 20, block_size=4))
    if poison:
        keys = list(range(model.depth)) + [h.cache_key for h in model.serving_heads if h.kind == "block"]
        for key in keys:
            k, v = eng.kv._pool(key)
            k.fill_(float("nan"))
            v.fill_(float("nan"))
    seqs = {eng.add_request(p, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)).seq_id: i
            for i, p in enumerate(prompts)}
    out: list[tuple[list[int], list[int]]] = [([], []) for _ in prompts]
    while eng.scheduler.has_work:
        for ev in eng.step():
            if ev.token is not None:
                out[seqs[ev.seq_id]][0].append(ev.token)
                out[seqs[ev.seq_id]][1].append(ev.exit_layer)
                assert ev.confidence == ev.confidence, "NaN confidence: a KV slot was read before it was written"
                if ev.exit_layer < model.depth:
                    assert ev.confidence >= threshold and not ev.breach
    assert eng.scheduler.blocks.num_used == 0
    return out


def test_token_exit_kv_layout_counts_the_block_heads(ee):
    eng = LLMEngine(ee, EngineConfig(memory_budget=1 << 30))
    assert ee.depth == 30 and ee.token_exits == EXITS
    assert eng.layout.num_kv_layers == 32  # 30 layers + 2 block heads that attend
    assert ee.param_bytes > load_model("smollm2-135m", exits="shared", dtype="float32").param_bytes


def test_nothing_confident_equals_the_full_model(ee, prompts):
    full = load_model("smollm2-135m", exits="shared", dtype="float32")
    got = _run(ee, prompts, threshold=1.0 + 1e-6)  # above any probability: every token reaches layer 30
    ref = _run(full, prompts, threshold=0.9)
    assert [o for o, _ in got] == [o for o, _ in ref]
    assert all(set(layers) == {30} for _, layers in got)


def test_everything_confident_equals_the_model_truncated_at_the_first_exit(ee, prompts):
    at20 = load_model("smollm2-135m", 20, dtype="float32")
    assert at20.exit_head.kind == "block"
    got = _run(ee, prompts, threshold=1e-9)
    ref = _run(at20, prompts, threshold=0.9)
    assert [o for o, _ in got] == [o for o, _ in ref]
    assert all(set(layers) == {20} for _, layers in got)


def test_mixed_exits_do_not_depend_on_the_batch(ee, prompts):
    batched = _run(ee, prompts, threshold=0.6)
    alone = [_run(ee, [p], threshold=0.6)[0] for p in prompts]
    assert batched == alone
    layers = [x for _, ls in batched for x in ls]
    assert {20, 30} <= set(layers), layers  # a real mix: some tokens exit early, some go all the way


def test_skipped_layers_get_their_kv_by_state_propagation(ee, prompts):
    """Every slot attention reads was written: with NaN-filled pools the output is unchanged."""
    assert _run(ee, prompts, threshold=0.6, poison=True) == _run(ee, prompts, threshold=0.6)


def test_token_exits_need_trained_heads_below_the_depth():
    with pytest.raises(HeliosError, match="no trained exit head at \\[13\\]"):
        load_model("smollm2-135m", token_exits=[13])
    with pytest.raises(HeliosError, match="below depth 20"):
        load_model("smollm2-135m", 20, token_exits=[24])
