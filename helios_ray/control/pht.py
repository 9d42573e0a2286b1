"""The performance history table (PHT): ``(model, depth) -> PHTEntry`` with staleness and merging.

The policy decides from it and the router persists it. Time comes from an injected clock so
staleness is testable without sleeping; entries older than ``stale_after_s`` are ignored (and
reported) rather than trusted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .config import PolicyConfig
from .pht_entry import PHTEntry
from .trace import TraceRequest, TraceToken

__all__ = ["Clock", "PHT"]

Clock = Callable[[], float]


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

    @property
    def clock(self) -> Clock:
        return self._clock

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
    def observe_token(self, record: TraceToken, depth: int | None = None) -> PHTEntry:
        """Add a profiled token under (record.model, depth); depth defaults to the deepest exit in
        the record, i.e. profile mode with the full model loaded."""
        key_depth = depth if depth is not None else max(record.exits)
        entry = self.entry(record.model, key_depth)
        entry.observe_token(record, self.now())
        return entry

    def observe_request(self, record: TraceRequest, depth: int | None = None) -> PHTEntry:
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
