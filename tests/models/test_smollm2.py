"""Truth on the real bundled SmolLM2-135M-Instruct (prepared by the README's setup command)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helios_ray.models.early_exit import load_model

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


def test_full_depth_logits_and_depth_20_hidden_state_match_transformers(smollm2_full, hf_smollm2):
    ids = smollm2_full.encode(messages=CHAT)
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    with torch.no_grad():
        ref = hf_smollm2(x, output_hidden_states=True)
    ours = smollm2_full.forward_exit(x, pos, smollm2_full.new_cache(), last_only=False)
    torch.testing.assert_close(ours, ref.logits, atol=1e-4, rtol=1e-4)
    m20 = load_model("smollm2-135m", depth=20, exits="shared", dtype="float32")
    with torch.no_grad():
        h20 = m20.lm(x, pos, m20.new_cache())
    torch.testing.assert_close(h20, ref.hidden_states[20], atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_transformers_generate(smollm2_full, hf_smollm2):
    ids = smollm2_full.encode(messages=CHAT)
    ours = [t.token for t in smollm2_full.generate_stream(ids, 12)]
    with torch.no_grad():
        ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref[: len(ours)]


def test_profile_mode_reports_every_exit_against_the_final_layer(smollm2_full):
    ids = smollm2_full.encode(messages=CHAT)
    recs = smollm2_full.profile_generate(ids, 10)
    greedy = [t.token for t in smollm2_full.generate_stream(ids, 10)]
    assert [r["final"] for r in recs] == greedy  # profile mode follows the full model
    assert all(sorted(r["exits"]) == list(range(1, 30)) for r in recs)
    assert all(0.0 <= c <= 1.0 for r in recs for _, c in r["exits"].values())
    agree = {d: sum(r["exits"][d][0] == r["final"] for r in recs) for d in (5, 29)}
    assert agree[29] > agree[5]  # the logit lens improves with depth (DESIGN.md: 54% at 29)
    assert all(r["final_logprob"] <= 0.0 for r in recs)


@pytest.mark.slow
def test_cli_generate_answers_paris(capsys):
    from helios_ray.cli import main  # in process: the real entry point runs in tests/test_cli.py

    assert main(["generate", "smollm2-135m", "--depth", "30", "--chat", "--prompt", "What is the capital of France?",
                 "--max-tokens", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["text"]
    assert out["depth"] == 30 and len(out["tokens"]) == out["completion_tokens"]
    assert all(t["exit_layer"] == 30 and 0 <= t["confidence"] <= 1 for t in out["tokens"])


@pytest.mark.slow
def test_cli_inspect_depth_20_is_smaller_than_30(capsys):
    # Truncation alone (the shared head), each depth in its own fresh process: RSS is only comparable there.  Both
    # run at once (one core each); a trained exit head adds its own bytes, below.
    procs = {d: subprocess.Popen([sys.executable, "-m", "helios_ray.cli", "inspect", "smollm2-135m", "--depth",
                                  str(d), "--exits", "shared", "--dtype", "float32", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in (20, 30)}
    runs = {}
    for d, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        runs[d] = json.loads(out)
    for d in (20, 30):
        assert {"model", "total_layers", "loaded_layers", "param_bytes", "kv_bytes_per_token", "load_seconds",
                "rss_bytes"} <= set(runs[d])
        assert runs[d]["loaded_layers"] == d and runs[d]["total_layers"] == 30
    assert runs[20]["param_bytes"] <= 0.75 * runs[30]["param_bytes"]
    assert runs[20]["kv_bytes_per_token"] * 30 == runs[30]["kv_bytes_per_token"] * 20
    # 10 fewer layers of 14.2 MB are not resident; allow noise but demand most of it shows
    assert runs[30]["rss_bytes"] - runs[20]["rss_bytes"] > 0.7 * (runs[30]["param_bytes"] - runs[20]["param_bytes"])
    from helios_ray.cli import main  # the shipped head at 20: only bytes are compared, so in process

    assert main(["inspect", "smollm2-135m", "--depth", "20", "--dtype", "float32", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    if trained["exit_head"] != "shared":
        from helios_ray.models.exit_files import load_heads
        from helios_ray.models.loading import param_bytes, read_spec
        from helios_ray.models.repository import ModelRepository

        repo = ModelRepository()
        head = load_heads(repo.exits_path("smollm2-135m"), read_spec(repo.checkpoint_dir("smollm2-135m")), [20])[20]
        assert trained["param_bytes"] == runs[20]["param_bytes"] + param_bytes(head)
