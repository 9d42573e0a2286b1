"""What the live page and ``helios-ray status`` show over time: pure bookkeeping for the brain's status document.

The brain feeds a :class:`Timeline` with what it already receives - finished requests (``observe_request``),
served tokens' exit layers (``observe_tokens``) and the policy's decisions - and puts
:meth:`Timeline.snapshot` under ``"timeline"`` in ``/v1/helios/status``:

* ``series``: the last ``span_s`` seconds in ``interval_s`` buckets - output tokens/s (each request's tokens
  spread evenly over its duration, so a long request counts in every bucket it ran in), finished requests,
  and TTFT / TPOT p50 and p90 of the requests that finished in the bucket;
* ``exit_layers``: served tokens per exit layer, per model, since the brain started;
* ``events``: the policy's decisions (every action, ``keep`` included, with trigger and reason) and the
  operator's placement changes, stamped with wall-clock time, newest last.

Memory is bounded: at most ``max_requests`` requests (and none older than ``span_s``) and ``max_events`` events.
No Ray, no I/O, no clock of its own: every time is passed in, so it is unit-testable.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class FinishedRequest:
    at: float  # wall-clock time it finished
    model: str
    depth: int
    output_tokens: int
    seconds: float
    ttft_s: float | None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return max(0.0, self.seconds - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank-interpolated percentile (numpy's default, ``linear``); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


class Timeline:
    def __init__(self, span_s: float = 300.0, interval_s: float = 10.0, max_requests: int = 20_000,
                 max_events: int = 200):
        if interval_s <= 0 or span_s < interval_s:
            raise ValueError("need 0 < interval_s <= span_s")
        self.span_s, self.interval_s = float(span_s), float(interval_s)
        self.requests: deque[FinishedRequest] = deque(maxlen=max_requests)
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.exit_layers: dict[str, Counter[int]] = {}

    # ------------------------------------------------------------------------------------------ feeding
    def request(self, at: float, model: str, depth: int, output_tokens: int, seconds: float,
                ttft_s: float | None) -> None:
        self.requests.append(FinishedRequest(at, model, int(depth), int(output_tokens), max(0.0, float(seconds)),
                                             None if ttft_s is None else float(ttft_s)))
        self._expire(at)

    def exits(self, model: str, layers: Iterable[int]) -> None:
        self.exit_layers.setdefault(model, Counter()).update(int(x) for x in layers)

    def decision(self, at: float, decision: dict[str, Any]) -> None:
        """A policy decision (``Decision.model_dump(mode="json")``)."""
        d = decision
        prev = ({"model": d.get("previous_model"), "depth": d.get("previous_depth")}
                if d.get("previous_model") is not None else None)
        self.events.append({"at": at, "source": "policy", "group": d.get("group"), "action": d.get("action"),
                            "trigger": d.get("trigger"),
                            "from": prev, "to": {"model": d.get("model"), "depth": d.get("depth")},
                            "reason": d.get("reason")})

    def _expire(self, now: float) -> None:
        while self.requests and self.requests[0].at < now - self.span_s - self.interval_s:
            self.requests.popleft()

    # ------------------------------------------------------------------------------------------ reading
    def series(self, now: float) -> list[dict[str, Any]]:
        """``span_s / interval_s`` buckets ending at ``now`` (oldest first); the last one is still filling."""
        n = int(round(self.span_s / self.interval_s))
        w = self.interval_s
        start = now - n * w
        tokens = [0.0] * n
        done: list[list[FinishedRequest]] = [[] for _ in range(n)]
        for r in self.requests:
            if start <= r.at <= now:
                done[min(n - 1, int((r.at - start) // w))].append(r)
            begin = r.at - r.seconds
            if r.output_tokens <= 0 or r.at < start or begin > now:
                continue
            if r.seconds <= 0:
                if start <= r.at <= now:
                    tokens[min(n - 1, int((r.at - start) // w))] += r.output_tokens
                continue
            rate = r.output_tokens / r.seconds
            first, last = max(0, int((begin - start) // w)), min(n - 1, int((r.at - start) // w))
            for i in range(first, last + 1):
                lo, hi = start + i * w, start + (i + 1) * w
                overlap = min(hi, r.at) - max(lo, begin)
                if overlap > 0:
                    tokens[i] += rate * overlap
        out = []
        for i in range(n):
            reqs = done[i]
            ttft = [r.ttft_s for r in reqs if r.ttft_s is not None]
            tpot = [t for t in (r.tpot_s for r in reqs) if t is not None]
            out.append({"t": round(start + (i + 1) * w, 3), "requests": len(reqs),
                        "tokens_per_s": round(tokens[i] / w, 3),
                        "ttft_p50": _r(percentile(ttft, 0.5)), "ttft_p90": _r(percentile(ttft, 0.9)),
                        "tpot_p50": _r(percentile(tpot, 0.5)), "tpot_p90": _r(percentile(tpot, 0.9))})
        return out

    def merged_events(self, changes: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Policy decisions plus the operator's placement changes (the brain's ``changes`` whose action is
        ``manual``), by time."""
        ops = [{"at": c.get("at"), "source": "operator", "action": c.get("action"), "trigger": c.get("trigger"),
                "from": c.get("from"), "to": c.get("to"), "reason": c.get("reason"), "version": c.get("version")}
               for c in changes if c.get("action") == "manual"]
        evs = sorted([*self.events, *ops], key=lambda e: e.get("at") or 0.0)
        return evs[-self.events.maxlen:] if self.events.maxlen else evs

    def snapshot(self, now: float, changes: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
        self._expire(now)
        return {"now": now, "interval_s": self.interval_s, "span_s": self.span_s, "series": self.series(now),
                "exit_layers": {m: {str(k): v for k, v in sorted(c.items())} for m, c in self.exit_layers.items()},
                "events": self.merged_events(changes)}
