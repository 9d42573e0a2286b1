"""Streaming clients behind one small protocol: ``HttpClient`` (OpenAI SSE over httpx) and ``GrpcClient``
(``helios.v1.HeliosService/GenerateStream`` over grpc.aio).

A client turns a :class:`~loadgen.workloads.Request` into an async stream of :class:`ReceivedToken` (one per
generated token, with the helios ``exit_layer``/``confidence`` when the server sends them) and a final
:class:`EndEvent` (finish reason, usage); any failure - HTTP 4xx/5xx, an ``{"error": ...}`` event mid-stream,
a gRPC status, a stream cut short - raises :class:`RequestError`.  The runner timestamps the events, so both
interfaces are measured the same way.  Connections are opened lazily inside the running event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from loadgen.net import LoadgenError, check_target, parse_grpc_target, parse_http_url
from loadgen.workloads import Request

ENDPOINTS = ("auto", "chat", "completions")


@dataclass
class ReceivedToken:
    """One token as the client received it (text, and the exit layer/confidence/breach the server reports)."""

    text: str
    exit_layer: int | None = None
    confidence: float | None = None
    breach: bool | None = None
    model: str | None = None
    depth: int | None = None
    token: int | None = None  # the token id, when the server sends it (helios-ray does)


@dataclass
class EndEvent:
    finish_reason: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    model: str | None = None
    depth: int | None = None


class RequestError(Exception):
    """A request failed; ``status`` is the HTTP status code, the gRPC status name or a short tag."""

    def __init__(self, message: str, status: int | str | None = None):
        super().__init__(message)
        self.message, self.status = message, status


@runtime_checkable
class Client(Protocol):
    interface: str

    def stream(self, req: Request) -> AsyncIterator[ReceivedToken | EndEvent]: ...

    async def status(self) -> dict[str, Any]: ...

    async def open(self) -> None: ...

    async def check(self) -> None: ...

    async def aclose(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class _Base:
    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


# ------------------------------------------------------------------------------------------------ HTTP
class HttpClient(_Base):
    """OpenAI-compatible streaming over HTTP.  ``endpoint="auto"`` sends chat requests to
    ``/v1/chat/completions`` and plain prompts to ``/v1/completions``; ``"chat"`` wraps every prompt as one user
    message; ``"completions"`` sends every request's ``prompt`` as a plain completion."""

    interface = "http"

    def __init__(self, url: str = "http://127.0.0.1:8000", model: str = "helios", api_key: str | None = None, *,
                 endpoint: str = "auto", temperature: float | None = 0.0, ignore_eos: bool = False,
                 seed: int | None = None, include_usage: bool = True, request_timeout: float = 300.0,
                 connect_timeout: float = 10.0, allow_remote: bool = False):
        self.base_url, host = parse_http_url(url)
        check_target(host, "URL", allow_remote)
        if endpoint not in ENDPOINTS:
            raise LoadgenError(f"unknown endpoint {endpoint!r}: choose from {', '.join(ENDPOINTS)}")
        self.model, self.api_key, self.endpoint = model, api_key, endpoint
        self.temperature, self.ignore_eos, self.seed, self.include_usage = temperature, ignore_eos, seed, include_usage
        self.request_timeout, self.connect_timeout = request_timeout, connect_timeout
        self._client: Any = None

    def describe(self) -> dict[str, Any]:
        return {"interface": "http", "url": self.base_url, "model": self.model, "endpoint": self.endpoint,
                "temperature": self.temperature, "ignore_eos": self.ignore_eos, "seed": self.seed,
                "api_key": self.api_key is not None}

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, trust_env=False,  # never through a proxy
                verify=self.base_url.startswith("https:"),  # plain http: skip loading CA certificates
                timeout=httpx.Timeout(self.request_timeout, connect=self.connect_timeout),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        return self._client

    def body(self, req: Request) -> tuple[str, dict[str, Any]]:
        chat = self.endpoint == "chat" or (self.endpoint == "auto" and req.is_chat)
        body: dict[str, Any] = {"model": self.model, "max_tokens": int(req.max_tokens), "stream": True}
        if chat:
            body["messages"] = req.messages if req.messages else [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.seed is not None:
            body["seed"] = self.seed
        if self.ignore_eos:
            body["ignore_eos"] = True
        return ("/v1/chat/completions" if chat else "/v1/completions"), body

    async def stream(self, req: Request) -> AsyncIterator[ReceivedToken | EndEvent]:
        import httpx

        path, body = self.body(req)
        chat = path.endswith("chat/completions")
        end = EndEvent()
        done = False
        try:
            async with self._http().stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    raw = await resp.aread()
                    raise RequestError(_error_message(raw, resp.status_code), resp.status_code)
                data: list[str] = []
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                        # servers put one JSON object per event on one line: dispatch without waiting for
                        # the blank line, so the timestamp is the arrival of the data itself
                        payload = "\n".join(data)
                        if payload == "[DONE]":
                            done = True
                            break
                        try:
                            obj = json.loads(payload)
                        except json.JSONDecodeError:
                            continue  # a multi-line data field: wait for the rest
                        data = []
                        for ev in _sse_events(obj, chat, end):
                            yield ev
                    elif line == "":
                        data = []
        except httpx.HTTPError as e:
            raise RequestError(f"{type(e).__name__}: {e}".rstrip(": "), "transport") from None
        if not done:
            raise RequestError("stream ended without data: [DONE]", "incomplete")
        yield end

    async def status(self) -> dict[str, Any]:
        import httpx

        try:
            r = await self._http().get("/v1/helios/status", timeout=10.0)
        except httpx.HTTPError as e:
            raise RequestError(f"{type(e).__name__}: {e}", "transport") from None
        if r.status_code != 200:
            raise RequestError(_error_message(r.content, r.status_code), r.status_code)
        return r.json()

    async def open(self) -> None:
        """Create the connection pool now (the runner calls this before starting its clock)."""
        self._http()

    async def check(self) -> None:
        """Fail fast (``RequestError``) when nothing answers at the URL."""
        import httpx

        try:
            await self._http().get("/v1/models", timeout=self.connect_timeout)
        except httpx.HTTPError as e:
            raise RequestError(f"cannot reach {self.base_url}: {type(e).__name__}: {e}".rstrip(": "),
                               "transport") from None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _error_message(raw: bytes, status: int) -> str:
    try:
        err = json.loads(raw)
        if isinstance(err, dict):
            e = err.get("error", err)
            msg = e.get("message") if isinstance(e, dict) else str(e)
            if msg:
                return f"HTTP {status}: {msg}"
            if "detail" in err:
                return f"HTTP {status}: {err['detail']}"
    except (ValueError, TypeError):
        pass
    text = raw.decode("utf-8", "replace").strip()
    return f"HTTP {status}: {text[:200]}" if text else f"HTTP {status}"


def _sse_events(obj: Any, chat: bool, end: EndEvent) -> list[ReceivedToken]:
    """Token events in one SSE chunk; usage/finish go into ``end``; an error event raises."""
    if not isinstance(obj, dict):
        return []
    if "error" in obj:
        e = obj["error"]
        msg = e.get("message", "error") if isinstance(e, dict) else str(e)
        raise RequestError(f"stream error: {msg}", "stream_error")
    if obj.get("model"):
        end.model = obj["model"]
    usage = obj.get("usage")
    if isinstance(usage, dict):
        end.completion_tokens = usage.get("completion_tokens", end.completion_tokens)
        end.prompt_tokens = usage.get("prompt_tokens", end.prompt_tokens)
    choices = obj.get("choices") or []
    if not choices:
        return []
    ch = choices[0]
    if ch.get("finish_reason"):
        end.finish_reason = ch["finish_reason"]
    text = ((ch.get("delta") or {}).get("content") if chat else ch.get("text")) or ""
    info = obj.get("helios") if isinstance(obj.get("helios"), dict) else None
    if not text and not (info and "exit_layer" in info):
        return []  # the role chunk, the finish chunk
    return [ReceivedToken(text=text, exit_layer=info.get("exit_layer") if info else None,
                       confidence=info.get("confidence") if info else None, model=obj.get("model"),
                       token=info.get("token") if info else None)]


# ------------------------------------------------------------------------------------------------ gRPC
class GrpcClient(_Base):
    """``helios.v1.HeliosService/GenerateStream`` over ``grpc.aio`` (metadata ``application`` and, with a key,
    ``authorization: Bearer``).  Chat requests send ``messages``, plain prompts send ``prompt``."""

    interface = "grpc"

    def __init__(self, target: str = "127.0.0.1:9000", model: str = "helios", api_key: str | None = None, *,
                 application: str = "helios", temperature: float | None = 0.0, seed: int | None = None,
                 request_timeout: float = 300.0, connect_timeout: float = 10.0, allow_remote: bool = False):
        self.target, host = parse_grpc_target(target)
        check_target(host, "gRPC target", allow_remote)
        self.model, self.api_key, self.application = model, api_key, application
        self.temperature, self.seed = temperature, seed
        self.request_timeout, self.connect_timeout = request_timeout, connect_timeout
        self._channel: Any = None
        self._stub: Any = None

    def describe(self) -> dict[str, Any]:
        return {"interface": "grpc", "target": self.target, "model": self.model, "application": self.application,
                "temperature": self.temperature, "seed": self.seed, "api_key": self.api_key is not None}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = [("application", self.application)]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        return tuple(md)

    def _get_stub(self) -> Any:
        if self._stub is None:
            import grpc

            from helios_proto import helios_pb2_grpc

            self._channel = grpc.aio.insecure_channel(self.target, options=[("grpc.enable_http_proxy", 0)])
            self._stub = helios_pb2_grpc.HeliosServiceStub(self._channel)
        return self._stub

    def message(self, req: Request) -> Any:
        from helios_proto import helios_pb2 as pb

        kw: dict[str, Any] = {"model": self.model, "max_tokens": int(req.max_tokens)}
        if req.is_chat:
            kw["messages"] = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in req.messages or []]
        else:
            kw["prompt"] = req.prompt
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        if self.seed is not None:
            kw["seed"] = self.seed
        return pb.GenerateRequest(**kw)

    async def stream(self, req: Request) -> AsyncIterator[ReceivedToken | EndEvent]:
        import grpc

        call = self._get_stub().GenerateStream(self.message(req), metadata=self.metadata,
                                               timeout=self.request_timeout)
        end: EndEvent | None = None
        try:
            async for chunk in call:
                if chunk.HasField("token"):
                    t = chunk.token
                    yield ReceivedToken(text=t.text, exit_layer=t.exit_layer, confidence=t.confidence, breach=t.breach,
                                     model=chunk.model or None, depth=chunk.depth or None, token=t.token)
                elif chunk.finish_reason or chunk.HasField("usage"):
                    end = EndEvent(finish_reason=chunk.finish_reason or None, model=chunk.model or None,
                                   depth=chunk.depth or None,
                                   completion_tokens=chunk.usage.completion_tokens if chunk.HasField("usage") else None,
                                   prompt_tokens=chunk.usage.prompt_tokens if chunk.HasField("usage") else None)
        except grpc.aio.AioRpcError as e:
            raise RequestError(f"gRPC {e.code().name}: {e.details()}", e.code().name) from None
        finally:
            if not call.done():
                call.cancel()
        if end is None:
            raise RequestError("stream ended without a final chunk", "incomplete")
        yield end

    async def status(self) -> dict[str, Any]:
        import grpc

        from helios_proto import helios_pb2 as pb

        try:
            resp = await self._get_stub().Status(pb.StatusRequest(), metadata=self.metadata, timeout=10.0)
        except grpc.aio.AioRpcError as e:
            raise RequestError(f"gRPC {e.code().name}: {e.details()}", e.code().name) from None
        return json.loads(resp.json)

    async def open(self) -> None:
        self._get_stub()

    async def check(self) -> None:
        import asyncio

        self._get_stub()
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.connect_timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"cannot reach gRPC {self.target} within {self.connect_timeout:g}s",
                               "transport") from None

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
