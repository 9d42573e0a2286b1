"""Shared fixtures: tiny random checkpoints per supported family, and the real bundled SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# One intra-op thread: on 2 cores, 2 OpenMP threads stall badly whenever anything else runs (docs/engine.md).
torch.set_num_threads(1)


def _tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=160, max_position_embeddings=128)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5000.0, **common)
    if family == "llama3-rope":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                              **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=32, sliding_window=5, query_pre_attn_scalar=32,
                                   layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2
                                   + ["full_attention"], **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=4, num_attention_heads=4,
                            word_embed_proj_dim=64, **common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=160, n_embd=64, n_layer=4, n_head=4, n_positions=128)
    raise ValueError(family)


FAMILIES = ["llama", "llama3-rope", "qwen2", "gemma3", "opt", "gpt2"]


def make_tiny(family: str, out: Path, seed: int = 0):
    """A random model with weights large enough that a wrong rope/mask/norm visibly changes the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name or "layer_norm" in name):
                p.copy_((0.0 if family == "gemma3" else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.eval()
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """family -> (directory, the transformers model that wrote it)."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(family: str):
        if family not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[family] = (d, make_tiny(family, d))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from helios_ray.models.repository import ModelRepository

    d = ModelRepository().checkpoint_dir("smollm2-135m", required=False)
    if d is None:
        pytest.fail("smollm2-135m is not prepared: run the README's setup command (helios-ray prepare)")
    return d


@pytest.fixture(scope="session")
def smollm2_full(smollm2_dir):
    from helios_ray.models.early_exit import load_model

    return load_model("smollm2-135m", exits="shared", dtype="float32")  # the reference: fp32 on every host
