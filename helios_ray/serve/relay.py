"""The relay: steer a request to a replica group, open a generation there, pass its events through, and feed
telemetry on the way.

Steering (:mod:`helios_ray.control.steering`) happens here because only the router has, at once, the request's
features, every group's live placement (polled from the brain each second) and the outcome of every request it
relayed - which is what the predictor learns from.  Each router replica learns on its own; a restarted router
re-learns within ``steering.min_observations`` requests per (placement, kind), load-balancing meanwhile.

Every token passes through here, so this is where live telemetry is born: exit confidences go to the brain in
small batches (breach counter, policy), each finished request is reported (throughput, TTFT), the Prometheus
metrics are recorded, and a few requests are mirrored to the profiler - all fire-and-forget, so neither the
brain nor profiling ever delays a response.  Both front ends (HTTP and gRPC) use it; it knows neither.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ray.serve.exceptions import BackPressureError

from helios_ray.serve.config import ServeConfig
from helios_ray.control.steering import GroupView, Outcome, RequestFeatures, Route, Steering, request_features
from helios_ray.serve.protocol import APIError
from helios_ray.serve.schemas import GenerateCall, StreamEnd, StreamError, StreamEvent, StreamStart, StreamToken

log = logging.getLogger("ray.serve")


def fire(coro_like: Any) -> None:
    """Send a request to another deployment without waiting for it (telemetry, mirroring)."""

    async def run() -> None:
        try:
            await coro_like
        except Exception:
            log.debug("helios router: background call failed", exc_info=True)

    asyncio.get_running_loop().create_task(run())


@dataclass
class Completed:
    """A whole (non-streamed) generation."""

    start: StreamStart
    text: str
    tokens: list[StreamToken]
    end: StreamEnd
    group: str = "default"

    def summary(self) -> dict[str, Any]:
        confs = [t.confidence for t in self.tokens]
        return {"model": self.start.model, "depth": self.start.depth, "group": self.group, "breaches": sum(t.breach for t in self.tokens),
                "mean_confidence": round(sum(confs) / len(confs), 4) if confs else None}


@dataclass
class Opened:
    """A generation started on a group: its first event, the replica stream, and how it was routed."""

    start: StreamStart
    gen: Any
    t0: float  # when the request arrived (perf_counter): the origin of TTFT and e2e latency
    group: str
    features: RequestFeatures
    route: Route | None = None
    view: GroupView | None = None
    released: bool = False


@dataclass
class Relay:
    cfg: ServeConfig
    groups: dict[str, Any]  # group name -> handle of its replica deployment
    brain: Any
    profiler: Any | None
    metrics: Any
    model_ids: list[str] = field(default_factory=list)

    _gauges: asyncio.Task | None = field(default=None, init=False, repr=False)
    _views: dict[str, GroupView] = field(default_factory=dict, init=False, repr=False)
    _versions: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _inflight: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _shown: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.steering = Steering(self.cfg.slo, self.cfg.steering)
        self._rng = random.Random()  # which served chats are scored online
        self._inflight = {g: 0 for g in self.groups}
        self.resumed_streams = 0  # streams this router resumed on a live replica after theirs died (status)
        self._viewed = asyncio.Event()

    async def _refresh(self, every_s: float = 1.0) -> None:
        """Keep the gauges exported (Ray exports a gauge only while it is set) and the fleet view fresh."""
        while True:
            self.metrics.admission_limit.set(self.admission_limit)
            try:
                views = await asyncio.wait_for(self.brain.fleet_view.remote(), 5.0)
                for v in views:
                    self._views[v["group"]] = GroupView(group=v["group"], model=v["model"], depth=v["depth"],
                                                        total_layers=v["total_layers"], slots=v["slots"],
                                                        busy=v["busy"], quality=v.get("quality") or {},
                                                        chat_capable=v.get("chat_capable", True),
                                                        prior_tps=v.get("prior_tps"))
                    self.steering.set_floors(v.get("floors") or {})
                    for cls, value in (v.get("quality") or {}).items():
                        self.metrics.group_quality.set(value, tags={"group": v["group"], "model": v["model"],
                                                                    "class": cls})
                    self._versions[v["group"]] = v["version"]
                    was = self._shown.get(v["group"])
                    if was is not None and was != v["model"]:  # the group moved off a model: zero its series
                        self.metrics.group_depth.set(0, tags={"group": v["group"], "model": was})
                    self._shown[v["group"]] = v["model"]
                    self.metrics.group_depth.set(v["depth"], tags={"group": v["group"], "model": v["model"]})
                self._viewed.set()
            except Exception:  # the brain restarting: keep steering by the last view
                log.debug("helios router: fleet view refresh failed", exc_info=True)
            await asyncio.sleep(every_s)

    @property
    def admission_limit(self) -> int:
        """Requests the cluster admits before shedding: running + waiting per replica, plus the router queue of
        each group's deployment."""
        adm = self.cfg.admission
        return (self.cfg.total_replicas * (self.cfg.engine.max_num_seqs + adm.max_waiting_per_replica)
                + adm.max_queued * len(self.groups))

    async def _route(self, call: GenerateCall, requested: str) -> tuple[str, RequestFeatures, Route | None,
                                                                          GroupView | None]:
        """The group to serve ``call``: among the groups serving ``requested`` (any, for the served model name),
        the one the steering predictor expects to serve it best.  Busy counts this router's own in-flight
        requests too, so a burst is spread before the replicas' next report."""
        feats = request_features(call.prompt, call.messages, metadata=call.metadata, rules=self.cfg.classes)
        if self._gauges is None:
            self._gauges = asyncio.get_running_loop().create_task(self._refresh())
        if not self._viewed.is_set():
            try:
                await asyncio.wait_for(self._viewed.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
        views = [v.model_copy(update={"busy": max(v.busy, self._inflight.get(g, 0))})
                 for g, v in self._views.items() if g in self.groups]
        if requested != self.cfg.served_model_name:
            views = [v for v in views if v.model == requested]
            if not views and self._views:
                serving = sorted({v.model for v in self._views.values()})
                raise APIError(400, f"model {requested!r} is a candidate but not deployed right now (serving "
                                    f"{', '.join(serving)}); send model={self.cfg.served_model_name!r} to let HELIOS "
                                    "choose", param="model", code="model_not_deployed")
        if not views:  # no fleet view yet (the brain is starting): the least busy group
            group = min(self.groups, key=lambda g: self._inflight.get(g, 0))
            return group, feats, None, None
        route = self.steering.choose(feats, views)
        self.metrics.routed.inc(tags={"group": route.group, "kind": route.kind, "reason": route.reason})
        return route.group, feats, route, next(v for v in views if v.group == route.group)

    def check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise APIError(404, f"the model {model!r} does not exist; available: {', '.join(self.model_ids)}",
                           "invalid_request_error", "model", "model_not_found")

    async def open(self, call: GenerateCall, requested: str) -> Opened:
        """Route and start a generation; returns the replica's start event, the stream, the group and when the
        request arrived (the origin of TTFT and e2e latency: queueing and prefill included).  Raises APIError."""
        t0 = time.perf_counter()
        self.check_model(requested)
        group, feats, route, view = await self._route(call, requested)
        fire(self._begin(call, group, feats))  # never awaited: no user request waits on the brain (it may be restarting)
        self._hold(group)
        try:
            return await self._open_on(call, requested, group, feats, route, view, t0)
        except BaseException:
            self._inflight[group] = max(0, self._inflight.get(group, 0) - 1)
            raise

    async def _open_on(self, call: GenerateCall, requested: str, group: str, feats: RequestFeatures,
                       route: Route | None, view: GroupView | None, t0: float) -> Opened:
        try:  # a request not yet started whose replica died is simply started again
            gen, first = await self._start(call, group, time.monotonic() + self.cfg.admission.resume_timeout_s)
        except BackPressureError:
            self.metrics.shed.inc(tags={"reason": "queue_full"})
            raise APIError(503, "the server is at capacity (every replica busy and the queue full); retry "
                                "later", "server_error", code="overloaded",
                           retry_after_s=self.cfg.admission.retry_after_s) from None
        except Exception as e:
            raise APIError(503, f"no replica could start the request ({type(e).__name__}); retry later",
                           "server_error", retry_after_s=self.cfg.admission.retry_after_s) from None
        if isinstance(first, StreamError):
            if first.status == 503:
                self.metrics.shed.inc(tags={"reason": "switching"})
            raise APIError(first.status, first.message, "invalid_request_error" if first.status < 500
                           else "server_error", retry_after_s=first.retry_after_s)
        assert isinstance(first, StreamStart), f"a replica stream began with {type(first).__name__}"
        if requested != self.cfg.served_model_name and first.model != requested:
            fire(self._drain(gen))
            raise APIError(400, f"model {requested!r} is a candidate but not deployed right now (serving "
                                f"{first.model}); send model={self.cfg.served_model_name!r} to let HELIOS choose",
                           param="model", code="model_not_deployed")
        return Opened(start=first, gen=gen, t0=t0, group=group, features=feats, route=route, view=view)

    async def _begin(self, call: GenerateCall, group: str, feats: RequestFeatures) -> None:
        """Tell the brain a request of this class started on ``group`` (the group's traffic mix sets the floors its
        placement must meet) and mirror it to the candidates that group's policy asks for (its profiling windows
        see the traffic steered to it)."""
        targets = await self.brain.begin_request.remote(group, feats.kind, feats.chat)
        if targets and self.profiler is not None:
            await self.profiler.mirror.remote({"prompt": call.prompt, "messages": call.messages, "kind": "mirrored",
                                               "group": group}, targets)

    async def _resilient(self, call: GenerateCall, opened: Opened
                         ) -> AsyncIterator[StreamToken | StreamEnd | StreamError]:
        """The replica's events - and if the replica dies mid-stream, the same request resumed on a live replica
        (another one, or the restarted one) from the prompt plus the tokens already streamed, so the client sees
        one uninterrupted stream; greedy text equals the uninterrupted run's.  Only when no replica serving the
        same model takes it within ``admission.resume_timeout_s`` does the client get an error event."""
        start, gen = opened.start, opened.gen
        streamed: list[int] = list(call.resume_ids)
        try:
            while True:
                try:
                    async for ev in gen:
                        if isinstance(ev, StreamToken):
                            streamed.append(ev.token)
                        yield ev
                        if isinstance(ev, (StreamEnd, StreamError)):
                            return
                    return
                except Exception as e:  # the replica died mid-stream (ActorDiedError, RayTaskError, ...)
                    log.warning("helios router: stream from %s@%d failed (%s) after %d tokens; resuming",
                                start.model, start.depth, type(e).__name__, len(streamed))
                    resumed = await self._resume(call, opened.group, start.model, streamed)
                    if resumed is None:
                        self.metrics.errors.inc(tags={"status": "503"})
                        yield StreamError(status=503, message=f"the replica serving this request failed mid-stream "
                                                              f"({type(e).__name__}) and no replica could resume it "
                                                              "in time; retry the request")
                        return
                    self.metrics.resumed.inc(tags={"model": start.model})
                    self.resumed_streams += 1
                    gen = resumed
        finally:
            gen.cancel()  # a no-op once the stream ended; frees the replica's sequence when the client left

    async def _start(self, call: GenerateCall, group: str, deadline: float, first_within: float | None = None
                     ) -> tuple[Any, StreamEvent]:
        """A replica stream for ``call`` and its first event, started again while replicas die or restart (until
        ``deadline``, monotonic); ``first_within`` also bounds the wait for that first event.  Admission control
        (BackPressureError) is not retried here; the last failure is raised at the deadline."""
        while True:
            gen = self.groups[group].options(stream=True).generate.remote(call)
            try:
                return gen, await asyncio.wait_for(gen.__anext__(), first_within)
            except BackPressureError:
                raise
            except Exception as e:
                gen.cancel()
                if time.monotonic() > deadline:
                    raise
                log.warning("helios router: starting a replica stream failed (%s); retrying", type(e).__name__)
                await asyncio.sleep(0.5)

    async def _resume(self, call: GenerateCall, group: str, model: str, streamed: list[int]) -> Any | None:
        """A new stream continuing ``call`` after ``streamed`` on a replica of ``group`` serving ``model``, or
        None."""
        resume = call.model_copy(update={"resume_ids": list(streamed)})
        deadline = time.monotonic() + self.cfg.admission.resume_timeout_s
        while time.monotonic() < deadline:
            try:
                gen, first = await self._start(resume, group, deadline, max(0.1, deadline - time.monotonic()))
            except BackPressureError:  # every replica full: keep trying until the deadline
                await asyncio.sleep(0.5)
                continue
            except Exception:  # no replica came back in time
                return None
            if isinstance(first, StreamStart) and first.model == model:
                return gen
            gen.cancel()
            if isinstance(first, StreamError) and first.status >= 500:
                await asyncio.sleep(first.retry_after_s or 0.5)
                continue
            return None  # another model now (its tokenizer cannot continue these ids), or refused
        return None

    @staticmethod
    async def _drain(gen: Any) -> None:
        async for _ in gen:
            pass

    async def relay(self, call: GenerateCall, opened: Opened) -> AsyncIterator[StreamToken | StreamEnd | StreamError]:
        """Yield the replica's token/end events (or one error event) while feeding telemetry, metrics and the
        steering predictor (each finished request is one observation of how its group served it)."""
        start, t0, group = opened.start, opened.t0, opened.group
        model, depth = start.model, start.depth
        first_at: float | None = None
        confs: list[float] = []
        exits: list[int] = []
        n = breaches = exit_sum = 0
        # a sample of served chat answers is scored under the chat reference, online (docs/quality.md)
        scored: list[str] | None = ([] if self.profiler is not None and call.messages and not call.resume_ids
                                    and opened.features.kind == "chat"
                                    and self._rng.random() < self.cfg.quality.online_sample else None)
        ended = False
        events = self._resilient(call, opened)
        try:
            async for ev in events:
                if isinstance(ev, StreamToken):
                    n += 1
                    if scored is not None:
                        scored.append(ev.text)
                    if first_at is None:
                        first_at = time.perf_counter()
                    confs.append(ev.confidence)
                    exits.append(ev.exit_layer)
                    exit_sum += ev.exit_layer
                    breaches += ev.breach
                    self.metrics.exit_depth.observe(ev.exit_layer, tags={"model": model})
                    if len(confs) >= self.cfg.telemetry_every_tokens:
                        fire(self.brain.observe_tokens.remote(model, depth, confs, exit_layers=exits, group=group))
                        confs, exits = [], []
                elif isinstance(ev, StreamEnd):
                    self.metrics.requests.inc(tags={"model": model, "finish_reason": ev.finish_reason})
                    ended = not ev.error
                yield ev
        finally:
            self._release(opened)
            await events.aclose()  # we stopped early: cancels the replica side (Serve also propagates disconnects)
            if confs:
                fire(self.brain.observe_tokens.remote(model, depth, confs, exit_layers=exits, group=group))
        if scored is not None and ended and n:
            fire(self.profiler.score_answer.remote({"messages": call.messages, "text": "".join(scored), "model": model,
                                                    "depth": depth, "group": group}))
        e2e = time.perf_counter() - t0
        ttft = (first_at - t0) if first_at is not None else None
        tags = {"model": model}
        if ttft is not None:
            self.metrics.ttft.observe(ttft, tags=tags)
        if n > 1 and ttft is not None:
            self.metrics.tpot.observe((e2e - ttft) / (n - 1), tags=tags)
        self.metrics.e2e.observe(e2e, tags=tags)
        if n:  # Ray's counters refuse 0: an answer that ended before its first token would turn into a 500
            self.metrics.tokens.inc(n, tags=tags)
        if breaches:
            self.metrics.breaches.inc(breaches, tags=tags)
        fire(self.brain.observe_request.remote(model, depth, n, e2e, ttft, start.prompt_tokens, group=group))
        self._learn(opened, n, breaches, exit_sum, e2e - (ttft or 0.0))

    def _learn(self, opened: Opened, n: int, breaches: int, exit_sum: int, decode_s: float) -> None:
        """One observation for the steering predictor: how the group served this request (only when it served it
        at the placement it was routed by - a group that moved meanwhile says nothing about that prediction)."""
        view = opened.view
        if view is None or n < 2 or (opened.start.model, opened.start.depth) != (view.model, view.depth):
            return
        outcome = Outcome(tokens=n, breaches=breaches, mean_exit_layer=exit_sum / n, seconds=max(decode_s, 1e-3))
        predicted = next((p for p in (opened.route.predictions if opened.route else []) if p.group == view.group),
                         None)
        self.steering.observe(opened.features, view, outcome, predicted)
        if predicted is not None and predicted.trusted and predicted.breach_rate is not None:
            self.metrics.route_error.observe(abs(predicted.breach_rate - breaches / n), tags={"group": view.group})

    def _hold(self, group: str) -> None:
        self._inflight[group] = self._inflight.get(group, 0) + 1

    def _release(self, opened: Opened) -> None:
        if not opened.released:
            opened.released = True
            self._inflight[opened.group] = max(0, self._inflight.get(opened.group, 0) - 1)

    def routing_status(self) -> dict[str, Any]:
        """What ``/v1/helios/status`` shows under ``routing``: the fleet as this router sees it, its in-flight
        requests per group, and the predictor's split, prediction errors and recent routes."""
        return {"groups": [{**v.model_dump(), "version": self._versions.get(g), "inflight": self._inflight.get(g, 0)}
                           for g, v in self._views.items()],
                "steering": self.steering.snapshot(), "resumed_streams": self.resumed_streams}

    async def complete(self, call: GenerateCall, requested: str) -> Completed:
        opened = await self.open(call, requested)
        text: list[str] = []
        tokens: list[StreamToken] = []
        end: StreamEnd | None = None
        async for ev in self.relay(call, opened):
            if isinstance(ev, StreamToken):
                text.append(ev.text)
                tokens.append(ev)
            elif isinstance(ev, StreamEnd):
                end = ev
            else:
                raise APIError(ev.status, ev.message, "server_error")
        if end is None:
            raise APIError(503, "the replica ended the stream without an end event", "server_error")
        if end.error:
            raise APIError(500, end.error, "server_error")
        return Completed(start=opened.start, text="".join(text), tokens=tokens, end=end, group=opened.group)
