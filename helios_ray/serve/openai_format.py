"""OpenAI's response shapes: the JSON of a finished completion and the SSE chunks of a streamed one.

Pure functions of the relay's typed events, so the formats are testable without a cluster and loadgen's fake
server can be checked against them.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from helios_ray.serve.protocol import error_body, now, usage
from helios_ray.serve.relay import Completed
from helios_ray.serve.schemas import StreamEnd, StreamError, StreamStart, StreamToken


def completion_body(request_id: str, out: Completed, chat: bool) -> dict[str, Any]:
    u = usage(out.start.prompt_tokens, out.end.completion_tokens)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "finish_reason": out.end.finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": out.text, "finish_reason": out.end.finish_reason, "logprobs": None}
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": now(),
            "model": out.start.model, "choices": [choice], "usage": u, "helios": out.summary()}


def sse(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


class ChunkWriter:
    """The chunks of one streamed response (``chat.completion.chunk`` or ``text_completion``)."""

    def __init__(self, request_id: str, start: StreamStart, chat: bool):
        self.id, self.start, self.chat = request_id, start, chat
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.created = now()

    def _body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.start.model,
                "choices": choices, **extra}

    def chunk(self, text: str | None, finish: str | None, role: bool = False, **extra: Any) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return sse(self._body([choice], **extra))

    def token(self, ev: StreamToken) -> bytes:
        return self.chunk(ev.text, None, helios={"exit_layer": ev.exit_layer, "confidence": round(ev.confidence, 4),
                                                 "token": ev.token})

    def usage(self, end: StreamEnd) -> bytes:
        return sse(self._body([], usage=usage(self.start.prompt_tokens, end.completion_tokens)))


async def sse_stream(w: ChunkWriter, events: AsyncIterator[StreamToken | StreamEnd | StreamError],
                     include_usage: bool) -> AsyncIterator[bytes]:
    """The whole SSE body: role chunk (chat), one chunk per token, the finish chunk, usage, ``[DONE]``.  A
    failure after the 200 was sent can only be told in-band: an OpenAI error object as one event."""
    if w.chat:
        yield w.chunk("", None, role=True)
    async for ev in events:
        if isinstance(ev, StreamToken):
            yield w.token(ev)
        elif isinstance(ev, StreamEnd):
            yield w.chunk(None, ev.finish_reason)
            if include_usage:
                yield w.usage(ev)
        else:
            yield sse(error_body(ev.message, "server_error"))
            break
    yield b"data: [DONE]\n\n"
