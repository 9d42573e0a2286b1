"""One conversation (or prompt, or plain text) from any source and its held-out split.

Everything the data readers return is a :class:`Conversation`: an id, its messages (roles normalised to
``system``/``user``/``assistant``, consecutive same-role turns merged, leading assistant turns dropped) or a
plain ``text``, and a ``kind`` label (``chat``, ``code``, ``text`` or whatever a prompt file says).

The train / held-out split is a pure function of the conversation's *group* id (for ShareGPT, the id without
its ``_N`` chunk suffix, so the chunks of one long chat never straddle the split): a SHA-256 bucket, the same
on every machine and in every process, so evaluation never sees training data.

This module imports only the standard library (no tokenizer, no server code).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

Split = Literal["train", "heldout", "all"]

#: Share of conversation groups held out from training (by hash); 5% of ShareGPT is ~880 conversations.
HELDOUT_FRACTION = 0.05

_ROLES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "assistant": "assistant",
    "model": "assistant", "system": "system",
}


@dataclass(frozen=True)
class Conversation:
    """A chat (``messages``) or a plain text (``text``); exactly one of the two is set."""

    id: str
    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None
    kind: str = "chat"
    source: str = ""
    #: Conversations sharing a group (chunks of one chat) always land in the same split.
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt(self) -> str:
        """The first user turn (or the text): what a load generator sends as the request."""
        if self.text is not None:
            return self.text
        for m in self.messages:
            if m["role"] == "user":
                return m["content"]
        return ""

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Messages up to and including the first user turn (a chat request's body)."""
        out: list[dict[str, str]] = []
        for m in self.messages:
            out.append(dict(m))
            if m["role"] == "user":
                break
        return out

    @property
    def split(self) -> str:
        return split_of(self.group or self.id)


def split_of(group_id: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """``"heldout"`` or ``"train"``, deterministically from a SHA-256 of the id."""
    h = int.from_bytes(hashlib.sha256(group_id.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h / 2**64 < heldout_fraction else "train"


def in_split(conv: Conversation, split: Split, heldout_fraction: float = HELDOUT_FRACTION) -> bool:
    return split == "all" or split_of(conv.group or conv.id, heldout_fraction) == split


def normalize_messages(turns: Iterable[tuple[str, str]]) -> tuple[dict[str, str], ...]:
    """Map source roles to system/user/assistant, drop empty turns, merge consecutive same-role turns and
    drop assistant turns before the first user turn (chat templates that enforce alternation accept it)."""
    out: list[dict[str, str]] = []
    for role, content in turns:
        r = _ROLES.get(str(role).lower())
        if r is None or not isinstance(content, str) or not content.strip():
            continue
        if r == "system" and out:  # a system turn in the middle: keep the text as a user turn
            r = "user"
        if r == "assistant" and not any(m["role"] == "user" for m in out):
            continue
        if out and out[-1]["role"] == r:
            out[-1] = {"role": r, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": r, "content": content})
    return tuple(out)

