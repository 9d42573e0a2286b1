"""What the repository reports about a prepared model without loading it: shapes, bytes per layer and per token,
trained exits, chat template - read from the checkpoint's config and safetensors headers (cached per folder)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from helios_ray import memory
from helios_ray.errors import HeliosError


class ExitInfo(BaseModel):
    shared: str = "every layer (final norm + LM head, 'logit lens')"
    trained: list[int] = []
    kinds: dict[int, str] = {}
    heads_path: str | None = None
    card_path: str | None = None


class ModelInfo(BaseModel):
    """Static metadata the policy and the memory planner work from."""

    name: str
    description: str = ""
    source: str
    prepared: bool
    family: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    dtype: str = "float32"
    embed_bytes: int | None = None
    layer_bytes: int | None = None
    head_bytes: int | None = None
    layer_params: int | None = None  # one layer's parameter count (its FLOPs per token are twice this)
    kv_bytes_per_token_per_layer: int | None = None
    tied_embeddings: bool | None = None
    chat_template: bool | None = None
    chat_capable: bool | None = None  # serves chat requests: the ModelSpec's `chat` override, else its template
    exits: ExitInfo | None = None
    problem: str | None = None

    def weight_bytes(self, depth: int) -> int:
        assert self.embed_bytes is not None and self.layer_bytes is not None and self.head_bytes is not None
        return self.embed_bytes + depth * self.layer_bytes + self.head_bytes



@lru_cache(maxsize=64)
def _static_info(d: str, name: str, description: str, source: str, dtype: str, exits_path: str,
                 tie_mode: str = "auto") -> ModelInfo:
    from helios_ray.models.checkpoint import Checkpoint
    from helios_ray.models.exit_files import heads_metadata
    from helios_ray.models.families import global_names, layer_names

    import torch

    from helios_ray.dtypes import split_dtype
    from helios_ray.models import quant

    from helios_ray.models.tied_head import spec_as_loaded

    spec = spec_as_loaded(Path(d), tie_mode)  # type: ignore[arg-type]  # as loaded: a tied head counted once
    ckpt = Checkpoint(Path(d))
    nbytes = memory.dtype_bytes(dtype)
    weights, _ = split_dtype(dtype)

    def size(names: dict[str, Any], params: bool = False) -> int:
        """Bytes (or parameters) of our tensors ``names``; each checkpoint tensor once, except that a quantized
        matrix is priced per our name from its shape as loaded (GPT-2's fused c_attn becomes three)."""
        total, seen = 0, set()
        for ours, (hf_name, transform) in names.items():
            hf = resolve_name(ckpt, hf_name)
            fmt = None
            if weights and not params:
                shape = transform(torch.empty(ckpt.shape(hf), device="meta")).shape
                fmt = quant.matrix_format(ours, shape, spec.tie_word_embeddings, weights)
            if fmt:
                total += quant.weight_bytes(shape, fmt, nbytes)
            elif hf not in seen:
                seen.add(hf)
                total += ckpt.numel(hf) * (1 if params else nbytes)
        return total

    g = global_names(spec)
    embed = {k: v for k, v in g.items() if k in ("embed.weight", "pos_embed.weight")}
    head = {k: v for k, v in g.items() if k not in embed}
    exits = ExitInfo()
    if exits_path:
        meta = heads_metadata(Path(exits_path))
        exits = ExitInfo(trained=sorted(meta), kinds={k: v["kind"] for k, v in meta.items()}, heads_path=exits_path,
                         card_path=str(Path(exits_path).with_suffix(".json")))
    tok_cfg = Path(d) / "tokenizer_config.json"
    chat = None
    if tok_cfg.exists():
        chat = bool(json.loads(tok_cfg.read_text()).get("chat_template")) or (Path(d) / "chat_template.jinja").exists()
    return ModelInfo(
        name=name, description=description, source=source, prepared=True, family=spec.family,
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, vocab_size=spec.vocab_size, dtype=dtype,
        embed_bytes=size(embed), layer_bytes=size(layer_names(spec, 0)), head_bytes=size(head),
        layer_params=size(layer_names(spec, 0), params=True),
        kv_bytes_per_token_per_layer=memory.kv_bytes_per_token(1, spec.num_kv_heads, spec.head_dim, dtype),
        tied_embeddings=spec.tie_word_embeddings, chat_template=chat, exits=exits,
    )


def resolve_name(ckpt: Any, name: str) -> str:
    """Checkpoint tensor names sometimes lack the ``model.``/``transformer.`` prefix (old GPT-2 files)."""
    if name in ckpt:
        return name
    short = name.split(".", 1)[1]
    if short in ckpt:
        return short
    raise HeliosError(f"checkpoint {ckpt.dir} has no tensor {name!r}")
