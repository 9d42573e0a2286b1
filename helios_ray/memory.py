"""The one memory model: bytes of weights, exit heads and KV per token, and what a budget holds.

Pure arithmetic (no torch), so the engine's admission, the policy's planning, the plain replica and the benches
can all call it and cannot drift apart - before this module each kept its own copy, and they disagreed: the
policy priced exit heads at 4 bytes per parameter whatever the dtype and ignored the KV of a block exit head,
which the engine does pay (a block head attends, so it keeps one more layer of KV per token).

Inputs are *per-part sizes at a dtype* (:class:`ModelParts`): the engine measures them from the loaded modules,
the repository from the checkpoint's tensor shapes, the plain replica from its ``transformers`` model.  The same
parts and depth give the same :class:`Footprint` everywhere; the same footprint, budget and sequence length give
the same concurrency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from helios_ray.dtypes import split_dtype

DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


def dtype_bytes(dtype: str) -> int:
    """Bytes per activation/KV element of ``dtype`` ('float32', 'bfloat16', 'float16'; a 'torch.' prefix is
    accepted; a weight-quantized serving dtype such as 'int8/bfloat16' gives its activation dtype's bytes - the
    quantized weights' own bytes are priced by ``helios_ray.models.quant``)."""
    _, name = split_dtype(dtype)  # ValueError with the known names for anything else
    return DTYPE_BYTES[name]


def param_bytes(num_params: int, dtype: str) -> int:
    return num_params * dtype_bytes(dtype)


def kv_bytes_per_token(kv_layers: int, num_kv_heads: int, head_dim: int, dtype: str | int) -> int:
    """K and V of one token in ``kv_layers`` attention layers (``dtype`` as a name or bytes per element)."""
    nbytes = dtype if isinstance(dtype, int) else dtype_bytes(dtype)
    return kv_layers * 2 * num_kv_heads * head_dim * nbytes


@dataclass(frozen=True)
class ModelParts:
    """Sizes of a model's parts at one dtype; layers are identical, so one layer's bytes stand for all."""

    num_layers: int
    embed_bytes: int  # token (+ learned position) embeddings
    layer_bytes: int  # one decoder layer
    head_bytes: int  # final norm + LM head (0 extra when tied to the embeddings)
    kv_bytes_per_token_per_layer: int
    exit_head_bytes: int = 0  # one trained exit head (loaded below the full depth)
    exit_head_attends: bool = False  # a block exit head keeps one more layer of KV per token


@dataclass(frozen=True)
class Footprint:
    """What one loaded (model, depth, dtype) costs."""

    weight_bytes: int
    kv_bytes_per_token: int

    def kv_blocks(self, budget_bytes: int, block_size: int) -> int:
        """Whole KV blocks of ``block_size`` tokens left by the weights in ``budget_bytes``."""
        per_block = block_size * self.kv_bytes_per_token
        return max(0, (budget_bytes - self.weight_bytes) // per_block) if per_block > 0 else 0

    def max_sequences(self, budget_bytes: int, seq_len: int, block_size: int | None = None) -> int:
        """Concurrent ``seq_len``-token sequences: by whole blocks as the engine admits (``block_size``), or by
        tokens (``None``: the policy's planning granularity, which ignores the last block's rounding)."""
        if self.kv_bytes_per_token <= 0 or budget_bytes <= self.weight_bytes:
            return 0
        if block_size:
            return self.kv_blocks(budget_bytes, block_size) // math.ceil(seq_len / block_size)
        return (budget_bytes - self.weight_bytes) // (self.kv_bytes_per_token * seq_len)


def footprint(parts: ModelParts, depth: int, exit_heads: int | None = None, attending_exit_heads: int | None = None
              ) -> Footprint:
    """Weights and KV per token with layers ``[0, depth)`` loaded.

    By default one exit head is loaded below the full depth (HELIOS serving: the head at D) and none at full
    depth (the model's own head is the exit).  Token-level exit loads several: pass how many
    (``exit_heads``) and how many of them attend (``attending_exit_heads``).
    """
    if not 1 <= depth <= parts.num_layers:
        raise ValueError(f"depth {depth} outside 1..{parts.num_layers}")
    if exit_heads is None:
        exit_heads = 1 if depth < parts.num_layers and parts.exit_head_bytes else 0
    if attending_exit_heads is None:
        attending_exit_heads = exit_heads if parts.exit_head_attends else 0
    weights = parts.embed_bytes + depth * parts.layer_bytes + parts.head_bytes + exit_heads * parts.exit_head_bytes
    kv = (depth + attending_exit_heads) * parts.kv_bytes_per_token_per_layer
    return Footprint(weights, kv)
