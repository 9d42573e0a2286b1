"""One request's state inside the engine, and the knobs that shape its sampling.

A sequence is prompt + generated tokens.  ``num_cached`` counts tokens whose KV is already stored in blocks:
after a prefill of n tokens it is n, and the freshly sampled token (not yet run through the model) is the next
decode step's input.  Preemption (recompute style) drops the KV and sets ``num_cached`` back to 0; the next
prefill covers prompt + outputs, so nothing generated is lost.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """OpenAI-style sampling knobs.  Unknown fields are rejected, so a misspelt knob is an error."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k")
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=16)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_str(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _no_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class TokenEvent:
    """What a sequence emits per generated token (and once more when it ends without a token)."""

    seq_id: int
    index: int
    token: int | None
    text: str
    exit_layer: int
    confidence: float
    breach: bool
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    text: str = ""
    emitted_chars: int = 0
    preemptions: int = 0
    generator: torch.Generator | None = None
    stream: Any = None  # the engine's TextStream (incremental detokenizer + stop rules), set when queued

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output without copying the whole sequence (per-step cost
        independent of its length)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``stops``."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def finish_text(text: str, params: SamplingParams, is_eos: bool, at_length: bool, emitted: int
                ) -> tuple[str, str | None, str, int]:
    """The stop rules every server here streams by, shared by the engine and the plain replica.

    Given a sequence's decoded output ``text`` so far, returns ``(text cut at the first stop string, finish
    reason or None, the new piece to stream, chars emitted after it)``.  An incomplete UTF-8 character
    (``\ufffd`` at the end) is held back until the next token completes it, unless the sequence ends here; so
    is a tail that could be the beginning of a stop string, so a stop string is never half streamed.
    """
    reason = None
    for stop in params.stop:
        idx = text.find(stop)
        if idx >= 0:
            text, reason = text[:idx], "stop"
            break
    if reason is None and is_eos:
        reason = "stop"
    if reason is None and at_length:
        reason = "length"
    stable = text if reason else text.rstrip("\ufffd")
    if reason is None:  # hold back a tail that may be the start of a stop string, so none of it is streamed
        stable = stable[:len(stable) - _stop_prefix_len(stable, params.stop)]
    return text, reason, stable[emitted:], max(emitted, len(stable))
