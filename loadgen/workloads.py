"""Workloads: what each request sends (prompt or chat messages), its ``kind`` and its target ``max_tokens``.

A :class:`Workload` hands out request ``i`` at elapsed time ``t`` (``request(i, t)``); the runner asks for one
per arrival, so a workload never needs to know in advance how many requests a time-bounded run will issue.

* ``sharegpt`` - the first user turn of ShareGPT conversations (sampled by ``seed``), ``max_tokens`` = the
  length of the recorded reply (the first assistant turn after the prompt), filtered by prompt/output length
  and optionally capped.  Kind ``chat``.
* ``random`` - synthetic text of random length (uniform in ``input_len * [1 - r, 1 + r]`` tokens) and random
  ``max_tokens`` (``output_len * [1 - r, 1 + r]``) from a seeded RNG.  Kind ``random``.
* ``humaneval`` - the 164 HumanEval prompts as plain completion prompts; ``max_tokens`` = the canonical
  solution's length (clipped).  Kind ``code``.
* ``shift`` - the mix changes half-way: ShareGPT chat for the first half of the run (by request count, or by
  time for a ``duration``-bounded run, whichever comes first), then HumanEval code.

Token counts are approximate (``ceil(chars / 4)``) unless a ``count_tokens(text) -> int`` callable (e.g. a
tokenizer's) is given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from helios_data import DatasetError, load_humaneval, load_sharegpt
from loadgen.net import LoadgenError

TokenCounter = Callable[[str], int]

WORKLOADS = ("sharegpt", "random", "humaneval", "shift")

#: Pool size for a run bounded only by time (requests cycle through the pool).
DEFAULT_POOL = 512


def approx_tokens(text: str) -> int:
    """``ceil(len(text) / 4)``, at least 1: the usual rough chars-per-token for English and code."""
    return max(1, math.ceil(len(text) / 4))


@dataclass
class Request:
    """One request to send.  ``messages`` set -> a chat request (HTTP ``/v1/chat/completions``, gRPC
    ``messages``); otherwise ``prompt`` goes to ``/v1/completions`` (gRPC ``prompt``)."""

    id: str
    kind: str
    prompt: str
    max_tokens: int
    messages: list[dict[str, str]] | None = None
    prompt_tokens: int = 0          # estimated with the workload's token counter
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


class Workload(Protocol):
    name: str

    def request(self, index: int, elapsed_s: float) -> Request: ...

    def reset(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class PoolWorkload:
    """Request ``i`` is ``pool[i % len(pool)]`` (renamed ``"<i>"``)."""

    def __init__(self, name: str, pool: Sequence[Request], **info: Any):
        if not pool:
            raise LoadgenError(f"workload {name!r} has no requests")
        self.name, self.pool, self.info = name, list(pool), info

    def __len__(self) -> int:
        return len(self.pool)

    def reset(self) -> None:
        pass

    def request(self, index: int, elapsed_s: float = 0.0) -> Request:
        return dataclasses.replace(self.pool[index % len(self.pool)], id=str(index))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "pool": len(self.pool), "kinds": sorted({r.kind for r in self.pool}), **self.info}


class ShiftWorkload:
    """``first`` until request index ``switch_index`` or elapsed time ``switch_s`` (whichever comes first;
    ``None`` disables that trigger), ``second`` afterwards (the second phase's pool starts from its beginning)."""

    def __init__(self, first: Workload, second: Workload, switch_index: int | None = None,
                 switch_s: float | None = None, name: str = "shift"):
        if switch_index is None and switch_s is None:
            raise LoadgenError("the shift workload needs a switch point (a request count or a duration)")
        self.name, self.first, self.second = name, first, second
        self.switch_index, self.switch_s = switch_index, switch_s
        self.switched_at: int | None = None  # the first index served by `second`

    def reset(self) -> None:
        self.switched_at = None
        self.first.reset()
        self.second.reset()

    def request(self, index: int, elapsed_s: float = 0.0) -> Request:
        if self.switched_at is None and ((self.switch_index is not None and index >= self.switch_index)
                                         or (self.switch_s is not None and elapsed_s >= self.switch_s)):
            self.switched_at = index
        if self.switched_at is not None and index >= self.switched_at:
            r = self.second.request(index - self.switched_at, elapsed_s)
            phase = 1
        else:
            r = self.first.request(index, elapsed_s)
            phase = 0
        return dataclasses.replace(r, id=str(index), meta={**r.meta, "phase": phase})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "first": self.first.describe(), "second": self.second.describe(),
                "switch_index": self.switch_index, "switch_s": self.switch_s}


# ------------------------------------------------------------------------------------------- builders
def sharegpt_requests(n: int, seed: int = 0, *, min_prompt_tokens: int = 4, max_prompt_tokens: int | None = 1024,
                      min_output_tokens: int = 4, max_output_tokens: int | None = None,
                      output_cap: int | None = None, split: str = "all",
                      count_tokens: TokenCounter = approx_tokens, path: str | None = None) -> list[Request]:
    """Up to ``n`` chat requests from ShareGPT (shuffled by ``seed``) whose prompt has
    ``min_prompt_tokens..max_prompt_tokens`` tokens and whose recorded reply has
    ``min_output_tokens..max_output_tokens`` tokens; ``max_tokens`` = the reply length, clipped to
    ``output_cap`` when given."""
    try:
        convs = load_sharegpt(limit=None, seed=seed, split=split, path=path)  # type: ignore[arg-type]
    except DatasetError as e:  # a missing package or file: one line
        raise LoadgenError(f"cannot load ShareGPT: {e}") from None
    out: list[Request] = []
    for conv in convs:
        msgs = conv.prompt_messages
        if not msgs or msgs[-1]["role"] != "user" or len(conv.messages) <= len(msgs):
            continue
        reply = conv.messages[len(msgs)]
        if reply["role"] != "assistant":
            continue
        p_tok = sum(count_tokens(m["content"]) for m in msgs)
        o_tok = count_tokens(reply["content"])
        if p_tok < min_prompt_tokens or (max_prompt_tokens is not None and p_tok > max_prompt_tokens):
            continue
        if o_tok < min_output_tokens or (max_output_tokens is not None and o_tok > max_output_tokens):
            continue
        mt = min(o_tok, output_cap) if output_cap else o_tok
        out.append(Request(id=str(len(out)), kind=conv.kind or "chat", prompt=conv.prompt, max_tokens=mt,
                           messages=msgs, prompt_tokens=p_tok, source=f"sharegpt:{conv.id}",
                           meta={"reply_tokens": o_tok}))
        if len(out) >= n:
            break
    if not out:
        raise LoadgenError("no ShareGPT conversation matches the prompt/output length filters")
    return out


def humaneval_requests(n: int | None = None, *, max_tokens: int | None = None, min_output_tokens: int = 16,
                       output_cap: int | None = 256, count_tokens: TokenCounter = approx_tokens) -> list[Request]:
    """HumanEval prompts (plain completions, kind ``code``); ``max_tokens`` = ``max_tokens`` when given, else
    the canonical solution's length clipped to ``[min_output_tokens, output_cap]``."""
    try:
        convs = load_humaneval(limit=n)
    except DatasetError as e:
        raise LoadgenError(f"cannot load HumanEval: {e}") from None
    out = []
    for conv in convs:
        sol = (conv.meta or {}).get("canonical_solution") or ""
        sol_tok = count_tokens(sol) if sol else min_output_tokens
        mt = max_tokens or max(min_output_tokens, min(sol_tok, output_cap) if output_cap else sol_tok)
        out.append(Request(id=str(len(out)), kind=conv.kind or "code", prompt=conv.prompt, max_tokens=mt,
                           prompt_tokens=count_tokens(conv.prompt), source=f"humaneval:{conv.id}",
                           meta={"solution_tokens": sol_tok}))
    if not out:
        raise LoadgenError("HumanEval has no problems")
    return out


_WORDS = ("the a of to and in is it that for on with as was at by be this from or have an are not but all "
          "time data model layer token exit serve request batch memory depth speed light river mountain city "
          "music paper water system number people world story question answer value green quick brown fox "
          "jumps over lazy dog stream latency energy kernel cache graph vector matrix signal network").split()


def synthetic_text(rng: np.random.Generator, tokens: int, chars_per_token: int = 4) -> str:
    """Random words totalling about ``tokens * chars_per_token`` characters."""
    target = max(1, tokens) * chars_per_token
    words: list[str] = []
    size = 0
    idx = rng.integers(0, len(_WORDS), size=target)  # more than enough
    for i in idx:
        w = _WORDS[int(i)]
        words.append(w)
        size += len(w) + 1
        if size >= target:
            break
    return " ".join(words)[:target].rstrip() or "hello"


def random_requests(n: int, seed: int = 0, *, input_len: int = 128, output_len: int = 64,
                    range_ratio: float = 0.5, count_tokens: TokenCounter = approx_tokens) -> list[Request]:
    """``n`` synthetic completion requests; lengths uniform in ``len * [1 - range_ratio, 1 + range_ratio]``."""
    if input_len < 1 or output_len < 1 or not 0.0 <= range_ratio < 1.0:
        raise LoadgenError("random workload: input_len and output_len must be >= 1 and 0 <= range_ratio < 1")
    rng = np.random.default_rng(seed)
    lo_i, hi_i = max(1, int(input_len * (1 - range_ratio))), max(1, int(input_len * (1 + range_ratio)))
    lo_o, hi_o = max(1, int(output_len * (1 - range_ratio))), max(1, int(output_len * (1 + range_ratio)))
    ins = rng.integers(lo_i, hi_i + 1, size=n)
    outs = rng.integers(lo_o, hi_o + 1, size=n)
    out = []
    for i in range(n):
        text = synthetic_text(rng, int(ins[i]))
        out.append(Request(id=str(i), kind="random", prompt=text, max_tokens=int(outs[i]),
                           prompt_tokens=count_tokens(text), source="random",
                           meta={"input_len": int(ins[i])}))
    return out


def build_workload(name: str, num_requests: int | None = None, seed: int = 0, *, duration: float | None = None,
                   count_tokens: TokenCounter = approx_tokens, sharegpt: dict[str, Any] | None = None,
                   humaneval: dict[str, Any] | None = None, random: dict[str, Any] | None = None,
                   shift: tuple[str, str] = ("sharegpt", "humaneval")) -> Workload:
    """A workload by name; ``num_requests`` sizes the pool (``DEFAULT_POOL`` for a time-bounded run) and, for
    ``shift``, sets the switch point (``num_requests // 2``; ``duration / 2`` as well when a duration is given).
    ``sharegpt``/``humaneval``/``random`` are keyword options for the builders above."""
    n = num_requests or DEFAULT_POOL
    opts = {"sharegpt": dict(sharegpt or {}), "humaneval": dict(humaneval or {}), "random": dict(random or {})}
    if name == "sharegpt":
        reqs = sharegpt_requests(n, seed, count_tokens=count_tokens, **opts["sharegpt"])
        return PoolWorkload("sharegpt", reqs, seed=seed, **opts["sharegpt"])
    if name == "random":
        return PoolWorkload("random", random_requests(n, seed, count_tokens=count_tokens, **opts["random"]),
                            seed=seed, **opts["random"])
    if name == "humaneval":
        return PoolWorkload("humaneval", humaneval_requests(count_tokens=count_tokens, **opts["humaneval"]),
                            **opts["humaneval"])
    if name == "shift":
        a, b = shift
        if a == "shift" or b == "shift" or a not in WORKLOADS or b not in WORKLOADS:
            raise LoadgenError(f"shift phases must be two of sharegpt, random, humaneval (got {a!r}, {b!r})")
        half = max(1, n // 2)
        first = build_workload(a, half, seed, count_tokens=count_tokens, sharegpt=sharegpt, humaneval=humaneval,
                               random=random)
        second = build_workload(b, max(1, n - half), seed + 1, count_tokens=count_tokens, sharegpt=sharegpt,
                                humaneval=humaneval, random=random)
        return ShiftWorkload(first, second, switch_index=(num_requests // 2) if num_requests else None,
                             switch_s=(duration / 2) if duration else None)
    raise LoadgenError(f"unknown workload {name!r}: choose from {', '.join(WORKLOADS)}")
