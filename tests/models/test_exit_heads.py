"""Exit heads: zero-initialised adapters start as the logit lens; files round-trip; only wanted heads load."""

from __future__ import annotations

import pytest
import torch

from helios_ray.errors import HeliosError
from helios_ray.models.decoder import DenseKVCache
from helios_ray.models.early_exit import EarlyExitLM, confidence
from helios_ray.models.exit_heads import BlockHead, LinearHead, SharedHead
from helios_ray.models.exit_files import heads_metadata, load_heads, save_heads
from helios_ray.models.loading import load_decoder

IDS = [5, 17, 99, 3, 42, 42, 7, 150, 8]


def _logits(lm, head, ids=IDS):
    cache = DenseKVCache()
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    with torch.no_grad():
        ctx = lm.context(pos, cache)
        h = lm.run_layers(lm.embed_tokens(x, ctx), ctx)
        return head(h, ctx, lm)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_untrained_adapters_equal_the_logit_lens(family, tiny_dir):
    d, _ = tiny_dir(family)
    lm, _ = load_decoder(d, 3)
    lens = _logits(lm, SharedHead(3))
    lin = LinearHead(3, lm.spec, rank=8)
    blk = BlockHead(3, lm.spec)
    blk.init_from(lm.layers[2])
    torch.testing.assert_close(_logits(lm, lin), lens)
    torch.testing.assert_close(_logits(lm, blk), lens)
    # ...and a perturbed head really changes the output (the comparison is not vacuous)
    with torch.no_grad():
        lin.up.weight.normal_(0, 0.5)
    assert (_logits(lm, lin) - lens).abs().max() > 1e-2


def test_heads_file_round_trip_loads_only_requested_depths(tiny_dir, tmp_path):
    d, _ = tiny_dir("llama")
    lm, _ = load_decoder(d)
    torch.manual_seed(1)
    heads = {2: LinearHead(2, lm.spec, rank=4), 3: LinearHead(3, lm.spec, rank=None), 4: BlockHead(4, lm.spec)}
    for h in heads.values():
        with torch.no_grad():
            for p in h.parameters():
                p.normal_(0, 0.1)
    path = tmp_path / "exits.safetensors"
    save_heads(path, heads)
    meta = heads_metadata(path)
    assert meta == {2: {"kind": "linear", "rank": 4}, 3: {"kind": "linear", "rank": None}, 4: {"kind": "block"}}
    only3 = load_heads(path, lm.spec, [3])
    assert list(only3) == [3]
    for k, v in heads[3].state_dict().items():
        torch.testing.assert_close(only3[3].state_dict()[k], v)
    every = load_heads(path, lm.spec)
    assert sorted(every) == [2, 3, 4] and every[4].kind == "block"


def test_exit_head_beyond_the_model_is_rejected(tiny_dir, tmp_path):
    d, _ = tiny_dir("llama")
    lm, _ = load_decoder(d)
    save_heads(tmp_path / "x.safetensors", {7: LinearHead(7, lm.spec, rank=2)})
    with pytest.raises(HeliosError, match="does not fit"):
        load_heads(tmp_path / "x.safetensors", lm.spec)


def test_greedy_exit_uses_the_trained_head_at_depth_and_counts_breaches(tiny_dir):
    d, _ = tiny_dir("llama")
    lm, _ = load_decoder(d, 3)
    head = LinearHead(3, lm.spec, rank=4)
    with torch.no_grad():
        head.up.weight.normal_(0, 0.3)
    m = EarlyExitLM("tiny", lm, {3: head}, tokenizer=None, threshold=0.5)
    assert m.exit_head is head
    cache = DenseKVCache()
    tok, conf, logits, _ = m.step(torch.tensor([IDS]), torch.arange(len(IDS))[None], cache)
    ref = _logits(lm, head)[:, -1]
    torch.testing.assert_close(logits, ref)
    assert int(tok) == int(ref.argmax())


def test_confidence_measures():
    logits = torch.tensor([[4.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    tok, p = confidence(logits, "max_prob")
    probs = torch.softmax(logits, -1)
    assert tok.tolist() == [0, 0]
    torch.testing.assert_close(p, probs.max(-1).values)
    _, m = confidence(logits, "margin")
    torch.testing.assert_close(m[0], probs[0, 0] - probs[0, 1])
    assert float(m[1]) == pytest.approx(0.0)
    _, e = confidence(logits, "entropy")
    assert float(e[1]) == pytest.approx(0.0, abs=1e-6)  # uniform: no confidence
    assert 0.0 < float(e[0]) < 1.0
