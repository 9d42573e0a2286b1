"""KV memory under a byte budget: block accounting and the paged store the model reads through.

HELIOS's memory saving becomes throughput here.  The budget minus the loaded weights is the KV capacity; one
token costs ``loaded layers x per-layer KV bytes``, so every layer not loaded directly becomes more blocks and
more concurrent sequences.  ``BlockManager`` is pure arithmetic (what the scheduler admits by);
``PagedKVCache`` is the physical store, a pool of ``num_blocks x block_size`` token slots per layer, and
implements the decoder's ``KVCache`` protocol for one step of a batch.

Reading the pages: SDPA needs each sequence's keys as one tensor, so the generic path gathers the sequence's
blocks (``index_select``) into a dense copy per layer.  On CPU, decode steps skip that copy
(``in_place_decode``, packed or not): :mod:`helios_ray.engine.paged_attention` reads the blocks where they lie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

import torch
from torch import Tensor

from helios_ray.engine.paged_attention import decode_attention
from helios_ray.engine.sequence import Sequence
from helios_ray.errors import HeliosError
from helios_ray.memory import kv_bytes_per_token


@dataclass(frozen=True)
class KVLayout:
    """Everything that fixes the KV arithmetic of one loaded model."""

    num_kv_layers: int  # loaded layers (+1 for a block exit head, which attends too)
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    block_size: int

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.num_kv_layers, self.num_kv_heads, self.head_dim, self.dtype_bytes)

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    def num_blocks(self, kv_budget_bytes: int) -> int:
        return max(0, kv_budget_bytes // self.bytes_per_block)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)


class BlockManager:
    """Free list of block ids.  No hidden caps: capacity is exactly ``num_blocks``."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise HeliosError("the memory budget leaves no room for a single KV block after the weights; "
                              "raise the budget or load fewer layers")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, math.ceil(num_tokens / self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Make ``seq`` own enough blocks for ``num_tokens`` tokens."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            raise RuntimeError("allocate() without can_allocate()")
        for _ in range(need):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_cached = 0


def trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc ``malloc_trim``) after a depth change.

    The old KV pools and layers are freed then, but glibc raises its mmap threshold after large frees and keeps
    later mid-size buffers in the heap, so a replica's RSS stepped up ~200 MB with depth round trips
    (Qwen2.5-Coder-0.5B, 24 -> 22 -> 24 layers, 3 GiB budget, prefaulted: 3.71 GB -> 3.87-3.94 GB; trimmed:
    3.77-3.78 GB, flat; the same decode time; found by `helios-ray bench soak`).  Once per change, so decoding
    pays nothing; a no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PagedKVCache:
    """Per-layer pools of token slots; slot ``b * block_size + o`` is offset ``o`` of block ``b``.

    Pools are allocated on first use of a layer: with ``torch.empty`` by default - the budget bounds them, and
    pages become resident only as tokens are written - or zero-filled (``prefault``, ``EngineConfig.prefault_kv``),
    so the whole pool is resident at once.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device, dtype: torch.dtype,
                 in_place_decode: bool = False, prefault: bool = False):
        """``in_place_decode``: one-token steps (a packed step's decode group, unpacked decode steps and their
        row subsets) attend with the paged kernel (the engine decides it once,
        :func:`helios_ray.engine.paged_attention.resolve`)."""
        self.layout, self.num_blocks = layout, num_blocks
        self.device, self.dtype = device, dtype
        self.in_place_decode = in_place_decode
        self.prefault = prefault
        self._pools: dict[Hashable, tuple[Tensor, Tensor]] = {}
        self._write: Tensor | None = None
        self._write_mask: Tensor | None = None
        self._write_all: Tensor | None = None
        self._gather: Tensor | None = None
        self._k_pos: Tensor | None = None
        self._lens: Tensor | None = None

    def _pool(self, key: Hashable) -> tuple[Tensor, Tensor]:
        pool = self._pools.get(key)
        if pool is None:
            n = self.num_blocks * self.layout.block_size
            shape = (n, self.layout.num_kv_heads, self.layout.head_dim)
            alloc = torch.zeros if self.prefault else torch.empty
            pool = (alloc(shape, device=self.device, dtype=self.dtype),
                    alloc(shape, device=self.device, dtype=self.dtype))
            if len(self._pools) >= self.layout.num_kv_layers:
                raise RuntimeError(f"more KV layers than the layout's {self.layout.num_kv_layers}")
            self._pools[key] = pool
        return pool

    def begin_step(self, seqs: list[Sequence], q_pos: Tensor) -> None:
        """Prepare slot indices for this step: where new tokens go, which slots each sequence attends to."""
        bs = self.layout.block_size
        B, T = q_pos.shape
        ctx_len = [int(q_pos[i].max()) + 1 for i in range(B)]
        S = max(ctx_len)
        gather = torch.zeros(B, S, dtype=torch.long)
        k_pos = torch.full((B, S), -1, dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = ctx_len[i]
            pos = torch.arange(n)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            gather[i, :n] = table[pos // bs] * bs + pos % bs
            k_pos[i, :n] = pos
        valid = q_pos >= 0
        qp = q_pos.clamp(min=0)
        write = torch.gather(gather, 1, qp)  # slot of each query token (its position indexes the gather map)
        self._write_all = write.to(self.device)
        self._write = write[valid].to(self.device)
        self._write_mask = valid.to(self.device)
        self._gather = gather.to(self.device)
        self._k_pos = k_pos.to(self.device)
        self._lens = torch.tensor(ctx_len, dtype=torch.long, device=self.device)

    # --- the decoder's KVCache protocol -------------------------------------------------------------
    def append_positions(self, q_pos: Tensor) -> None:
        assert self._k_pos is not None, "begin_step() must run before the model"

    def key_positions(self) -> Tensor:
        assert self._k_pos is not None
        return self._k_pos

    def update(self, key: Hashable, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        assert self._write is not None and self._gather is not None and self._write_mask is not None
        kp, vp = self._pool(key)
        # [B, H, T, d] -> valid tokens [N, H, d]
        kt, vt = k.transpose(1, 2)[self._write_mask], v.transpose(1, 2)[self._write_mask]
        kp.index_copy_(0, self._write, kt.to(kp.dtype))
        vp.index_copy_(0, self._write, vt.to(vp.dtype))
        B, S = self._gather.shape
        flat = self._gather.reshape(-1)
        kk = kp.index_select(0, flat).view(B, S, *kp.shape[1:]).transpose(1, 2)
        vv = vp.index_select(0, flat).view(B, S, *vp.shape[1:]).transpose(1, 2)
        return kk, vv

    def write(self, key: Hashable, k: Tensor, v: Tensor) -> None:
        assert self._write is not None and self._write_mask is not None
        kp, vp = self._pool(key)
        kp.index_copy_(0, self._write, k.transpose(1, 2)[self._write_mask].to(kp.dtype))
        vp.index_copy_(0, self._write, v.transpose(1, 2)[self._write_mask].to(vp.dtype))

    def read_in_place(self, key: Hashable, q: Tensor, slots: Tensor, lens: Tensor, scale: float,
                      window: int | None, softcap: float | None) -> Tensor:
        """Attention of [B, heads, 1, hd] queries (one per row, this step's keys already written) over layer
        ``key``'s pools through the rows' slot maps, by the paged kernel; [B, heads, 1, hd].  Both this cache's
        decode steps and a packed step's decode group (engine/packed.py) read through here."""
        kp, vp = self._pool(key)
        return decode_attention(q[:, :, 0], kp, vp, slots, lens, scale, window, softcap)[:, :, None]

    def attend_in_place(self, key: Hashable, q: Tensor, scale: float, window: int | None,
                        softcap: float | None) -> Tensor:
        """A decode step's attention read in place, without the gathered copy :meth:`update` makes."""
        assert self._gather is not None and self._lens is not None and q.shape[2] == 1
        return self.read_in_place(key, q, self._gather, self._lens, scale, window, softcap)

    def select(self, rows: Tensor) -> "PagedKVCache":
        """A view for a subset of this step's rows (token-level exit): same pools, the rows' slots only."""
        assert self._write_all is not None and self._write_mask is not None
        assert self._gather is not None and self._k_pos is not None and self._lens is not None
        sub = PagedKVCache(self.layout, self.num_blocks, self.device, self.dtype, self.in_place_decode, self.prefault)
        sub._pools = self._pools  # shared: what the subset writes, the whole step sees
        rows = rows.to(self.device)
        sub._write_mask = self._write_mask[rows]
        sub._write_all = self._write_all[rows]
        sub._write = sub._write_all[sub._write_mask]
        sub._gather, sub._k_pos, sub._lens = self._gather[rows], self._k_pos[rows], self._lens[rows]
        return sub
