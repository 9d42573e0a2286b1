"""The "plain" replica: ``transformers`` ``generate()`` behind the same router and API, full model, no exits.

This is how a model is usually put behind an HTTP endpoint without a serving engine, and the third system of
``helios-ray bench serve``.  It batches *statically*: requests that arrive while a batch runs wait for the whole
batch to finish, and a batch is padded to its longest prompt, because that is what ``generate()`` does.  Within
those rules it is made as good as it honestly can be:

* every request waiting when a batch starts joins it (up to ``engine.max_num_seqs`` and the memory budget);
* each row stops at its own ``max_tokens``/EOS/stop string (a per-row stopping criterion), so a batch ends when
  its longest row ends rather than at the batch-wide maximum;
* tokens stream as they are produced (the stopping criterion sees every step and relays the new tokens).

Memory: the KV cache of a static batch holds ``rows x (longest prompt + longest max_tokens)`` tokens at every
layer, so a batch is admitted only while that fits ``engine.memory_budget`` minus the weights - the same budget the
engine replicas get.  Requests with different sampling settings never share a batch (``generate()`` takes one
setting per call); a request with a ``seed`` runs alone, seeded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator


from helios_ray.serve.config import ServeConfig
from helios_ray.errors import HeliosError, InvalidRequestError
from helios_ray.serve.schemas import (
    GenerateCall, ReplicaStats, StreamEnd, StreamError, StreamEvent, StreamStart, StreamToken,
)

log = logging.getLogger("ray.serve")


@dataclass
class _Pending:
    ids: list[int]
    params: Any  # SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    out: list[int] = field(default_factory=list)
    stream: Any = None  # TextStream: incremental detokenizer + stop rules, one per request
    done: bool = False
    cancelled: bool = False

    @property
    def key(self) -> tuple:
        p = self.params
        if p.seed is not None:
            return ("seed", id(self))
        return (p.temperature, p.top_p, p.top_k)


class PlainReplica:
    async def __init__(self, config: dict[str, Any], brain: Any, group: str = "default"):
        self.cfg = ServeConfig.model_validate(config)
        self.brain = brain
        self.group = group
        self.name = self.cfg.candidates[0]
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self.tokens_out = self.batches = self.requests = 0
        self.running = 0
        self.busy_s = 0.0
        await asyncio.to_thread(self._load)
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._batch_loop())
        self._reporter = loop.create_task(self._report_stats())

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from helios_ray.models.loading import pick_device, pick_dtype
        from helios_ray.models.repository import ModelRepository

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self.cfg.engine.torch_threads:
            torch.set_num_threads(self.cfg.engine.torch_threads)
        repo = ModelRepository(extra=self.cfg.models, models_file=self.cfg.models_file)
        d = repo.checkpoint_dir(self.name)
        self.device = pick_device(self.cfg.device)
        dtype = pick_dtype(self.cfg.dtype, self.device)  # the same serving dtype as the engine replicas
        self.hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(d))
        c = self.hf.config.get_text_config()
        self.num_layers = int(c.num_hidden_layers)
        kv_heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        from helios_ray import memory  # the one memory model, as the engine and the policy use

        esize = torch.tensor([], dtype=dtype).element_size()
        self.kv_bytes_per_token = memory.kv_bytes_per_token(self.num_layers, kv_heads, head_dim, esize)
        self.weight_bytes = sum(memory.param_bytes(p.numel(), str(p.dtype)) for p in self.hf.parameters())
        if self.cfg.engine.memory_budget is not None:
            self.budget = int(self.cfg.engine.memory_budget)
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            self.budget = int(free * self.cfg.engine.gpu_memory_fraction) + self.weight_bytes
        else:
            raise HeliosError("a memory budget (engine.memory_budget) is required on CPU")
        self.kv_budget = self.budget - self.weight_bytes
        if self.kv_budget <= 0:
            raise HeliosError(f"memory budget {self.budget >> 20} MiB does not hold the weights "
                              f"({self.weight_bytes >> 20} MiB)")
        gen = self.hf.generation_config
        eos = gen.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids or {0}))
        self.max_model_len = min(self.cfg.engine.max_model_len or 8192,
                                 int(getattr(c, "max_position_embeddings", 8192)))

    # ----------------------------------------------------------------------------------------- admission
    def _kv_tokens(self, batch: list[_Pending]) -> int:
        """KV slots a static batch holds: every row padded to the longest prompt + the longest output."""
        return len(batch) * (max(len(p.ids) for p in batch) + max(p.params.max_tokens for p in batch))

    def _fits(self, batch: list[_Pending]) -> bool:
        return (len(batch) <= self.cfg.engine.max_num_seqs
                and self._kv_tokens(batch) * self.kv_bytes_per_token <= self.kv_budget)

    def _validate(self, ids: list[int], params: Any) -> None:
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                                      f"exceeds the maximum context of {self.max_model_len} tokens")
        if total * self.kv_bytes_per_token > self.kv_budget:
            raise InvalidRequestError(f"the request needs {total} KV slots but the memory budget holds "
                                      f"{self.kv_budget // self.kv_bytes_per_token}; lower max_tokens")

    # ----------------------------------------------------------------------------------------- batching
    async def _batch_loop(self) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            first = self._pending.popleft()
            if first.cancelled:
                continue
            batch = [first]
            rest: deque[_Pending] = deque()
            while self._pending:
                p = self._pending.popleft()
                if p.cancelled:
                    continue
                if p.key == first.key and self._fits(batch + [p]):
                    batch.append(p)
                else:
                    rest.append(p)
            self._pending.extendleft(reversed(rest))
            self.running = len(batch)
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self._run_batch, batch)
            except Exception as e:  # a failing batch ends its requests, never the replica
                log.exception("plain replica: batch failed")
                for p in batch:
                    if not p.done:
                        p.done = True
                        p.loop.call_soon_threadsafe(p.queue.put_nowait, StreamEnd(
                            finish_reason="error", completion_tokens=len(p.out), error=f"{type(e).__name__}: {e}"))
            finally:
                self.busy_s += time.perf_counter() - t0
                self.batches += 1
                self.running = 0

    def _run_batch(self, batch: list[_Pending]) -> None:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        replica = self
        T = max(len(p.ids) for p in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, T - len(p.ids):] = torch.tensor(p.ids)
            mask[i, T - len(p.ids):] = 1
        conf: list[float] = [0.0] * len(batch)

        class Confidence(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                conf[:] = torch.softmax(scores.float(), -1).max(-1).values.tolist()
                return scores

        class RowStop(StoppingCriteria):
            """Relays each row's new token and ends rows one by one (max_tokens, EOS, stop string, client gone)."""

            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
                last = input_ids[:, -1].tolist()
                done = []
                for i, p in enumerate(batch):
                    if not p.done:
                        replica._emit(p, int(last[i]), conf[i])
                    done.append(p.done)
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        p0 = batch[0].params
        kw: dict[str, Any] = {"do_sample": p0.temperature > 0}
        if p0.temperature > 0:
            kw.update(temperature=p0.temperature, top_p=p0.top_p, top_k=p0.top_k or 0)
            if p0.seed is not None:
                torch.manual_seed(p0.seed)
        with torch.inference_mode():
            self.hf.generate(
                ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max(p.params.max_tokens for p in batch), pad_token_id=self.pad_id,
                eos_token_id=None, logits_processor=LogitsProcessorList([Confidence()]),
                stopping_criteria=StoppingCriteriaList([RowStop()]), **kw)
        for p in batch:  # generation can end before a row's own stop (e.g. the context limit)
            if not p.done:
                self._end(p, "length")

    def _emit(self, p: _Pending, tok: int, conf: float) -> None:
        if p.cancelled:
            p.done = True
            return
        params = p.params
        is_eos = tok in self.eos_ids and not params.ignore_eos
        if not is_eos:
            p.out.append(tok)
        delta, reason = p.stream.add(None if is_eos else tok, is_eos, len(p.out) >= params.max_tokens)
        if not is_eos:
            self.tokens_out += 1
            p.loop.call_soon_threadsafe(p.queue.put_nowait, StreamToken(
                token=tok, text=delta, exit_layer=self.num_layers, confidence=conf, breach=conf < self.cfg.threshold))
        if reason is not None:
            self._end(p, reason)

    def _end(self, p: _Pending, reason: str) -> None:
        p.done = True
        p.loop.call_soon_threadsafe(p.queue.put_nowait, StreamEnd(finish_reason=reason,
                                                                   completion_tokens=len(p.out)))

    # ----------------------------------------------------------------------------------------- API
    async def generate(self, call: GenerateCall) -> AsyncIterator[StreamEvent]:
        from helios_ray.serve.replica import prepare

        from helios_ray.engine.detok import TextStream

        try:
            ids, params = prepare(self.tokenizer, call)
            self._validate(ids, params)
            if len(call.resume_ids) >= params.max_tokens:
                raise InvalidRequestError(f"nothing to resume: {len(call.resume_ids)} tokens reach max_tokens")
        except HeliosError as e:
            yield StreamError(status=e.http_status, message=str(e))
            return
        # a resumed request (its replica died): prompt + the streamed tokens as input, those count as output
        p = _Pending(ids + list(call.resume_ids), params, asyncio.get_running_loop(), asyncio.Queue(),
                     out=list(call.resume_ids), stream=TextStream.resumed(self.tokenizer, params, call.resume_ids))
        self.requests += 1
        self._pending.append(p)
        self._wake.set()
        yield StreamStart(model=self.name, depth=self.num_layers, prompt_tokens=len(ids))
        try:
            while True:
                ev = await p.queue.get()
                yield ev
                if isinstance(ev, StreamEnd):
                    return
        finally:
            p.cancelled = True  # client gone (or finished): the row stops at the next step

    async def stats(self) -> ReplicaStats:
        from helios_ray import memory as _memory

        return ReplicaStats.here(
            mode="plain", group=self.group,
            model=self.name, depth=self.num_layers, total_layers=self.num_layers, exit_head="none",
            running=self.running, waiting=len(self._pending), weight_bytes=self.weight_bytes,
            kv_bytes_per_token=self.kv_bytes_per_token, memory_budget_bytes=self.budget,
            max_concurrent_1k=min(self.cfg.engine.max_num_seqs, _memory.Footprint(
                self.weight_bytes, self.kv_bytes_per_token).max_sequences(self.budget, 1024)),
            tokens_out=self.tokens_out, steps=self.batches, requests=self.requests, last_batch=self.running,
        )

    async def _report_stats(self, every_s: float = 2.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.brain.report_replica.remote(await self.stats())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("plain replica: stats report failed", exc_info=True)

    async def check_health(self) -> None:
        if self._worker.done():
            raise RuntimeError("the batching loop ended")

