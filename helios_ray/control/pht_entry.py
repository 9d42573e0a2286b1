"""One row of the performance history table: what was seen of one model loaded to one depth.

The row is keyed by the depth the model was *loaded* to while the numbers were collected (profile
mode loads the full model and evaluates every exit, so profile entries sit at the full depth; a
serving replica at depth D reports request timings under D). Everything is plain counters and
bounded sample buffers so an entry is cheap to update per token, JSON round-trips (the router
persists and displays it) and two runs on the same data give the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .reservoir import Reservoir
from .trace import TraceRequest, TraceToken

__all__ = ["ExitStats", "PHTEntry"]


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
    def observe_token(self, record: TraceToken, now: float) -> None:
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

    def observe_request(self, record: TraceRequest, now: float) -> None:
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
