"""Dataset readers (``helios_data``) on the real bundled data: ShareGPT (truncated JSON, parsed record by
record), HumanEval, JSONL.  Rendering through a tokenizer is the server's side: tests/data/test_render.py."""

from __future__ import annotations

import json

import pytest

from helios_data import (
    DatasetError, iter_json_array, load_dataset, load_humaneval, load_jsonl, load_sharegpt, sharegpt_path, split_of,
)


def test_sharegpt_file_is_truncated_and_parsed_record_by_record():
    text = sharegpt_path().read_text(encoding="utf-8")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    raw = sum(1 for _ in iter_json_array(text))
    assert 17_500 <= raw <= 17_700  # 17,671 records before the cut-off tail
    convs = load_sharegpt(seed=None)
    assert 17_000 <= len(convs) <= raw  # minus records without any user turn
    c = convs[0]
    assert c.source == "sharegpt" and c.kind == "chat" and c.messages[0]["role"] in ("user", "system")
    assert {m["role"] for cv in convs[:500] for m in cv.messages} <= {"system", "user", "assistant"}
    assert all(a["role"] != b["role"] for cv in convs[:500] for a, b in zip(cv.messages, cv.messages[1:]))


def test_heldout_split_is_disjoint_deterministic_and_by_chat():
    train = load_sharegpt(split="train", seed=None)
    held = load_sharegpt(split="heldout", seed=None)
    every = load_sharegpt(split="all", seed=None)
    assert len(train) + len(held) == len(every)
    assert 0.03 < len(held) / len(every) < 0.07
    # chunks of one chat ("abc_0", "abc_1") share a group and never straddle the split
    assert not {c.group for c in train} & {c.group for c in held}
    assert [c.id for c in load_sharegpt(split="heldout", seed=None)] == [c.id for c in held]
    assert all(split_of(c.group) == "heldout" for c in held)
    assert split_of("QWJhYvA") == split_of("QWJhYvA")  # a pure function (sha256), not Python's salted hash()


def test_load_sharegpt_filters_shuffles_and_limits_deterministically():
    a = load_sharegpt(limit=50, seed=1, min_len=20, max_len=400)
    assert len(a) == 50 and all(20 <= len(c.prompt) <= 400 for c in a)
    assert [c.id for c in a] == [c.id for c in load_sharegpt(limit=50, seed=1, min_len=20, max_len=400)]
    assert [c.id for c in a] != [c.id for c in load_sharegpt(limit=50, seed=2, min_len=20, max_len=400)]
    assert a[0].prompt_messages[-1]["role"] == "user"


def test_humaneval_prompts():
    he = load_humaneval()
    assert len(he) == 164 and he[0].id == "HumanEval/0" and he[0].kind == "code"
    assert he[0].text.startswith("from typing import List") and "def has_close_elements" in he[0].prompt
    assert len(load_dataset("humaneval", limit=5)) == 5


def test_jsonl_records_of_every_shape(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "id": "m1"},
        {"prompt": "def f():", "kind": "code"},
        {"prompt": "What is 2+2?", "kind": "chat", "chat": True},
    ]) + "\n\n")
    convs = load_jsonl(p)
    assert [c.kind for c in convs] == ["text", "chat", "code", "chat"]
    assert convs[0].text == "plain text" and convs[1].id == "m1" and convs[2].prompt == "def f():"
    assert convs[3].messages == ({"role": "user", "content": "What is 2+2?"},)
    assert [c.id for c in load_dataset(str(p))] == [c.id for c in convs]


@pytest.mark.parametrize("content, message", [
    ("", "has no records"),
    ('{"text": "ok"}\n{broken\n', ":2: not valid JSON"),
    ('{"foo": 1}\n', "needs 'text', 'messages' or 'prompt'"),
    ('{"messages": "hi"}\n', "'messages' must be a list"),
    ('{"text": ""}\n', "must be a non-empty string"),
])
def test_jsonl_errors_are_clear(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_jsonl(p)


def test_unknown_source_and_missing_file():
    with pytest.raises(DatasetError, match="unknown data 'nope'"):
        load_dataset("nope")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("/no/such/file.jsonl")



def test_dataset_error_is_a_one_line_value_error():
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match="not a JSON array"):
        list(iter_json_array("{}"))
