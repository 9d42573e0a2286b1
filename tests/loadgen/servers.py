"""Real local servers for the load generator tests: an OpenAI-style SSE server (Starlette + uvicorn in a thread)
and a grpc.aio HeliosService, both with controlled delays, so the measured TTFT/TPOT/E2E are known.

Prompt markers steer a request: ``BAD`` -> HTTP 400 / gRPC INVALID_ARGUMENT, ``MIDERR`` -> an error event
after two tokens.  Token ``k`` of every stream exits at layer ``exit_layers[k % len(exit_layers)]`` with
confidence ``0.5 + 0.01 * k``.

The status document's placement change is built from the real control plane's :class:`Decision` (so its
``action``/``trigger`` can only be values the real policy produces) in the shape the real ``Brain`` deployment
writes; ``test_fake_server_contract.py`` fails when either drifts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from helios_ray.control.policy import Decision

#: The placement change the fake servers report: a periodic re-assessment that moves ``tiny`` from 6 to 4 layers.
#: (The policy calls a same-model move to a shallower depth ``deploy``; ``extend`` is a deeper one.)
SWITCH = Decision(action="deploy", trigger="reassess", model="tiny", depth=4, previous_model="tiny",
                  previous_depth=6, reason="most tokens exit early: depth 4 meets the SLO at a lower cost")


def change_entry(decision: Decision, version: int, at: float) -> dict[str, Any]:
    """One ``changes`` entry of ``/v1/helios/status``, built by the real brain's own function."""
    from helios_ray.serve.brain import change_entry as real

    return real(version, at, {"model": decision.previous_model, "depth": decision.previous_depth},
                {"model": decision.model, "depth": decision.depth}, decision.action, decision.trigger,
                decision.reason)


@dataclass
class Behavior:
    ttft: float = 0.05            # delay before the first token
    tpot: float = 0.01            # delay between tokens
    exit_layers: tuple[int, ...] = (3, 5)
    api_key: str | None = None
    send_usage: bool = True
    switch_after: int | None = None  # placement changes once this many requests were received
    # observed
    received: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    switched_at: float | None = None
    status_calls: int = 0

    def enter(self, body: dict[str, Any]) -> None:
        self.received.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.switch_after is not None and len(self.received) >= self.switch_after and self.switched_at is None:
            self.switched_at = time.time()

    def status_doc(self) -> dict[str, Any]:
        self.status_calls += 1
        d = SWITCH
        if self.switched_at is None:
            return {"placement": {"version": 1, "model": d.previous_model, "depth": d.previous_depth}, "changes": [],
                    "replicas": [{"replica": "r1", "depth": d.previous_depth}]}
        change = change_entry(d, 2, self.switched_at)
        return {"placement": {"version": 2, **change["to"]}, "replicas": [{"replica": "r1", "depth": d.depth}],
                "changes": [change]}


def prompt_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(m.get("content", "") for m in body["messages"])
    return str(body.get("prompt", ""))


def make_app(b: Behavior) -> Starlette:
    def err(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=status)

    async def generate(request: Request) -> Any:
        chat = request.url.path.endswith("/chat/completions")
        if b.api_key is not None and request.headers.get("authorization") != f"Bearer {b.api_key}":
            return err(401, "invalid or missing API key")
        body = await request.json()
        b.paths.append(request.url.path)
        b.headers.append(dict(request.headers))
        prompt = prompt_of(body)
        if "BAD" in prompt:
            b.received.append(body)
            return err(400, "bad prompt")
        n = int(body.get("max_tokens") or 16)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and b.send_usage
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, k: int | None = None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            d: dict[str, Any] = {"id": "x", "object": obj, "created": 0, "model": "tiny", "choices": [choice]}
            if k is not None:
                d["helios"] = {"exit_layer": b.exit_layers[k % len(b.exit_layers)], "confidence": 0.5 + 0.01 * k}
            return f"data: {json.dumps(d)}\n\n".encode()

        async def sse() -> AsyncIterator[bytes]:
            b.enter(body)
            try:
                if chat:
                    yield chunk("", None, role=True)  # not a token: TTFT must not stop here
                for k in range(n):
                    await asyncio.sleep(b.ttft if k == 0 else b.tpot)
                    if "MIDERR" in prompt and k == 2:
                        yield f"data: {json.dumps({'error': {'message': 'replica died', 'type': 'server_error'}})}\n\n".encode()
                        yield b"data: [DONE]\n\n"
                        return
                    yield chunk(f" t{k}", None, k)
                yield chunk(None, "length")
                if include_usage:
                    u = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                    yield f"data: {json.dumps({'id': 'x', 'object': obj, 'choices': [], 'usage': u})}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                b.in_flight -= 1

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def status(request: Request) -> JSONResponse:
        return JSONResponse(b.status_doc())

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "helios", "object": "model"}]})

    return Starlette(routes=[Route("/v1/chat/completions", generate, methods=["POST"]),
                             Route("/v1/completions", generate, methods=["POST"]),
                             Route("/v1/helios/status", status), Route("/v1/models", models)])


class HttpServer:
    """The SSE app served by uvicorn on 127.0.0.1 (ephemeral port) in a background thread."""

    def __init__(self) -> None:
        import uvicorn

        self.behavior = Behavior()
        self.app = make_app(self._proxy())
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                             access_log=False)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def _proxy(self) -> Any:
        srv = self

        class P:  # forwards to the current Behavior, so tests can swap it with reset()
            def __getattr__(self, k: str) -> Any:
                return getattr(srv.behavior, k)

            def __setattr__(self, k: str, v: Any) -> None:
                setattr(srv.behavior, k, v)

        return P()

    def start(self) -> "HttpServer":
        self.thread.start()
        t = time.time()
        while not self.server.started:
            if time.time() - t > 20 or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def reset(self, **kw: Any) -> Behavior:
        self.behavior = Behavior(**kw)
        return self.behavior

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# ------------------------------------------------------------------------------------------------ gRPC
class Servicer:
    """HeliosService with the same behaviour, on a thread-pool ``grpc.server`` (its own threads, so any client
    event loop - including the CLI's ``asyncio.run`` - can reach it)."""

    def __init__(self, srv: "GrpcServer"):
        self.srv = srv

    def GenerateStream(self, request: Any, context: Any) -> Any:  # noqa: N802
        import grpc

        from helios_proto import helios_pb2 as pb

        b = self.srv.behavior
        md = dict(context.invocation_metadata())
        with self.srv.lock:
            b.headers.append(md)
        if md.get("application") != "helios":
            context.abort(grpc.StatusCode.NOT_FOUND, "no application metadata")
        if b.api_key is not None and md.get("authorization") != f"Bearer {b.api_key}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing API key")
        prompt = request.prompt or " ".join(m.content for m in request.messages)
        body = {"prompt": request.prompt, "messages": [m.content for m in request.messages],
                "max_tokens": request.max_tokens}
        if "BAD" in prompt:
            with self.srv.lock:
                b.received.append(body)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")
        n = request.max_tokens or 16
        with self.srv.lock:
            b.enter(body)
        try:
            for k in range(n):
                time.sleep(b.ttft if k == 0 else b.tpot)
                if "MIDERR" in prompt and k == 2:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "replica died")
                layer = b.exit_layers[k % len(b.exit_layers)]
                yield pb.GenerateChunk(id="g", model="tiny", depth=6, token=pb.TokenInfo(
                    token=k, text=f" t{k}", exit_layer=layer, confidence=0.5 + 0.01 * k, breach=(k == 1)))
            yield pb.GenerateChunk(id="g", model="tiny", depth=6, finish_reason="length",
                                   usage=pb.Usage(prompt_tokens=7, completion_tokens=n, total_tokens=7 + n))
        finally:
            with self.srv.lock:
                b.in_flight -= 1

    def Status(self, request: Any, context: Any) -> Any:  # noqa: N802
        from helios_proto import helios_pb2 as pb

        with self.srv.lock:
            return pb.StatusResponse(json=json.dumps(self.srv.behavior.status_doc()))

    def Generate(self, request: Any, context: Any) -> Any:  # noqa: N802
        import grpc

        context.abort(grpc.StatusCode.UNIMPLEMENTED, "unary is not used by the load generator")


class GrpcServer:
    """A real gRPC HeliosService on 127.0.0.1 (ephemeral port)."""

    def __init__(self, workers: int = 16) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        from helios_proto import helios_pb2_grpc

        self.behavior = Behavior()
        self.lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers))
        helios_pb2_grpc.add_HeliosServiceServicer_to_server(Servicer(self), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"

    def start(self) -> "GrpcServer":
        self.server.start()
        return self

    def reset(self, **kw: Any) -> Behavior:
        self.behavior = Behavior(**kw)
        return self.behavior

    def stop(self) -> None:
        self.server.stop(0)
