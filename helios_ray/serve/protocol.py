"""OpenAI-compatible request/response schemas and the internal request a replica receives.

Unknown fields are rejected (a misspelt sampling knob is an error, not silently ignored); standard OpenAI fields
we do not implement are accepted only at their neutral value (``n=1``, penalties 0, no logprobs) so the official
client's defaults work and anything else is a clear 400.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from helios_ray.engine.sequence import SamplingParams


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only n=1 is supported.")
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logprobs: bool | int | None = Field(default=None)
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @model_validator(mode="after")
    def _stream_options(self) -> "_Req":
        if self.stream_options is not None:
            if not self.stream:
                raise ValueError("stream_options is only allowed when stream is true")
            extra = set(self.stream_options) - {"include_usage"}
            if extra:
                raise ValueError(f"unknown stream_options: {', '.join(sorted(extra))}")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling(self, default_max_tokens: int = 16) -> SamplingParams:
        kw: dict[str, Any] = {"max_tokens": self.max_tokens or default_max_tokens, "ignore_eos": self.ignore_eos}
        for f in ("temperature", "top_p", "top_k", "seed"):
            v = getattr(self, f)
            if v is not None:
                kw[f] = v
        if self.stop is not None:
            kw["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingParams(**kw)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int = 16) -> SamplingParams:
        p = super().sampling(default_max_tokens)
        if self.max_completion_tokens is not None:
            p = p.model_copy(update={"max_tokens": self.max_completion_tokens})
        return p


class CompletionRequest(_Req):
    prompt: str = Field(min_length=1)
    echo: bool = Field(default=False)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v


class GenerateCall(BaseModel):
    """What the router sends a replica."""

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    params: SamplingParams


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
