"""Telemetry the policy decides from: the performance history table (PHT) and the breach counter.

The PHT is keyed by ``(model, depth)`` where depth is the depth the model was *loaded* to while the
numbers were collected (profile mode loads the full model and evaluates every exit, so profile
entries sit at the full depth; a serving replica at depth D reports request timings under D).
Everything is plain counters and bounded sample buffers so an entry is cheap to update per token,
JSON round-trips (the router persists and displays it) and two runs on the same data give the
same numbers. Time comes from an injected clock so staleness is testable without sleeping.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .config import PolicyConfig
from .trace import RequestRecord, TokenRecord

__all__ = [
    "Reservoir",
    "LatencySummary",
    "ExitStats",
    "PHTEntry",
    "PHT",
    "BreachCounter",
]

Clock = Callable[[], float]


class LatencySummary(BaseModel):
    """Mean over every sample ever seen; percentiles over the recent reservoir."""

    count: int
    mean: float | None
    p50: float | None
    p99: float | None


class Reservoir(BaseModel):
    """A bounded buffer of the most recent samples plus exact running count and sum.

    Recency rather than uniform reservoir sampling: the controller follows drift, so p50/p99 should
    describe the recent past, and a ring buffer is deterministic (no RNG state to persist).
    """

    model_config = ConfigDict(extra="forbid")

    size: int = Field(512, ge=1)
    samples: list[float] = Field(default_factory=list)
    cursor: int = 0
    count: int = 0
    total: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if len(self.samples) < self.size:
            self.samples.append(value)
        else:
            self.samples[self.cursor] = value
            self.cursor = (self.cursor + 1) % self.size

    def merge(self, other: "Reservoir") -> None:
        """Append another reservoir's recent samples (oldest first) and its exact totals."""
        ordered = other.samples[other.cursor :] + other.samples[: other.cursor]
        count, total = self.count + other.count, self.total + other.total
        for value in ordered:
            self.add(value)
        self.count, self.total = count, total

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile (q in [0, 100]) of the recent samples."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        rank = max(1, math.ceil(q / 100.0 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]

    def summary(self) -> LatencySummary:
        return LatencySummary(
            count=self.count, mean=self.mean, p50=self.percentile(50), p99=self.percentile(99)
        )


class ExitStats(BaseModel):
    """What profiling saw at one exit depth."""

    model_config = ConfigDict(extra="forbid")

    tokens: int = 0
    """Tokens for which this exit was evaluated."""
    confident: int = 0
    """... whose confidence was >= the entry's threshold."""
    agree_known: int = 0
    """... for which the full model's token was known."""
    agree: int = 0
    """... whose exit token equalled the full model's (what greedy exit here would serve right)."""
    confident_agree: int = 0
    logprob_n: int = 0
    logprob_sum: float = 0.0
    """Sum of log p_full(exit token): perplexity of the served output under the full model."""
    conf_hist: list[int] = Field(default_factory=list)

    @property
    def agreement(self) -> float | None:
        return self.agree / self.agree_known if self.agree_known else None

    @property
    def confident_rate(self) -> float | None:
        return self.confident / self.tokens if self.tokens else None

    @property
    def perplexity(self) -> float | None:
        """Perplexity under the full model, only when every token's log-prob was known: a partial
        sample would be biased towards agreeing tokens, whose log-prob is always known."""
        if self.tokens == 0 or self.logprob_n != self.tokens:
            return None
        return math.exp(-self.logprob_sum / self.logprob_n)


class PHTEntry(BaseModel):
    """Performance history of one model loaded to one depth."""

    model_config = ConfigDict(extra="forbid")

    model: str
    depth: int = Field(ge=1)
    threshold: float = Field(gt=0.0, le=1.0)
    bins: int = Field(20, ge=2)
    reservoir_size: int = Field(512, ge=1)
    tokens: int = 0
    requests: int = 0
    exit_hist: dict[int, int] = Field(default_factory=dict)
    """First exit (<= depth) at which a token was confident."""
    greedy_exits: int = 0
    """Tokens confident at no exit <= depth: greedy exit at ``depth`` serves them anyway."""
    exits: dict[int, ExitStats] = Field(default_factory=dict)
    final_logprob_n: int = 0
    final_logprob_sum: float = 0.0
    output_tokens: int = 0
    seconds: float = 0.0
    timed_requests: int = 0
    ttft: Reservoir = Field(default_factory=Reservoir)
    tpot: Reservoir = Field(default_factory=Reservoir)
    energy_j: float = 0.0
    energy_tokens: int = 0
    measured_tokens_per_s: float | None = None
    measured_weight: float = 0.0
    updated_at: float | None = None
    """Last update of any kind (tokens, requests, throughput)."""
    profiled_at: float | None = None
    """Last profiled token: exit statistics age separately, because serving timings keep
    refreshing ``updated_at`` of the full-depth entry while its profile grows old."""

    def model_post_init(self, __context: Any) -> None:
        # Reservoirs take the entry's size unless they were deserialised with their own.
        if not self.ttft.samples and self.ttft.size != self.reservoir_size:
            self.ttft = Reservoir(size=self.reservoir_size)
        if not self.tpot.samples and self.tpot.size != self.reservoir_size:
            self.tpot = Reservoir(size=self.reservoir_size)

    # ----------------------------------------------------------------- ingest
    def observe_token(self, record: TokenRecord, now: float) -> None:
        """Add one profiled token. Exits deeper than the entry's depth are ignored (not loaded)."""
        self.tokens += 1
        first: int | None = None
        for depth in sorted(record.exits):
            if depth > self.depth:
                break
            obs = record.exits[depth]
            stats = self.exits.get(depth)
            if stats is None:
                stats = self.exits[depth] = ExitStats(conf_hist=[0] * self.bins)
            stats.tokens += 1
            confident = obs.confidence >= self.threshold
            stats.confident += confident
            stats.conf_hist[min(int(obs.confidence * self.bins), self.bins - 1)] += 1
            if record.final is not None:
                agree = obs.token == record.final
                stats.agree_known += 1
                stats.agree += agree
                stats.confident_agree += confident and agree
                logprob = obs.full_logprob
                if logprob is None and agree:
                    logprob = record.final_logprob
                if logprob is not None:
                    stats.logprob_n += 1
                    stats.logprob_sum += logprob
            if confident and first is None:
                first = depth
        if first is None:
            self.greedy_exits += 1
        else:
            self.exit_hist[first] = self.exit_hist.get(first, 0) + 1
        if record.final_logprob is not None:
            self.final_logprob_n += 1
            self.final_logprob_sum += record.final_logprob
        self.updated_at = now
        self.profiled_at = now

    def observe_request(self, record: RequestRecord, now: float) -> None:
        """Add one finished request's timings (and energy when measured)."""
        self.requests += 1
        if record.seconds > 0 and record.output_tokens > 0:
            self.output_tokens += record.output_tokens
            self.seconds += record.seconds
            self.timed_requests += 1
            if record.ttft_s is not None:
                self.ttft.add(record.ttft_s)
                if record.output_tokens > 1 and record.seconds > record.ttft_s:
                    self.tpot.add((record.seconds - record.ttft_s) / (record.output_tokens - 1))
            else:
                self.tpot.add(record.seconds / record.output_tokens)
        if record.energy_j is not None and record.output_tokens > 0:
            self.energy_j += record.energy_j
            self.energy_tokens += record.output_tokens
        self.updated_at = now

    def merge_throughput(self, tokens_per_s: float, weight: float, now: float) -> None:
        """Fold in an engine-level throughput measurement (weighted running mean).

        Engine throughput (all sequences of a batch) is what the throughput SLO is about; the
        per-request figure derived from request records is a single stream's speed and is only the
        fallback.
        """
        if tokens_per_s <= 0 or weight <= 0:
            raise ValueError("tokens_per_s and weight must be positive")
        total = self.measured_weight + weight
        prev = self.measured_tokens_per_s or 0.0
        self.measured_tokens_per_s = (prev * self.measured_weight + tokens_per_s * weight) / total
        self.measured_weight = total
        self.updated_at = now

    def merge(self, other: "PHTEntry") -> None:
        """Add another entry's counts for the same (model, depth, threshold) into this one."""
        if (other.model, other.depth) != (self.model, self.depth):
            raise ValueError("can only merge entries of the same (model, depth)")
        if other.threshold != self.threshold or other.bins != self.bins:
            raise ValueError("can only merge entries collected with the same threshold and bins")
        for name in (
            "tokens", "requests", "greedy_exits", "final_logprob_n", "final_logprob_sum",
            "output_tokens", "seconds", "timed_requests", "energy_j", "energy_tokens",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for depth, count in other.exit_hist.items():
            self.exit_hist[depth] = self.exit_hist.get(depth, 0) + count
        for depth, stats in other.exits.items():
            mine = self.exits.setdefault(depth, ExitStats(conf_hist=[0] * self.bins))
            for name in (
                "tokens", "confident", "agree_known", "agree", "confident_agree", "logprob_n",
                "logprob_sum",
            ):  # fmt: skip
                setattr(mine, name, getattr(mine, name) + getattr(stats, name))
            mine.conf_hist = [a + b for a, b in zip(mine.conf_hist, stats.conf_hist)]
        self.ttft.merge(other.ttft)
        self.tpot.merge(other.tpot)
        if other.measured_tokens_per_s is not None and other.updated_at is not None:
            self.merge_throughput(other.measured_tokens_per_s, other.measured_weight, other.updated_at)
        stamps = [t for t in (self.updated_at, other.updated_at) if t is not None]
        self.updated_at = max(stamps) if stamps else None
        profiled = [t for t in (self.profiled_at, other.profiled_at) if t is not None]
        self.profiled_at = max(profiled) if profiled else None

    # ----------------------------------------------------------------- read
    def exit_share(self, depth: int) -> float | None:
        """Share of profiled tokens whose first confident exit is at or before ``depth``."""
        if self.tokens == 0:
            return None
        return sum(n for d, n in self.exit_hist.items() if d <= depth) / self.tokens

    def exit_depth_histogram(self) -> dict[int, int]:
        """Where tokens exit: first confident exit, greedy exit at the loaded depth for the rest."""
        hist = dict(self.exit_hist)
        if self.greedy_exits:
            hist[self.depth] = hist.get(self.depth, 0) + self.greedy_exits
        return dict(sorted(hist.items()))

    def agreement(self, depth: int) -> float | None:
        stats = self.exits.get(depth)
        return stats.agreement if stats else None

    @property
    def full_perplexity(self) -> float | None:
        if self.tokens == 0 or self.final_logprob_n != self.tokens:
            return None
        return math.exp(-self.final_logprob_sum / self.final_logprob_n)

    def perplexity(self, depth: int) -> float | None:
        stats = self.exits.get(depth)
        return stats.perplexity if stats else None

    def ppl_increase(self, depth: int) -> float | None:
        """Relative perplexity increase of greedy exit at ``depth`` over the full model's own."""
        ppl, full = self.perplexity(depth), self.full_perplexity
        if ppl is None or full is None or full <= 0:
            return None
        return ppl / full - 1.0

    @property
    def stream_tokens_per_s(self) -> float | None:
        """Output tokens per second of a single request stream, from request records."""
        return self.output_tokens / self.seconds if self.seconds > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        """Engine throughput when measured, else single-stream speed from request records."""
        return self.measured_tokens_per_s or self.stream_tokens_per_s

    @property
    def energy_per_token(self) -> float | None:
        return self.energy_j / self.energy_tokens if self.energy_tokens else None

    def age(self, now: float) -> float | None:
        return None if self.updated_at is None else max(0.0, now - self.updated_at)

    def is_stale(self, now: float, stale_after_s: float) -> bool:
        """Never-updated entries count as stale: there is nothing fresh to trust."""
        age = self.age(now)
        return age is None or age > stale_after_s

    def profile_is_stale(self, now: float, stale_after_s: float) -> bool:
        """Whether the exit statistics (not the timings) are too old to trust."""
        return self.profiled_at is None or now - self.profiled_at > stale_after_s

    def summary(self, now: float | None = None, stale_after_s: float | None = None) -> dict[str, Any]:
        """A compact view for status pages and logs."""
        out: dict[str, Any] = {
            "model": self.model,
            "depth": self.depth,
            "tokens": self.tokens,
            "requests": self.requests,
            "exit_depth_histogram": self.exit_depth_histogram(),
            "agreement": {d: s.agreement for d, s in sorted(self.exits.items())},
            "exit_share": {d: self.exit_share(d) for d in sorted(self.exits)},
            "ppl_increase": {d: self.ppl_increase(d) for d in sorted(self.exits)},
            "tokens_per_s": self.tokens_per_s,
            "ttft_s": self.ttft.summary().model_dump(),
            "tpot_s": self.tpot.summary().model_dump(),
            "energy_j_per_token": self.energy_per_token,
            "updated_at": self.updated_at,
            "profiled_at": self.profiled_at,
        }
        if now is not None:
            out["age_s"] = self.age(now)
            if stale_after_s is not None:
                out["stale"] = self.is_stale(now, stale_after_s)
                if self.exits:
                    out["profile_stale"] = self.profile_is_stale(now, stale_after_s)
        return out


class PHT(BaseModel):
    """The performance history table: ``(model, depth) -> PHTEntry``.

    ``clock`` (not serialised) returns seconds; inject a fake one in tests and simulations.
    """

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.9, gt=0.0, le=1.0)
    bins: int = Field(20, ge=2)
    reservoir_size: int = Field(512, ge=1)
    stale_after_s: float = Field(600.0, gt=0.0)
    entries: list[PHTEntry] = Field(default_factory=list)

    _index: dict[tuple[str, int], PHTEntry] = PrivateAttr(default_factory=dict)
    _clock: Clock = PrivateAttr(default=time.time)
    _deepest: dict[str, int] = PrivateAttr(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        for entry in self.entries:
            self._index[(entry.model, entry.depth)] = entry
            self._deepest[entry.model] = max(self._deepest.get(entry.model, 0), entry.depth)

    @classmethod
    def from_config(cls, config: PolicyConfig, clock: Clock | None = None) -> "PHT":
        pht = cls(
            threshold=config.confidence_threshold,
            bins=config.confidence_bins,
            reservoir_size=config.reservoir_size,
            stale_after_s=config.stale_after_s,
        )
        if clock is not None:
            pht.set_clock(clock)
        return pht

    def set_clock(self, clock: Clock) -> None:
        self._clock = clock

    def now(self) -> float:
        return float(self._clock())

    # ----------------------------------------------------------------- entries
    def entry(self, model: str, depth: int) -> PHTEntry:
        """The entry for (model, depth), created empty when missing."""
        key = (model, depth)
        found = self._index.get(key)
        if found is None:
            found = PHTEntry(
                model=model,
                depth=depth,
                threshold=self.threshold,
                bins=self.bins,
                reservoir_size=self.reservoir_size,
            )
            self._index[key] = found
            self.entries.append(found)
            self._deepest[model] = max(self._deepest.get(model, 0), depth)
        return found

    def get(self, model: str, depth: int, *, include_stale: bool = False) -> PHTEntry | None:
        """The entry for (model, depth); ``None`` when missing or (unless asked) stale."""
        found = self._index.get((model, depth))
        if found is None:
            return None
        if not include_stale and found.is_stale(self.now(), self.stale_after_s):
            return None
        return found

    def for_model(self, model: str, *, include_stale: bool = False) -> list[PHTEntry]:
        now = self.now()
        return sorted(
            (
                e
                for e in self.entries
                if e.model == model and (include_stale or not e.is_stale(now, self.stale_after_s))
            ),
            key=lambda e: e.depth,
        )

    def stale(self) -> list[PHTEntry]:
        """Entries that are too old to trust: the policy ignores them and reports their keys."""
        now = self.now()
        return [e for e in self.entries if e.is_stale(now, self.stale_after_s)]

    def put(self, entry: PHTEntry) -> None:
        """Replace (or add) an entry, e.g. a fresh profile computed elsewhere."""
        self.reset(entry.model, entry.depth)
        self._index[(entry.model, entry.depth)] = entry
        self.entries.append(entry)
        self._deepest[entry.model] = max(self._deepest.get(entry.model, 0), entry.depth)

    def reset(self, model: str, depth: int) -> None:
        """Drop an entry, e.g. before a new profiling round so the profile describes the recent
        workload rather than the whole history."""
        found = self._index.pop((model, depth), None)
        if found is not None:
            self.entries = [e for e in self.entries if e is not found]

    # ----------------------------------------------------------------- ingest
    def observe_token(self, record: TokenRecord, depth: int | None = None) -> PHTEntry:
        """Add a profiled token under (record.model, depth); depth defaults to the deepest exit in
        the record, i.e. profile mode with the full model loaded."""
        key_depth = depth if depth is not None else max(record.exits)
        entry = self.entry(record.model, key_depth)
        entry.observe_token(record, self.now())
        return entry

    def observe_request(self, record: RequestRecord, depth: int | None = None) -> PHTEntry:
        """Add a finished request under (model, depth); depth defaults to ``record.depth``, then to
        the deepest entry seen for that model (profile mode)."""
        key_depth = depth or record.depth or self._deepest.get(record.model)
        if key_depth is None:
            raise ValueError(
                f"depth of request {record.request} on {record.model!r} is unknown: pass depth= or "
                "observe its tokens first"
            )
        entry = self.entry(record.model, key_depth)
        entry.observe_request(record, self.now())
        return entry

    def merge_throughput(
        self, model: str, depth: int, tokens_per_s: float, weight: float = 1.0
    ) -> PHTEntry:
        """Fold an engine-level throughput measurement into (model, depth)."""
        entry = self.entry(model, depth)
        entry.merge_throughput(tokens_per_s, weight, self.now())
        return entry

    def merge(self, other: "PHT") -> None:
        """Add every entry of another table (e.g. a profiler actor's) into this one."""
        for theirs in other.entries:
            mine = self._index.get((theirs.model, theirs.depth))
            if mine is None:
                self.put(theirs.model_copy(deep=True))
            else:
                mine.merge(theirs)

    # ----------------------------------------------------------------- persistence
    def to_json(self, **kwargs: Any) -> str:
        return self.model_dump_json(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes, clock: Clock | None = None) -> "PHT":
        pht = cls.model_validate_json(text)
        if clock is not None:
            pht.set_clock(clock)
        return pht

    def summary(self) -> list[dict[str, Any]]:
        now = self.now()
        return [
            e.summary(now, self.stale_after_s)
            for e in sorted(self.entries, key=lambda e: (e.model, e.depth))
        ]


class BreachCounter:
    """Confidence breaches among the last ``window`` served tokens, O(1) per token.

    A breach is a served token whose confidence is below the threshold; a *storm* is more than
    ``limit`` breaches inside the window (the paper: more than 50 in 100). The window need not be
    full: 51 breaches in the first 51 tokens already are a storm.
    """

    __slots__ = ("window", "limit", "threshold", "_flags", "_breaches", "_total", "_total_breaches")

    def __init__(self, window: int = 100, limit: int = 50, threshold: float = 0.9) -> None:
        if window < 1:
            raise ValueError(f"breach window must be >= 1, got {window}")
        if not 0 <= limit < window:
            raise ValueError(f"breach limit must satisfy 0 <= limit < window ({window}), got {limit}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in (0, 1], got {threshold}")
        self.window = window
        self.limit = limit
        self.threshold = threshold
        self._flags: deque[bool] = deque()
        self._breaches = 0
        self._total = 0
        self._total_breaches = 0

    @classmethod
    def from_config(cls, config: PolicyConfig) -> "BreachCounter":
        return cls(config.breach_window, config.breach_limit, config.confidence_threshold)

    def record(self, confidence: float) -> bool:
        """Count one served token; returns whether it was a breach."""
        breach = confidence < self.threshold
        if len(self._flags) == self.window:
            self._breaches -= self._flags.popleft()
        self._flags.append(breach)
        self._breaches += breach
        self._total += 1
        self._total_breaches += breach
        return breach

    @property
    def breaches(self) -> int:
        """Breaches among the tokens currently in the window."""
        return self._breaches

    @property
    def tokens(self) -> int:
        """Tokens currently in the window (<= window)."""
        return len(self._flags)

    @property
    def storm(self) -> bool:
        return self._breaches > self.limit

    @property
    def rate(self) -> float | None:
        return self._breaches / len(self._flags) if self._flags else None

    @property
    def total_tokens(self) -> int:
        return self._total

    @property
    def total_breaches(self) -> int:
        return self._total_breaches

    def reset(self) -> None:
        """Forget the window (after an action the old confidences describe another placement);
        lifetime totals are kept for metrics."""
        self._flags.clear()
        self._breaches = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "limit": self.limit,
            "threshold": self.threshold,
            "tokens": self.tokens,
            "breaches": self.breaches,
            "storm": self.storm,
            "total_tokens": self.total_tokens,
            "total_breaches": self.total_breaches,
        }
