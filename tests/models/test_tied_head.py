"""One LM head where the model ties it (models/tied_head.py): the rule on synthetic checkpoints - a head that is
the embedding up to rounding is loaded tied, reading the kept copy for both; an unrelated head is not; operators
force either - and the memory model prices what the loader loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helios_ray.models import tied_head
from helios_ray.models.loading import load_decoder, param_bytes, read_spec


def _gguf_source(d, head, embed) -> None:
    """A GGUF beside the checkpoint, named as its source (helios.json), storing the head at more bits (f32) than
    the embedding (f16) - the split a quantized file makes."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(d / "source.gguf"), "llama")
    w.add_tensor("output.weight", head.numpy().astype(np.float32))
    w.add_tensor("token_embd.weight", embed.numpy().astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (d / "helios.json").write_text(json.dumps({"converted_from": str(d / "source.gguf")}))


def _checkpoint(tiny_dir, tmp_path, noise: float | None):
    """The tiny untied llama, its head replaced by its embedding times (1 + noise) when ``noise`` is given, as if
    converted from a GGUF that stored both."""
    src, _ = tiny_dir("llama")
    d = tmp_path / "ck"
    shutil.copytree(src, d)
    sd = load_file(str(d / "model.safetensors"))
    if noise is not None:
        g = torch.Generator().manual_seed(0)
        e = sd["model.embed_tokens.weight"]
        sd["lm_head.weight"] = (e * (1 + noise * torch.randn(e.shape, generator=g))).contiguous()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    _gguf_source(d, sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    return d, sd


def test_a_head_equal_to_the_embedding_up_to_rounding_is_loaded_once(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HELIOS_TIED_HEAD", raising=False)
    d, sd = _checkpoint(tiny_dir, tmp_path, noise=0.03)
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is False
    spec = read_spec(d)
    rec = json.loads((d / tied_head.RECORD).read_text())
    assert rec["within"] and 0.02 < rec["relative_difference"] < 0.04 and rec["keep"] == tied_head.HEAD  # f32 copy
    assert spec.tie_word_embeddings and spec.embed_source == tied_head.HEAD
    lm, _ = load_decoder(d)
    assert lm.lm_head is None and torch.equal(lm.embed.weight, sd["lm_head.weight"])  # the kept copy, for both
    vocab, hidden = sd["lm_head.weight"].shape
    monkeypatch.setenv("HELIOS_TIED_HEAD", "untied")
    untied, _ = load_decoder(d)
    assert param_bytes(untied) - param_bytes(lm) == vocab * hidden * 4
    # the memory model prices what each load holds (the same rule, through read_spec)
    from helios_ray.models.model_info import _static_info

    tied_info = _static_info(str(d), "t", "", "file", "float32", "", "auto")
    untied_info = _static_info(str(d), "t", "", "file", "float32", "", "untied")
    assert tied_info.tied_embeddings and not untied_info.tied_embeddings
    assert untied_info.weight_bytes(5) - tied_info.weight_bytes(5) == vocab * hidden * 4
    assert tied_info.weight_bytes(5) == param_bytes(lm)
    (d / "helios.json").unlink()  # a safetensors model (no GGUF source): auto never ties it, however close
    (d / tied_head.RECORD).unlink()
    monkeypatch.setenv("HELIOS_TIED_HEAD", "auto")
    assert not read_spec(d).tie_word_embeddings


def test_an_unrelated_head_stays_untied_unless_forced(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HELIOS_TIED_HEAD", raising=False)
    d, sd = _checkpoint(tiny_dir, tmp_path, noise=None)  # the random tiny model: head and embedding unrelated
    assert not read_spec(d).tie_word_embeddings
    rec = json.loads((d / tied_head.RECORD).read_text())
    assert not rec["within"] and rec["relative_difference"] > 1.0
    monkeypatch.setenv("HELIOS_TIED_HEAD", "tied")
    assert read_spec(d).tie_word_embeddings  # forced
    monkeypatch.setenv("HELIOS_TIED_HEAD", "sometimes")
    with pytest.raises(Exception, match="auto, tied or untied"):
        read_spec(d)
