"""One packed forward for a mixed step: decode tokens of running sequences plus chunks of prompts.

Why packed: a step's matmuls (QKV, O, MLP) are token-wise, so every token of every sequence can share one
``[1, N, hidden]`` GEMM - no padding, and a prompt no longer needs a forward pass of its own that stalls
everyone's decoding.  Only attention is per sequence; :class:`PackedKV` splits it into *groups*:

* the decode tokens (one per sequence, listed first) form one batched group ``[B, heads, 1, head_dim]`` that
  attends over each sequence's blocks - read in place by the paged kernel when the cache says so
  (``PagedKVCache.in_place_decode``, :mod:`~helios_ray.engine.paged_attention`), else over a gathered copy;
* each prompt chunk is its own group ``[1, heads, T, head_dim]`` attending over its sequence's earlier blocks
  plus itself (causal by absolute position) - chunked prefill (vLLM) is just a chunk that starts at a
  position > 0, and the KV it needs was written by the previous chunks.

It implements the decoder's ``KVCache`` protocol plus ``groups()/update_groups()``, which
:class:`~helios_ray.models.decoder.Attention` uses when present.  Token-level exit (rows leaving the batch) is
not supported here; those models keep the unpacked step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch
from torch import Tensor

from helios_ray.engine.kv_cache import PagedKVCache
from helios_ray.engine.sequence import Sequence


@dataclass
class AttnGroup:
    """Query tokens ``[start, start + rows * tokens)`` of the packed row, as ``rows`` sequences of ``tokens``."""

    start: int
    rows: int
    tokens: int
    gather: Tensor  # [rows, S] pool slots of each row's keys
    k_pos: Tensor  # [rows, S] their positions (-1 = padding)
    q_pos: Tensor  # [rows, tokens]
    in_place: bool = False  # decode group read by the paged kernel: no gathered copy

    @property
    def lens(self) -> Tensor:
        """[rows] keys each row attends to (its query is the last): what the paged kernel reads."""
        return self.q_pos[:, -1] + 1

    @property
    def end(self) -> int:
        return self.start + self.rows * self.tokens


class PackedKV:
    """The KV view of one packed step over a :class:`PagedKVCache`'s pools."""

    packed = True

    def __init__(self, paged: PagedKVCache, seqs: list[Sequence], starts: list[int], counts: list[int],
                 num_decode: int):
        """``seqs[i]`` contributes tokens at positions ``[starts[i], starts[i] + counts[i])``; the first
        ``num_decode`` have one token each and are batched into one attention group."""
        self.paged = paged
        bs = paged.layout.block_size
        dev = paged.device
        tables = [torch.tensor(s.block_table, dtype=torch.long) for s in seqs]

        def slots(i: int, pos: Tensor) -> Tensor:
            return tables[i][pos // bs] * bs + pos % bs

        write, q_pos = [], []
        for i in range(len(seqs)):
            pos = torch.arange(starts[i], starts[i] + counts[i])
            q_pos.append(pos)
            write.append(slots(i, pos))
        self._write = torch.cat(write).to(dev)
        self.q_pos = torch.cat(q_pos)[None]
        self._groups: list[AttnGroup] = []
        if num_decode:
            S = max(starts[:num_decode]) + 1
            gather = torch.zeros(num_decode, S, dtype=torch.long)
            k_pos = torch.full((num_decode, S), -1, dtype=torch.long)
            for i in range(num_decode):
                n = starts[i] + 1
                pos = torch.arange(n)
                gather[i, :n], k_pos[i, :n] = slots(i, pos), pos
            qp = torch.tensor(starts[:num_decode], dtype=torch.long)[:, None]
            self._groups.append(AttnGroup(0, num_decode, 1, gather.to(dev), k_pos.to(dev), qp.to(dev),
                                          in_place=paged.in_place_decode))
        offset = num_decode
        for i in range(num_decode, len(seqs)):
            pos = torch.arange(starts[i] + counts[i])
            qp = q_pos[i][None]
            self._groups.append(AttnGroup(offset, 1, counts[i], slots(i, pos)[None].to(dev), pos[None].to(dev),
                                          qp.to(dev)))
            offset += counts[i]
        self._masks: dict[tuple[int, int | None], Tensor] = {}

    # --- the decoder's KVCache protocol ------------------------------------------------------------------------
    def append_positions(self, q_pos: Tensor) -> None:
        pass

    def key_positions(self) -> Tensor:
        raise NotImplementedError("a packed step attends per group (groups()/update_groups())")

    def update(self, key: Hashable, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("a packed step attends per group (groups()/update_groups())")

    def write(self, key: Hashable, k: Tensor, v: Tensor) -> None:
        kp, vp = self.paged._pool(key)
        kp.index_copy_(0, self._write, k[0].transpose(0, 1).to(kp.dtype))
        vp.index_copy_(0, self._write, v[0].transpose(0, 1).to(vp.dtype))

    def select(self, rows: Tensor) -> "PackedKV":
        raise NotImplementedError("token-level exit runs unpacked steps")

    # --- grouped attention -------------------------------------------------------------------------------------
    def groups(self) -> list[AttnGroup]:
        return self._groups

    def mask(self, gi: int, window: int | None) -> Tensor:
        """[rows, 1, tokens, S]: key visible to query (causal by position, not padding, inside the window)."""
        m = self._masks.get((gi, window))
        if m is None:
            g = self._groups[gi]
            k, q = g.k_pos[:, None, :], g.q_pos[:, :, None]
            m = (k >= 0) & (k <= q)
            if window is not None:
                m = m & (q - k < window)
            m = m[:, None]
            self._masks[(gi, window)] = m
        return m

    def update_groups(self, key: Hashable, k: Tensor, v: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """Store this step's [1, Hkv, N, hd] k/v; return each group's keys/values [rows, Hkv, S, hd], or None for
        a group that reads the pools in place (:meth:`attend_in_place`)."""
        self.write(key, k, v)
        kp, vp = self.paged._pool(key)
        out: list[tuple[Tensor, Tensor] | None] = []
        for g in self._groups:
            if g.in_place:
                out.append(None)
                continue
            R, S = g.gather.shape
            flat = g.gather.reshape(-1)
            out.append((kp.index_select(0, flat).view(R, S, *kp.shape[1:]).transpose(1, 2),
                        vp.index_select(0, flat).view(R, S, *vp.shape[1:]).transpose(1, 2)))
        return out

    def attend_in_place(self, gi: int, key: Hashable, q: Tensor, scale: float, window: int | None,
                        softcap: float | None) -> Tensor:
        """Group ``gi``'s attention ([rows, heads, 1, hd] queries, this step's keys already written) read straight
        from the pools by the paged kernel; returns [rows, heads, 1, hd]."""
        g = self._groups[gi]
        return self.paged.read_in_place(key, q, g.gather, g.lens, scale, window, softcap)
