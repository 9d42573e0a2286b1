"""A request resumed from the tokens a dead replica had streamed continues exactly where it stopped: the same
greedy tokens, and streamed text that joins the part already sent without a gap or a repeat - also for
SentencePiece (Gemma), whose decoder drops the leading space of a sequence's first token."""

from __future__ import annotations

import pytest

from helios_ray.engine.config import EngineConfig
from helios_ray.engine.engine import LLMEngine
from helios_ray.engine.sequence import SamplingParams
from helios_ray.errors import InvalidRequestError
from helios_ray.models.early_exit import load_model

pytestmark = pytest.mark.slow
N = 16


def _run(eng: LLMEngine, ids: list[int], params: SamplingParams, resume: list[int] | None = None):
    seq = eng.add_request(ids, params, resume)
    events = []
    while eng.scheduler.has_work:
        events += [e for e in eng.step() if e.seq_id == seq.seq_id]
    return seq, events


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_resumed_stream_continues_the_uninterrupted_one(name):
    m = load_model(name, exits="shared", dtype="float32")
    eng = LLMEngine(m, EngineConfig(memory_budget="3GiB"))
    ids = m.encode("The history of the city of Rome, in brief:")
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    full, events = _run(eng, ids, params)
    text = "".join(e.text for e in events)
    assert len(full.output_ids) == N and " " in text
    for k in (1, 6, N - 1):
        seq, resumed = _run(eng, ids, params, full.output_ids[:k])
        assert seq.output_ids == full.output_ids  # the same greedy continuation
        assert [e.token for e in resumed] == full.output_ids[k:]
        sent_before = "".join(e.text for e in events[:k])
        assert sent_before + "".join(e.text for e in resumed) == text, k
        assert resumed[-1].finish_reason == "length"


def test_nothing_left_to_resume_is_refused():
    m = load_model("smollm2-135m", exits="shared", dtype="float32")
    eng = LLMEngine(m, EngineConfig(memory_budget="1GiB"))
    with pytest.raises(InvalidRequestError, match="nothing to resume"):
        eng.add_request(m.encode("Hi"), SamplingParams(max_tokens=2), [1, 2])
