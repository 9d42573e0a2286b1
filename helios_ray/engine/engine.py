"""The step loop: schedule, run the truncated model once, sample, stream token events, account memory.

``LLMEngine`` is synchronous and single-threaded (easy to test and reason about); ``AsyncEngine`` runs it on a
dedicated thread (torch releases the GIL during kernels) and exposes ``async for event in generate(...)`` to
asyncio callers such as the Serve replica.  All control operations (add, abort, change depth, swap model) are
executed by the engine thread between steps, so a step never sees a half-applied change.

Live depth change is **recompute**: at a step boundary every running sequence is preempted (KV dropped,
tokens kept), the model grows or shrinks in place (growing reads only the new layers), the block pool is
re-sized for the new per-token KV cost, and the sequences are prefilled again at the new depth ahead of new
arrivals.  Nothing queued or running is lost; the pause is the layer load plus one recompute prefill, and
``set_depth`` reports it.  Drain-then-switch would avoid the recompute but stall new requests behind the
longest running one, which on CPU is tens of seconds; recompute of a 16-sequence batch is ~1 s.  A model
*swap* (different tokenizer) drains instead - see ``swap_model``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch
from helios_ray.engine.config import EngineConfig
from helios_ray.engine.detok import TextStream
from helios_ray.engine.kv_cache import BlockManager, KVLayout, PagedKVCache, trim_heap
from helios_ray.engine import paged_attention
from helios_ray.engine.packed import PackedKV
from helios_ray.engine.sampling import sample
from helios_ray.engine.scheduler import Scheduler
from helios_ray.engine.sequence import SamplingParams, Sequence, SeqStatus, TokenEvent
from helios_ray.errors import EngineDrainingError, HeliosError, InvalidRequestError
from helios_ray.models.early_exit import EarlyExitLM

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """One step, as the control plane sees it."""

    prefill: bool
    batch_size: int
    tokens_in: int
    tokens_out: int
    seconds: float
    breaches: int
    kv_blocks_used: int
    kv_blocks_total: int
    running: int
    waiting: int
    depth: int


@dataclass
class DepthChange:
    old_depth: int
    new_depth: int
    load_seconds: float
    pause_seconds: float
    preempted: int
    kv_blocks_before: int
    kv_blocks_after: int


@dataclass
class EngineTotals:
    steps: int = 0
    tokens_out: int = 0
    tokens_in: int = 0
    breaches: int = 0
    requests_finished: int = 0
    preemptions: int = 0
    busy_seconds: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=256))


class LLMEngine:
    def __init__(self, model: EarlyExitLM, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.totals = EngineTotals()
        self.step_listeners: list[Callable[[StepStats], None]] = []
        if self.config.torch_threads is not None:
            torch.set_num_threads(self.config.torch_threads)
        self.sequences: dict[int, Sequence] = {}
        self._scheduler: Scheduler | None = None
        self._setup_memory()

    # ------------------------------------------------------------------------------------- memory
    @property
    def scheduler(self) -> Scheduler:
        assert self._scheduler is not None
        return self._scheduler

    @property
    def memory_budget_bytes(self) -> int:
        if self.config.memory_budget is not None:
            return int(self.config.memory_budget)
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            return int(free * self.config.gpu_memory_fraction) + self.model.param_bytes
        raise HeliosError("a memory budget (engine.memory_budget) is required on CPU")

    @property
    def layout(self) -> KVLayout:
        m = self.model
        return KVLayout(
            num_kv_layers=m.kv_layers,
            num_kv_heads=m.spec.num_kv_heads, head_dim=m.spec.head_dim,
            dtype_bytes=m.lm.dtype.itemsize, block_size=self.config.block_size,
        )

    @property
    def max_model_len(self) -> int:
        return min(self.config.max_model_len or 8192, self.model.spec.max_positions)

    def _setup_memory(self) -> None:
        budget = self.memory_budget_bytes
        fp = self.model.footprint  # the one memory model (helios_ray/memory.py), as the policy plans with
        weights = fp.weight_bytes
        layout = self.layout
        assert layout.bytes_per_token == fp.kv_bytes_per_token
        num_blocks = fp.kv_blocks(budget, layout.block_size)
        if num_blocks < 1:
            raise HeliosError(
                f"memory budget {budget / 2**20:.0f} MiB does not hold the weights ({weights / 2**20:.0f} MiB at "
                f"depth {self.model.depth}) plus one KV block ({layout.bytes_per_block / 2**20:.2f} MiB)"
            )
        blocks = BlockManager(num_blocks, layout.block_size)
        dev, dtype = self.model.device, self.model.lm.dtype
        self.kv = PagedKVCache(layout, num_blocks, dev, dtype,
                               in_place_decode=paged_attention.resolve(self.config.decode_attention, dev, dtype),
                               prefault=self.config.prefault_kv)
        if self._scheduler is None:
            self._scheduler = Scheduler(blocks, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        else:
            assert not self._scheduler.running, "re-sizing memory with running sequences"
            self._scheduler.blocks = blocks

    def max_concurrent(self, seq_len: int) -> int:
        """How many sequences of ``seq_len`` tokens the block pool holds at once (pure arithmetic)."""
        return self.scheduler.blocks.num_blocks // self.layout.blocks_for(seq_len)

    # ----------------------------------------------------------------------------------- requests
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model.spec.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"maximum context of {self.max_model_len} tokens"
            )
        need = self.layout.blocks_for(total)
        if need > self.scheduler.blocks.num_blocks:
            raise InvalidRequestError(
                f"the request needs {need} KV blocks but this replica holds {self.scheduler.blocks.num_blocks} "
                f"at depth {self.model.depth}; lower max_tokens or the prompt length"
            )

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    resume_ids: list[int] | None = None) -> Sequence:
        """Queue a request.  ``resume_ids``: output a replica that died had already streamed - the sequence starts
        as a preempted one does (prompt and those tokens prefilled again, they count towards ``max_tokens``) and
        streams only what comes after them."""
        params = params or SamplingParams()
        resume = list(resume_ids or [])
        self.validate(prompt_ids + resume, params.model_copy(update={"max_tokens": max(1, params.max_tokens
                                                                                       - len(resume))}))
        if len(resume) >= params.max_tokens:
            raise InvalidRequestError(f"nothing to resume: {len(resume)} tokens already reach max_tokens")
        seq = Sequence(list(prompt_ids), params, output_ids=resume)
        seq.stream = TextStream.resumed(self.model.tokenizer, params, resume)
        seq.text, seq.emitted_chars = seq.stream.text, seq.stream.emitted
        self.sequences[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, seq_id: int) -> bool:
        """Cancel a request; its blocks are freed immediately."""
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
        return True

    # ---------------------------------------------------------------------------------------- step
    @property
    def mixed_steps(self) -> bool:
        """Chunked prefill in packed mixed steps (token-level exit needs whole rows, so it keeps the old ones)."""
        return self.config.chunked_prefill and not self.model.token_exits

    def step(self) -> list[TokenEvent]:
        if self.mixed_steps:
            return self._step_mixed()
        seqs, prefill = self.scheduler.schedule()
        if not seqs:
            return []
        t0 = time.perf_counter()
        try:
            if prefill:
                # One forward pass per prompt: prompts differ in length, and padding them into one batch would
                # spend compute on pad tokens; a prompt alone is already a GEMM-sized matrix.
                outs = [self._forward([s], torch.tensor([s.all_ids]), torch.arange(s.num_tokens)[None])
                        for s in seqs]
                token, conf, logits, layers = (torch.cat([o[i] for o in outs]) for i in range(4))
                tokens_in = sum(s.num_tokens for s in seqs)
            else:
                token, conf, logits, layers = self._forward(
                    seqs, torch.tensor([s.token_ids(s.num_tokens - 1, s.num_tokens) for s in seqs]),
                    torch.tensor([[s.num_tokens - 1] for s in seqs]))
                tokens_in = len(seqs)
            new_tokens = sample(logits, seqs, greedy=token)
        except Exception as e:  # a failing batch never takes the engine down
            log.exception("engine step failed")
            return [self._finish(s, None, f"error: {type(e).__name__}: {e}") for s in seqs]
        for s in seqs:
            s.num_cached = s.num_tokens
        return self._emit_step(seqs, new_tokens, conf, layers, prefill, len(seqs), tokens_in, t0)

    def _step_mixed(self) -> list[TokenEvent]:
        """Decode tokens and prompt chunks in one packed forward (``engine/packed.py``)."""
        work = self.scheduler.schedule_mixed()
        if not work:
            return []
        t0 = time.perf_counter()
        seqs = [s for s, _ in work]
        starts = [s.num_cached for s, _ in work]
        counts = [n for _, n in work]
        # The batched decode group is the leading run of one-token items (the scheduler lists decodes first).  A
        # one-token prompt admitted in this step looks the same but comes after other prompts' chunks: it is a
        # prompt group of its own (counting it here once mis-sized the whole packed step).
        num_decode = next((i for i, (s, n) in enumerate(work) if not (n == 1 and s.num_cached == s.num_tokens - 1)),
                          len(work))
        sampling = [s for s, n in work if s.num_cached + n == s.num_tokens]  # their prompt is complete now
        try:
            ids: list[int] = []
            rows: list[int] = []
            for s, n in work:
                ids += s.token_ids(s.num_cached, s.num_cached + n)
                if s.num_cached + n == s.num_tokens:
                    rows.append(len(ids) - 1)
            dev = self.model.device
            kv = PackedKV(self.kv, seqs, starts, counts, num_decode)
            token, conf, logits, layers = self.model.step_packed(torch.tensor([ids], device=dev), kv.q_pos.to(dev), kv,
                                                             torch.tensor(rows, dtype=torch.long, device=dev))
            new_tokens = sample(logits, sampling, greedy=token)
        except Exception as e:  # a failing batch never takes the engine down
            log.exception("engine step failed")
            return [self._finish(s, None, f"error: {type(e).__name__}: {e}") for s in seqs]
        for s, n in work:
            s.num_cached += n
        return self._emit_step(sampling, new_tokens, conf, layers, len(work) > num_decode, len(seqs), len(ids), t0)

    def _emit_step(self, seqs: list[Sequence], new_tokens: list[int], conf: torch.Tensor, layers: torch.Tensor,
                   prefill: bool, batch_size: int, tokens_in: int, t0: float) -> list[TokenEvent]:
        """Append the sampled tokens, stream their events, account the step."""
        conf_list, layer_list = conf.tolist(), layers.tolist()
        events: list[TokenEvent] = []
        breaches = 0
        now = time.perf_counter()
        for s, tok, c, layer in zip(seqs, new_tokens, conf_list, layer_list):
            breach = c < self.model.threshold
            breaches += breach
            events.append(self._append(s, tok, c, breach, now, int(layer)))
        dt = time.perf_counter() - t0
        t = self.totals
        t.steps += 1
        t.tokens_in += tokens_in
        t.tokens_out += len(seqs)
        t.breaches += breaches
        t.busy_seconds += dt
        stats = StepStats(prefill, batch_size, tokens_in, len(seqs), dt, breaches, self.scheduler.blocks.num_used,
                          self.scheduler.blocks.num_blocks, len(self.scheduler.running), len(self.scheduler.waiting),
                          self.model.depth)
        t.recent.append(stats)
        for fn in self.step_listeners:
            fn(stats)
        return events

    def _forward(self, seqs: list[Sequence], ids: torch.Tensor, q_pos: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(argmax token, confidence, logits, exit layer) per row of one unpacked step."""
        dev = self.model.device
        self.kv.begin_step(seqs, q_pos)
        return self.model.step(ids.to(dev), q_pos.to(dev), self.kv)

    def _append(self, s: Sequence, tok: int, conf: float, breach: bool, now: float, layer: int) -> TokenEvent:
        if s.first_token_at is None:
            s.first_token_at = now
        s.output_ids.append(tok)
        p = s.params
        is_eos = tok in self.model.eos_ids and not p.ignore_eos
        at_length = len(s.output_ids) >= p.max_tokens or s.num_tokens >= self.max_model_len
        # incremental: only the new token is decoded and only the new text is searched for stop strings
        if s.stream is None:  # a Sequence built outside add_request
            s.stream = TextStream(self.model.tokenizer, p)
        delta, reason = s.stream.add(None if is_eos else tok, is_eos, at_length)
        s.text, s.emitted_chars = s.stream.text, s.stream.emitted
        ev = TokenEvent(s.seq_id, len(s.output_ids) - 1, tok, delta, layer, conf, breach)
        if reason is not None:
            self._finish(s, reason)
            ev.finished, ev.finish_reason = True, reason
        return ev

    def _finish(self, s: Sequence, reason: str | None, error: str | None = None) -> TokenEvent:
        self.scheduler.remove(s)
        self.sequences.pop(s.seq_id, None)
        s.status = SeqStatus.FINISHED
        s.finish_reason = reason or "error"
        s.finished_at = time.perf_counter()
        self.totals.requests_finished += 1
        self.totals.preemptions += s.preemptions
        return TokenEvent(s.seq_id, len(s.output_ids), None, "", self.model.depth, 0.0, False, True,
                          s.finish_reason, error)

    # ------------------------------------------------------------------------------ live changes
    def set_depth(self, depth: int) -> DepthChange:
        """Change the loaded depth at a step boundary without losing a request (recompute strategy)."""
        t0 = time.perf_counter()
        old, blocks_before = self.model.depth, self.scheduler.blocks.num_blocks
        preempted = self.scheduler.preempt_all()
        load = self.model.set_depth(depth)
        self._setup_memory()
        trim_heap()  # the old pools and layers are free now: give their memory back (kv_cache.trim_heap)
        # queued requests that no longer fit the smaller pool end with a clear error instead of blocking the queue
        dropped = []
        for s in list(self.scheduler.waiting):
            if self.layout.blocks_for(len(s.prompt_ids) + s.params.max_tokens) > self.scheduler.blocks.num_blocks:
                dropped.append(s)
        for s in dropped:
            self._finish(s, None, "the request no longer fits the KV memory after a depth change")
        return DepthChange(old, depth, load, time.perf_counter() - t0, len(preempted), blocks_before,
                           self.scheduler.blocks.num_blocks)

    def swap_model(self, model: EarlyExitLM) -> None:
        """Replace the model.  Token ids differ across tokenizers, so this requires an idle engine: the async
        wrapper drains (stops admitting, lets running requests finish) before calling it."""
        if self.scheduler.has_work:
            raise HeliosError("swap_model() needs an idle engine; drain first")
        self.model = model
        self._setup_memory()
        trim_heap()


class AsyncEngine:
    """Runs an LLMEngine on its own thread and streams events to asyncio consumers."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._ops: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._subscribers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._admit = True
        self._thread = threading.Thread(target=self._loop, name="helios-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            while self._ops:
                fn, fut = self._ops.popleft()
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # delivered to the caller
                        fut.set_exception(e)
            if self.engine.scheduler.has_work:
                for ev in self.engine.step():
                    self._publish(ev)
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def _publish(self, ev: TokenEvent) -> None:
        sub = self._subscribers.get(ev.seq_id)
        if sub is None:
            return
        loop, q = sub
        loop.call_soon_threadsafe(q.put_nowait, ev)
        if ev.finished:
            self._subscribers.pop(ev.seq_id, None)

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._ops.append((fn, fut))
        self._wake.set()
        return fut

    async def run(self, fn: Callable[[], object]) -> object:
        return await asyncio.wrap_future(self.call(fn))

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                       resume_ids: list[int] | None = None) -> AsyncIterator[TokenEvent]:
        """Stream token events; leaving the iterator early (client gone) aborts the request and frees its KV."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def add() -> Sequence:
            if not self._admit:
                raise EngineDrainingError("the engine is draining for a model switch")
            seq = self.engine.add_request(prompt_ids, params, resume_ids)
            self._subscribers[seq.seq_id] = (loop, q)
            return seq

        seq = await self.run(add)
        assert isinstance(seq, Sequence)
        finished = False
        try:
            while True:
                ev = await q.get()
                if ev.finished:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self._subscribers.pop(seq.seq_id, None)
                self.call(lambda: self.engine.abort(seq.seq_id))

    async def set_depth(self, depth: int) -> DepthChange:
        res = await self.run(lambda: self.engine.set_depth(depth))
        assert isinstance(res, DepthChange)
        return res

    async def swap_model(self, model: EarlyExitLM, poll_s: float = 0.01) -> float:
        """Drain-then-switch; returns the seconds new requests were held back."""
        t0 = time.perf_counter()
        self._admit = False
        try:
            while await self.run(lambda: self.engine.scheduler.has_work):
                await asyncio.sleep(poll_s)
            await self.run(lambda: self.engine.swap_model(model))
        finally:
            self._admit = True
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
