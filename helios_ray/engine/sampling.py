"""Turn a batch of exit logits into next tokens: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch
from torch import Tensor

from helios_ray.engine.sequence import Sequence

#: float32's smallest normal number: below it a temperature rounds to 0 (or loses precision) in the division.
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


def _filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop tokens once the mass *before* them already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False  # kept explicitly: a top_p below float32's range (1e-300) compares as 0 >= 0
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
    return logits


def sample(logits: Tensor, seqs: list[Sequence], greedy: Tensor | None = None) -> list[int]:
    """One token per sequence from ``logits`` [B, V].  ``greedy``: the rows' argmax when the caller already has
    it (the model's step computes it with the confidence), so greedy rows cost no second pass over the vocabulary."""
    picks = (logits.float().argmax(-1) if greedy is None else greedy).tolist()
    out: list[int] = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            out.append(int(picks[i]))
            continue
        # Shifted by the row's max first: with a tiny temperature (1e-30 is valid) logits / T overflows to +inf
        # and softmax turns it into NaN; shifted, the best token stays 0 and the rest go to -inf (greedy's limit).
        # And at least float32's smallest normal: a float64 temperature such as 5e-324 is 0 in float32 (0/0 = NaN).
        row = logits[i].float()
        row = _filter((row - row.max()) / max(p.temperature, MIN_TEMPERATURE), p.top_k, p.top_p)
        probs = row.softmax(-1)
        if not bool(torch.isfinite(probs).all()):  # a non-finite logit: greedy for this row, not a failed batch
            out.append(int(picks[i]))
            continue
        out.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    return out
