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
import logging
import os
import random
import time
from typing import Any

from helios_ray.config import ServeConfig
from helios_ray.errors import HeliosError, InvalidRequestError, UnknownModelError
from helios_ray.control import checkpoint
from helios_ray.control.controller import Placement
from helios_ray.serve import brain_store
from helios_ray.serve.schemas import ReplicaStats
from helios_ray.serve.timeline import Timeline

log = logging.getLogger("ray.serve")


def _app_name() -> str | None:
    """The Serve application this brain belongs to (None outside Serve: no checkpoint then)."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:
        return None


def change_entry(version: int, at: float, old: dict[str, Any], new: dict[str, Any], action: str, trigger: str,
                 reason: str) -> dict[str, Any]:
    """One ``changes`` entry of the status document (also what loadgen's fake server must produce)."""
    return {"version": version, "at": at, "from": dict(old), "to": dict(new), "action": action, "trigger": trigger,
            "reason": reason}


class Brain:
    async def __init__(self, config: dict[str, Any]):
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
        self.pinned = self.cfg.mode != "helios"  # a baseline: never moved by the policy
        self.operator_pin = False  # an operator's (or user_config's) pinned placement: the policy waits
        self._cond = asyncio.Condition()
        self._rng = random.Random(0)
        self.replicas: dict[str, ReplicaStats] = {}
        self.started_at = time.time()
        self._app = _app_name()
        self._fingerprint = brain_store.fingerprint(self.cfg.model_dump_json())
        self._dirty = False
        self.timeline = Timeline()  # rolling request window, exit layers, stamped decisions (the live page)
        saved = brain_store.load(self._app, self._fingerprint) if self._app else None
        if saved is not None:
            self._restore(saved)
            log.info("helios brain: restored %s at version %d (restart %d)", self.placement, self.version,
                     self.restarts)
        else:
            self._first_placement()
            log.info("helios brain: initial placement %s", self.placement)
        self._save()
        self._saver = asyncio.get_running_loop().create_task(self._save_periodically())

    def _first_placement(self) -> None:
        first = None if self.pinned else self.controller.start()
        if first is not None:
            self.timeline.decision(time.time(), first.model_dump(mode="json"))
        if self.pinned:  # a baseline: the first candidate at full depth
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
        self.requests = self.tokens_observed = self.profile_records = self.restarts = 0

    # ---------------------------------------------------------------------------------- checkpoint
    def _state(self) -> brain_store.BrainState:
        return brain_store.BrainState(
            fingerprint=self._fingerprint, version=self.version, placement=self.placement,
            operator_pin=self.operator_pin, changed_at=self.changed_at, changes=self.changes[-200:],
            requests=self.requests, tokens_observed=self.tokens_observed, profile_records=self.profile_records,
            restarts=self.restarts, controller=checkpoint.snapshot(self.controller))

    def _restore(self, st: brain_store.BrainState) -> None:
        checkpoint.restore(self.controller, st.controller)
        self.version, self.placement, self.operator_pin = st.version, dict(st.placement), st.operator_pin
        self.changed_at, self.changes = st.changed_at, list(st.changes)
        self.requests, self.tokens_observed, self.profile_records = st.requests, st.tokens_observed, st.profile_records
        self.restarts = st.restarts + 1

    def _save(self) -> None:
        if self._app:
            brain_store.save(self._app, self._state())
        self._dirty = False

    async def _save_periodically(self, every_s: float = 2.0) -> None:
        """Telemetry changes the PHT and breach window all the time: checkpoint them every ``every_s``
        (placement changes are saved at once)."""
        while True:
            await asyncio.sleep(every_s)
            if self._dirty:
                self._save()

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
        if decision is not None:
            self.timeline.decision(time.time(), decision.model_dump(mode="json"))
        if self.pinned or self.operator_pin or decision is None or not decision.changes_placement:
            return
        new = {"model": decision.model, "depth": int(decision.depth)}
        if new == self.placement:
            return
        async with self._cond:
            old = self.placement
            self.placement = new
            self.version += 1
            self.changed_at = time.time()
            self.changes.append(change_entry(self.version, self.changed_at, old, new, decision.action,
                                             decision.trigger, decision.reason))
            self._cond.notify_all()
        self._save()
        log.info("helios brain: %s -> %s (%s: %s)", old, new, decision.action, decision.reason)

    async def set_placement(self, model: str, depth: int | None, pin: bool = False) -> dict[str, Any]:
        """Operator override.  ``pin``: the policy leaves it there until :meth:`unpin` (a Serve ``user_config``
        pins); otherwise the policy may move it again on its next storm or re-assessment."""
        names = {c.name: c for c in self.candidates}
        if model not in names:
            raise UnknownModelError(f"{model!r} is not a candidate of this application "
                                    f"(candidates: {', '.join(names)})")
        if depth is None:
            depth = names[model].num_layers
        if not 1 <= depth <= names[model].num_layers:
            raise InvalidRequestError(f"depth {depth} is out of range for {model!r} "
                                      f"(1..{names[model].num_layers} layers)")
        if self.pinned:
            raise InvalidRequestError(f"mode {self.cfg.mode!r} serves a fixed baseline; its placement cannot move")
        self.operator_pin = pin
        if self.placement == {"model": model, "depth": depth}:
            self._save()
            return self._snapshot()
        async with self._cond:
            old, self.placement = self.placement, {"model": model, "depth": depth}
            self.version += 1
            self.changed_at = time.time()
            self.changes.append(change_entry(self.version, self.changed_at, old, self.placement, "manual", "operator",
                                             "set_placement (pinned)" if pin else "set_placement"))
            self.controller.current = Placement(model=model, depth=depth)
            self._cond.notify_all()
        self._save()
        return self._snapshot()

    async def place(self, model: str, depth: int | None, pin: bool = True) -> dict[str, Any]:
        """:meth:`set_placement` for the admin API: the new placement, or the refusal as data (status, message) -
        an exception would reach the router wrapped in Ray's traceback text."""
        try:
            return {"placement": await self.set_placement(model, depth, pin=pin)}
        except HeliosError as e:
            return {"error": {"status": e.http_status, "message": str(e)}}

    async def unpin(self) -> dict[str, Any]:
        self.operator_pin = False
        self._save()
        return {"placement": self._snapshot()}

    # ----------------------------------------------------------------------------------- telemetry
    async def begin_request(self) -> list[str]:
        """Called per admitted request: the candidates to mirror it to (profiling windows, plus a random
        ``mirror_fraction`` of traffic that keeps every candidate's profile fresh)."""
        self.requests += 1
        self._dirty = True
        if self.pinned:
            return []
        targets = self.controller.begin_request()
        if not targets and self._rng.random() < self.cfg.mirror_fraction:
            targets = [c.name for c in self.candidates]
        return targets

    async def observe_tokens(self, model: str, depth: int, confidences: list[float],
                             exit_layers: list[int] | None = None) -> None:
        self._dirty = True
        if exit_layers:
            self.timeline.exits(model, exit_layers)
        for c in confidences:
            self.tokens_observed += 1
            await self._maybe_apply(self.controller.observe_token(model, depth, c))

    async def observe_request(self, model: str, depth: int, output_tokens: int, seconds: float,
                              ttft_s: float | None, prompt_tokens: int) -> None:
        self._dirty = True
        d = self.controller.observe_request(model, depth, output_tokens=output_tokens, seconds=seconds,
                                            ttft_s=ttft_s, prompt_tokens=prompt_tokens)
        self.timeline.request(time.time(), model, depth, output_tokens, seconds, ttft_s)
        await self._maybe_apply(d)

    async def observe_profile(self, records: list[dict[str, Any]]) -> None:
        self._dirty = True
        from helios_ray.control.trace import TraceRequest, parse_record

        for r in records:
            rec = parse_record(r)
            self.profile_records += 1
            if isinstance(rec, TraceRequest):
                self.controller.observe_profile_request(rec)
            else:
                self.controller.observe_profile_token(rec)

    async def report_replica(self, stats: ReplicaStats) -> None:  # noqa: D102 - shown in the status
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
            "mode": self.cfg.mode, "pinned": self.pinned or self.operator_pin,
            "brain": {"pid": os.getpid(), "started_at": self.started_at, "restarts": self.restarts},
            "controller": st,  # the router turns the document into strict JSON (router._json_ready)
            "timeline": self.timeline.snapshot(now, self.changes),
        }
