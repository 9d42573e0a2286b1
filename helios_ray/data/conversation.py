"""How a model sees a :class:`~loadgen.data.Conversation`, for exit tuning and evaluation.

The conversation type, its held-out split and the dataset readers live in :mod:`loadgen.data` (the load
generator is a client of this package and owns them).  Rendering is the serving prompt encoder's
(:mod:`helios_ray.models.prompts`), so exit heads are tuned and evaluated on exactly the text the replicas
build for the same chat: the chat template where the model has one, the plain turns otherwise.
"""

from __future__ import annotations

from typing import Any

from helios_ray.models.prompts import encode_text, has_chat_template, render_messages
from loadgen.data import Conversation

__all__ = ["Conversation", "encode", "has_chat_template", "render"]


def render(conv: Conversation, tokenizer: Any = None, add_generation_prompt: bool = False) -> str:
    """The text of a chat (``text`` conversations are returned as they are)."""
    if conv.text is not None:
        return conv.text
    return render_messages(conv.messages, tokenizer, add_generation_prompt)[0]


def encode(conv: Conversation, tokenizer: Any, add_generation_prompt: bool = False) -> list[int]:
    """Token ids the way the replicas build them: a chat-templated text carries its own special tokens; a plain
    text gets the tokenizer's (e.g. Gemma's ``<bos>``)."""
    if conv.text is not None:
        return encode_text(tokenizer, conv.text, templated=False)
    text, templated = render_messages(conv.messages, tokenizer, add_generation_prompt)
    return encode_text(tokenizer, text, templated)
