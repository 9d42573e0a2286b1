"""The one prompt encoder: how a request - a plain prompt or chat messages - becomes a model's token ids.

Every path that turns text into ids goes through here: the serving replicas (engine and plain), the profiler
on mirrored prompts, exit tuning and evaluation data, and the benches.  When they disagree, the profiler measures
a model on a different prompt than the one it serves, and exit heads are tuned on text the server never sends.

* A model with a chat template gets the messages through it (the template carries its own special tokens).
* A base model (no template, e.g. Gemma 3 270M) gets a documented plain rendering::

      System: <system text>

      User: <user text>

      Assistant:

  and the request gains stop strings at the next turn marker (:data:`PLAIN_TURN_STOPS`), so the model answers
  one turn and stops instead of inventing the user's next line.  HELIOS may switch a chat workload onto a base
  model at any time, so a base model must serve chat, not refuse it.
* A plain prompt is tokenized as it is, with the tokenizer's own special tokens (e.g. Gemma's ``<bos>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from helios_ray.errors import InvalidRequestError

if TYPE_CHECKING:  # the dataset type only; rendering needs no data reader
    from helios_data import Conversation

#: How the plain rendering names each role.
TURN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
#: Where a base model's chat answer ends: at the next turn marker it would start writing.
PLAIN_TURN_STOPS: tuple[str, ...] = tuple(f"\n{name}:" for name in ("User", "System", "Assistant"))


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids plus the stop strings the rendering implies (empty unless a base model renders a chat)."""

    ids: list[int]
    stop: tuple[str, ...] = ()
    templated: bool = False


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_messages(messages: Sequence[dict[str, str]], tokenizer: Any = None,
                    add_generation_prompt: bool = True) -> tuple[str, bool]:
    """The text of a chat for ``tokenizer``'s model, and whether it came from the chat template."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt), True
    bad = sorted({m["role"] for m in msgs} - set(TURN_NAMES))
    if bad:
        raise InvalidRequestError(f"unknown message role {bad[0]!r} (known: system, user, assistant)")
    text = "\n\n".join(f"{TURN_NAMES[m['role']]}: {m['content']}" for m in msgs)
    return text + ("\n\nAssistant:" if add_generation_prompt else ""), False


def encode_text(tokenizer: Any, text: str, templated: bool) -> list[int]:
    """A chat-templated text carries its own special tokens; anything else gets the tokenizer's."""
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def encode_request(tokenizer: Any, prompt: str | None = None,
                   messages: Sequence[dict[str, str]] | None = None) -> EncodedPrompt:
    """Token ids (and implied stop strings) of a request: exactly one of ``prompt`` / ``messages``."""
    if messages:
        text, templated = render_messages(messages, tokenizer, add_generation_prompt=True)
        ids = encode_text(tokenizer, text, templated)
        stop = () if templated else PLAIN_TURN_STOPS
    elif prompt is not None:
        ids, stop, templated = encode_text(tokenizer, prompt, False), (), False
    else:
        raise InvalidRequestError("either a prompt or chat messages are required")
    if not ids:
        raise InvalidRequestError("the prompt is empty after tokenization")
    return EncodedPrompt(ids=ids, stop=stop, templated=templated)


def render_conversation(conv: "Conversation", tokenizer: Any = None, add_generation_prompt: bool = False) -> str:
    """The text of a dataset conversation as this encoder renders it (``text`` conversations are returned as they
    are): exit heads are tuned and evaluated on exactly the text the replicas build for the same chat."""
    if conv.text is not None:
        return conv.text
    return render_messages(conv.messages, tokenizer, add_generation_prompt)[0]


def encode_conversation(conv: "Conversation", tokenizer: Any, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a dataset conversation the way the replicas build them: a chat-templated text carries its own
    special tokens; a plain text gets the tokenizer's (e.g. Gemma's ``<bos>``)."""
    if conv.text is not None:
        return encode_text(tokenizer, conv.text, templated=False)
    text, templated = render_messages(conv.messages, tokenizer, add_generation_prompt)
    return encode_text(tokenizer, text, templated)
