"""The ingress: OpenAI-compatible HTTP and the helios.v1 gRPC service, relaying tokens from the replicas.

Every token passes through here, so the router is where live telemetry is born: it forwards the exit
confidences to Control in small batches (breach counter, policy), reports each finished request (throughput,
TTFT), records the Prometheus metrics, and mirrors a few requests to the profiler - fire-and-forget, so
profiling never delays a response.  It holds no policy state itself; any number of router replicas can run.

Errors: bad input -> 4xx with OpenAI's error body (gRPC: INVALID_ARGUMENT / NOT_FOUND / UNAUTHENTICATED);
a replica dying mid-stream -> the stream ends with an error event (HTTP status is already 200 by then), and
Serve restarts the replica.

(No ``from __future__ import annotations`` here: Serve rewrites the route signatures for class-based views, and
string annotations would no longer resolve - FastAPI would then read ``request`` as a query parameter.)
"""


import asyncio
import json
import logging
import os
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from helios_ray.config import ServeConfig
from helios_ray.serve.protocol import (
    ChatCompletionRequest, CompletionRequest, GenerateCall, error_body, new_id, now, usage,
)

log = logging.getLogger("ray.serve")

app = FastAPI(title="helios-ray", description="HELIOS early-exit LLM serving (OpenAI-compatible)")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def __reduce__(self) -> tuple:  # crosses process boundaries (the gRPC proxy re-raises it)
        return (APIError, (self.status, self.message, self.type, self.param, self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


def _fire(coro_like: Any) -> None:
    """Send a request to another deployment without waiting for it (telemetry, mirroring)."""

    async def run() -> None:
        try:
            await coro_like
        except Exception:
            log.debug("helios router: background call failed", exc_info=True)

    asyncio.get_running_loop().create_task(run())


# serve.ingress converts the routes when the class is defined: it must run at import, in every process
# (the FastAPI app is pickled by reference and re-imported in the replica).
@serve.ingress(app)
class Router:
    def __init__(self, config: dict[str, Any], replica: Any, control: Any, profiler: Any | None):
        self.cfg = ServeConfig.model_validate(config)
        self.replica, self.control, self.profiler = replica, control, profiler
        key = os.environ.get(self.cfg.api_key_env or "", "") if self.cfg.api_key_env else ""
        self.api_key = key or None
        self.model_ids = [self.cfg.served_model_name] + list(self.cfg.candidates)
        from helios_ray.metrics import RouterMetrics

        self.metrics = RouterMetrics()

    # ------------------------------------------------------------------------------------ common
    def _check_key(self, presented: str | None) -> None:
        if self.api_key is not None and presented != self.api_key:
            raise APIError(401, "invalid or missing API key", "invalid_request_error", code="invalid_api_key")

    @staticmethod
    def _key_from_headers(headers: Any) -> str | None:
        auth = headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return headers.get("x-api-key")

    def _check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise APIError(404, f"the model {model!r} does not exist; available: {', '.join(self.model_ids)}",
                           "invalid_request_error", "model", "model_not_found")

    async def _open(self, call: GenerateCall, requested: str) -> tuple[dict[str, Any], Any]:
        """Start a generation; returns the replica's ``start`` item and the stream.  Raises APIError."""
        self._check_model(requested)
        targets = await self.control.begin_request.remote()
        if targets and self.profiler is not None:
            item = {"prompt": call.prompt, "messages": call.messages, "kind": "mirrored"}
            _fire(self.profiler.mirror.remote(item, targets))
        gen = self.replica.options(stream=True).generate.remote(call.model_dump(mode="json"))
        first = await gen.__anext__()
        if first["type"] == "error":
            raise APIError(first["status"], first["message"])
        if requested != self.cfg.served_model_name and first["model"] != requested:
            _fire(self._drain(gen))
            raise APIError(400, f"model {requested!r} is a candidate but not deployed right now (serving "
                                f"{first['model']}); send model={self.cfg.served_model_name!r} to let HELIOS choose",
                           param="model", code="model_not_deployed")
        return first, gen

    @staticmethod
    async def _drain(gen: Any) -> None:
        async for _ in gen:
            pass

    async def _relay(self, start: dict[str, Any], gen: Any) -> AsyncIterator[dict[str, Any]]:
        """Yield replica items (token/end/error) while feeding telemetry and metrics."""
        model, depth = start["model"], start["depth"]
        t0 = time.perf_counter()
        first_at: float | None = None
        confs: list[float] = []
        n = breaches = 0
        ended = False
        try:
            async for item in gen:
                ended = item["type"] in ("end", "error")
                if item["type"] == "token":
                    n += 1
                    if first_at is None:
                        first_at = time.perf_counter()
                    confs.append(item["confidence"])
                    breaches += item["breach"]
                    self.metrics.exit_depth.observe(item["exit_layer"], tags={"model": model})
                    if len(confs) >= self.cfg.telemetry_every_tokens:
                        _fire(self.control.observe_tokens.remote(model, depth, confs))
                        confs = []
                yield item
        except Exception as e:  # the replica died mid-stream (ActorDiedError, RayTaskError, ...)
            ended = True
            self.metrics.errors.inc(tags={"status": "503"})
            log.warning("helios router: stream from %s@%d failed: %s", model, depth, type(e).__name__)
            yield {"type": "error", "status": 503,
                   "message": f"the replica serving this request failed mid-stream ({type(e).__name__}); "
                              "retry the request"}
            return
        finally:
            if not ended:  # we stopped early: cancel the replica side (Serve also propagates client disconnects)
                gen.cancel()
            if confs:
                _fire(self.control.observe_tokens.remote(model, depth, confs))
        e2e = time.perf_counter() - t0
        ttft = (first_at - t0) if first_at is not None else None
        tags = {"model": model}
        if ttft is not None:
            self.metrics.ttft.observe(ttft, tags=tags)
        if n > 1 and ttft is not None:
            self.metrics.tpot.observe((e2e - ttft) / (n - 1), tags=tags)
        self.metrics.e2e.observe(e2e, tags=tags)
        self.metrics.tokens.inc(n, tags=tags)
        if breaches:
            self.metrics.breaches.inc(breaches, tags=tags)
        _fire(self.control.observe_request.remote(model, depth, n, e2e, ttft, start["prompt_tokens"]))

    async def _complete(self, call: GenerateCall, requested: str) -> dict[str, Any]:
        start, gen = await self._open(call, requested)
        text, tokens, end = [], [], None
        async for item in self._relay(start, gen):
            if item["type"] == "token":
                text.append(item["text"])
                tokens.append(item)
            elif item["type"] == "end":
                end = item
            elif item["type"] == "error":
                raise APIError(item["status"], item["message"], "server_error")
        assert end is not None
        if end.get("error"):
            raise APIError(500, end["error"], "server_error")
        self.metrics.requests.inc(tags={"model": start["model"], "finish_reason": end["finish_reason"]})
        return {"start": start, "text": "".join(text), "tokens": tokens, "end": end}

    # -------------------------------------------------------------------------------------- HTTP
    async def _parse(self, request: Request, schema: type) -> Any:
        self._check_key(self._key_from_headers(request.headers))
        try:
            body = await request.json()
        except Exception:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(body)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise APIError(400, msg, param=param) from None

    def _call_from(self, req: ChatCompletionRequest | CompletionRequest) -> GenerateCall:
        try:
            params = req.sampling()
        except ValidationError as e:
            raise APIError(400, _validation_message(e)[0]) from None
        if isinstance(req, ChatCompletionRequest):
            msgs = [{"role": m.role, "content": m.content} for m in req.messages]
            return GenerateCall(request_id=new_id("chatcmpl"), messages=msgs, params=params)
        return GenerateCall(request_id=new_id("cmpl"), prompt=req.prompt, params=params)

    @staticmethod
    def _helios_info(start: dict[str, Any], tokens: list[dict[str, Any]]) -> dict[str, Any]:
        confs = [t["confidence"] for t in tokens]
        return {"model": start["model"], "depth": start["depth"], "breaches": sum(t["breach"] for t in tokens),
                "mean_confidence": round(sum(confs) / len(confs), 4) if confs else None}

    async def _http_generate(self, request: Request, chat: bool) -> Any:
        try:
            req = await self._parse(request, ChatCompletionRequest if chat else CompletionRequest)
            call = self._call_from(req)
            if req.stream:
                start, gen = await self._open(call, req.model)
                return StreamingResponse(self._sse(call, req, start, gen, chat), media_type="text/event-stream")
            out = await self._complete(call, req.model)
        except APIError as e:
            if e.status >= 400 and e.status < 500:
                self.metrics.errors.inc(tags={"status": str(e.status)})
            return e.response()
        start, end = out["start"], out["end"]
        u = usage(start["prompt_tokens"], end["completion_tokens"])
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                      "finish_reason": end["finish_reason"], "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out["text"], "finish_reason": end["finish_reason"], "logprobs": None}
            obj = "text_completion"
        return JSONResponse({"id": call.request_id, "object": obj, "created": now(), "model": start["model"],
                             "choices": [choice], "usage": u, "helios": self._helios_info(start, out["tokens"])})

    async def _sse(self, call: GenerateCall, req: Any, start: dict[str, Any], gen: Any, chat: bool
                   ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = now()

        def chunk(delta_text: str | None, finish: str | None, extra: dict[str, Any] | None = None,
                  role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": call.request_id, "object": obj, "created": created, "model": start["model"],
                    "choices": [choice], **(extra or {})}
            return f"data: {json.dumps(body)}\n\n".encode()

        if chat:
            yield chunk("", None, role=True)
        async for item in self._relay(start, gen):
            if item["type"] == "token":
                yield chunk(item["text"], None, {"helios": {"exit_layer": item["exit_layer"],
                                                            "confidence": round(item["confidence"], 4),
                                                            "token": item["token"]}})
            elif item["type"] == "end":
                self.metrics.requests.inc(tags={"model": start["model"], "finish_reason": item["finish_reason"]})
                yield chunk(None, item["finish_reason"])
                if req.include_usage:
                    body = {"id": call.request_id, "object": obj, "created": created, "model": start["model"],
                            "choices": [], "usage": usage(start["prompt_tokens"], item["completion_tokens"])}
                    yield f"data: {json.dumps(body)}\n\n".encode()
            elif item["type"] == "error":
                yield f"data: {json.dumps(error_body(item['message'], 'server_error'))}\n\n".encode()
                break
        yield b"data: [DONE]\n\n"

    async def status_doc(self) -> dict[str, Any]:
        st = await self.control.status.remote()
        if self.profiler is not None:
            try:
                st["profiler"] = await asyncio.wait_for(self.profiler.stats.remote(), 5)
            except Exception as e:
                st["profiler"] = {"error": type(e).__name__}
        return st

    # -------------------------------------------------------------------------------- HTTP routes
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        try:
            self._check_key(self._key_from_headers(request.headers))
        except APIError as e:
            return e.response()
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "helios-ray"}
                                           for m in self.model_ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._http_generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._http_generate(request, chat=False)

    @app.get("/v1/helios/status")
    async def status(self, request: Request) -> Any:
        try:
            self._check_key(self._key_from_headers(request.headers))
        except APIError as e:
            return e.response()
        return JSONResponse(json.loads(json.dumps(await self.status_doc(), default=str)))

    # -------------------------------------------------------------------------------------- gRPC
    async def _grpc_call(self, request: Any, grpc_context: Any) -> tuple[GenerateCall, str]:
        import grpc

        md = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        try:
            self._check_key(self._key_from_headers(md))
            model = request.model or self.cfg.served_model_name
            self._check_model(model)
            has_msgs = len(request.messages) > 0
            if bool(request.prompt) == has_msgs:
                raise APIError(400, "exactly one of prompt or messages is required")
            kw: dict[str, Any] = {"max_tokens": request.max_tokens or 16}
            for f in ("temperature", "top_p", "top_k", "seed"):
                if request.HasField(f):
                    kw[f] = getattr(request, f)
            if request.stop:
                kw["stop"] = list(request.stop)
            from helios_ray.engine.sequence import SamplingParams

            try:
                params = SamplingParams(**kw)
            except ValidationError as e:
                raise APIError(400, _validation_message(e)[0]) from None
            msgs = [{"role": m.role, "content": m.content} for m in request.messages]
            bad = [m["role"] for m in msgs if m["role"] not in ("system", "user", "assistant")]
            if bad:
                raise APIError(400, f"unknown message role {bad[0]!r}")
            call = GenerateCall(request_id=new_id("grpc"), prompt=request.prompt or None,
                                messages=msgs or None, params=params)
            return call, model
        except APIError as e:
            self._grpc_fail(grpc_context, e)
            raise

    @staticmethod
    def _grpc_fail(grpc_context: Any, e: APIError) -> None:
        import grpc

        code = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}.get(e.status, grpc.StatusCode.INTERNAL)
        if grpc_context is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(e.message)

    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - RPC name
        from helios_ray.grpc import helios_pb2 as pb

        call, model = await self._grpc_call(request, grpc_context)
        try:
            out = await self._complete(call, model)
        except APIError as e:
            self._grpc_fail(grpc_context, e)
            raise
        start, end = out["start"], out["end"]
        return pb.GenerateResponse(
            id=call.request_id, model=start["model"], depth=start["depth"], text=out["text"],
            finish_reason=end["finish_reason"], usage=pb.Usage(**usage(start["prompt_tokens"], end["completion_tokens"])),
            tokens=[pb.TokenInfo(token=t["token"], text=t["text"], exit_layer=t["exit_layer"],
                                 confidence=t["confidence"], breach=t["breach"]) for t in out["tokens"]])

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        from helios_ray.grpc import helios_pb2 as pb

        call, model = await self._grpc_call(request, grpc_context)
        try:
            start, gen = await self._open(call, model)
        except APIError as e:
            self._grpc_fail(grpc_context, e)
            raise
        async for item in self._relay(start, gen):
            if item["type"] == "token":
                yield pb.GenerateChunk(id=call.request_id, model=start["model"], depth=start["depth"],
                                       token=pb.TokenInfo(token=item["token"], text=item["text"],
                                                          exit_layer=item["exit_layer"],
                                                          confidence=item["confidence"], breach=item["breach"]))
            elif item["type"] == "end":
                self.metrics.requests.inc(tags={"model": start["model"], "finish_reason": item["finish_reason"]})
                yield pb.GenerateChunk(id=call.request_id, model=start["model"], depth=start["depth"],
                                       finish_reason=item["finish_reason"],
                                       usage=pb.Usage(**usage(start["prompt_tokens"], item["completion_tokens"])))
            elif item["type"] == "error":
                self._grpc_fail(grpc_context, APIError(503, item["message"]))
                raise RuntimeError(item["message"])

    async def Status(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from helios_ray.grpc import helios_pb2 as pb

        md = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        try:
            self._check_key(self._key_from_headers(md))
        except APIError as e:
            self._grpc_fail(grpc_context, e)
            raise
        return pb.StatusResponse(json=json.dumps(await self.status_doc(), default=str))
