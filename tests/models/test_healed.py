"""Healed truncation: an untrained healed exit is plain truncation; merged into the replica's layers it computes
exactly what the profiling side branch computes; it costs nothing beyond truncation; depth changes restore the
original layers; it is refused where it cannot serve."""

from __future__ import annotations

import pytest
import torch

from helios_ray.errors import HeliosError
from helios_ray.models.decoder import DenseKVCache
from helios_ray.models.early_exit import EarlyExitLM
from helios_ray.models.exit_heads import SharedHead
from helios_ray.models.exit_files import heads_metadata, load_heads, save_heads
from helios_ray.models.healed import HealedHead
from helios_ray.models.loading import load_decoder

IDS = [5, 17, 99, 3, 42, 42, 7, 150, 8, 61, 2, 77]


def _exit_logits(model: EarlyExitLM) -> torch.Tensor:
    """Logits at every position through the model's greedy exit (all of its loaded layers, then its head)."""
    return model.forward_exit(torch.tensor([IDS]), torch.arange(len(IDS))[None], model.new_cache(), last_only=False)


def _branch_logits(lm, head) -> torch.Tensor:
    """The profiling path: layers [0, D-k) of a deeper model, then the head's side branch."""
    cache = DenseKVCache()
    with torch.no_grad():
        ctx = lm.context(torch.arange(len(IDS))[None], cache)
        h = lm.run_layers(lm.embed_tokens(torch.tensor([IDS]), ctx), ctx, 0, head.input_depth)
        return head(h, ctx, lm)


def _trained(spec, depth=4, layers=2, rank=4, seed=3) -> HealedHead:
    torch.manual_seed(seed)
    head = HealedHead(depth, spec, layers=layers, rank=rank)
    with torch.no_grad():
        for p in head.b.values():
            p.normal_(0, 0.3)
    return head


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_untrained_healed_exit_is_plain_truncation(family, tiny_dir):
    d, _ = tiny_dir(family)
    lm4, _ = load_decoder(d, 4)
    plain = EarlyExitLM("tiny", lm4, {}, tokenizer=None)
    lens = _exit_logits(plain)
    head = HealedHead(4, lm4.spec, layers=2, rank=4)  # B = 0
    full, _ = load_decoder(d)
    head.attach(full)
    torch.testing.assert_close(_branch_logits(full, head)[0], lens[0])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_merged_replica_equals_the_profiling_branch_and_differs_from_truncation(family, tiny_dir):
    d, _ = tiny_dir(family)
    full, _ = load_decoder(d)
    lm4, _ = load_decoder(d, 4)
    plain = _exit_logits(EarlyExitLM("tiny", load_decoder(d, 4)[0], {}, tokenizer=None))
    branch = _trained(full.spec)
    merged = _trained(full.spec)  # same seed: same deltas
    branch.attach(full)
    merged.merge_into(lm4)
    served = _exit_logits(EarlyExitLM("tiny", lm4, {4: merged}, tokenizer=None))
    torch.testing.assert_close(served[0], _branch_logits(full, branch)[0], rtol=1e-4, atol=1e-4)
    assert (served - plain).abs().max() > 1e-2  # the deltas really act (the comparison is not vacuous)
    # the branch copies are private: profiling a healed exit leaves the full model's layers untouched
    fresh, _ = load_decoder(d)
    for a, b in zip(full.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_merged_head_costs_nothing_beyond_truncation(tiny_dir):
    d, _ = tiny_dir("llama")
    lm4, _ = load_decoder(d, 4)
    plain = EarlyExitLM("tiny", load_decoder(d, 4)[0], {}, tokenizer=None)
    head = _trained(lm4.spec)
    head.merge_into(lm4)
    healed = EarlyExitLM("tiny", lm4, {4: head}, tokenizer=None)
    assert healed.footprint == plain.footprint and healed.kv_layers == 4
    assert sum(p.numel() for p in head.parameters()) == 0
    with pytest.raises(HeliosError, match="already merged"):
        head.merge_into(lm4)


def test_file_round_trip_and_depth_changes_restore_the_original_layers(tiny_dir, tmp_path):
    d, _ = tiny_dir("llama")
    spec = load_decoder(d, 1)[0].spec
    path = tmp_path / "exits.safetensors"
    save_heads(path, {4: _trained(spec), 2: SharedHead(2)})
    assert heads_metadata(path)[4] == {"kind": "healed", "layers": 2, "rank": 4}
    loaded = load_heads(path, spec, [4])[4]
    ref = _trained(spec)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)

    lm, _ = load_decoder(d, 4)
    loaded.merge_into(lm)
    m = EarlyExitLM("tiny", lm, {4: loaded}, tokenizer=None, ckpt_dir=d, heads_path=path)
    healed_logits = _exit_logits(m)
    m.set_depth(5)  # full depth: layers 2-3 must be the checkpoint's again, not the merged ones
    orig, _ = load_decoder(d)
    for a, b in zip(m.lm.state_dict().values(), orig.state_dict().values()):
        torch.testing.assert_close(a, b)
    m.set_depth(4)  # back: the head is read from the file and merged again
    assert m.exit_head.kind == "healed" and m.exit_head.merged
    torch.testing.assert_close(_exit_logits(m), healed_logits)


def test_healed_exits_are_refused_where_they_cannot_serve(tiny_dir):
    d, _ = tiny_dir("llama")
    full, _ = load_decoder(d)
    with pytest.raises(HeliosError, match="cannot be token-level exits"):
        EarlyExitLM("tiny", full, {4: _trained(full.spec)}, tokenizer=None, token_exits=[4])
    lm3, _ = load_decoder(d, 3)
    with pytest.raises(HeliosError, match="merges into a model loaded to that depth"):
        _trained(lm3.spec).merge_into(lm3)
    with pytest.raises(HeliosError, match="needs layers up to 4"):
        _trained(lm3.spec).attach(lm3)
    with pytest.raises(HeliosError, match="neither merged"):
        _branch_logits(full, _trained(full.spec))
    with pytest.raises(HeliosError, match="can heal 1..3 layers"):
        HealedHead(4, full.spec, layers=4)
