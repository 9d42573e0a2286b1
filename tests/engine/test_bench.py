"""The engine/memory benchmarks' JSON contract (speed itself is measured, never asserted)."""

from __future__ import annotations

import json

import pytest

from helios_ray.cli import main


def test_bench_memory_reports_admission_from_byte_arithmetic(capsys):
    assert main(["bench", "memory", "--model", "smollm2-135m", "--budget-mb", "1024", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    d30, d20 = res["depths"]["30"], res["depths"]["20"]
    from helios_ray.models.repository import ModelRepository

    import torch

    from helios_ray.dtypes import serving_dtype

    kinds = ModelRepository().info("smollm2-135m").exits.kinds  # a trained block head at D attends: +1 KV layer
    esize = torch.finfo(getattr(torch, serving_dtype("auto", False))).bits // 8  # bf16 on bf16-capable CPUs
    for d, v in ((30, d30), (20, d20)):
        assert v["kv_bytes_per_token"] == (d + (kinds.get(d) == "block")) * 2 * 3 * 64 * esize
        blocks = ((1024 << 20) - v["weight_bytes"]) // (16 * v["kv_bytes_per_token"])
        assert v["kv_blocks"] == blocks and v["max_concurrent_sequences"] == blocks // (512 // 16)
    assert res["ratio_max_concurrency"] == round(d20["max_concurrent_sequences"] / d30["max_concurrent_sequences"], 3)


@pytest.mark.slow
def test_bench_engine_prints_both_sides_and_agreement(capsys):
    rc = main(["bench", "engine", "--batches", "1,2", "--requests", "2", "--max-output-tokens", "4",
               "--repeats", "1", "--prefill-prompts", "1", "--compare-gather", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in res["runs"]] == [1, 2]
    for r in res["runs"]:
        assert r["engine_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0
        assert r["ratio_engine_over_transformers"] == pytest.approx(
            r["transformers_seconds"] / r["engine_seconds"], rel=0.02)
    assert res["runs"][0]["token_agreement_with_transformers"] == 1.0  # batch 1: no padding, exact
    # llama.cpp side by side at batch 1 when the optional extra is installed, else said so (never silently absent)
    cpp = res["runs"][0]["llama_cpp"]
    assert (isinstance(cpp, dict) and cpp["tokens_per_s"] > 0) or cpp.startswith(("not installed", "llama.cpp crashed")), cpp
    assert "llama_cpp" not in res["runs"][1]
    assert all("transformers_same_dtype" not in r for r in res["runs"])  # fp32 engine: fp32 generate() is the same
    # decode attention in place (this host has a compiler) vs the gather path, side by side; fp32: same tokens
    assert res["decode_attention_in_place"] is True
    for r in res["runs"]:
        assert r["gather"]["engine_tokens_per_s"] > 0 and r["gather"]["token_agreement_with_engine"] == 1.0
    pre = res["prefill"]
    assert pre["prompts"] == 1 and 384 <= pre["prompt_tokens_min_max"][0] <= pre["prompt_tokens_min_max"][1] <= 512
    assert pre["engine_prompt_tokens_per_s"] > 0 and pre["transformers_prompt_tokens_per_s"] > 0
    assert pre["first_token_agreement"] == 1.0  # fp32 prefill, chunked or not, is the same computation


@pytest.mark.slow
def test_bench_engine_at_bf16_also_runs_generate_at_bf16(capsys):
    rc = main(["bench", "engine", "--batches", "2", "--requests", "2", "--max-output-tokens", "4", "--repeats", "1",
               "--dtype", "bfloat16", "--prefill-prompts", "0", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["engine_dtype"] == "bfloat16" and "prefill" not in res
    same = res["runs"][0]["transformers_same_dtype"]
    assert same["dtype"] == "bfloat16" and same["tokens_per_s"] > 0
    assert same["ratio_engine_over_it"] == pytest.approx(same["seconds"][0] / res["runs"][0]["engine_seconds"], rel=0.02)
    # the same dtype, greedy, 4 tokens: the two implementations agree on (nearly) every token; misaligned outputs
    # would not
    assert same["token_agreement_with_engine"] >= 0.5 and same["token_agreement_with_fp32"] >= 0.5


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "engine", "--batches", "8,x"]) == 2
    assert "--batches must be comma-separated integers" in capsys.readouterr().err
