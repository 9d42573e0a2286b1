"""The brain deployment (``HeliosBrain``): the HELIOS policy and the single source of truth for the fleet.

One replica holds, per replica group (:mod:`.brain_group`), a policy :class:`~helios_ray.control.Controller`
(PHT, breach counter, decisions) and a versioned placement.  Routers feed it live token telemetry and request
completions tagged with the group that served them; the profiler feeds it profile-mode records of the prompts
mirrored for a group; replicas long-poll ``wait_placement(group)`` and apply a new version at their next step
boundary (~ms to reach every replica; a restarted replica reads the current version on start).

One group switches at a time (:class:`~helios_ray.control.fleet.SwitchGate`): while a group's replicas are still
moving to a new model, another group's policy change waits in a queue and is applied when that switch is done -
so the fleet never has two groups draining at once, and no decided change is lost.  Keeping this in a Serve
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

from helios_ray.serve.brain_quality import FleetQuality
from helios_ray.serve.config import DEFAULT_GROUP, ServeConfig
from helios_ray.errors import HeliosError, UnknownModelError
from helios_ray.serve import brain_store
from helios_ray.serve.brain_group import Group
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
                 reason: str, group: str = DEFAULT_GROUP) -> dict[str, Any]:
    """One ``changes`` entry of the status document (also what loadgen's fake server must produce)."""
    return {"version": version, "at": at, "group": group, "from": dict(old), "to": dict(new), "action": action,
            "trigger": trigger, "reason": reason}


class Brain:
    async def __init__(self, config: dict[str, Any]):
        from helios_ray.control import Hardware
        from helios_ray.dtypes import serving_dtype
        from helios_ray.tuning.profiling import candidate_info
        from helios_ray.models.repository import ModelRepository

        self.cfg = ServeConfig.model_validate(config)
        repo = ModelRepository(extra=self.cfg.models, models_file=self.cfg.models_file)
        gpu = self.cfg.replica_num_gpus > 0 or any((g.replica_num_gpus or 0) > 0 for g in self.cfg.fleet())
        self.candidates = [candidate_info(repo, n, serving_dtype(self.cfg.dtype, gpu))
                           for n in self.cfg.candidates]  # priced at the dtype the replicas load
        budget = self.cfg.engine.memory_budget_bytes or (16384 << 20)
        hw = Hardware(device="cuda" if gpu else "cpu", memory_budget_bytes=budget)
        self.pinned = self.cfg.mode != "helios"  # a baseline: never moved by the policy
        self.quality = FleetQuality(self.cfg, repo, self.candidates)
        self.floors = self.quality.floors
        self.groups: dict[str, Group] = {g.name: Group(g, self.cfg, self.candidates, hw, self.pinned, self.floors)
                                         for g in self.cfg.fleet()}
        self._cond = asyncio.Condition()
        self._rng = random.Random(0)
        self.replicas: dict[str, ReplicaStats] = {}
        self.started_at = time.time()
        self._app = _app_name()
        self._fingerprint = brain_store.fingerprint(self.cfg.model_dump_json())
        self._dirty = False
        self.timeline = Timeline()  # rolling request window, exit layers, stamped decisions (the live page)
        from helios_ray.control.fleet import SwitchGate

        self.gate = SwitchGate()
        self.sizes = {n: g.spec.replicas for n, g in self.groups.items()}  # the fleet plan's replicas per group
        self.demand = {n: 0.0 for n in self.groups}  # tokens served per group, decayed at every sizing tick
        self._sized_at = time.time()
        self.last_resize: dict[str, Any] | None = None
        saved = brain_store.load(self._app, self._fingerprint) if self._app else None
        if saved is not None and set(saved.groups) == set(self.groups):
            self._restore(saved)
            log.info("helios brain: restored %s (restart %d)", self._placements(), self.restarts)
        else:
            self._first_placement()
            log.info("helios brain: initial placement %s", self._placements())
        self._save()
        self._saver = asyncio.get_running_loop().create_task(self._save_periodically())

    def _placements(self) -> dict[str, dict[str, Any]]:
        return {n: g.snapshot() for n, g in self.groups.items()}

    def _group(self, name: str) -> Group:
        try:
            return self.groups[name]
        except KeyError:
            raise UnknownModelError(f"unknown group {name!r} (groups: {', '.join(self.groups)})") from None

    @property
    def default(self) -> Group:
        """The group the one-group fields of the status describe (``default``, or the first configured)."""
        return self.groups.get(DEFAULT_GROUP) or next(iter(self.groups.values()))

    def _first_placement(self) -> None:
        for g in self.groups.values():
            g.start()
            if g.first_decision is not None:
                self.timeline.decision(time.time(), {**g.first_decision.model_dump(mode="json"), "group": g.name})
        self.changes: list[dict[str, Any]] = []
        self.requests = self.tokens_observed = self.profile_records = self.restarts = 0

    # ---------------------------------------------------------------------------------- checkpoint
    def _state(self) -> brain_store.BrainState:
        return brain_store.BrainState(
            fingerprint=self._fingerprint, groups={n: g.save() for n, g in self.groups.items()},
            changes=self.changes[-200:], sizes=self.sizes, requests=self.requests, tokens_observed=self.tokens_observed,
            profile_records=self.profile_records, restarts=self.restarts)

    def _restore(self, st: brain_store.BrainState) -> None:
        for n, g in self.groups.items():
            g.restore(st.groups[n])
        self.changes = list(st.changes)
        self.sizes.update({n: k for n, k in st.sizes.items() if n in self.sizes})
        self.requests, self.tokens_observed, self.profile_records = st.requests, st.tokens_observed, st.profile_records
        self.restarts = st.restarts + 1

    def _save(self) -> None:
        if self._app:
            brain_store.save(self._app, self._state())
        self._dirty = False

    async def _save_periodically(self, every_s: float = 2.0) -> None:
        """Telemetry changes the PHT and breach window all the time: checkpoint them every ``every_s``
        (placement changes are saved at once).  Also applies a queued group change once the gate opens."""
        while True:
            await asyncio.sleep(every_s)
            await self._apply_deferred()
            self._size_groups(time.time())
            if self._dirty:
                self._save()

    def _size_groups(self, now: float, every_s: float = 10.0, keep: float = 0.7) -> None:
        """The fleet plan's group sizes: elastic groups (``max_replicas``) share the slots the fixed ones leave, in
        proportion to the tokens each served recently (``size_groups``: floor of one, hysteresis), and Serve's
        autoscaler applies the numbers (:mod:`.fleet_scaling`)."""
        if now - self._sized_at < every_s:
            return
        self._sized_at = now
        elastic = {n: g for n, g in self.groups.items() if g.spec.elastic}
        demand = {n: self.demand[n] for n in elastic}
        for n in self.demand:
            self.demand[n] *= keep
        fixed = sum(g.spec.replicas for n, g in self.groups.items() if n not in elastic)
        slots = (self.cfg.fleet_slots or sum(g.spec.replicas for g in self.groups.values())) - fixed
        if not elastic or slots < len(elastic) or sum(demand.values()) <= 0:
            return
        from helios_ray.control.fleet import size_groups

        current = {n: self.sizes[n] for n in elastic}
        want = size_groups(demand, slots, current)
        want = {n: max(1, min(k, elastic[n].spec.max_replicas or k)) for n, k in want.items()}
        if want == current:
            return
        self.sizes.update(want)
        share = {n: round(v / sum(demand.values()), 3) for n, v in demand.items()}
        self.last_resize = {"at": now, "from": current, "to": want, "demand_share": share}
        self.timeline.decision(now, {"action": "resize", "trigger": "fleet_plan", "group": ",".join(sorted(want)),
                                     "reason": f"replicas {current} -> {want} for demand shares {share}"})
        log.info("helios brain: group sizes %s -> %s (demand shares %s)", current, want, share)
        if self._app:
            from helios_ray.serve import fleet_scaling

            fleet_scaling.publish(self._app, want)
        self._dirty = True

    # ----------------------------------------------------------------------------------- placement
    async def get_placement(self, group: str = DEFAULT_GROUP) -> dict[str, Any]:
        return self._group(group).snapshot()

    async def wait_placement(self, known_version: int, timeout_s: float = 30.0,
                             group: str = DEFAULT_GROUP) -> dict[str, Any]:
        """Long-poll: returns as soon as the group's version differs from ``known_version`` (or at the timeout)."""
        g = self._group(group)
        async with self._cond:
            if g.version == known_version:
                try:
                    await asyncio.wait_for(self._cond.wait_for(lambda: g.version != known_version), timeout_s)
                except asyncio.TimeoutError:
                    pass
        return g.snapshot()

    async def _move(self, g: Group, model: str, depth: int, action: str, trigger: str, reason: str) -> bool:
        async with self._cond:
            old = g.move(model, depth)
            if old is None:
                return False
            self.changes.append(change_entry(g.version, g.changed_at, old, g.placement, action, trigger, reason,
                                             group=g.name))
            now = time.time()
            if old["model"] != model and self.gate.may_switch(g.name, now):
                self.gate.begin(g.name, g.version, now)  # a model swap drains the group: the others wait for it
            self._cond.notify_all()
        self._save()
        log.info("helios brain: group %s %s -> %s (%s: %s)", g.name, old, g.placement, action, reason)
        return True

    async def _maybe_apply(self, g: Group, decision: Any) -> None:
        if decision is not None:
            self.timeline.decision(time.time(), {**decision.model_dump(mode="json"), "group": g.name})
        if g.pinned or decision is None or not decision.changes_placement:
            return
        new = {"model": decision.model, "depth": int(decision.depth)}
        if new == g.placement:
            return
        if new["model"] != g.placement["model"] and not self.gate.may_switch(g.name, time.time()):
            self.gate.defer(g.name, {**new, "action": decision.action, "trigger": decision.trigger,
                                     "reason": decision.reason})
            log.info("helios brain: group %s -> %s waits for another group's switch", g.name, new)
            return
        await self._move(g, new["model"], new["depth"], decision.action, decision.trigger, decision.reason)

    async def _apply_deferred(self) -> None:
        """Apply a queued group change once no other group is mid-switch (the gate sees replicas report)."""
        now = time.time()
        for name, g in self.groups.items():
            live = self._live(now, name)
            if live and all((r.placement_version or 0) >= g.version for r in live):
                self.gate.done(name, g.version)
        ready = self.gate.next_ready(now)
        if ready is not None:
            name, want = ready
            g = self.groups[name]
            if not g.pinned:
                await self._move(g, want["model"], int(want["depth"]), want.get("action", "switch"),
                                 want.get("trigger", "deferred"), f"deferred: {want.get('reason', '')}")
            self.gate.discard(name)  # applied (begin() dropped it already for a swap), or pinned meanwhile

    async def set_placement(self, model: str, depth: int | None, pin: bool = False,
                            group: str = DEFAULT_GROUP) -> dict[str, Any]:
        """Operator override (acts at once, like an SLO change).  ``pin``: the policy leaves the group there until
        :meth:`unpin` (a Serve ``user_config`` pins); otherwise the policy may move it again on its next storm or
        re-assessment."""
        g = self._group(group)
        depth = g.check(model, depth)
        g.operator_pin = pin
        self.gate.discard(g.name)  # the operator's word replaces a queued policy change
        if not await self._move(g, model, depth, "manual", "operator",
                                "set_placement (pinned)" if pin else "set_placement"):
            self._save()
        return g.snapshot()

    async def place(self, model: str, depth: int | None, pin: bool = True,
                    group: str = DEFAULT_GROUP) -> dict[str, Any]:
        """:meth:`set_placement` for the admin API: the new placement, or the refusal as data (status, message) -
        an exception would reach the router wrapped in Ray's traceback text."""
        try:
            return {"placement": await self.set_placement(model, depth, pin=pin, group=group)}
        except HeliosError as e:
            return {"error": {"status": e.http_status, "message": str(e)}}

    async def unpin(self, group: str = DEFAULT_GROUP) -> dict[str, Any]:
        try:
            g = self._group(group)
        except HeliosError as e:
            return {"error": {"status": e.http_status, "message": str(e)}}
        g.operator_pin = False
        self._save()
        return {"placement": g.snapshot()}

    async def fleet_view(self) -> list[dict[str, Any]]:
        """What the router steers by: per group its placement and its live replicas' capacity (a few seconds old)."""
        now = time.time()
        out = []
        for name, g in self.groups.items():
            live = self._live(now, name)
            cand = g.by_name[g.placement["model"]]
            out.append({"group": name, **g.snapshot(), "total_layers": cand.num_layers, "live_replicas": len(live),
                        # none reported yet (starting): the configured replicas' slots
                        "slots": self.cfg.engine.max_num_seqs * (len(live) or g.spec.replicas),
                        "busy": sum(r.running + r.waiting for r in live),
                        # what steering needs for quality first: this placement's measured quality per class,
                        # whether it may answer chats, the floors, and the profiled speed it starts from
                        "quality": cand.quality.get(int(g.placement["depth"]), {}),
                        "chat_capable": cand.chat_capable,
                        "floors": {c: f.value for c, f in self.floors.items()},
                        "prior_tps": g.controller.placement_tokens_per_s()})
        return out

    # ----------------------------------------------------------------------------------- telemetry
    async def begin_request(self, group: str = DEFAULT_GROUP, kind: str | None = None,
                            chat: bool | None = None) -> list[str]:
        """Called per admitted request: the candidates to mirror it to (the group's profiling windows, plus a
        random ``mirror_fraction`` of traffic that keeps every candidate of the group's profile fresh).  ``kind``
        and ``chat`` (the request's class, whether it is a chat) keep the group's traffic mix, which sets the
        quality floors its placement must meet; a mix that its placement no longer meets re-plans the group."""
        self.requests += 1
        self._dirty = True
        g = self.groups.get(group)
        if self.pinned or g is None:
            return []
        if kind is not None and g.observe_class(kind, bool(chat)) and not g.operator_pin:
            await self._maybe_apply(g, g.controller.quality_breached())
        targets = g.controller.begin_request()
        if not targets and self._rng.random() < self.cfg.mirror_fraction:
            targets = [c.name for c in g.candidates]
        return targets

    async def observe_tokens(self, model: str, depth: int, confidences: list[float],
                             exit_layers: list[int] | None = None, group: str = DEFAULT_GROUP) -> None:
        self._dirty = True
        if exit_layers:
            self.timeline.exits(model, exit_layers)
        g = self.groups.get(group)
        for c in confidences:
            self.tokens_observed += 1
            if g is not None:
                await self._maybe_apply(g, g.controller.observe_token(model, depth, c))

    async def observe_request(self, model: str, depth: int, output_tokens: int, seconds: float,
                              ttft_s: float | None, prompt_tokens: int, group: str = DEFAULT_GROUP) -> None:
        self._dirty = True
        self.timeline.request(time.time(), model, depth, output_tokens, seconds, ttft_s)
        g = self.groups.get(group)
        if g is not None:
            self.demand[group] += output_tokens
            d = g.controller.observe_request(model, depth, output_tokens=output_tokens, seconds=seconds,
                                             ttft_s=ttft_s, prompt_tokens=prompt_tokens)
            await self._maybe_apply(g, d)

    async def observe_profile(self, records: list[dict[str, Any]], group: str = DEFAULT_GROUP) -> None:
        self._dirty = True
        from helios_ray.control.trace import TraceRequest, parse_record

        g = self.groups.get(group)
        for r in records:
            rec = parse_record(r)
            self.profile_records += 1
            if g is None:
                continue
            if isinstance(rec, TraceRequest):
                g.controller.observe_profile_request(rec)
            else:
                g.controller.observe_profile_token(rec)

    async def observe_quality(self, model: str, depth: int, cls: str, value: float) -> None:
        """One served answer scored online (the profiler, under the chat reference).  Once the placement has enough
        scores, its online value replaces the offline record for the floors, and every group serving it re-plans if
        it now misses a floor - as it would on a breach storm."""
        self._dirty = True
        if not self.quality.observe(model, depth, cls, value):
            return
        for g in self.groups.values():
            if g.placement == {"model": model, "depth": int(depth)} and not g.operator_pin:
                await self._maybe_apply(g, g.controller.quality_breached())

    def _live(self, now: float, group: str | None = None) -> list[ReplicaStats]:
        """Replicas (of ``group``, or all) that reported in the last 10 s: the ones the status and plans count."""
        return [r for r in self.replicas.values()
                if now - (r.reported_at or 0) < 10.0 and (group is None or r.group == group)]

    async def report_replica(self, stats: ReplicaStats) -> None:  # noqa: D102 - shown in the status
        self.replicas[stats.replica] = stats.model_copy(update={"reported_at": time.time()})

    # -------------------------------------------------------------------------------------- status
    async def status(self) -> dict[str, Any]:
        now = time.time()
        live = sorted((r.model_dump(mode="json") for r in self._live(now)), key=lambda r: r["replica"])
        d = self.default
        groups = [{"name": n, "placement": g.snapshot(), "pinned": g.pinned, "candidates": [c.name for c in g.candidates],
                   "replicas_configured": g.spec.replicas, "max_replicas": g.spec.max_replicas,
                   "replicas_planned": self.sizes[n], "replicas": [r["replica"] for r in live if r["group"] == n],
                   "quality": g.quality_view(), "controller": g.controller.status()} for n, g in self.groups.items()]
        return {
            "placement": d.snapshot(), "changed_at": d.changed_at, "changes": self.changes[-20:],
            "groups": groups, "switching": self.gate.snapshot(),
            "fleet_plan": {"sizes": dict(self.sizes), "fleet_slots": self.cfg.fleet_slots,
                           "last_resize": self.last_resize},
            "replicas": live,
            "requests": self.requests, "tokens_observed": self.tokens_observed,
            "profile_records": self.profile_records, "slo": self.cfg.slo.value, "candidates": self.cfg.candidates,
            "mode": self.cfg.mode, "pinned": d.pinned,
            "quality": self.quality.status(),
            "brain": {"pid": os.getpid(), "started_at": self.started_at, "restarts": self.restarts},
            "controller": groups[list(self.groups).index(d.name)]["controller"],  # the one-group view (dashboard)
            "timeline": self.timeline.snapshot(now, self.changes),
        }
