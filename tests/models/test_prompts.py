"""The one prompt encoder: chat template where the model has one, the plain rendering with turn stops where
it has none, and the same ids for every caller (EarlyExitLM, the replicas' ``prepare``)."""

from __future__ import annotations

import pytest

from helios_ray.engine.sequence import SamplingParams
from helios_ray.errors import InvalidRequestError
from helios_ray.models.prompts import PLAIN_TURN_STOPS, encode_request, render_messages
from helios_ray.serve.replica import prepare
from helios_ray.serve.schemas import GenerateCall

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_chat_model_uses_its_template_and_adds_no_stops(smollm2_full):
    tok = smollm2_full.tokenizer
    enc = encode_request(tok, messages=MSGS)
    assert enc.templated and enc.stop == ()
    text = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert enc.ids == tok(text, add_special_tokens=False)["input_ids"]
    assert smollm2_full.encode(messages=MSGS) == enc.ids


def test_plain_rendering_for_a_template_less_tokenizer(smollm2_full):
    class NoTemplate:  # the same tokenizer seen as a base model's (no chat template)
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return smollm2_full.tokenizer(text, add_special_tokens=add_special_tokens)

    text, templated = render_messages(MSGS, NoTemplate())
    assert not templated and text == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    enc = encode_request(NoTemplate(), messages=MSGS)
    assert enc.stop == PLAIN_TURN_STOPS and enc.ids == smollm2_full.tokenizer(text)["input_ids"]
    with pytest.raises(InvalidRequestError, match="unknown message role 'tool'"):
        encode_request(NoTemplate(), messages=[{"role": "tool", "content": "x"}])


def test_prompt_and_errors(smollm2_full):
    tok = smollm2_full.tokenizer
    assert encode_request(tok, prompt="Hello").ids == tok("Hello")["input_ids"]
    with pytest.raises(InvalidRequestError, match="either a prompt or chat messages"):
        encode_request(tok)


def test_prepare_merges_stops_without_duplicates(smollm2_full):
    class NoTemplate:
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return smollm2_full.tokenizer(text, add_special_tokens=add_special_tokens)

    call = GenerateCall(request_id="r", messages=[{"role": "user", "content": "Hi"}],
                        params=SamplingParams(stop=["\nUser:", "END"]))
    _, params = prepare(NoTemplate(), call)
    assert params.stop == ["\nUser:", "END", "\nSystem:", "\nAssistant:"]
    _, params = prepare(smollm2_full.tokenizer, call)  # a chat model: the caller's stops only
    assert params.stop == ["\nUser:", "END"]
