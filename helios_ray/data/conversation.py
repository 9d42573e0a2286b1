"""How a model sees a :class:`~loadgen.data.Conversation`: its chat template when it has one, otherwise plain
``User:``/``Assistant:`` turns.

The conversation type, its held-out split and the dataset readers live in :mod:`loadgen.data` (the load
generator is a client of this package and owns them); this module only renders and encodes.  It imports no
tokenizer library; rendering takes any tokenizer with ``apply_chat_template``/``__call__``.
"""

from __future__ import annotations

from typing import Any

from loadgen.data import Conversation

__all__ = ["Conversation", "encode", "has_chat_template", "render"]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(conv: Conversation, tokenizer: Any = None, add_generation_prompt: bool = False) -> str:
    """The text a model is trained/evaluated on: its chat template for chats when it has one, otherwise plain
    ``User:``/``Assistant:`` turns (base models); ``text`` conversations are returned as they are."""
    if conv.text is not None:
        return conv.text
    msgs = [dict(m) for m in conv.messages]
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    text = "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in msgs)
    return text + ("\n\nAssistant:" if add_generation_prompt else "")


def encode(conv: Conversation, tokenizer: Any, add_generation_prompt: bool = False) -> list[int]:
    """Token ids the way :meth:`EarlyExitLM.encode` builds them: a chat-templated text carries its own special
    tokens; a plain text gets the tokenizer's (e.g. Gemma's ``<bos>``)."""
    text = render(conv, tokenizer, add_generation_prompt)
    templated = conv.text is None and has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
