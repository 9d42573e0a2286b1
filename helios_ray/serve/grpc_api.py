"""helios.v1 over Serve's gRPC proxy: status codes for API errors and the response messages.

Requests are mapped onto the OpenAI schemas (:func:`~helios_ray.serve.protocol.body_from_grpc`), so gRPC and
HTTP validate identically; this module only knows the protobuf side.
"""

from __future__ import annotations

from typing import Any

from helios_ray.serve.protocol import APIError, usage
from helios_ray.serve.relay import Completed
from helios_ray.serve.schemas import StreamEnd, StreamStart, StreamToken


def fail(grpc_context: Any, e: APIError) -> None:
    """Set the gRPC status for an API error (the caller re-raises so the proxy ends the call)."""
    import grpc

    code = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
            403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
            503: grpc.StatusCode.UNAVAILABLE}.get(e.status, grpc.StatusCode.INTERNAL)
    if e.code == "overloaded":  # shed by admission control, not a broken server
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(e.message)
        if e.retry_after_s is not None:
            grpc_context.set_trailing_metadata((("retry-after", str(max(1, round(e.retry_after_s)))),))


def metadata(grpc_context: Any) -> dict[str, str]:
    return dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}


def _pb() -> Any:
    from helios_proto import helios_pb2

    return helios_pb2


def token_info(ev: StreamToken) -> Any:
    return _pb().TokenInfo(token=ev.token, text=ev.text, exit_layer=ev.exit_layer, confidence=ev.confidence,
                           breach=ev.breach)


def generate_response(request_id: str, out: Completed) -> Any:
    pb = _pb()
    return pb.GenerateResponse(
        id=request_id, model=out.start.model, depth=out.start.depth, text=out.text,
        finish_reason=out.end.finish_reason,
        usage=pb.Usage(**usage(out.start.prompt_tokens, out.end.completion_tokens)),
        tokens=[token_info(t) for t in out.tokens])


def token_chunk(request_id: str, start: StreamStart, ev: StreamToken) -> Any:
    return _pb().GenerateChunk(id=request_id, model=start.model, depth=start.depth, token=token_info(ev))


def final_chunk(request_id: str, start: StreamStart, end: StreamEnd) -> Any:
    pb = _pb()
    return pb.GenerateChunk(id=request_id, model=start.model, depth=start.depth, finish_reason=end.finish_reason,
                            usage=pb.Usage(**usage(start.prompt_tokens, end.completion_tokens)))


def status_response(doc_json: str) -> Any:
    return _pb().StatusResponse(json=doc_json)
