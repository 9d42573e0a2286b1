"""The confidence-breach counter whose storms trigger extend-or-switch.

Kept apart from the PHT because it is the per-token hot path of a serving replica: a plain class
with ``__slots__``, O(1) per token, no pydantic validation.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .config import PolicyConfig

__all__ = ["BreachCounter"]


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

    def window_state(self) -> tuple[list[bool], int, int]:
        """(the window's flags oldest first, lifetime tokens, lifetime breaches): what a checkpoint keeps."""
        return list(self._flags), self._total, self._total_breaches

    def load_window_state(self, flags: list[bool], total: int, total_breaches: int) -> None:
        self._flags = deque(flags[-self.window:])
        self._breaches = sum(self._flags)
        self._total, self._total_breaches = total, total_breaches

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
