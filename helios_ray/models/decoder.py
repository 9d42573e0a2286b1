"""One readable decoder-only transformer for every supported family, built to be truncated.

Why our own model rather than ``transformers``' modules: HELIOS loads layers [0, D) only, runs the stack
layer by layer so that exits can be read in between, and the serving engine owns the KV-cache layout
(paged blocks, batches of sequences at different positions).  ``transformers`` stays the oracle: tests
check that logits at full depth and hidden states at every depth match ``AutoModelForCausalLM`` exactly.

The model sees the world through a :class:`KVCache` (where keys/values live, which positions they hold) and a
:class:`StepContext` (the query positions of this step, masks and rotary tables, computed once per step and
shared by all layers).  Positions are absolute per sequence; a position of ``-1`` marks padding.
"""

from __future__ import annotations

from typing import Hashable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helios_ray.models.families import ArchSpec

_ACTS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class KVCache(Protocol):
    """Where a step's keys and values go.  The engine provides a paged implementation; tests use Dense."""

    def key_positions(self) -> Tensor:
        """[B, S] absolute positions of the cached keys after this step's append (-1 = empty slot)."""
        ...

    def append_positions(self, q_pos: Tensor) -> None:
        """Called once per step before any layer runs, with this step's [B, T] query positions."""
        ...

    def update(self, key: Hashable, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's [B, Hkv, T, hd] k/v for layer ``key``; return all keys/values [B, Hkv, S, hd]."""
        ...

    def write(self, key: Hashable, k: Tensor, v: Tensor) -> None:
        """Store this step's k/v for layer ``key`` without reading anything back (token-level exit)."""
        ...

    def select(self, rows: Tensor) -> "KVCache":
        """The same storage seen by a subset of this step's rows (a [B] bool mask), for token-level exit."""
        ...


class DenseKVCache:
    """Contiguous per-layer cache (concatenation along the sequence axis).  Simple and exact; the serving
    engine replaces it with a block-allocated one."""

    def __init__(self) -> None:
        self.kv: dict[Hashable, tuple[Tensor, Tensor]] = {}
        self._pos: Tensor | None = None

    def append_positions(self, q_pos: Tensor) -> None:
        self._pos = q_pos if self._pos is None else torch.cat([self._pos, q_pos], dim=1)

    def key_positions(self) -> Tensor:
        assert self._pos is not None, "append_positions() must run before attention"
        return self._pos

    def update(self, key: Hashable, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        old = self.kv.get(key)
        if old is not None:
            k = torch.cat([old[0], k], dim=2)
            v = torch.cat([old[1], v], dim=2)
        self.kv[key] = (k, v)
        return k, v

    def write(self, key: Hashable, k: Tensor, v: Tensor) -> None:
        self.update(key, k, v)

    def select(self, rows: Tensor) -> "DenseKVCache":
        # Rows of one dense cache share a length, so a row cannot skip a layer another row runs: only the
        # trivial subsets exist (the engine's paged cache supports any subset).
        if bool(rows.all()):
            return self
        raise NotImplementedError("DenseKVCache cannot run a subset of its rows; use the engine's paged cache")

    @property
    def length(self) -> int:
        return 0 if self._pos is None else int(self._pos.shape[1])


class StepContext:
    """Per-step data shared by all layers: masks per window size and rotary tables per rope kind."""

    def __init__(self, spec: ArchSpec, q_pos: Tensor, cache: KVCache, dtype: torch.dtype):
        self.spec = spec
        self.q_pos = q_pos
        self.cache = cache
        self.dtype = dtype
        cache.append_positions(q_pos)
        self._masks: dict[int | None, Tensor] = {}
        self._rope: dict[str, tuple[Tensor, Tensor]] = {}

    def select(self, rows: Tensor) -> "StepContext":
        """This step for a subset of its rows ([B] bool mask): the rows that did not exit yet."""
        sub = StepContext.__new__(StepContext)
        sub.spec, sub.q_pos, sub.cache, sub.dtype = self.spec, self.q_pos[rows], self.cache.select(rows), self.dtype
        sub._masks = {w: m[rows] for w, m in self._masks.items()}
        sub._rope = {k: (c[rows], s[rows]) for k, (c, s) in self._rope.items()}
        return sub

    def mask(self, window: int | None) -> Tensor:
        """[B, 1, T, S] boolean: key visible to query (causal, not padding, inside the sliding window)."""
        m = self._masks.get(window)
        if m is None:
            k_pos = self.cache.key_positions()[:, None, :]
            q_pos = self.q_pos[:, :, None]
            m = (k_pos >= 0) & (k_pos <= q_pos)
            if window is not None:
                m = m & (q_pos - k_pos < window)
            # Padding queries see everything so no row is all-masked (their outputs are discarded).
            m = m | (q_pos < 0)
            m = m[:, None]
            self._masks[window] = m
        return m

    def rope(self, kind: str) -> tuple[Tensor, Tensor]:
        cs = self._rope.get(kind)
        if cs is None:
            r = self.spec.rope[kind]
            inv = torch.tensor(r.inv_freq, dtype=torch.float32, device=self.q_pos.device)
            freqs = self.q_pos.clamp(min=0)[..., None].float() * inv
            emb = torch.cat((freqs, freqs), dim=-1)
            cs = ((emb.cos() * r.attention_scaling).to(self.dtype), (emb.sin() * r.attention_scaling).to(self.dtype))
            self._rope[kind] = cs
        return cs


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, d]
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]  # partial rotary
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


class Norm(nn.Module):
    def __init__(self, kind: str, dim: int, eps: float, bias: bool):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if (kind == "layer" and bias) else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "rms_gemma":  # Gemma: (1 + w), multiplied in float32
            return (x32 * (1.0 + self.weight.float())).type_as(x)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        h, nh, nkv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.spec = spec
        self.q = nn.Linear(h, nh * hd, bias=spec.qkv_bias)
        self.k = nn.Linear(h, nkv * hd, bias=spec.qkv_bias)
        self.v = nn.Linear(h, nkv * hd, bias=spec.qkv_bias)
        self.o = nn.Linear(nh * hd, h, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = Norm(spec.norm, hd, spec.norm_eps, False)
            self.k_norm = Norm(spec.norm, hd, spec.norm_eps, False)

    def kv(self, x: Tensor, ctx: StepContext, rope: str) -> tuple[Tensor, Tensor]:
        """This step's keys and values [B, Hkv, T, hd] (normed and rotated) - what the cache stores."""
        s = self.spec
        B, T, _ = x.shape
        k = self.k(x).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:
            k = self.k_norm(k)
        if rope:
            cos, sin = ctx.rope(rope)
            k = _apply_rope(k, cos, sin)
        return k, v

    def forward(self, x: Tensor, ctx: StepContext, cache_key: Hashable, rope: str, window: int | None) -> Tensor:
        s = self.spec
        B, T, _ = x.shape
        q = self.q(x).view(B, T, s.num_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:
            q = self.q_norm(q)
        if rope:
            cos, sin = ctx.rope(rope)
            q = _apply_rope(q, cos, sin)
        if getattr(ctx.cache, "packed", False):
            return self.o(self._attend_groups(q, x, ctx, cache_key, rope, window))
        if T == 1 and getattr(ctx.cache, "in_place_decode", False):  # the engine's paged kernel, no gathered copy
            ctx.cache.write(cache_key, *self.kv(x, ctx, rope))
            out = ctx.cache.attend_in_place(cache_key, q, s.attn_scale, window,  # type: ignore[attr-defined]
                                            s.attn_logit_softcap)
            return self.o(out.transpose(1, 2).reshape(B, T, s.num_heads * s.head_dim))
        k, v = ctx.cache.update(cache_key, *self.kv(x, ctx, rope))
        out = self._attend(q, k, v, ctx.mask(window))
        return self.o(out.transpose(1, 2).reshape(B, T, s.num_heads * s.head_dim))

    def _attend_groups(self, q: Tensor, x: Tensor, ctx: StepContext, cache_key: Hashable, rope: str,
                       window: int | None) -> Tensor:
        """A packed step ([1, N] tokens of many sequences): attention per group of the engine's PackedKV -
        the batched decode tokens, then each prompt chunk - while every matmul stays one packed GEMM."""
        s, cache = self.spec, ctx.cache
        kvs = cache.update_groups(cache_key, *self.kv(x, ctx, rope))  # type: ignore[attr-defined]
        outs = []
        for gi, (g, kv) in enumerate(zip(cache.groups(), kvs)):  # type: ignore[attr-defined]
            qg = q[0, :, g.start:g.end].view(s.num_heads, g.rows, g.tokens, s.head_dim).transpose(0, 1)
            if kv is None:  # decode tokens read the paged KV in place (engine/paged_attention.py)
                og = cache.attend_in_place(gi, cache_key, qg, s.attn_scale, window,  # type: ignore[attr-defined]
                                           s.attn_logit_softcap)
            else:
                og = self._attend(qg, *kv, cache.mask(gi, window))  # type: ignore[attr-defined]
            outs.append(og.transpose(1, 2).reshape(g.rows * g.tokens, s.num_heads * s.head_dim))
        return torch.cat(outs)[None] if len(outs) > 1 else outs[0][None]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        s = self.spec
        if s.attn_logit_softcap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=s.attn_scale, enable_gqa=s.num_heads != s.num_kv_heads
            )
        # softcapped logits need the explicit (eager) path
        rep = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        w = (q @ k.transpose(-1, -2)) * s.attn_scale
        w = torch.tanh(w / s.attn_logit_softcap) * s.attn_logit_softcap
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
        return torch.softmax(w.float(), dim=-1).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.act = _ACTS[spec.act]
        self.gate = nn.Linear(h, i, bias=spec.mlp_bias) if spec.gated_mlp else None
        self.up = nn.Linear(h, i, bias=spec.mlp_bias)
        self.down = nn.Linear(i, h, bias=spec.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block; Gemma adds "sandwich" norms after attention and MLP."""

    def __init__(self, spec: ArchSpec, rope: str, window: int | None):
        super().__init__()
        self.rope, self.window = rope, window
        self.attn_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, spec.norm_bias)
        self.attn = Attention(spec)
        self.mlp_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, spec.norm_bias)
        self.mlp = MLP(spec)
        if spec.sandwich_norms:
            self.post_attn_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, spec.norm_bias)
            self.post_mlp_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, spec.norm_bias)
        self.sandwich = spec.sandwich_norms

    def propagate_kv(self, x: Tensor, ctx: StepContext, cache_key: Hashable) -> None:
        """Write this block's KV for tokens that exited below it, computed from their exit hidden state ``x``
        (CALM's state propagation): later tokens that do reach this block find an entry at every position."""
        ctx.cache.write(cache_key, *self.attn.kv(self.attn_norm(x), ctx, self.rope))

    def forward(self, x: Tensor, ctx: StepContext, cache_key: Hashable) -> Tensor:
        h = self.attn(self.attn_norm(x), ctx, cache_key, self.rope, self.window)
        if self.sandwich:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.sandwich:
            h = self.post_mlp_norm(h)
        return x + h


class DecoderLM(nn.Module):
    """Embeddings, the first ``depth`` blocks, and the final norm + LM head (the shared exit)."""

    def __init__(self, spec: ArchSpec, depth: int):
        super().__init__()
        if not 1 <= depth <= spec.num_layers:
            raise ValueError(f"depth {depth} outside [1, {spec.num_layers}]")
        self.spec, self.depth = spec, depth
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.pos_embed = (
            nn.Embedding(spec.max_positions + spec.learned_pos_offset, spec.hidden_size)
            if spec.learned_positions
            else None
        )
        self.layers = nn.ModuleList(
            Block(spec, spec.layer_rope[i], spec.layer_window[i]) for i in range(depth)
        )
        self.final_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, spec.norm_bias)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.quant: str | None = None  # weight format when quantized (models/quant.py swaps the linears)
        self.prepacked = False  # bf16 CPU projections in oneDNN's layout (models/prepack.py swaps the linears)

    @property
    def lm_head_weight(self) -> Tensor:
        """The LM head as a float matrix (dequantized when the model is quantized: a copy, for training code)."""
        head = self.embed if self.lm_head is None else self.lm_head
        return head.weight if isinstance(head, (nn.Linear, nn.Embedding)) else head.dequantized()

    @property
    def dtype(self) -> torch.dtype:
        """The activation (and KV) dtype; the final norm is never quantized, so it carries it."""
        return self.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    def context(self, q_pos: Tensor, cache: KVCache) -> StepContext:
        return StepContext(self.spec, q_pos, cache, self.dtype)

    def embed_tokens(self, ids: Tensor, ctx: StepContext) -> Tensor:
        x = self.embed(ids)
        if self.spec.embed_scale is not None:
            x = x * torch.tensor(self.spec.embed_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(ctx.q_pos.clamp(min=0) + self.spec.learned_pos_offset)
        return x

    def run_layers(self, x: Tensor, ctx: StepContext, start: int = 0, end: int | None = None) -> Tensor:
        for i in range(start, self.depth if end is None else end):
            x = self.layers[i](x, ctx, i)
        return x

    def logits(self, h: Tensor) -> Tensor:
        """The shared head: final norm, LM head, optional final soft-capping."""
        x = self.final_norm(h)
        if self.lm_head is not None:
            logits = self.lm_head(x)
        elif isinstance(self.embed, nn.Embedding):
            logits = F.linear(x, self.embed.weight)
        else:  # a quantized tied head (models/quant.py QuantEmbedding)
            logits = self.embed.project(x)
        cap = self.spec.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, ids: Tensor, q_pos: Tensor, cache: KVCache) -> Tensor:
        """Hidden state after the loaded layers (no final norm)."""
        ctx = self.context(q_pos, cache)
        return self.run_layers(self.embed_tokens(ids, ctx), ctx)
