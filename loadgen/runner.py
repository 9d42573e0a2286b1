"""The async runner: issue requests by the arrival process, measure them, poll the status, summarize.

    async with HttpClient("http://127.0.0.1:8000") as client:
        wl = build_workload("sharegpt", num_requests=50, seed=0)
        result = await run_load(client, wl, Arrival(rate=2.0), num_requests=50, slos={"ttft": 500, "tpot": 100})
    write_result(result, "results.json")

A run is bounded by ``num_requests`` and/or ``duration`` (no new request after ``duration`` seconds; requests
still in flight get ``drain_timeout`` more seconds, then are cancelled and counted as failed), and every request
by ``request_timeout``.  ``sweep`` repeats the run at several rates for the throughput-latency curve.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from loadgen.arrivals import Arrival
from loadgen.clients import Client, EndEvent, ReceivedToken, RequestError
from loadgen.metrics import DEFAULT_PERCENTILES, RequestRecord, parse_slos, summarize
from loadgen.net import LoadgenError
from loadgen.workloads import PoolWorkload, Request, Workload

SCHEMA_RUN = "loadgen.run/1"
SCHEMA_SWEEP = "loadgen.sweep/1"
_SAME = object()


@dataclass
class RunResult:
    config: dict[str, Any]
    records: list[RequestRecord]
    summary: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0  # Unix time of the run start (t = 0 of every *_s field)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_RUN, "started_at": self.started_at, "config": self.config,
                "summary": self.summary, "status": self.status, "records": [r.to_dict() for r in self.records]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        return cls(config=d.get("config", {}), records=[RequestRecord.from_dict(r) for r in d.get("records", [])],
                   summary=d.get("summary", {}), status=d.get("status", {}), started_at=d.get("started_at", 0.0))


@dataclass
class SweepResult:
    config: dict[str, Any]
    runs: list[RunResult]
    curve: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_SWEEP, "config": self.config, "curve": self.curve,
                "runs": [r.to_dict() for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepResult":
        return cls(config=d.get("config", {}), runs=[RunResult.from_dict(r) for r in d.get("runs", [])],
                   curve=d.get("curve", []))


# ---------------------------------------------------------------------------------------- status poller
class StatusPoller:
    """Polls ``client.status()`` (``/v1/helios/status`` or the gRPC ``Status`` RPC) every ``interval`` seconds
    and keeps the decisions timeline: every placement version seen (``t`` = seconds after the run start, when
    the poll saw it) and the server's own ``changes`` entries (``t`` from their ``at`` time)."""

    def __init__(self, client: Any, interval: float, t0: float, wall_t0: float, max_failures: int = 5):
        self.client, self.interval, self.t0, self.wall_t0 = client, interval, t0, wall_t0
        self.max_failures = max_failures
        self.polls = self.errors = 0
        self.last_error: str | None = None
        self.placements: list[dict[str, Any]] = []
        self.changes: dict[Any, dict[str, Any]] = {}
        self.replicas: Any = None
        self._fails = 0

    async def poll_once(self) -> None:
        try:
            doc = await asyncio.wait_for(self.client.status(), 10.0)
        except (RequestError, asyncio.TimeoutError, ValueError, OSError) as e:
            self.errors += 1
            self._fails += 1
            self.last_error = getattr(e, "message", None) or type(e).__name__
            return
        self._fails = 0
        self.polls += 1
        now = time.perf_counter() - self.t0
        if not isinstance(doc, dict):
            return
        p = doc.get("placement")
        if isinstance(p, dict):
            if not self.placements or self.placements[-1].get("version") != p.get("version") \
                    or (p.get("version") is None and self.placements[-1].get("model") != p.get("model")):
                self.placements.append({"t": round(now, 3), **p})
        for c in doc.get("changes") or []:
            if not isinstance(c, dict):
                continue
            key = (c.get("version"), c.get("at"))
            if key not in self.changes:
                at = c.get("at")
                t = round(float(at) - self.wall_t0, 3) if isinstance(at, (int, float)) else None
                self.changes[key] = {"t": t, **c}
        if "replicas" in doc:
            self.replicas = doc["replicas"]

    async def run(self, stop: asyncio.Event, initial_delay: bool = False) -> None:
        first = True
        while not stop.is_set() and self._fails < self.max_failures:
            if not (first and initial_delay):
                await self.poll_once()
            first = False
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    def result(self) -> dict[str, Any]:
        changes = sorted(self.changes.values(), key=lambda c: (c["t"] is None, c["t"] or 0.0, c.get("version") or 0))
        return {"interval_s": self.interval, "polls": self.polls, "errors": self.errors,
                "last_error": self.last_error, "placements": self.placements, "changes": changes,
                "replicas": self.replicas}


# ------------------------------------------------------------------------------------------------ runner
def _as_workload(workload: Workload | Sequence[Request]) -> Workload:
    if isinstance(workload, (list, tuple)):
        return PoolWorkload("custom", workload)
    return workload  # type: ignore[return-value]


async def _measure(client: Client, req: Request, rec: RequestRecord, t0: float) -> None:
    """Send one request and fill ``rec`` (timestamps relative to ``t0``)."""
    st = time.perf_counter()
    rec.start_s = st - t0
    last = st
    end: EndEvent | None = None
    async for ev in client.stream(req):
        now = time.perf_counter()
        if isinstance(ev, ReceivedToken):
            if rec.ttft_s is None:
                rec.ttft_s = now - st
            else:
                rec.itl_s.append(now - last)
            last = now
            rec.chunks += 1
            if ev.exit_layer is not None:
                rec.exit_layers.append(int(ev.exit_layer))
            if ev.confidence is not None:
                rec.confidences.append(float(ev.confidence))
            if ev.token is not None:
                rec.token_ids.append(int(ev.token))
            if ev.breach:
                rec.breaches += 1
            rec.model = rec.model or ev.model
            rec.depth = rec.depth or ev.depth
        elif isinstance(ev, EndEvent):
            end = ev
    rec.e2e_s = time.perf_counter() - st
    if end is not None:
        rec.finish_reason = end.finish_reason
        rec.prompt_tokens = end.prompt_tokens
        rec.model = end.model or rec.model
        rec.depth = end.depth or rec.depth
    n = end.completion_tokens if end is not None and end.completion_tokens is not None else rec.chunks
    rec.output_tokens = int(n)
    if rec.ttft_s is not None and rec.output_tokens > 1:
        rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)
    rec.success = True


async def run_load(client: Client, workload: Workload | Sequence[Request], arrival: Arrival | None = None, *,
                   num_requests: int | None = None, duration: float | None = None,
                   slos: dict[str, float] | Sequence[str] | None = None, status_client: Any = _SAME,
                   status_interval: float = 2.0, request_timeout: float = 300.0, drain_timeout: float = 30.0,
                   progress: bool = True, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                   extra_config: dict[str, Any] | None = None) -> RunResult:
    """Run one load test and return its records and summary.

    ``workload`` is a :class:`~loadgen.workloads.Workload` or a list of requests (then ``num_requests``
    defaults to its length).  ``status_client`` (default: ``client``; ``None`` disables) is polled every
    ``status_interval`` seconds for placement changes.
    """
    arrival = arrival or Arrival()
    if num_requests is None and isinstance(workload, (list, tuple)) and duration is None:
        num_requests = len(workload)
    wl = _as_workload(workload)
    if num_requests is not None and num_requests < 1:
        raise LoadgenError(f"num_requests must be >= 1, got {num_requests}")
    if duration is not None and not duration > 0:
        raise LoadgenError(f"duration must be > 0 seconds, got {duration}")
    if num_requests is None and duration is None:
        raise LoadgenError("a run needs a bound: num_requests and/or duration")
    if num_requests is None and math.isinf(arrival.rate) and arrival.max_concurrency is None:
        raise LoadgenError("an unpaced run (rate inf, no max_concurrency) needs num_requests")
    slo = parse_slos(slos)
    if hasattr(wl, "reset"):
        wl.reset()  # a ShiftWorkload reused by a sweep starts in its first phase again
    sc = client if status_client is _SAME else status_client

    from tqdm import tqdm

    for c in {id(client): client, id(sc): sc}.values():
        if c is not None and hasattr(c, "open"):
            await c.open()  # connection setup (e.g. httpx's client) must not count as the first request's wait
    records: list[RequestRecord] = []
    in_flight = 0
    max_in_flight = 0
    sem = asyncio.Semaphore(arrival.max_concurrency) if arrival.max_concurrency else None
    bar = tqdm(total=num_requests, unit="req", disable=not progress, dynamic_ncols=True, leave=False,
               desc=f"{client.interface} {wl.name}")

    async def one(req: Request, rec: RequestRecord) -> None:
        nonlocal in_flight, max_in_flight
        try:
            if sem is not None:
                w = time.perf_counter()
                await sem.acquire()
                rec.queued_s = time.perf_counter() - w
            try:
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
                await asyncio.wait_for(_measure(client, req, rec, t0), request_timeout)
            finally:
                in_flight -= 1
                if sem is not None:
                    sem.release()
        except RequestError as e:
            rec.error, rec.status = e.message, e.status
        except asyncio.TimeoutError:
            rec.error, rec.status = f"timeout after {request_timeout:g}s", "timeout"
        except asyncio.CancelledError:
            rec.error, rec.status = "cancelled: the run ended (duration + drain timeout)", "cancelled"
            raise
        except Exception as e:  # a client bug or an unexpected payload: count it, keep the run going
            rec.error, rec.status = f"{type(e).__name__}: {e}", "exception"
        finally:
            if rec.error is not None:
                rec.success = False
            bar.update(1)
            if records and bar.n % 8 == 0:
                bar.set_postfix(failed=sum(1 for r in records if r.error), refresh=False)

    stop_poll = asyncio.Event()
    poller = None
    poll_task = None
    if sc is not None and status_interval and status_interval > 0:
        poller = StatusPoller(sc, status_interval, time.perf_counter(), time.time())
        await poller.poll_once()  # the initial placement; also warms up the connection before the clock starts
    wall_t0 = time.time()
    t0 = time.perf_counter()
    if poller is not None:
        poller.t0, poller.wall_t0 = t0, wall_t0
        for p in poller.placements:
            p["t"] = 0.0
        for c in poller.changes.values():
            if isinstance(c.get("at"), (int, float)):
                c["t"] = round(float(c["at"]) - wall_t0, 3)
        poll_task = asyncio.create_task(poller.run(stop_poll, initial_delay=True))

    def new_record(i: int, scheduled: float, elapsed: float) -> tuple[Request, RequestRecord]:
        req = wl.request(i, elapsed)
        rec = RequestRecord(index=i, id=req.id, kind=req.kind, interface=client.interface, max_tokens=req.max_tokens,
                            prompt_tokens_est=req.prompt_tokens, phase=req.meta.get("phase"),
                            scheduled_s=scheduled)
        records.append(rec)
        return req, rec

    tasks: list[asyncio.Task] = []
    try:
        if arrival.closed_loop:
            counter = itertools.count()

            async def user() -> None:
                while True:
                    i = next(counter)
                    el = time.perf_counter() - t0
                    if (num_requests is not None and i >= num_requests) or (duration is not None and el >= duration):
                        return
                    req, rec = new_record(i, el, el)
                    await one(req, rec)

            tasks = [asyncio.create_task(user()) for _ in range(arrival.max_concurrency or 1)]
        else:
            times = arrival.times()
            for i in itertools.count():
                if num_requests is not None and i >= num_requests:
                    break
                t_s = next(times)
                if duration is not None and t_s >= duration:
                    break
                delay = t0 + t_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                req, rec = new_record(i, t_s, time.perf_counter() - t0)
                tasks.append(asyncio.create_task(one(req, rec)))
                if delay <= 0 and i % 64 == 63:
                    await asyncio.sleep(0)  # let sends start while a backlog is being issued
        if tasks:
            timeout = None
            if duration is not None:
                timeout = max(0.0, t0 + duration + drain_timeout - time.perf_counter())
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        dur = time.perf_counter() - t0
        stop_poll.set()
        if poll_task is not None:
            await asyncio.gather(poll_task, return_exceptions=True)
            await poller.poll_once()  # the last word on the placement
        bar.close()

    records.sort(key=lambda r: r.index)
    summary = summarize(records, dur, slo, percentiles)
    summary["max_in_flight"] = max_in_flight
    config = {
        "client": client.describe(), "workload": wl.describe(), "arrival": arrival.to_dict(),
        "num_requests": num_requests, "duration_s": duration, "slos_ms": slo or None,
        "request_timeout_s": request_timeout, "drain_timeout_s": drain_timeout,
        "status_interval_s": status_interval if poller else None, "percentiles": list(percentiles),
        "python": platform.python_version(), "loadgen": _version(), **(extra_config or {}),
    }
    status = poller.result() if poller else {}
    return RunResult(config=config, records=records, summary=summary, status=status, started_at=wall_t0)


def _version() -> str:
    from loadgen.version import __version__

    return __version__


# ------------------------------------------------------------------------------------------------- sweep
def curve_point(rate: float | None, s: dict[str, Any]) -> dict[str, Any]:
    def g(metric: str, key: str) -> Any:
        return (s.get(metric) or {}).get(key)

    gp = s.get("goodput") or {}
    return {"rate": rate, "request_throughput": s.get("request_throughput"),
            "output_throughput": s.get("output_throughput"), "request_goodput": gp.get("request_goodput"),
            "completed": s.get("completed"), "failed": s.get("failed"),
            **{f"{m}_{k}": g(f"{m}_ms", k) for m in ("ttft", "tpot", "itl", "e2e") for k in ("mean", "median", "p99")},
            "exit_layer_mean": g("exit_layer", "mean")}


async def sweep(client: Client, workload: Workload | Sequence[Request], rates: Sequence[float], *,
                burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0, pause_s: float = 0.0,
                **run_kwargs: Any) -> SweepResult:
    """The same workload at each rate in ``rates`` (light to saturation; ``inf`` = all at once or closed loop
    with ``max_concurrency``), one run after the other; ``curve`` holds the throughput-latency points."""
    if not rates:
        raise LoadgenError("a sweep needs at least one rate")
    runs: list[RunResult] = []
    curve: list[dict[str, Any]] = []
    for k, rate in enumerate(rates):
        if k and pause_s > 0:
            await asyncio.sleep(pause_s)
        arr = Arrival(rate=float(rate), burstiness=burstiness, max_concurrency=max_concurrency, seed=seed)
        res = await run_load(client, workload, arr, **run_kwargs)
        runs.append(res)
        curve.append(curve_point(arr.to_dict()["rate"], res.summary))
    config = {**runs[0].config, "rates": [None if math.isinf(float(r)) else float(r) for r in rates]}
    config.pop("arrival", None)
    config["arrival"] = {"burstiness": burstiness, "max_concurrency": max_concurrency, "seed": seed}
    return SweepResult(config=config, runs=runs, curve=curve)
