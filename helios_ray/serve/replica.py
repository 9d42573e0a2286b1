"""One truncated early-exit replica: an engine on one GPU or CPU slot, following the Control placement.

The replica reads the current placement (model, depth) from the Control deployment when it starts - so a
replica that Serve restarts after a crash comes back with the current configuration - and then long-polls it.
A new placement is applied at an engine step boundary: the same model at another depth grows/shrinks in place
(running requests are recomputed at the new depth), another model drains first (in-flight requests finish on
the model they started with, new ones wait), then swaps.

``generate`` streams dicts: one ``start`` (model, depth, prompt tokens), ``token`` events, one ``end``; a request
the engine refuses yields a single ``error`` item with an HTTP status, so the replica never raises on bad input.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator

from ray import serve

from helios_ray.config import ServeConfig
from helios_ray.errors import HeliosError

log = logging.getLogger("ray.serve")


class EarlyExitReplica:
    async def __init__(self, config: dict[str, Any], control: Any):
        import torch

        self.cfg = ServeConfig.model_validate(config)
        self.control = control
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
        self._poller: asyncio.Task | None = None
        self._reporter: asyncio.Task | None = None
        await self._ensure_started()  # load the current placement before taking traffic

    async def _ensure_started(self) -> None:
        if self.aeng is None:
            async with self._apply_lock:
                if self.aeng is None:
                    p = await self.control.get_placement.remote()
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
        return load_model(model, depth, repo=self.repo, device=self.cfg.device, threshold=self.cfg.threshold,
                          token_exits=token_exits)

    async def _apply(self, p: dict[str, Any]) -> None:
        """Bring this replica to placement ``p`` (idempotent)."""
        from helios_ray.engine.engine import AsyncEngine, EngineConfig, LLMEngine

        model, depth, version = p["model"], int(p["depth"]), int(p["version"])
        t0 = time.perf_counter()
        if self.aeng is None:
            lm = await asyncio.to_thread(self._load, model, depth)
            eng = LLMEngine(lm, EngineConfig(
                memory_budget_bytes=(self.cfg.memory_budget_mb << 20) if self.cfg.memory_budget_mb else None,
                **self.cfg.engine.model_dump()))
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
            await self.aeng.swap_model(lm)
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
                p = await self.control.wait_placement.remote(self.version, 30.0)
                if int(p["version"]) != self.version:
                    async with self._apply_lock:
                        await self._apply(p)
            except asyncio.CancelledError:
                raise
            except Exception:  # Control restarting, transient errors: keep following
                log.exception("helios replica: placement poll failed; retrying")
                await asyncio.sleep(1.0)

    async def _report_stats(self, every_s: float = 2.0) -> None:
        """Every ``every_s``: Prometheus gauges, energy per token (NVML, GPU only), and the stats Control shows
        in /v1/helios/status."""
        from helios_ray.metrics import EnergyMeter, ReplicaMetrics

        metrics, meter = ReplicaMetrics(), EnergyMeter()
        last_j, last_tokens, last_switches = meter.joules(), 0, 0
        while True:
            await asyncio.sleep(every_s)
            try:
                st = await self.stats()
                metrics.running.set(st["running"])
                metrics.waiting.set(st["waiting"])
                metrics.kv_usage.set(st["kv_blocks_used"] / max(1, st["kv_blocks_total"]))
                metrics.loaded_layers.set(st["depth"], tags={"model": st["model"]})
                if self.switches > last_switches and self.last_change:
                    metrics.switches.inc(self.switches - last_switches, tags={"kind": self.last_change["kind"]})
                    last_switches = self.switches
                j = meter.joules()
                if j is not None and last_j is not None and st["tokens_out"] > last_tokens:
                    st["energy_j_per_token"] = (j - last_j) / (st["tokens_out"] - last_tokens)
                    metrics.energy.set(st["energy_j_per_token"])
                last_j, last_tokens = j, st["tokens_out"]
                await self.control.report_replica.remote(st)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("helios replica: stats report failed", exc_info=True)

    def _encode(self, call: dict[str, Any]) -> list[int]:
        return encode_call(self.aeng.engine.model, call)

    async def generate(self, call: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from helios_ray.engine.sequence import SamplingParams

        await self._ensure_started()
        m = self.aeng.engine.model
        try:
            ids = self._encode(call)
            params = SamplingParams.model_validate(call["params"])
            stream = self.aeng.generate(ids, params)
            first = await stream.__anext__()
        except HeliosError as e:
            yield {"type": "error", "status": e.http_status, "message": str(e)}
            return
        except StopAsyncIteration:
            yield {"type": "error", "status": 500, "message": "the engine ended the request without output"}
            return
        yield {"type": "start", "model": m.name, "depth": m.depth, "prompt_tokens": len(ids)}
        n = 0
        ev = first
        while True:
            if ev.token is not None and not (ev.finished and ev.finish_reason == "stop" and ev.token in m.eos_ids):
                n += 1
                yield {"type": "token", "token": ev.token, "text": ev.text, "exit_layer": ev.exit_layer,
                       "confidence": ev.confidence, "breach": ev.breach}
            if ev.finished:
                yield {"type": "end", "finish_reason": ev.finish_reason or "stop", "completion_tokens": n,
                       "error": ev.error}
                return
            ev = await stream.__anext__()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's lightweight update: a ``user_config`` of ``{model, depth}`` pins the placement for every
        replica (it goes through Control, so all replicas and the policy agree).  Idempotent."""
        if not user_config or "model" not in user_config:
            return
        p = await self.control.set_placement.remote(user_config["model"], int(user_config.get("depth") or 0) or None)
        async with self._apply_lock:
            await self._apply(p)

    async def stats(self) -> dict[str, Any]:
        await self._ensure_started()
        eng = self.aeng.engine
        t = eng.totals
        last = t.recent[-1] if t.recent else None
        return {
            "replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
            "model": eng.model.name, "depth": eng.model.depth, "total_layers": eng.model.total_layers,
            "placement_version": self.version, "exit_head": eng.model.exit_head.kind,
            "running": len(eng.scheduler.running), "waiting": len(eng.scheduler.waiting),
            "kv_blocks_used": eng.scheduler.blocks.num_used, "kv_blocks_total": eng.scheduler.blocks.num_blocks,
            "weight_bytes": eng.model.param_bytes, "kv_bytes_per_token": eng.layout.bytes_per_token,
            "max_concurrent_1k": eng.max_concurrent(1024), "mode": self.cfg.mode,
            "token_exits": list(eng.model.token_exits), "memory_budget_bytes": eng.memory_budget_bytes,
            "tokens_out": t.tokens_out, "breaches": t.breaches, "steps": t.steps,
            "last_batch": last.batch_size if last else 0, "switches": self.switches, "last_change": self.last_change,
        }

    async def check_health(self) -> None:
        if self.aeng is not None and not self.aeng._thread.is_alive():
            raise RuntimeError("engine thread died")


def encode_call(m: Any, call: dict[str, Any]) -> list[int]:
    """Token ids of a router call for model ``m`` (an EarlyExitLM or anything with its ``encode``)."""
    from helios_ray.data.conversation import Conversation, render

    if call.get("messages"):
        if m.has_chat_template:
            return m.encode(messages=call["messages"])
        # a base model: the chat as plain "User:/Assistant:" turns (HELIOS may switch to it at any time)
        conv = Conversation(id="req", messages=tuple(call["messages"]))
        return m.encode(prompt=render(conv, None, add_generation_prompt=True))
    return m.encode(prompt=call["prompt"])


def resolve_token_exits(cfg: ServeConfig, repo: Any, model: str, depth: int) -> list[int]:
    """early_exit mode: the configured exits, or the card's choice at the threshold and accuracy guard."""
    if cfg.token_exits is not None:
        return [d for d in cfg.token_exits if d < depth]
    from helios_ray.control import PolicyConfig
    from helios_ray.models.profiling import token_exits_from_card

    policy = PolicyConfig.model_validate({"confidence_threshold": cfg.threshold, **cfg.policy})
    return token_exits_from_card(repo, model, cfg.threshold, policy.min_agreement, depth)
