"""Bounded latency samples with exact running totals, summarised as mean, p50 and p99.

Recent samples rather than all of them: the controller follows drift, so percentiles should describe
the recent past, and the totals stay exact so means never drift with the buffer.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LatencySummary", "Reservoir"]


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
