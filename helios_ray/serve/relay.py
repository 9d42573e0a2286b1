"""The relay: open a generation on a replica, pass its events through, and feed telemetry on the way.

Every token passes through here, so this is where live telemetry is born: exit confidences go to the brain in
small batches (breach counter, policy), each finished request is reported (throughput, TTFT), the Prometheus
metrics are recorded, and a few requests are mirrored to the profiler - all fire-and-forget, so neither the
brain nor profiling ever delays a response.  Both front ends (HTTP and gRPC) use it; it knows neither.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ray.serve.exceptions import BackPressureError

from helios_ray.config import ServeConfig
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

    def summary(self) -> dict[str, Any]:
        confs = [t.confidence for t in self.tokens]
        return {"model": self.start.model, "depth": self.start.depth, "breaches": sum(t.breach for t in self.tokens),
                "mean_confidence": round(sum(confs) / len(confs), 4) if confs else None}


@dataclass
class Relay:
    cfg: ServeConfig
    replica: Any
    brain: Any
    profiler: Any | None
    metrics: Any
    model_ids: list[str] = field(default_factory=list)

    _gauges: asyncio.Task | None = field(default=None, init=False, repr=False)

    async def _refresh_gauges(self, every_s: float = 2.0) -> None:
        while True:
            self.metrics.admission_limit.set(self.admission_limit)
            await asyncio.sleep(every_s)

    @property
    def admission_limit(self) -> int:
        """Requests the cluster admits before shedding: running + waiting per replica, plus the router queue."""
        adm = self.cfg.admission
        return self.cfg.replicas * (self.cfg.engine.max_num_seqs + adm.max_waiting_per_replica) + adm.max_queued

    def check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise APIError(404, f"the model {model!r} does not exist; available: {', '.join(self.model_ids)}",
                           "invalid_request_error", "model", "model_not_found")

    async def open(self, call: GenerateCall, requested: str) -> tuple[StreamStart, Any, float]:
        """Start a generation; returns the replica's start event, the stream and when the request arrived (the
        origin of TTFT and e2e latency: queueing and prefill included).  Raises APIError."""
        t0 = time.perf_counter()
        self.check_model(requested)
        if self._gauges is None:  # Ray exports a gauge only while it is being set: keep it fresh
            self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())
        fire(self._begin(call))  # never awaited: no user request waits on the brain (it may be restarting)
        try:  # a request not yet started whose replica died is simply started again
            gen, first = await self._start(call, time.monotonic() + self.cfg.admission.resume_timeout_s)
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
        return first, gen, t0

    async def _begin(self, call: GenerateCall) -> None:
        """Tell the brain a request started and mirror it to the candidates the brain asks for."""
        targets = await self.brain.begin_request.remote()
        if targets and self.profiler is not None:
            await self.profiler.mirror.remote({"prompt": call.prompt, "messages": call.messages, "kind": "mirrored"},
                                              targets)

    async def _resilient(self, call: GenerateCall, start: StreamStart, gen: Any
                         ) -> AsyncIterator[StreamToken | StreamEnd | StreamError]:
        """The replica's events - and if the replica dies mid-stream, the same request resumed on a live replica
        (another one, or the restarted one) from the prompt plus the tokens already streamed, so the client sees
        one uninterrupted stream; greedy text equals the uninterrupted run's.  Only when no replica serving the
        same model takes it within ``admission.resume_timeout_s`` does the client get an error event."""
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
                    resumed = await self._resume(call, start.model, streamed)
                    if resumed is None:
                        self.metrics.errors.inc(tags={"status": "503"})
                        yield StreamError(status=503, message=f"the replica serving this request failed mid-stream "
                                                              f"({type(e).__name__}) and no replica could resume it "
                                                              "in time; retry the request")
                        return
                    self.metrics.resumed.inc(tags={"model": start.model})
                    gen = resumed
        finally:
            gen.cancel()  # a no-op once the stream ended; frees the replica's sequence when the client left

    async def _start(self, call: GenerateCall, deadline: float, first_within: float | None = None
                     ) -> tuple[Any, StreamEvent]:
        """A replica stream for ``call`` and its first event, started again while replicas die or restart (until
        ``deadline``, monotonic); ``first_within`` also bounds the wait for that first event.  Admission control
        (BackPressureError) is not retried here; the last failure is raised at the deadline."""
        while True:
            gen = self.replica.options(stream=True).generate.remote(call)
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

    async def _resume(self, call: GenerateCall, model: str, streamed: list[int]) -> Any | None:
        """A new stream continuing ``call`` after ``streamed`` on a replica serving ``model``, or None."""
        resume = call.model_copy(update={"resume_ids": list(streamed)})
        deadline = time.monotonic() + self.cfg.admission.resume_timeout_s
        while time.monotonic() < deadline:
            try:
                gen, first = await self._start(resume, deadline, max(0.1, deadline - time.monotonic()))
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

    async def relay(self, call: GenerateCall, start: StreamStart, gen: Any, t0: float
                    ) -> AsyncIterator[StreamToken | StreamEnd | StreamError]:
        """Yield the replica's token/end events (or one error event) while feeding telemetry and metrics."""
        model, depth = start.model, start.depth
        first_at: float | None = None
        confs: list[float] = []
        exits: list[int] = []
        n = breaches = 0
        events = self._resilient(call, start, gen)
        try:
            async for ev in events:
                if isinstance(ev, StreamToken):
                    n += 1
                    if first_at is None:
                        first_at = time.perf_counter()
                    confs.append(ev.confidence)
                    exits.append(ev.exit_layer)
                    breaches += ev.breach
                    self.metrics.exit_depth.observe(ev.exit_layer, tags={"model": model})
                    if len(confs) >= self.cfg.telemetry_every_tokens:
                        fire(self.brain.observe_tokens.remote(model, depth, confs, exit_layers=exits))
                        confs, exits = [], []
                elif isinstance(ev, StreamEnd):
                    self.metrics.requests.inc(tags={"model": model, "finish_reason": ev.finish_reason})
                yield ev
        finally:
            await events.aclose()  # we stopped early: cancels the replica side (Serve also propagates disconnects)
            if confs:
                fire(self.brain.observe_tokens.remote(model, depth, confs, exit_layers=exits))
        e2e = time.perf_counter() - t0
        ttft = (first_at - t0) if first_at is not None else None
        tags = {"model": model}
        if ttft is not None:
            self.metrics.ttft.observe(ttft, tags=tags)
        if n > 1 and ttft is not None:
            self.metrics.tpot.observe((e2e - ttft) / (n - 1), tags=tags)
        self.metrics.e2e.observe(e2e, tags=tags)
        self.metrics.tokens.inc(n, tags=tags)
        if breaches:
            self.metrics.breaches.inc(breaches, tags=tags)
        fire(self.brain.observe_request.remote(model, depth, n, e2e, ttft, start.prompt_tokens))

    async def complete(self, call: GenerateCall, requested: str) -> Completed:
        start, gen, t0 = await self.open(call, requested)
        text: list[str] = []
        tokens: list[StreamToken] = []
        end: StreamEnd | None = None
        async for ev in self.relay(call, start, gen, t0):
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
        return Completed(start=start, text="".join(text), tokens=tokens, end=end)
