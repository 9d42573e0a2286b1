"""Data from the neutral package: ``helios_data`` is one copy read by the server and the load generator (no server
module imports loadgen for it); the prompt encoder renders and encodes its conversations for a model; a reader's
error is one clean line in the ``helios-ray`` command."""

from __future__ import annotations

import pytest

import helios_data
from helios_data import Conversation, load_sharegpt, normalize_messages
from helios_ray.models.prompts import encode_conversation, render_conversation


def test_readers_are_one_copy_shared_with_the_load_generator():
    import loadgen.workloads

    assert loadgen.workloads.load_sharegpt is helios_data.load_sharegpt
    assert loadgen.workloads.load_humaneval is helios_data.load_humaneval


@pytest.mark.parametrize("prompts, message", [("/no/such/prompts.jsonl", "does not exist"),
                                              ("nope", "unknown data 'nope'")])
def test_a_dataset_error_is_one_line_in_the_helios_cli(capsys, prompts, message):
    from helios_ray.cli import main

    assert main(["eval-exits", "smollm2-135m", "--prompts", prompts, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("helios-ray eval-exits: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_messages_are_normalised_and_rendered_without_a_template():
    msgs = normalize_messages([("gpt", "ignored: before any user"), ("human", "a"), ("human", "b"), ("gpt", ""),
                               ("chatgpt", "c"), ("bing", "d"), ("weird", "x")])
    assert msgs == ({"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c\n\nd"})
    conv = Conversation(id="x", messages=msgs)
    assert render_conversation(conv) == "User: a\n\nb\n\nAssistant: c\n\nd"
    assert render_conversation(conv, add_generation_prompt=True).endswith("Assistant:")


def test_rendering_through_a_real_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    conv = load_sharegpt(limit=1, seed=0, split="heldout")[0]
    text = render_conversation(conv, tok)
    assert text.startswith("<|im_start|>") and conv.messages[0]["content"][:20] in text
    ids = encode_conversation(conv, tok)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
