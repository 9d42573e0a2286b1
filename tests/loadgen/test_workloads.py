"""Workloads: ShareGPT sampling and length filters, random lengths, HumanEval, the shift half-way."""

from __future__ import annotations

import pytest

from loadgen import (
    LoadgenError, PoolWorkload, Request, ShiftWorkload, approx_tokens, build_workload, humaneval_requests,
    random_requests, sharegpt_requests,
)


def test_sharegpt_sampling_filters_and_reply_lengths():
    reqs = sharegpt_requests(8, seed=0, min_prompt_tokens=5, max_prompt_tokens=100, min_output_tokens=10,
                             max_output_tokens=400)
    assert len(reqs) == 8
    for r in reqs:
        assert r.kind == "chat" and r.is_chat and r.messages[-1]["role"] == "user"
        assert r.messages[-1]["content"] == r.prompt
        assert 5 <= r.prompt_tokens <= 100
        assert 10 <= r.max_tokens <= 400 and r.max_tokens == r.meta["reply_tokens"]
    again = sharegpt_requests(8, seed=0, min_prompt_tokens=5, max_prompt_tokens=100, min_output_tokens=10,
                              max_output_tokens=400)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    other = sharegpt_requests(8, seed=1, min_prompt_tokens=5, max_prompt_tokens=100, min_output_tokens=10,
                              max_output_tokens=400)
    assert [r.prompt for r in other] != [r.prompt for r in reqs]
    capped = sharegpt_requests(8, seed=0, min_prompt_tokens=5, max_prompt_tokens=100, min_output_tokens=10,
                               max_output_tokens=400, output_cap=12)
    assert [r.prompt for r in capped] == [r.prompt for r in reqs]
    assert all(r.max_tokens == min(12, r.meta["reply_tokens"]) for r in capped)
    # a custom token counter is used for the filters and the lengths
    words = sharegpt_requests(3, seed=0, count_tokens=lambda s: len(s.split()), min_output_tokens=1)
    assert all(r.prompt_tokens == sum(len(m["content"].split()) for m in r.messages) for r in words)
    assert all(r.max_tokens == r.meta["reply_tokens"] for r in words)
    with pytest.raises(LoadgenError):
        sharegpt_requests(3, seed=0, min_prompt_tokens=10**9, max_prompt_tokens=None)


def test_random_workload_lengths_are_seeded_and_in_range():
    a = random_requests(50, seed=3, input_len=40, output_len=20, range_ratio=0.5)
    assert [r.max_tokens for r in a] == [r.max_tokens for r in random_requests(50, 3, input_len=40, output_len=20)]
    assert [r.max_tokens for r in a] != [r.max_tokens for r in random_requests(50, 4, input_len=40, output_len=20)]
    assert all(10 <= r.max_tokens <= 30 for r in a)
    assert all(20 <= r.meta["input_len"] <= 60 and r.prompt_tokens == approx_tokens(r.prompt) for r in a)
    assert all(abs(r.prompt_tokens - r.meta["input_len"]) <= 1 for r in a)
    assert len({r.max_tokens for r in a}) > 5 and all(r.kind == "random" and not r.is_chat for r in a)
    fixed = random_requests(5, 0, input_len=8, output_len=4, range_ratio=0.0)
    assert all(r.max_tokens == 4 for r in fixed)
    with pytest.raises(LoadgenError):
        random_requests(2, 0, range_ratio=1.5)


def test_humaneval_prompts():
    reqs = humaneval_requests(5, output_cap=64)
    assert len(reqs) == 5 and all(r.kind == "code" and not r.is_chat and "def " in r.prompt for r in reqs)
    assert all(16 <= r.max_tokens <= 64 for r in reqs)
    assert all(r.max_tokens == 32 for r in humaneval_requests(3, max_tokens=32))
    wl = build_workload("humaneval", 200)
    assert len(wl) == 164 and wl.request(170).source == wl.request(6).source  # cycles the 164 problems


def test_shift_changes_kind_half_way_by_count():
    wl = build_workload("shift", num_requests=10, seed=0)
    got = [wl.request(i, 0.0) for i in range(10)]
    assert [r.kind for r in got] == ["chat"] * 5 + ["code"] * 5
    assert [r.meta["phase"] for r in got] == [0] * 5 + [1] * 5
    assert got[5].source == "humaneval:HumanEval/0"  # the second phase starts at its own beginning
    assert [r.id for r in got] == [str(i) for i in range(10)]
    wl.reset()
    assert wl.request(7, 0.0).kind == "code" and wl.request(1, 0.0).kind == "chat"


def test_shift_by_time_and_validation():
    a = PoolWorkload("a", [Request(id="0", kind="chat", prompt="p", max_tokens=3,
                                   messages=[{"role": "user", "content": "p"}])])
    b = PoolWorkload("b", [Request(id="0", kind="code", prompt="def f():", max_tokens=5)])
    wl = ShiftWorkload(a, b, switch_s=1.0)
    assert [wl.request(i, t).kind for i, t in [(0, 0.0), (1, 0.9), (2, 1.0), (3, 0.5)]] == \
        ["chat", "chat", "code", "code"]  # once switched it stays switched
    with pytest.raises(LoadgenError):
        ShiftWorkload(a, b)
    with pytest.raises(LoadgenError):
        build_workload("nope", 3)
    with pytest.raises(LoadgenError):
        build_workload("shift", 4, shift=("shift", "random"))
    wl2 = build_workload("shift", 6, shift=("random", "humaneval"), random={"input_len": 8, "output_len": 4})
    assert [wl2.request(i).kind for i in range(6)] == ["random"] * 3 + ["code"] * 3
