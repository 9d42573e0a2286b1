"""A base model (Gemma 3 270M, no chat template) serving a chat request answers one turn and stops.

The reference run without the encoder's stop strings shows what the model would otherwise do - invent the
user's next turn - so this test fails if the turn-marker stops are lost anywhere between the prompt encoder
and the engine's streamed text.
"""

from __future__ import annotations

import pytest

from helios_ray.engine.config import EngineConfig
from helios_ray.engine.engine import LLMEngine
from helios_ray.engine.sequence import SamplingParams
from helios_ray.models.early_exit import load_model
from helios_ray.models.prompts import PLAIN_TURN_STOPS
from helios_ray.serve.replica import prepare
from helios_ray.serve.schemas import GenerateCall

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Why do cats purr?"}]
MAX_TOKENS = 64


def test_gemma_chat_stops_at_the_next_turn_marker():
    m = load_model("gemma3-270m", exits="shared")
    assert not m.has_chat_template
    call = GenerateCall(request_id="t", messages=CHAT, params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    ids, params = prepare(m.tokenizer, call)
    assert m.decode(ids).rstrip().endswith("Assistant:") and set(PLAIN_TURN_STOPS) <= set(params.stop)

    rambling = m.generate(ids, MAX_TOKENS).text  # what the model does when nothing stops it
    cut = min(i for i in (rambling.find(s) for s in PLAIN_TURN_STOPS) if i >= 0)
    assert cut > 0, f"the reference run never invented a turn: {rambling!r}"

    eng = LLMEngine(m, EngineConfig(memory_budget="3GiB"))
    seq = eng.add_request(ids, params)
    events = []
    while eng.scheduler.has_work:
        events += [e for e in eng.step() if e.seq_id == seq.seq_id]
    served = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert served == rambling[:cut]  # the same answer, ended exactly where the next turn would begin
    assert not any(s.strip() in served for s in PLAIN_TURN_STOPS)
