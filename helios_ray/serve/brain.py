"""The brain deployment (``HeliosBrain``): the HELIOS policy and the single source of truth for the placement.

One replica holds the policy :class:`~helios_ray.control.Controller` (PHT, breach counter, decisions) and a
versioned placement.  Routers feed it live token telemetry and request completions; the profiler feeds it
profile-mode records; replicas long-poll ``wait_placement`` and apply a new version at their next step boundary
(~ms to reach every replica; a restarted replica reads the current version on start).  Keeping this in a Serve
deployment rather than a detached actor means ``serve shutdown`` removes it with the application.

Everything here is async and runs on the replica's event loop, so the Controller is never entered concurrently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any

from helios_ray.config import ServeConfig
from helios_ray.control.controller import Placement
from helios_ray.serve.schemas import ReplicaStats

log = logging.getLogger("ray.serve")


class Brain:
    def __init__(self, config: dict[str, Any]):
        from helios_ray.control import Controller, Hardware
        from helios_ray.dtypes import serving_dtype
        from helios_ray.models.profiling import candidate_info
        from helios_ray.models.repository import ModelRepository

        self.cfg = ServeConfig.model_validate(config)
        repo = ModelRepository(extra=self.cfg.models, models_file=self.cfg.models_file)
        self.candidates = [candidate_info(repo, n, serving_dtype(self.cfg.dtype, self.cfg.replica_num_gpus > 0))
                           for n in self.cfg.candidates]  # priced at the dtype the replicas load
        budget = self.cfg.engine.memory_budget_bytes or (16384 << 20)
        hw = Hardware(device="cuda" if self.cfg.replica_num_gpus > 0 else "cpu", memory_budget_bytes=budget)
        self.controller = Controller(self.candidates, self.cfg.slo, hw, self.cfg.policy)
        self.pinned = self.cfg.mode != "helios"
        first = None if self.pinned else self.controller.start()
        if self.pinned:  # a baseline: the first candidate at full depth, never changed by the policy
            name = self.cfg.candidates[0]
            self.placement = {"model": name, "depth": self.candidates[0].num_layers}
            self.controller.current = Placement(**self.placement)
        elif self.cfg.initial is not None:
            names = {c.name: c for c in self.candidates}
            depth = self.cfg.initial.depth or names[self.cfg.initial.model].num_layers
            self.placement = {"model": self.cfg.initial.model, "depth": depth}
            self.controller.current = Placement(model=self.placement["model"], depth=depth)
        else:
            assert first is not None
            self.placement = {"model": first.model, "depth": first.depth}
        self.version = 1
        self.changed_at = time.time()
        self.changes: list[dict[str, Any]] = []
        self._cond = asyncio.Condition()
        self._rng = random.Random(0)
        self.requests = 0
        self.tokens_observed = 0
        self.profile_records = 0
        self.replicas: dict[str, dict[str, Any]] = {}
        log.info("helios brain: initial placement %s", self.placement)

    # ----------------------------------------------------------------------------------- placement
    def _snapshot(self) -> dict[str, Any]:
        return {"version": self.version, **self.placement}

    async def get_placement(self) -> dict[str, Any]:
        return self._snapshot()

    async def wait_placement(self, known_version: int, timeout_s: float = 30.0) -> dict[str, Any]:
        """Long-poll: returns as soon as the version differs from ``known_version`` (or at the timeout)."""
        async with self._cond:
            if self.version == known_version:
                try:
                    await asyncio.wait_for(self._cond.wait_for(lambda: self.version != known_version), timeout_s)
                except asyncio.TimeoutError:
                    pass
        return self._snapshot()

    async def _maybe_apply(self, decision: Any) -> None:
        if self.pinned or decision is None or not decision.changes_placement:
            return
        new = {"model": decision.model, "depth": int(decision.depth)}
        if new == self.placement:
            return
        async with self._cond:
            old = self.placement
            self.placement = new
            self.version += 1
            self.changed_at = time.time()
            self.changes.append({"version": self.version, "at": self.changed_at, "from": old, "to": new,
                                 "action": decision.action, "trigger": decision.trigger, "reason": decision.reason})
            self._cond.notify_all()
        log.info("helios brain: %s -> %s (%s: %s)", old, new, decision.action, decision.reason)

    async def set_placement(self, model: str, depth: int | None) -> dict[str, Any]:
        """Operator override (also used by tests to force a live switch)."""
        names = {c.name: c for c in self.candidates}
        if model in names and depth is None:
            depth = names[model].num_layers
        if model not in names or not 1 <= depth <= names[model].num_layers:
            raise ValueError(f"{model}@{depth} is not a valid candidate placement")
        if self.placement == {"model": model, "depth": depth}:
            return self._snapshot()
        async with self._cond:
            old, self.placement = self.placement, {"model": model, "depth": depth}
            self.version += 1
            self.changes.append({"version": self.version, "at": time.time(), "from": old, "to": self.placement,
                                 "action": "manual", "trigger": "operator", "reason": "set_placement"})
            self.controller.current = Placement(model=model, depth=depth)
            self._cond.notify_all()
        return self._snapshot()

    # ----------------------------------------------------------------------------------- telemetry
    async def begin_request(self) -> list[str]:
        """Called per admitted request: the candidates to mirror it to (profiling windows, plus a random
        ``mirror_fraction`` of traffic that keeps every candidate's profile fresh)."""
        self.requests += 1
        if self.pinned:
            return []
        targets = self.controller.begin_request()
        if not targets and self._rng.random() < self.cfg.mirror_fraction:
            targets = [c.name for c in self.candidates]
        return targets

    async def observe_tokens(self, model: str, depth: int, confidences: list[float]) -> None:
        for c in confidences:
            self.tokens_observed += 1
            await self._maybe_apply(self.controller.observe_token(model, depth, c))

    async def observe_request(self, model: str, depth: int, output_tokens: int, seconds: float,
                              ttft_s: float | None, prompt_tokens: int) -> None:
        d = self.controller.observe_request(model, depth, output_tokens=output_tokens, seconds=seconds,
                                            ttft_s=ttft_s, prompt_tokens=prompt_tokens)
        await self._maybe_apply(d)

    async def observe_profile(self, records: list[dict[str, Any]]) -> None:
        from helios_ray.control.trace import TraceRequest, parse_record

        for r in records:
            rec = parse_record(r)
            self.profile_records += 1
            if isinstance(rec, TraceRequest):
                self.controller.observe_profile_request(rec)
            else:
                self.controller.observe_profile_token(rec)

    async def report_replica(self, stats: ReplicaStats) -> None:
        self.replicas[stats.replica] = stats.model_copy(update={"reported_at": time.time()})

    # -------------------------------------------------------------------------------------- status
    async def status(self) -> dict[str, Any]:
        st = self.controller.status()
        now = time.time()
        live = [r.model_dump(mode="json") for r in self.replicas.values() if now - (r.reported_at or 0) < 10.0]
        return {
            "placement": self._snapshot(), "changed_at": self.changed_at, "changes": self.changes[-20:],
            "replicas": sorted(live, key=lambda r: r["replica"]),
            "requests": self.requests, "tokens_observed": self.tokens_observed,
            "profile_records": self.profile_records, "slo": self.cfg.slo.value, "candidates": self.cfg.candidates,
            "mode": self.cfg.mode,
            "controller": json.loads(json.dumps(st, default=str)),
        }
