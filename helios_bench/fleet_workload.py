"""The mixed workload of ``helios-ray bench serve``: ShareGPT chats and HumanEval code prompts in one stream whose
mix shifts half-way, chat-heavy then code-heavy (both chat shares 1.0: chats only, the one-model preset's).

* chat requests are the first user turn of ShareGPT conversations (``/v1/chat/completions``), ``max_tokens`` =
  the recorded reply's length capped at ``chat_output_cap``;
* code requests are HumanEval prompts sent as plain completions (``/v1/completions``), ``max_tokens`` =
  ``code_max_tokens`` (a cap).  Every system generates exactly ``max_tokens`` tokens (``ignore_eos``), so
  throughputs compare like with like; HumanEval's stop sequences are applied when the answer is *scored*
  (:func:`helios_ray.tuning.code_eval.truncate_at_stop`), which is where a stop would have cut it;
* the first ``n // 2`` requests hold ``chat_share_first`` chats, the rest ``chat_share_second``; inside each half
  the order is a seeded shuffle.  Each request carries ``kind`` (``chat``/``code``, recorded per request by
  ``loadgen``) and ``meta["phase"]`` (0 before the shift, 1 after); a code request carries its problem's
  ``test`` and ``entry_point`` for pass@1.

Arrivals are ``loadgen``'s: a seeded Poisson stream per sweep rate, and the closed loop for saturation.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from loadgen.workloads import Request, approx_tokens, sharegpt_requests


def code_requests(n: int, seed: int, *, max_prompt_tokens: int, max_tokens: int) -> list[Request]:
    """``n`` HumanEval problems (a seeded sample of those whose prompt fits), completion-style, kind ``code``."""
    from helios_data import load_humaneval

    probs = [c for c in load_humaneval() if approx_tokens(c.text) <= max_prompt_tokens]
    random.Random(seed).shuffle(probs)
    out = []
    for c in probs[:n]:
        out.append(Request(id=c.id, kind="code", prompt=c.text, max_tokens=max_tokens,
                           prompt_tokens=approx_tokens(c.text), source=f"humaneval:{c.id}",
                           meta={"task_id": c.id, "test": c.meta.get("test"),
                                 "entry_point": c.meta.get("entry_point")}))
    return out


def phase_counts(n: int, chat_share_first: float, chat_share_second: float) -> list[tuple[int, int]]:
    """``[(chats, codes) before the shift, (chats, codes) after]`` for ``n`` requests."""
    first = n // 2
    second = n - first
    c1 = round(first * chat_share_first)
    c2 = round(second * chat_share_second)
    return [(c1, first - c1), (c2, second - c2)]


def mixed_requests(n: int, seed: int = 0, *, chat_share_first: float = 0.75, chat_share_second: float = 0.25,
                   max_prompt_tokens: int = 512, chat_output_cap: int = 128, code_max_tokens: int = 128,
                   offset: int = 0) -> list[Request]:
    """``n`` requests, chat-heavy then code-heavy (see the module doc).  ``offset`` skips that many chats and
    code problems first (the warm-up takes its requests from a disjoint offset)."""
    (c1, k1), (c2, k2) = phase_counts(n, chat_share_first, chat_share_second)
    chats = sharegpt_requests(offset + c1 + c2, seed, max_prompt_tokens=max_prompt_tokens, min_output_tokens=8,
                              output_cap=chat_output_cap)[offset:] if c1 + c2 else []
    codes = code_requests(offset + k1 + k2, seed, max_prompt_tokens=max_prompt_tokens,
                          max_tokens=code_max_tokens)[offset:] if k1 + k2 else []
    if len(chats) < c1 + c2 or len(codes) < k1 + k2:
        raise ValueError(f"mixed workload: wanted {c1 + c2} chats and {k1 + k2} code prompts within "
                         f"{max_prompt_tokens} prompt tokens, found {len(chats)} and {len(codes)}")
    for r in chats:
        r.kind = "chat"  # ShareGPT's own kinds (e.g. a conversation tagged code) stay in meta
    rng = random.Random(seed)
    out: list[Request] = []
    for phase, (nc, nk) in enumerate([(c1, k1), (c2, k2)]):
        part = chats[:nc] + codes[:nk]
        chats, codes = chats[nc:], codes[nk:]
        rng.shuffle(part)
        out += [dataclasses.replace(r, meta={**r.meta, "phase": phase}) for r in part]
    return [dataclasses.replace(r, id=str(i)) for i, r in enumerate(out)]


def describe(reqs: list[Request]) -> dict[str, Any]:
    by_phase: dict[int, dict[str, int]] = {}
    for r in reqs:
        d = by_phase.setdefault(int(r.meta.get("phase", 0)), {"chat": 0, "code": 0})
        d[r.kind] = d.get(r.kind, 0) + 1
    return {"requests": len(reqs), "phases": [by_phase.get(p, {}) for p in sorted(by_phase)],
            "output_tokens": sum(r.max_tokens for r in reqs)}
