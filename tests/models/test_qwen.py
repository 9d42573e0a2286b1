"""The one test that loads the real Qwen2.5-Coder-0.5B (prepared by the README's setup command): listed,
generates, and matches transformers at full depth (loaded untied, as transformers does); tied by default, with
the same greedy tokens and <= 1.0 GB of bf16 parameters.  Kept to a single short test (the model is 2.4 GB float32)."""

from __future__ import annotations

import json

import pytest
import torch

from helios_ray.cli import main
from helios_ray.models.repository import ModelRepository

NAME = "qwen2.5-coder-0.5b"


def test_qwen_is_listed_ready_generates_and_matches_transformers(capsys, monkeypatch):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"smollm2-135m", "gemma3-270m", NAME} <= set(rows)
    q = rows[NAME]
    if not q["prepared"]:
        pytest.fail(f"{NAME} is not prepared: run the README's setup command (helios-ray prepare): {q['problem']}")
    assert (q["family"], q["num_layers"], q["chat_template"]) == ("qwen2", 24, True)
    big = rows["qwen2.5-coder-1.5b"]  # the ladder's top rung: listed from its headers, not loaded here
    assert big["prepared"], big["problem"]
    assert (big["num_layers"], big["hidden_size"], big["num_heads"], big["num_kv_heads"], big["chat_template"],
            big["tied_embeddings"]) == (28, 1536, 12, 2, True, True)

    from transformers import AutoModelForCausalLM

    from helios_ray.models.early_exit import load_model

    monkeypatch.setenv("HELIOS_TIED_HEAD", "untied")  # both matrices as stored: what transformers loads
    m = load_model(NAME, exits="shared", dtype="float32")
    ids = m.encode(prompt="def reverse_string(s: str) -> str:\n")
    ours = [t.token for t in m.generate_stream(ids, 4)]
    assert m.decode(ours).strip(), "four greedy tokens decode to text"
    x, pos = torch.tensor([ids]), torch.arange(len(ids))[None]
    logits = m.forward_exit(x, pos, m.new_cache(), last_only=False)
    del m
    hf = AutoModelForCausalLM.from_pretrained(str(ModelRepository().checkpoint_dir(NAME)), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(x).logits
    torch.testing.assert_close(logits, ref, atol=2e-4, rtol=2e-4)
    assert ours[0] == int(ref[0, -1].argmax())
    del hf
    # The default load ties the head (models/tied_head.py): one matrix (the GGUF's Q8_0 output.weight) for both,
    # the Q5_0 embedding's 545 MB (float32) not loaded, and the same greedy tokens here.
    monkeypatch.setenv("HELIOS_TIED_HEAD", "auto")
    tied = load_model(NAME, exits="shared", dtype="float32")
    assert tied.lm.lm_head is None
    assert [t.token for t in tied.generate_stream(ids, 4)] == ours
    info = ModelRepository().info(NAME, dtype="bfloat16")
    assert info.tied_embeddings and info.weight_bytes(24) <= 1.0e9, info.weight_bytes(24)  # was 1.26 GB untied
