"""Request arrivals: open loop (Poisson / gamma at a rate) or closed loop (a fixed number of users).

Inter-arrival times are gamma distributed with shape ``burstiness`` and mean ``1 / rate``: ``burstiness = 1``
is a Poisson process (exponential gaps, coefficient of variation 1); below 1 arrivals are burstier
(CV^2 = 1 / burstiness), above 1 more regular.  ``rate = inf`` sends every request at once, or - with
``max_concurrency`` - runs a closed loop: ``max_concurrency`` users each send their next request as soon as the
previous one finished.  With both a finite rate and ``max_concurrency``, arrivals follow the rate and wait for
a free slot (the wait is recorded as ``queued_s``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from loadgen.net import LoadgenError


@dataclass(frozen=True)
class Arrival:
    rate: float = math.inf          # requests per second; inf = no pacing
    burstiness: float = 1.0         # gamma shape; 1.0 = Poisson
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.rate > 0):  # also rejects NaN
            raise LoadgenError(f"rate must be > 0 requests/s (or inf), got {self.rate}")
        if not (self.burstiness > 0) or math.isinf(self.burstiness):
            raise LoadgenError(f"burstiness must be a finite number > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise LoadgenError(f"max_concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def closed_loop(self) -> bool:
        return math.isinf(self.rate) and self.max_concurrency is not None

    def times(self) -> Iterator[float]:
        """Scheduled send times in seconds from the start (the first at 0), without end."""
        return arrival_times_iter(self.rate, self.burstiness, self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate"] = None if math.isinf(self.rate) else self.rate  # JSON has no inf: null = unpaced
        d["mode"] = "closed" if self.closed_loop else ("burst" if math.isinf(self.rate) else "open")
        return d


def gamma_intervals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """``n`` inter-arrival gaps (seconds), gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate."""
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_times_iter(rate: float, burstiness: float = 1.0, seed: int = 0, block: int = 1024) -> Iterator[float]:
    if math.isinf(rate):
        yield from itertools.repeat(0.0)
        return
    rng = np.random.default_rng(seed)
    t = 0.0
    yield t
    while True:
        for gap in rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=block):
            t += float(gap)
            yield t


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """The first ``n`` scheduled send times of :func:`arrival_times_iter` (seeded: same arguments, same times)."""
    return np.fromiter(itertools.islice(arrival_times_iter(rate, burstiness, seed), n), dtype=float, count=n)
