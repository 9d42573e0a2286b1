"""oneDNN-prepacked bf16 projections (models/prepack.py): same numbers, same bytes, only faster.

The claim the module makes is exactness - a packed projection computes what ``F.linear`` computes on the same bf16
weight - so the tests compare bit for bit, on single matrices and on the whole model's logits, and check that
everything that reads weights (the memory count, growing the model, a healed side branch's float copy) still does.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helios_ray.models import prepack
from helios_ray.models.early_exit import load_model
from helios_ray.models.healed import projections
from helios_ray.models.loading import param_bytes
from helios_ray.models.prepack import PackedLinear

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [1, 3, 16, 33, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_bit_for_bit(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(384, 576, generator=g).bfloat16()
    b = torch.randn(384, generator=g).bfloat16() if bias else None
    x = torch.randn(1, rows, 576, generator=g).bfloat16()
    lin = PackedLinear(w, b)
    assert torch.equal(lin(x), F.linear(x, w, b))
    assert torch.equal(lin.dequantized(), w) and lin.opaque_bytes == w.numel() * 2
    twin = copy.deepcopy(lin)  # the opaque tensor has no storage: deepcopy repacks
    assert twin.packed is not lin.packed and torch.equal(twin(x), lin(x))
    sd = lin.state_dict()  # the plain weight, as nn.Linear would save it
    assert torch.equal(sd["weight"], w) and (("bias" in sd) == bias)
    with pytest.raises(RuntimeError, match="cannot change dtype or device"):
        lin.float()  # would convert the bias and silently keep bf16 weights


def test_only_bf16_on_cpu_without_a_weight_format_is_packed(monkeypatch):
    assert prepack.enabled("cpu", torch.bfloat16, None)
    assert not prepack.enabled("cpu", torch.float32, None)  # fp32 stays exact against transformers
    assert not prepack.enabled("cpu", torch.bfloat16, "int8")  # int8/int4 have their own kernels
    assert not prepack.enabled("cuda", torch.bfloat16, None)
    monkeypatch.setenv("HELIOS_PREPACK", "0")
    assert not prepack.enabled("cpu", torch.bfloat16, None)


@pytest.fixture(scope="module")
def pair():
    mp = pytest.MonkeyPatch()
    mp.setenv("HELIOS_PREPACK", "0")
    plain = load_model("smollm2-135m", depth=20, exits="shared", dtype="bfloat16")
    mp.undo()
    packed = load_model("smollm2-135m", depth=20, exits="shared", dtype="bfloat16")
    return plain, packed


def _logits(model, ids):
    seq = torch.tensor([ids])
    return model.forward_exit(seq, torch.arange(len(ids))[None], model.new_cache(), last_only=False)


def test_packed_model_gives_the_same_logits_and_bytes(pair):
    plain, packed = pair
    assert all(isinstance(m, PackedLinear) for b in packed.lm.layers for m in projections(b).values())
    assert not any(isinstance(m, PackedLinear) for b in plain.lm.layers for m in projections(b).values())
    assert packed.lm.prepacked and not plain.lm.prepacked
    ids = plain.encode(messages=[{"role": "user", "content": "Name three rivers in Europe."}])
    assert torch.equal(_logits(packed, ids), _logits(plain, ids))
    assert param_bytes(packed.lm) == param_bytes(plain.lm)  # the memory model holds either way
    assert packed.param_bytes == plain.param_bytes


def test_growing_a_packed_model_packs_the_new_layers(pair):
    plain, packed = pair
    ids = plain.encode(messages=[{"role": "user", "content": "What is a prime number?"}])
    for m in (plain, packed):
        m.set_depth(24)
    try:
        assert all(isinstance(m, PackedLinear) for b in packed.lm.layers[20:] for m in projections(b).values())
        assert torch.equal(_logits(packed, ids), _logits(plain, ids))
        assert param_bytes(packed.lm) == param_bytes(plain.lm)
    finally:
        for m in (plain, packed):
            m.set_depth(20)


def test_a_side_branch_copy_of_a_packed_block_is_plain_and_equal(pair):
    """Healed exits profile through a float copy of the healed layers (models/healed.py): it must see the weights."""
    from helios_ray.models.healed import _float_copy

    plain, packed = pair
    copy_ = _float_copy(packed.lm.layers[3], torch.bfloat16)
    for name, lin in projections(copy_).items():
        assert isinstance(lin, torch.nn.Linear)
        assert torch.equal(lin.weight, projections(plain.lm.layers[3])[name].weight)
