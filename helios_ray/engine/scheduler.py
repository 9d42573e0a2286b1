"""Continuous batching: admit by KV blocks, prefill first, decode the rest, preempt when blocks run out.

Each ``schedule()`` call picks one step's work, as nano-vllm does:

* **prefill** - waiting sequences join, oldest first, while the step's token budget
  (``max_num_batched_tokens``), the sequence cap and free blocks allow;
* otherwise **decode** - every running sequence advances one token; a sequence that needs a new block when
  none is free preempts the newest running sequence (its blocks are freed and it goes back to the front of the
  queue to be recomputed later - recompute rather than swap, because CPU RAM *is* the KV memory here).

New requests therefore join at step boundaries and finished ones free their blocks immediately.
"""

from __future__ import annotations

from collections import deque

from helios_ray.engine.kv_cache import BlockManager
from helios_ray.engine.sequence import Sequence, SeqStatus


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def preempt_all(self) -> list[Sequence]:
        """Drop the KV of every running sequence and queue them (oldest first) ahead of new arrivals.
        Used when the model's depth changes: their KV is recomputed at the new depth."""
        seqs = sorted(self.running, key=lambda s: s.arrival)
        for seq in reversed(seqs):
            self._preempt(seq)
        return seqs

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule_mixed(self) -> list[tuple[Sequence, int]]:
        """One mixed step (chunked prefill): ``[(sequence, tokens to run)]``, decode sequences first.

        Every running sequence whose prompt is done decodes one token (preempting the newest when blocks run
        out, as ``schedule``); the rest of the step's ``max_num_batched_tokens`` goes to prompt chunks -
        first of sequences already part-way through their prompt, then of newly admitted ones (oldest
        first).  Admission still reserves blocks for the whole prompt, so admission by memory is unchanged;
        only the compute is chunked.  A running sequence never waits for someone else's prompt.
        """
        decode: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running or seq.num_cached < seq.num_tokens - 1:
                continue
            if self._reserve_decode_slot(seq):
                decode.append(seq)
        work = [(s, 1) for s in decode if s in self.running]
        budget = self.max_num_batched_tokens - len(work)
        for seq in self.running:
            if budget > 0 and seq.num_cached < seq.num_tokens - 1:
                n = min(seq.num_tokens - seq.num_cached, budget)
                work.append((seq, n))
                budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq, seq.num_tokens):
                break
            self.blocks.allocate(seq, seq.num_tokens)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens, budget)
            work.append((seq, n))
            budget -= n
        return work

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill).  Empty when there is nothing that can run."""
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            if batch and tokens + n > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq, n):
                break
            self.blocks.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            batch.append(seq)
            tokens += n
        if batch:
            self.running.extend(batch)
            return batch, True

        # Decode: each running sequence needs a slot for its next token (position num_cached).
        for seq in list(self.running):
            if seq in self.running:  # (not preempted meanwhile as a victim)
                self._reserve_decode_slot(seq)
        return list(self.running), False

    def _reserve_decode_slot(self, seq: Sequence) -> bool:
        """A KV slot for ``seq``'s next token (position num_cached), preempting the newest running sequences -
        ``seq`` itself if it is the newest - until it fits.  Returns whether ``seq`` is still running."""
        while not self.blocks.can_allocate(seq, seq.num_cached + 1):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq, seq.num_cached + 1)
        return True
