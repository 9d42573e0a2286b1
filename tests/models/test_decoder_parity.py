"""Our decoder against transformers on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helios_ray.errors import HeliosError
from helios_ray.models.decoder import DenseKVCache
from helios_ray.models.loading import load_decoder, param_bytes
from helios_ray.models.repository import ModelRepository
from helios_ray.models.spec import ModelSpec
from tests.conftest import FAMILIES

PROMPTS = [[5, 17, 99, 3, 42, 42, 7, 150, 8, 61, 23, 4, 90], [11, 12, 13, 140, 2, 77, 31]]


def _hf(model, ids, mask=None):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=mask, output_hidden_states=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_depth_logits_match_transformers(family, tiny_dir):
    d, hf = tiny_dir(family)
    lm, _ = load_decoder(d)
    ids = torch.tensor([PROMPTS[0]])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ours = lm.logits(lm(ids, pos, DenseKVCache()))
    ref = _hf(hf, [PROMPTS[0]]).logits
    assert ref.abs().max() > 1.0  # the weights are large enough for the comparison to mean something
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_state_at_every_depth_matches(family, tiny_dir):
    d, hf = tiny_dir(family)
    out = _hf(hf, [PROMPTS[0]])
    ids = torch.tensor([PROMPTS[0]])
    pos = torch.arange(ids.shape[1])[None]
    n = hf.config.num_hidden_layers
    for depth in range(1, n + 1):
        lm, _ = load_decoder(d, depth)
        with torch.no_grad():
            h = lm(ids, pos, DenseKVCache())
        # transformers' last hidden state already has the final norm applied
        ref = out.hidden_states[depth]
        mine = lm.final_norm(h) if depth == n else h
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4, msg=f"{family} depth {depth}")


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_with_cache_equals_full_forward(family, tiny_dir):
    d, _ = tiny_dir(family)
    lm, _ = load_decoder(d, 3)
    seq = PROMPTS[0]
    full_pos = torch.arange(len(seq))[None]
    with torch.no_grad():
        full = lm.logits(lm(torch.tensor([seq]), full_pos, DenseKVCache()))
        cache = DenseKVCache()
        parts = [lm.logits(lm(torch.tensor([seq[:7]]), full_pos[:, :7], cache))]
        for i in range(7, len(seq)):
            parts.append(lm.logits(lm(torch.tensor([[seq[i]]]), torch.tensor([[i]]), cache)))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_left_padded_batch_equals_single_sequences(family, tiny_dir):
    d, _ = tiny_dir(family)
    lm, _ = load_decoder(d)
    a, b = PROMPTS
    pad = len(a) - len(b)
    ids = torch.tensor([a, [0] * pad + b])
    pos = torch.tensor([list(range(len(a))), [-1] * pad + list(range(len(b)))])
    with torch.no_grad():
        batch = lm.logits(lm(ids, pos, DenseKVCache()))
        alone = lm.logits(lm(torch.tensor([b]), torch.arange(len(b))[None], DenseKVCache()))
    torch.testing.assert_close(batch[1, pad:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt", "gpt2"])
def test_truncated_load_never_reads_layers_beyond_depth(family, tiny_dir, tmp_path):
    """Remove every tensor of layers >= D from the checkpoint: loading depth D must still work, and give
    the same hidden state as the intact checkpoint."""
    d, hf = tiny_dir(family)
    depth = 2
    sd = load_file(str(d / "model.safetensors"))
    kept = {k: v for k, v in sd.items() if not any(f"layers.{i}." in k or f"h.{i}." in k
                                                    for i in range(depth, hf.config.num_hidden_layers))}
    assert len(kept) < len(sd)
    save_file(kept, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    cut, stats = load_decoder(tmp_path, depth)
    whole, _ = load_decoder(d, depth)
    ids = torch.tensor([PROMPTS[1]])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        torch.testing.assert_close(cut(ids, pos, DenseKVCache()), whole(ids, pos, DenseKVCache()))
    assert stats.tensors_read == len(kept) or family == "gpt2" and stats.tensors_read <= len(kept)
    with pytest.raises(HeliosError, match="no tensor"):
        load_decoder(tmp_path, depth + 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "opt", "gpt2"])
def test_static_metadata_predicts_parameter_bytes(family, tiny_dir):
    d, hf = tiny_dir(family)
    repo = ModelRepository(extra=[ModelSpec(name=f"tiny-{family}", source="hf_dir", path=d)])
    info = repo.info(f"tiny-{family}")
    assert info.num_layers == hf.config.num_hidden_layers
    for depth in (1, info.num_layers):
        lm, _ = load_decoder(d, depth)
        assert param_bytes(lm) == info.weight_bytes(depth)
    # transformers' parameters() lists a tied embedding/LM head once, as we count it
    assert param_bytes(load_decoder(d)[0]) == sum(p.numel() * 4 for p in hf.parameters())
