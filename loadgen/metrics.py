"""Per-request records and the run summary.

Definitions (all latencies measured at the client, from the moment the request is sent):

* **TTFT** - time to the first *token* chunk (a chat stream's leading role-only chunk is not a token).
* **ITL** - the gaps between consecutive token chunks.
* **E2E** - time until the stream is complete (``data: [DONE]`` / the gRPC stream's end).
* **TPOT** - ``(e2e - ttft) / (n_out - 1)``, ``n_out`` = the server's ``usage.completion_tokens`` when it
  reports usage, else the number of token chunks; undefined (``None``) for ``n_out <= 1``.
* **request throughput** = completed requests / run duration; **output throughput** = output tokens of
  completed requests / run duration; the run duration runs from the first send to the last response.
* **goodput** = completed requests meeting every SLO (``ttft``, ``tpot``, ``e2e`` in ms) / run duration.
  A request without a TPOT (one output token) meets any TPOT SLO; one without a TTFT (no token) misses a
  TTFT SLO.

Percentiles use numpy's default linear interpolation (as vLLM's ``benchmark_serving``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Sequence

import numpy as np

from loadgen.net import LoadgenError

SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}
DEFAULT_PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    id: str
    kind: str
    interface: str = ""
    max_tokens: int = 0              # the target output length sent
    prompt_tokens_est: int = 0       # the workload's estimate
    phase: int | None = None         # shift workload: 0 before the switch, 1 after
    scheduled_s: float = 0.0         # planned send time, seconds after the run start
    start_s: float | None = None     # actual send time (after any concurrency wait)
    queued_s: float = 0.0            # time spent waiting for a free --max-concurrency slot
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    chunks: int = 0                  # token chunks received
    prompt_tokens: int | None = None  # the server's usage, when reported
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # when the server sends them: for accuracy scoring
    breaches: int = 0                # gRPC only (TokenInfo.breach)
    model: str | None = None         # the model that served it, as the server reports
    depth: int | None = None         # gRPC only
    finish_reason: str | None = None
    success: bool = False
    error: str | None = None
    status: int | str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("scheduled_s", "start_s", "queued_s", "ttft_s", "tpot_s", "e2e_s"):
            if d[k] is not None:
                d[k] = round(d[k], 6)
        d["itl_s"] = [round(x, 6) for x in self.itl_s]
        d["confidences"] = [round(float(x), 5) for x in self.confidences]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def token_times_s(self) -> list[float]:
        """Arrival time of each token chunk, seconds after the run start."""
        if self.start_s is None or self.ttft_s is None:
            return []
        t = self.start_s + self.ttft_s
        out = [t]
        for gap in self.itl_s:
            t += gap
            out.append(t)
        return out


# ------------------------------------------------------------------------------------------- statistics
def _pkey(p: float) -> str:
    return "median" if p == 50 else f"p{p:g}"


def stats(values: Iterable[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES, scale: float = 1.0
          ) -> dict[str, Any]:
    """``n, mean, std, min, max`` and the percentiles (``median`` for 50, ``p90``...) of ``values * scale``;
    all ``None`` for an empty input."""
    a = np.asarray([v for v in values if v is not None], dtype=float) * scale
    out: dict[str, Any] = {"n": int(a.size)}
    if a.size == 0:
        out.update({"mean": None, "std": None, "min": None, "max": None})
        out.update({_pkey(p): None for p in percentiles})
        if 50 not in percentiles:
            out["median"] = None
        return out
    out.update({"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())})
    if 50 not in percentiles:
        out["median"] = float(np.median(a))
    for p, v in zip(percentiles, np.percentile(a, list(percentiles))):
        out[_pkey(p)] = float(v)
    return out


def parse_slos(specs: Iterable[str] | dict[str, float] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:100"]`` (ms) -> ``{"ttft": 500.0, "tpot": 100.0}``; keys ttft, tpot, e2e (e2el)."""
    if not specs:
        return {}
    if isinstance(specs, dict):
        items = list(specs.items())
    else:
        items = []
        for s in specs:
            for part in str(s).replace(",", " ").split():
                k, sep, v = part.partition(":")
                if not sep:
                    raise LoadgenError(f"bad SLO {part!r}: expected METRIC:MS, e.g. ttft:500")
                items.append((k, v))
    out: dict[str, float] = {}
    for k, v in items:
        key = SLO_KEYS.get(str(k).strip().lower())
        if key is None:
            raise LoadgenError(f"unknown SLO metric {k!r}: use ttft, tpot or e2e (milliseconds)")
        try:
            ms = float(v)
        except (TypeError, ValueError):
            raise LoadgenError(f"bad SLO value {v!r} for {k}: expected milliseconds") from None
        if not ms > 0:
            raise LoadgenError(f"SLO {k} must be > 0 ms, got {v}")
        out[key] = ms
    return out


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    if not rec.success:
        return False
    for key, ms in slos.items():
        v = {"ttft": rec.ttft_s, "tpot": rec.tpot_s, "e2e": rec.e2e_s}[key]
        if v is None:
            if key == "tpot":
                continue
            return False
        if v * 1000.0 > ms:
            return False
    return True


def run_duration(records: Sequence[RequestRecord]) -> float:
    """First send to last response, from the records (used when the runner's own clock is not given)."""
    starts = [r.start_s for r in records if r.start_s is not None]
    ends = [r.start_s + r.e2e_s for r in records if r.start_s is not None and r.e2e_s is not None]
    return max(ends) - min(starts) if starts and ends else 0.0


def summarize(records: Sequence[RequestRecord], duration_s: float | None = None,
              slos: dict[str, float] | Iterable[str] | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    """The run summary: counts, throughputs, goodput, latency statistics in milliseconds (``ttft_ms``,
    ``tpot_ms``, ``itl_ms``, ``e2e_ms``), exit layers and confidences, per-kind breakdown, errors."""
    slo = parse_slos(slos)
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    dur = duration_s if duration_s is not None else run_duration(records)
    per_s = (lambda x: x / dur) if dur and dur > 0 else (lambda x: None)
    out_tokens = sum(r.output_tokens for r in ok)
    layers = [int(x) for r in records for x in r.exit_layers]
    confs = [float(x) for r in records for x in r.confidences]
    s: dict[str, Any] = {
        "num_requests": len(records), "completed": len(ok), "failed": len(failed),
        "duration_s": dur,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out_tokens),
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens or 0 for r in ok) or None,
        "ttft_ms": stats((r.ttft_s for r in ok), percentiles, 1000.0),
        "tpot_ms": stats((r.tpot_s for r in ok), percentiles, 1000.0),
        "itl_ms": stats((x for r in ok for x in r.itl_s), percentiles, 1000.0),
        "e2e_ms": stats((r.e2e_s for r in ok), percentiles, 1000.0),
        "output_tokens": stats((r.output_tokens for r in ok), percentiles),
        "queued_ms": stats((r.queued_s for r in ok), percentiles, 1000.0),
        "exit_layer": {**stats(layers, percentiles),
                       "histogram": {str(k): v for k, v in sorted(Counter(layers).items())}},
        "confidence": stats(confs, (10, 50, 90, 99)),
        "breaches": sum(r.breaches for r in records),
        "served_models": dict(Counter(f"{r.model}@{r.depth}" if r.depth else str(r.model) for r in ok if r.model)),
        "errors": dict(Counter((r.error or "unknown")[:200] for r in failed).most_common(10)),
        "goodput": None,
        "by_kind": {},
    }
    if slo:
        good = [r for r in ok if meets_slos(r, slo)]
        s["goodput"] = {"slos_ms": slo, "good": len(good), "request_goodput": per_s(len(good)),
                        "output_goodput": per_s(sum(r.output_tokens for r in good)),
                        "fraction": len(good) / len(records) if records else None}
    for kind in sorted({r.kind for r in records}):
        rs = [r for r in records if r.kind == kind]
        ks = [r for r in rs if r.success]
        s["by_kind"][kind] = {
            "num_requests": len(rs), "completed": len(ks), "output_tokens": sum(r.output_tokens for r in ks),
            "ttft_ms_median": stats((r.ttft_s for r in ks), (50,), 1000.0)["median"],
            "tpot_ms_median": stats((r.tpot_s for r in ks), (50,), 1000.0)["median"],
            "e2e_ms_median": stats((r.e2e_s for r in ks), (50,), 1000.0)["median"],
            "exit_layer_mean": stats((x for r in rs for x in r.exit_layers), (50,))["mean"],
        }
    return s
