"""Polling helper shared by the serve tests: wait for a condition with a deadline that names what failed."""

from __future__ import annotations

import time
from typing import Callable


def wait_until(pred: Callable[[], object], timeout: float, what: str, every_s: float = 0.5) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(every_s)
