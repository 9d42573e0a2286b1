"""The ingress: OpenAI-compatible HTTP and the helios.v1 gRPC service, one thin front end each.

Both front ends map a request onto the same schema (:mod:`.protocol`), hand it to the :class:`~.relay.Relay`
(which talks to the replicas and feeds telemetry) and format what comes back (:mod:`.openai_format`,
:mod:`.grpc_api`).  The router holds no policy state; any number of router replicas can run.

Errors: bad input -> 4xx with OpenAI's error body (gRPC: INVALID_ARGUMENT / NOT_FOUND / UNAUTHENTICATED /
PERMISSION_DENIED);
a replica dying mid-stream -> the stream ends with an error event (HTTP status is already 200 by then), and
Serve restarts the replica.

(No ``from __future__ import annotations`` here: Serve rewrites the route signatures for class-based views, and
string annotations would no longer resolve - FastAPI would then read ``request`` as a query parameter.)
"""

import asyncio
import json
import math
import os
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from helios_ray.errors import HeliosError
from helios_ray.serve.auth import Access, exposure_problem
from helios_ray.serve.config import ServeConfig
from helios_ray.serve import dashboard, grpc_api
from helios_ray.serve.openai_format import ChunkWriter, completion_body, sse_stream
from helios_ray.serve.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, PlacementRequest, UnpinRequest, body_from_grpc, check_decoded,
    openapi_body,
    parse_request, to_call, validate,
)
from helios_ray.serve.relay import Relay
from helios_ray.serve.schemas import StreamEnd, StreamToken

app = FastAPI(title="helios-ray", description="HELIOS early-exit LLM serving (OpenAI-compatible)")


def _error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s is not None else None
    return JSONResponse(e.body, status_code=e.status, headers=headers)


def _json_ready(obj: Any) -> Any:
    """The status as strict JSON: non-finite floats (an infeasible placement's cost is +inf) become null, and
    anything else JSON lacks becomes its string - JSON has no Infinity, and strict clients reject it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except Exception:
        raise APIError(400, "the request body is not valid JSON") from None


def _http_host() -> str | None:
    """The host Serve's HTTP proxy binds, from the controller (None when it cannot be asked: the per-request
    check of the caller's address still holds)."""
    try:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except Exception as e:  # noqa: BLE001 - a private API: a changed one must not stop the router
        import logging

        logging.getLogger("ray.serve").warning("helios router: cannot read Serve's HTTP host (%s): the start-time "
                                               "exposure check is skipped; the per-request check still holds", e)
        return None


def _key_from_headers(headers: Any) -> str | None:
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


# serve.ingress converts the routes when the class is defined: it must run at import, in every process
# (the FastAPI app is pickled by reference and re-imported in the replica).
@serve.ingress(app)
class Router:
    def __init__(self, config: dict[str, Any], groups: dict[str, Any], brain: Any, profiler: Any | None):
        from helios_ray.serve.metrics import RouterMetrics

        self.cfg = ServeConfig.model_validate(config)
        self.brain, self.profiler = brain, profiler
        self.access = Access.from_env(self.cfg.api_key_env, self.cfg.admin_key_env, self.cfg.allow_unauthenticated)
        problem = exposure_problem(_http_host(), self.access)
        if problem:  # the deployment fails with this line (`serve run`, KubeRay); `helios-ray serve` checks first
            raise HeliosError(problem)
        self.metrics = RouterMetrics()
        self.relay = Relay(self.cfg, groups, brain, profiler, self.metrics,
                           model_ids=[self.cfg.served_model_name] + list(self.cfg.candidates))

    def _check_http(self, request: Request, admin: bool = False) -> None:
        self.access.check(_key_from_headers(request.headers), request.client.host if request.client else None, admin,
                          host=request.headers.get("host"), origin=request.headers.get("origin"))

    def _check_grpc(self, grpc_context: Any) -> None:
        peer = grpc_context.peer() if grpc_context is not None else None
        self.access.check(_key_from_headers(grpc_api.metadata(grpc_context)), peer)

    def _count_error(self, e: APIError) -> None:
        if 400 <= e.status < 500:
            self.metrics.errors.inc(tags={"status": str(e.status)})

    async def status_doc(self) -> dict[str, Any]:
        st = await self.brain.status.remote()
        st["routing"] = self.relay.routing_status()
        st["access"] = self.access.summary()
        st["router"] = {"pid": os.getpid()}  # with the brain's and the replicas' pids: what a soak watches
        if self.profiler is not None:
            try:
                st["profiler"] = await asyncio.wait_for(self.profiler.stats.remote(), 5)
            except Exception as e:
                st["profiler"] = {"error": type(e).__name__}
        return _json_ready(st)

    # -------------------------------------------------------------------------------------- HTTP
    async def _http_generate(self, request: Request, chat: bool) -> Any:
        try:
            self._check_http(request)
            req = parse_request(await _json_body(request), chat)
            call = to_call(req)
            if req.stream:
                opened = await self.relay.open(call, req.model)
                events = self.relay.relay(call, opened)
                return StreamingResponse(sse_stream(ChunkWriter(call.request_id, opened.start, chat), events,
                                                    req.include_usage), media_type="text/event-stream")
            out = await self.relay.complete(call, req.model)
        except APIError as e:
            self._count_error(e)
            return _error_response(e)
        return JSONResponse(completion_body(call.request_id, out, chat))

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        try:
            self._check_http(request)
        except APIError as e:
            return _error_response(e)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "helios-ray"}
                                           for m in self.relay.model_ids]}

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Any:
        return await self._http_generate(request, chat=True)

    @app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        return await self._http_generate(request, chat=False)

    @app.get("/dashboard")  # the live page: static files only, open; its data comes from /v1/helios/status
    @app.get("/dashboard/{name}")
    async def dashboard_file(self, name: str = "index.html") -> Response:
        return dashboard.response(name)

    # ------------------------------------------------------------------------------------ admin
    async def _admin(self, request: Request, schema: type, call: Any) -> Any:
        try:
            self._check_http(request, admin=True)
            req = validate(schema, await _json_body(request))
            groups = [g.name for g in self.cfg.fleet()]
            if req.group not in groups:
                raise APIError(404, f"unknown group {req.group!r} (groups: {', '.join(groups)})",
                               param="group", code="group_not_found")
            out = await call(req)
            if "error" in out:  # the brain's verdict: unknown model (404), depth out of range (400)
                err = out["error"]
                not_found = err["status"] == 404
                raise APIError(err["status"], err["message"], param="model" if not_found else "depth",
                               code="model_not_found" if not_found else None)
        except APIError as e:
            self._count_error(e)
            return _error_response(e)
        return JSONResponse({"group": req.group, **out})

    @app.post("/v1/helios/placements", openapi_extra=openapi_body(PlacementRequest))
    async def placements(self, request: Request) -> Any:
        """Move a group live (operators: the admin key, :mod:`.auth`)."""
        return await self._admin(request, PlacementRequest,
                                 lambda r: self.brain.place.remote(r.model, r.depth, pin=r.pin, group=r.group))

    @app.post("/v1/helios/placements/unpin", openapi_extra=openapi_body(UnpinRequest))
    async def unpin(self, request: Request) -> Any:
        return await self._admin(request, UnpinRequest, lambda r: self.brain.unpin.remote(r.group))

    @app.get("/v1/helios/status")
    async def status(self, request: Request) -> Any:
        try:
            self._check_http(request)
        except APIError as e:
            return _error_response(e)
        return JSONResponse(await self.status_doc())

    # -------------------------------------------------------------------------------------- gRPC
    async def _grpc_call(self, request: Any, grpc_context: Any) -> tuple[Any, str]:
        try:
            self._check_grpc(grpc_context)
            body, chat = body_from_grpc(request, self.cfg.served_model_name)
            req = parse_request(body, chat)
            self.relay.check_model(req.model)
            return to_call(req, prefix="grpc"), req.model
        except APIError as e:
            grpc_api.fail(grpc_context, e)
            raise

    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - RPC name
        call, model = await self._grpc_call(request, grpc_context)
        try:
            out = await self.relay.complete(call, model)
        except APIError as e:
            grpc_api.fail(grpc_context, e)
            raise
        return grpc_api.generate_response(call.request_id, out)

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        call, model = await self._grpc_call(request, grpc_context)
        try:
            opened = await self.relay.open(call, model)
        except APIError as e:
            grpc_api.fail(grpc_context, e)
            raise
        async for ev in self.relay.relay(call, opened):
            if isinstance(ev, StreamToken):
                yield grpc_api.token_chunk(call.request_id, opened.start, ev)
            elif isinstance(ev, StreamEnd):
                yield grpc_api.final_chunk(call.request_id, opened.start, ev)
            else:
                grpc_api.fail(grpc_context, APIError(ev.status, ev.message))
                raise RuntimeError(ev.message)

    async def Status(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            self._check_grpc(grpc_context)
            check_decoded(request)
        except APIError as e:
            grpc_api.fail(grpc_context, e)
            raise
        return grpc_api.status_response(json.dumps(await self.status_doc()))
