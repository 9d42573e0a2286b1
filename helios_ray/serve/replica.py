"""One truncated early-exit replica: an engine on one GPU or CPU slot, following its group's placement.

The replica reads the current placement (model, depth) from the brain deployment when it starts - so a
replica that Serve restarts after a crash comes back with the current configuration - and then long-polls it.
A new placement is applied at an engine step boundary: the same model at another depth grows/shrinks in place
(running requests are recomputed at the new depth), another model drains first (in-flight requests finish on
the model they started with, new ones wait), then swaps.

``generate`` streams typed events (:mod:`.schemas`): one ``StreamStart`` (model, depth, prompt tokens),
``StreamToken``s, one ``StreamEnd``; a request the engine refuses yields a single ``StreamError`` with an HTTP
status, so the replica never raises on bad input.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator


from helios_ray.serve.config import DEFAULT_GROUP, ServeConfig
from helios_ray.engine.sequence import SamplingParams
from helios_ray.errors import EngineDrainingError, HeliosError
from helios_ray.serve.schemas import (
    GenerateCall, ReplicaStats, StreamEnd, StreamError, StreamEvent, StreamStart, StreamToken,
)

log = logging.getLogger("ray.serve")


class EarlyExitReplica:
    async def __init__(self, config: dict[str, Any], brain: Any, group: str = DEFAULT_GROUP):
        import torch

        self.cfg = ServeConfig.model_validate(config)
        self.brain = brain
        self.group = group
        if self.cfg.engine.torch_threads:
            torch.set_num_threads(self.cfg.engine.torch_threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from helios_ray.models.repository import ModelRepository

        self.repo = ModelRepository(extra=self.cfg.models, models_file=self.cfg.models_file)
        self.aeng: Any = None
        self.version = 0
        self.placement: dict[str, Any] = {}
        self.switches = 0
        self.last_change: dict[str, Any] | None = None
        self._metrics = None
        self._apply_lock = asyncio.Lock()
        self._serving = asyncio.Event()  # cleared while a model swap drains the engine
        self._serving.set()
        self._poller: asyncio.Task | None = None
        self._reporter: asyncio.Task | None = None
        await self._ensure_started()  # load the current placement before taking traffic

    async def _ensure_started(self) -> None:
        if self.aeng is None:
            async with self._apply_lock:
                if self.aeng is None:
                    p = await self.brain.get_placement.remote(self.group)
                    await self._apply(p)
        if self._poller is None or self._poller.done():
            loop = asyncio.get_running_loop()
            self._poller = loop.create_task(self._follow_placement())
            self._reporter = loop.create_task(self._report_stats())

    def _load(self, model: str, depth: int) -> Any:
        from helios_ray.models.early_exit import load_model

        token_exits = None
        if self.cfg.mode == "early_exit":
            token_exits = resolve_token_exits(self.cfg, self.repo, model, depth)
        elif self.cfg.mode == "helios" and self.cfg.inner_exits == "auto":
            token_exits = helios_inner_exits(self.cfg, self.repo, model, depth) or None
        return load_model(model, depth, repo=self.repo, device=self.cfg.device, threshold=self.cfg.threshold,
                          token_exits=token_exits, dtype=self.cfg.dtype)

    async def _apply(self, p: dict[str, Any]) -> None:
        """Bring this replica to placement ``p`` (idempotent)."""
        from helios_ray.engine.engine import AsyncEngine, LLMEngine

        model, depth, version = p["model"], int(p["depth"]), int(p["version"])
        t0 = time.perf_counter()
        if self.aeng is None:
            lm = await asyncio.to_thread(self._load, model, depth)
            eng = LLMEngine(lm, self.cfg.engine)
            self.aeng = AsyncEngine(eng)
            kind = "load"
        elif self.aeng.engine.model.name == model:
            if self.aeng.engine.model.depth != depth:
                await self.aeng.set_depth(depth)
                kind = "depth"
            else:
                kind = "none"
        else:
            lm = await asyncio.to_thread(self._load, model, depth)
            self._serving.clear()  # new requests wait for the new model instead of being refused
            try:
                await self.aeng.swap_model(lm)
            finally:
                self._serving.set()
            kind = "swap"
        if kind in ("depth", "swap"):
            self.switches += 1
        self.version, self.placement = version, {"model": model, "depth": depth}
        self.last_change = {"kind": kind, "version": version, "model": model, "depth": depth,
                            "seconds": round(time.perf_counter() - t0, 3)}
        if kind != "none":
            log.info("helios replica: %s -> %s@%d in %.2fs", kind, model, depth, time.perf_counter() - t0)

    async def _follow_placement(self) -> None:
        while True:
            try:
                p = await self.brain.wait_placement.remote(self.version, 30.0, self.group)
                if int(p["version"]) != self.version:
                    async with self._apply_lock:
                        await self._apply(p)
            except asyncio.CancelledError:
                raise
            except Exception:  # the brain restarting, transient errors: keep following
                log.exception("helios replica: placement poll failed; retrying")
                await asyncio.sleep(1.0)

    async def _report_stats(self, every_s: float = 2.0) -> None:
        """Every ``every_s``: Prometheus gauges, energy per token (NVML, GPU only), and the stats the brain shows
        in /v1/helios/status."""
        from helios_ray.serve.metrics import EnergyMeter, ReplicaMetrics

        metrics, meter = ReplicaMetrics(), EnergyMeter()
        last_j, last_tokens, last_switches = meter.joules(), 0, 0
        while True:
            await asyncio.sleep(every_s)
            try:
                st = await self.stats()
                metrics.running.set(st.running)
                metrics.waiting.set(st.waiting)
                metrics.kv_usage.set(st.kv_usage)
                metrics.loaded_layers.set(st.depth, tags={"model": st.model})
                if self.switches > last_switches and self.last_change:
                    metrics.switches.inc(self.switches - last_switches, tags={"kind": self.last_change["kind"]})
                    last_switches = self.switches
                j = meter.joules()
                if j is not None and last_j is not None and st.tokens_out > last_tokens:
                    st.energy_j_per_token = (j - last_j) / (st.tokens_out - last_tokens)
                    metrics.energy.set(st.energy_j_per_token)
                last_j, last_tokens = j, st.tokens_out
                await self.brain.report_replica.remote(st)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("helios replica: stats report failed", exc_info=True)

    async def generate(self, call: GenerateCall) -> AsyncIterator[StreamEvent]:
        """A model swap never refuses a request: one arriving while the engine drains waits for the new model
        (up to ``admission.switch_wait_s``, then a 503 with Retry-After) and is encoded with its tokenizer."""
        await self._ensure_started()
        deadline = time.monotonic() + self.cfg.admission.switch_wait_s
        while True:
            try:
                await asyncio.wait_for(self._serving.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                yield StreamError(status=503, message="the replica is switching models; retry shortly",
                                  retry_after_s=self.cfg.admission.retry_after_s)
                return
            m = self.aeng.engine.model
            try:
                ids, params = prepare(m.tokenizer, call)
                if call.resume_ids and len(call.resume_ids) >= params.max_tokens:  # died between last token and end
                    yield StreamStart(model=m.name, depth=m.depth, prompt_tokens=len(ids))
                    yield StreamEnd(finish_reason="length", completion_tokens=len(call.resume_ids))
                    return
                stream = self.aeng.generate(ids, params, call.resume_ids)
                first = await stream.__anext__()
                break
            except EngineDrainingError:
                continue  # a swap began between the wait and the admission: wait for it, encode again
            except HeliosError as e:
                yield StreamError(status=e.http_status, message=str(e),
                                  retry_after_s=getattr(e, "retry_after_s", None))
                return
            except StopAsyncIteration:
                yield StreamError(status=500, message="the engine ended the request without output")
                return
        yield StreamStart(model=m.name, depth=m.depth, prompt_tokens=len(ids))
        n = len(call.resume_ids)  # completion_tokens counts the resumed part too
        ev = first
        while True:
            if ev.token is not None and not (ev.finished and ev.finish_reason == "stop" and ev.token in m.eos_ids):
                n += 1
                yield StreamToken(token=ev.token, text=ev.text, exit_layer=ev.exit_layer, confidence=ev.confidence,
                                  breach=ev.breach)
            if ev.finished:
                yield StreamEnd(finish_reason=ev.finish_reason or "stop", completion_tokens=n, error=ev.error)
                return
            ev = await stream.__anext__()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's lightweight update: a ``user_config`` of ``{model, depth}`` pins the placement for every
        replica (it goes through the brain, so all replicas and the policy agree).  Idempotent."""
        if not user_config or "model" not in user_config:
            return
        p = await self.brain.set_placement.remote(user_config["model"], int(user_config.get("depth") or 0) or None,
                                                  pin=True, group=self.group)
        if not isinstance(p, dict) or "version" not in p:
            raise HeliosError(f"user_config {user_config}: the brain refused it")
        async with self._apply_lock:
            await self._apply(p)

    async def stats(self) -> ReplicaStats:
        await self._ensure_started()
        eng = self.aeng.engine
        t = eng.totals
        last = t.recent[-1] if t.recent else None
        return ReplicaStats.here(
            mode=self.cfg.mode, group=self.group,
            model=eng.model.name, depth=eng.model.depth, total_layers=eng.model.total_layers,
            placement_version=self.version, exit_head=eng.model.exit_head.kind,
            running=len(eng.scheduler.running), waiting=len(eng.scheduler.waiting),
            kv_blocks_used=eng.scheduler.blocks.num_used, kv_blocks_total=eng.scheduler.blocks.num_blocks,
            weight_bytes=eng.model.param_bytes, kv_bytes_per_token=eng.layout.bytes_per_token,
            max_concurrent_1k=eng.max_concurrent(1024), token_exits=list(eng.model.token_exits),
            memory_budget_bytes=eng.memory_budget_bytes, tokens_out=t.tokens_out, breaches=t.breaches,
            steps=t.steps, requests=t.requests_finished, last_batch=last.batch_size if last else 0,
            switches=self.switches, last_change=self.last_change,
        )

    async def check_health(self) -> None:
        if self.aeng is not None and not self.aeng._thread.is_alive():
            raise RuntimeError("engine thread died")


def prepare(tokenizer: Any, call: GenerateCall) -> tuple[list[int], SamplingParams]:
    """Token ids of a call and its sampling parameters, with the stop strings the prompt rendering implies
    (a base model serving a chat stops at the next turn marker).  Shared by both replica kinds."""
    from helios_ray.models.prompts import encode_request

    enc = encode_request(tokenizer, call.prompt, call.messages)
    params = call.params
    extra = [s for s in enc.stop if s not in params.stop]
    if extra:
        params = params.model_copy(update={"stop": [*params.stop, *extra]})
    return enc.ids, params


def helios_inner_exits(cfg: ServeConfig, repo: Any, model: str, depth: int) -> list[int]:
    """helios mode: the trained exits below D that pay for their checks on this model (usually none on small
    models: see :func:`helios_ray.tuning.profiling.inner_exits`); the decision and its numbers are logged."""
    import torch

    from helios_ray.dtypes import serving_dtype
    from helios_ray.tuning.profiling import inner_exits

    dtype = serving_dtype(cfg.dtype, cfg.device != "cpu" and torch.cuda.is_available())  # as this replica loads
    choice = inner_exits(repo, model, depth, cfg.threshold, cfg.policy.min_agreement, dtype)
    if choice["considered"]:
        log.info("helios replica: inner exits of %s@%d: %s (coverage, FLOPs saved per token: %s)", model, depth,
                 choice["exits"] or "none pay", choice["considered"])
    return list(choice["exits"])


def resolve_token_exits(cfg: ServeConfig, repo: Any, model: str, depth: int) -> list[int]:
    """early_exit mode: the configured exits, or the card's choice at the threshold and accuracy guard."""
    if cfg.token_exits is not None:
        return [d for d in cfg.token_exits if d < depth]
    from helios_ray.tuning.profiling import token_exits_from_card

    return token_exits_from_card(repo, model, cfg.threshold, cfg.policy.min_agreement, depth)
