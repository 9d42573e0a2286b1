"""The per-token telemetry trace: what the runtime's profile mode emits and the simulator replays.

One JSON object per line (JSONL), discriminated by ``type``:

``token``
    One generated token of one request on one model, evaluated at every available exit::

        {"type": "token", "model": "smollm2-135m", "request": 17, "kind": "chat", "pos": 3,
         "exits": {"12": [412, 0.31], "20": [412, 0.93], "30": [412, 0.97, -0.05]},
         "final": 412, "final_logprob": -0.05}

    ``exits`` maps an exit depth D ("after D layers") to ``[token_id, confidence]`` where confidence
    is the exit's max softmax probability; an optional third element is the log-probability of that
    exit's token under the full model (it lets the accuracy guard compute perplexity for tokens that
    disagree with ``final``). ``final`` is the full model's argmax and ``final_logprob`` its
    log-probability. Under HELIOS greedy exit a replica loaded to depth D serves ``exits[D]`` for
    every token; the token "agrees" when that equals ``final``. Profile-mode records should include
    the full depth itself in ``exits`` so its confidence is known.

``request``
    One finished request on one model: prompt/output token counts, wall seconds, optional TTFT and
    energy, and optionally the ``depth`` it was served at (absent = profile mode, full model).

A trace may hold records of several models for the same requests (so switching can be simulated)
and a ``kind`` that changes half-way (workload drift). Unknown extra keys are ignored, so newer
writers do not break older readers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_serializer,
    model_validator,
)

__all__ = [
    "ExitObservation",
    "TraceToken",
    "TraceRequest",
    "TraceRecord",
    "TraceError",
    "parse_record",
    "iter_trace",
    "read_trace",
    "write_trace",
]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ExitObservation(NamedTuple):
    """What one exit said about one token; in JSON a compact list ``[token, confidence]`` or
    ``[token, confidence, full_logprob]``.

    A NamedTuple rather than a model: pydantic validates it in its core without a Python
    callback, which makes reading a trace several times faster (traces have millions of exits).
    """

    token: int
    confidence: Annotated[float, Field(ge=0.0, le=1.0)]
    full_logprob: Annotated[float | None, Field(le=0.0)] = None
    """log p_full(token): this exit's token under the full model, when known."""


class TraceToken(_Lenient):
    """One generated token evaluated at every exit (profile mode)."""

    type: Literal["token"] = "token"
    model: str = Field(min_length=1)
    request: int
    kind: str | None = None
    pos: int = Field(ge=0)
    exits: dict[int, ExitObservation] = Field(min_length=1)
    final: int | None = None
    final_logprob: float | None = Field(None, le=0.0)

    @field_serializer("exits")
    def _compact_exits(self, exits: dict[int, ExitObservation]) -> dict[int, list[float | int]]:
        return {
            depth: [obs.token, obs.confidence]
            if obs.full_logprob is None
            else [obs.token, obs.confidence, obs.full_logprob]
            for depth, obs in exits.items()
        }

    @model_validator(mode="after")
    def _positive_depths(self) -> "TraceToken":
        bad = [d for d in self.exits if d < 1]
        if bad:
            raise ValueError(f"exit depths must be >= 1, got {bad}")
        return self

    def served(self, depth: int) -> ExitObservation | None:
        """What a replica loaded to ``depth`` serves for this token under greedy exit.

        ``None`` when this record did not evaluate that exit. When ``depth`` is deeper than every
        recorded exit and the full model's token is known, the full model's token is served with an
        unknown confidence reported as 1.0 (the full model cannot go deeper anyway).
        """
        obs = self.exits.get(depth)
        if obs is not None:
            return obs
        if self.final is not None and depth > max(self.exits):
            return ExitObservation(token=self.final, confidence=1.0, full_logprob=self.final_logprob)
        return None

    def agrees(self, depth: int) -> bool | None:
        """Whether the token served at ``depth`` equals the full model's (None when unknown)."""
        obs = self.served(depth)
        if obs is None or self.final is None:
            return None
        return obs.token == self.final


class TraceRequest(_Lenient):
    """One finished request on one model."""

    type: Literal["request"] = "request"
    model: str = Field(min_length=1)
    request: int
    kind: str | None = None
    prompt_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(ge=0)
    seconds: float = Field(ge=0.0)
    ttft_s: float | None = Field(None, ge=0.0)
    energy_j: float | None = Field(None, ge=0.0)
    depth: int | None = Field(None, ge=1, description="Depth served at; None = profile mode (full).")


TraceRecord = Annotated[Union[TraceToken, TraceRequest], Field(discriminator="type")]
_ADAPTER: TypeAdapter[TraceToken | TraceRequest] = TypeAdapter(TraceRecord)


class TraceError(ValueError):
    """A trace file could not be read; the message names the file and line."""


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    parts = list(err.get("loc", ()))
    if parts and parts[0] in ("token", "request"):  # the discriminator tag adds nothing
        parts = parts[1:]
    if len(parts) >= 3 and parts[0] == "exits" and parts[2] in (0, 1, 2):
        parts[2] = ExitObservation._fields[int(parts[2])]
    loc = ".".join(str(p) for p in parts)
    msg = err.get("msg", "invalid")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def parse_record(data: str | dict[str, Any]) -> TraceToken | TraceRequest:
    """Parse one record from a JSON line or an already decoded dict."""
    if isinstance(data, str):
        return _ADAPTER.validate_json(data)
    return _ADAPTER.validate_python(data)


def iter_trace(path: str | Path) -> Iterator[TraceToken | TraceRequest]:
    """Yield records of a JSONL trace lazily; blank lines are skipped.

    Raises :class:`TraceError` naming the file and line number on the first bad record, and
    ``FileNotFoundError`` when the file is missing.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(raw, dict):
                raise TraceError(f"{path}:{lineno}: a record must be a JSON object")
            if raw.get("type") not in ("token", "request"):
                raise TraceError(
                    f"{path}:{lineno}: unknown record type {raw.get('type')!r} "
                    "(expected 'token' or 'request')"
                )
            try:
                yield _ADAPTER.validate_python(raw)
            except ValidationError as exc:
                raise TraceError(
                    f"{path}:{lineno}: bad {raw['type']} record: {_first_error(exc)}"
                ) from None


def read_trace(path: str | Path) -> list[TraceToken | TraceRequest]:
    """Read a whole JSONL trace into memory (see :func:`iter_trace`)."""
    return list(iter_trace(path))


def write_trace(path: str | Path, records: Iterable[TraceToken | TraceRequest]) -> int:
    """Write records as JSONL (``None`` fields omitted); returns the number written."""
    path = Path(path)
    n = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(record.model_dump_json(exclude_none=True))
            handle.write("\n")
            n += 1
    return n
