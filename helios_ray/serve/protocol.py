"""The public request schemas (OpenAI's, which helios.v1 gRPC maps onto) and the one request mapper.

Validation is strict, like OpenAI's API: unknown fields are rejected (a misspelt sampling knob is an error, not
silently ignored), types are not coerced (``"stream": "yes"`` is a 400, not a stream), and standard OpenAI fields
we do not implement are accepted only at their neutral value (``n=1``, penalties 0, no logprobs) so the official
client's defaults work and anything else is a clear 400.

HTTP bodies and gRPC messages both become one of these two models, then :func:`to_call` - so both protocols have
the same fields, the same defaults and the same error messages.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from helios_ray.engine.sequence import SamplingParams
from helios_ray.serve.schemas import GenerateCall


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

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
    metadata: dict[str, str] | None = Field(
        default=None, description="Up to 16 key-value pairs (OpenAI's metadata): operator request classes may match "
                                  "on them (the serve config's `classes`)")
    ignore_eos: bool = False

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if len(v) > 16:
                raise ValueError("at most 16 metadata pairs")
            if any(len(k) > 64 or len(x) > 512 for k, x in v.items()):
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return v

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
    model_config = ConfigDict(extra="forbid", strict=True)

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


class PlacementRequest(BaseModel):
    """``POST /v1/helios/placements``: move a replica group to (model, depth), pinned unless ``pin`` is false.
    ``group`` names one of the application's groups (``default`` when the config has no ``groups``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    group: str = "default"
    model: str = Field(min_length=1)
    depth: int | None = Field(default=None, ge=1, description="None = the model's full depth.")
    pin: bool = True


class UnpinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    group: str = "default"


def openapi_body(schema: type[BaseModel]) -> dict[str, Any]:
    """The route's OpenAPI ``requestBody``: the routes read the body themselves (so a bad one gets OpenAI's error
    body, not FastAPI's), so FastAPI cannot see the schema - this puts it in ``/openapi.json`` for clients and for
    schema-driven fuzzing (``helios-ray bench fuzz``).  ``$defs`` are inlined: they would resolve against the
    OpenAPI document's root, not the schema's."""
    doc = schema.model_json_schema()
    defs = doc.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(doc)}}}}


# ------------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    """A request that ends in an error response: HTTP status + OpenAI error body, or the gRPC status below."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple:  # crosses process boundaries (the gRPC proxy re-raises it)
        return (APIError, (self.status, self.message, self.type, self.param, self.code, self.retry_after_s))

    @property
    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The first problem of a validation error as OpenAI words it: ``"loc: msg"`` and the parameter name."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


# -------------------------------------------------------------------------------------------- the mapper
Request = ChatCompletionRequest | CompletionRequest


def validate(schema: type[BaseModel], body: Any) -> Any:
    """A decoded JSON body validated as ``schema``, or a 400 naming the first problem."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise APIError(400, msg, param=param) from None


def parse_request(body: Any, chat: bool) -> Request:
    """A decoded JSON body (or a gRPC message mapped by :func:`body_from_grpc`) -> a validated request."""
    return validate(ChatCompletionRequest if chat else CompletionRequest, body)


def to_call(req: Request, prefix: str | None = None) -> GenerateCall:
    """The one mapping from a public request to what a replica receives."""
    try:
        params = req.sampling()
    except ValidationError as e:
        raise APIError(400, validation_message(e)[0]) from None
    if isinstance(req, ChatCompletionRequest):
        msgs = [{"role": m.role, "content": m.content} for m in req.messages]
        return GenerateCall(request_id=new_id(prefix or "chatcmpl"), messages=msgs, params=params,
                            metadata=req.metadata)
    return GenerateCall(request_id=new_id(prefix or "cmpl"), prompt=req.prompt, params=params, metadata=req.metadata)


def check_decoded(request: Any) -> None:
    """A gRPC request whose bytes did not decode (:class:`helios_proto.servicer.Undecodable`) is a 400."""
    from helios_proto.servicer import Undecodable

    if isinstance(request, Undecodable):
        raise APIError(400, f"the request is not a valid helios.v1 message ({request.message})")


def body_from_grpc(request: Any, default_model: str) -> tuple[dict[str, Any], bool]:
    """A helios.v1 ``GenerateRequest`` as the equivalent OpenAI body, and whether it is a chat.

    Proto3 scalars have no "unset": ``max_tokens`` 0 and the empty prompt mean "not given"; the ``optional``
    fields are copied only when present.  Everything else is validated by the same schema as HTTP.
    """
    check_decoded(request)
    has_msgs = len(request.messages) > 0
    if bool(request.prompt) == has_msgs:
        raise APIError(400, "exactly one of prompt or messages is required")
    body: dict[str, Any] = {"model": request.model or default_model}
    if has_msgs:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        body["prompt"] = request.prompt
    if request.max_tokens:
        body["max_tokens"] = int(request.max_tokens)
    for f in ("temperature", "top_p", "top_k", "seed", "ignore_eos"):
        if f in request.DESCRIPTOR.fields_by_name and request.HasField(f):
            body[f] = getattr(request, f)
    if request.stop:
        body["stop"] = list(request.stop)
    if "metadata" in request.DESCRIPTOR.fields_by_name and len(request.metadata):
        body["metadata"] = dict(request.metadata)
    return body, has_msgs
