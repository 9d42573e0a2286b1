"""One-time preparation of model sources into the float32 safetensors cache.

GGUF files are quantized and laid out for llama.cpp; ``transformers`` knows how to dequantize them and undo
llama.cpp's Q/K permutation, so we let it do that once (~15-45 s for the bundled models) and write plain
safetensors plus ``config.json`` and the tokenizer.  From then on every load reads tensors by name, in
well under a second, and a truncated load reads only the layers it needs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from helios_ray.models.spec import ModelSpec
from helios_ray.errors import HeliosError, ModelUnavailableError


def _atomic_dir(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def gguf_to_cache(gguf: Path, out: Path, provenance: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """Dequantize ``gguf`` into ``out`` (config.json, model.safetensors, tokenizer, helios.json)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    t0 = time.time()
    tmp = _atomic_dir(out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # gguf_file= needs `accelerate` installed (transformers refuses without it): why pyproject lists it.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "float32"
        sd = model.state_dict()
        if cfg.get("tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        tensors = {k: v.detach().contiguous() for k, v in sd.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(tmp)
        (tmp / "helios.json").write_text(json.dumps({
            "converted_from": str(gguf), "size_bytes": gguf.stat().st_size, "seconds": round(time.time() - t0, 1),
            "spec": provenance or {},
        }, indent=2, default=str))
        del model, sd, tensors
        _commit_dir(tmp, out)
        from helios_ray.models import tied_head

        try:
            tied_head.record(out)  # a GGUF that stores the head beside its embedding: measured once, here
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed; the loader measures again
            print(f"helios-ray: tied-head check of {out.name} failed ({e}); it runs again at first load",
                  file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def link_safetensors(spec: ModelSpec, out: Path) -> Path:
    """A single-file checkpoint + a config dir become one view directory of symlinks."""
    assert spec.path is not None and spec.config_dir is not None
    if not spec.path.exists():
        raise ModelUnavailableError(f"model {spec.name!r}: {spec.path} does not exist")
    if not (spec.config_dir / "config.json").exists():
        raise ModelUnavailableError(f"model {spec.name!r}: {spec.config_dir} has no config.json")
    tmp = _atomic_dir(out)
    for f in spec.config_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            (tmp / f.name).symlink_to(f.resolve())
    (tmp / "model.safetensors").symlink_to(spec.path.resolve())
    _commit_dir(tmp, out)
    return out


def download_hub(spec: ModelSpec, out: Path) -> Path:
    """Production only: fetch config, tokenizer and safetensors weights of a hub id into the cache."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelUnavailableError(f"model {spec.name!r} comes from the hub, but HF_HUB_OFFLINE=1")
    try:
        from huggingface_hub import snapshot_download

        assert spec.hub_id is not None
        snapshot_download(
            spec.hub_id, revision=spec.revision, local_dir=str(out),
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"],
        )
    except Exception as e:  # network / auth / missing repo: all user-actionable
        raise HeliosError(f"model {spec.name!r}: could not download {spec.hub_id!r} from the hub: {e}") from None
    return out
