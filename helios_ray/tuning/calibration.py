"""How good a trained exit is on held-out rows: agreement with the final layer, a calibration table and a
recommended confidence threshold (with a statistical margin and an out-of-sample check).

Agreement is measured with the full vocabulary, whatever vocabulary training used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from helios_ray.models.decoder import DecoderLM
from helios_ray.models.early_exit import confidence
from helios_ray.models.exit_heads import ExitHead
from helios_ray.tuning.cache import Cache
from helios_ray.tuning.train import apply_head

__all__ = [
    "THRESHOLDS",
    "TARGET_AGREEMENT",
    "MIN_CONFIDENT_TOKENS",
    "ExitScores",
    "score_exit",
    "calibration",
    "wilson_lower",
    "recommend_threshold",
    "summarize",
]

#: Confidence thresholds of the calibration table.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
#: A threshold is only recommended if agreement among the tokens above it reaches this...
TARGET_AGREEMENT = 0.95
#: ...measured on at least this many tokens (fewer is noise).
MIN_CONFIDENT_TOKENS = 30


@dataclass
class ExitScores:
    """Per held-out token: does the exit's argmax equal the final layer's, and the exit's confidence."""

    agree: np.ndarray  # bool [N]
    conf: np.ndarray  # float [N]
    resp: np.ndarray  # bool [N]
    conv: np.ndarray  # int [N] (row index, for out-of-sample threshold checks)


@torch.no_grad()
def score_exit(head: ExitHead, lm: DecoderLM, cache: Cache, d: int, stride: int = 1, batch_rows: int = 4,
               chunk: int = 512) -> ExitScores:
    """Run ``head`` over every held-out row (a block head needs the whole context) and score every
    ``stride``-th position with the full vocabulary (the LM head is most of the cost)."""
    valid_all = cache.open("valid")
    n = valid_all.shape[0]
    agree, conf, resp, conv = [], [], [], []
    resp_all, topi_all = cache.open("resp"), cache.open("topi")
    for s in range(0, n, batch_rows):
        rows = np.arange(s, min(n, s + batch_rows))
        valid = torch.from_numpy(np.ascontiguousarray(valid_all[rows]))
        t = valid.shape[1]
        pos = torch.where(valid, torch.arange(t)[None].expand_as(valid), torch.full(valid.shape, -1))
        h = torch.from_numpy(np.ascontiguousarray(cache.open(f"h{d}")[rows])).float()
        valid = valid & (torch.arange(t) % stride == 0)[None]
        z = apply_head(head, lm, h, pos)[valid]
        teacher = torch.from_numpy(np.ascontiguousarray(topi_all[rows][..., 0]))[valid]
        for c in range(0, z.shape[0], chunk):
            tok, cf = confidence(lm.logits(z[c:c + chunk]))
            agree.append((tok == teacher[c:c + chunk]).numpy())
            conf.append(cf.numpy())
        resp.append(np.asarray(resp_all[rows])[valid.numpy()])
        conv.append(np.broadcast_to(rows[:, None], valid.shape)[valid.numpy()])
    cat = np.concatenate
    return ExitScores(cat(agree), cat(conf).astype(np.float64), cat(resp), cat(conv))


def calibration(agree: np.ndarray, conf: np.ndarray,
                thresholds: Iterable[float] = THRESHOLDS) -> list[dict[str, float | None]]:
    """Rows ``{threshold, coverage, agreement}``: the share of tokens at or above the threshold and how often those
    agree with the final layer (``agreement`` is None when no token is that confident)."""
    out: list[dict[str, float | None]] = []
    for t in thresholds:
        sel = conf >= t
        cov = float(sel.mean()) if len(conf) else 0.0
        agr = round(float(agree[sel].mean()), 4) if sel.any() else None
        out.append({"threshold": t, "coverage": round(cov, 4), "agreement": agr})
    return out


def wilson_lower(k: int, n: int, z: float = 1.645) -> float:
    """One-sided 95% lower confidence bound of a proportion k/n (Wilson score interval)."""
    if n == 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def recommend_threshold(agree: np.ndarray, conf: np.ndarray, target: float = TARGET_AGREEMENT,
                        min_tokens: int = MIN_CONFIDENT_TOKENS, margin: bool = True,
                        groups: np.ndarray | None = None) -> float | None:
    """Smallest table threshold whose agreement among confident tokens is >= ``target`` (None if none is).

    With ``margin`` the agreement must reach the target with 95% confidence (Wilson lower bound) and, when
    ``groups`` (conversation index per token) is given, also on the even and on the odd conversations
    separately - tokens of one conversation are correlated, so a bound over tokens alone is too optimistic.
    That way the promise "tokens above the threshold agree >= 95% of the time" survives new text.  Without
    ``margin`` this is the plain point-estimate rule."""
    halves = [] if groups is None or not margin else [groups % 2 == 0, groups % 2 == 1]
    for t in THRESHOLDS:
        sel = conf >= t
        n, k = int(sel.sum()), int(agree[sel].sum())
        if n < min_tokens or (wilson_lower(k, n) if margin else k / n) < target:
            continue
        if all((agree[sel & h].mean() if (sel & h).any() else 0.0) >= target for h in halves):
            return t
    return None


def summarize(s: ExitScores) -> dict[str, Any]:
    """Agreement, the calibration table and a recommended threshold (with a statistical margin, on every
    held-out row), plus an out-of-sample check of the rule: fitted on even held-out rows, measured on odd ones,
    so the calibration claim is not only fitted to the numbers that report it."""
    out: dict[str, Any] = {
        "agreement": round(float(s.agree.mean()), 4) if len(s.agree) else 0.0,
        "agreement_response": round(float(s.agree[s.resp].mean()), 4) if s.resp.any() else None,
        "tokens": int(len(s.agree)),
        "response_tokens": int(s.resp.sum()),
        "mean_confidence": round(float(s.conf.mean()), 4) if len(s.conf) else 0.0,
        "calibration": calibration(s.agree, s.conf),
    }
    even, odd = s.conv % 2 == 0, s.conv % 2 == 1
    thr = recommend_threshold(s.agree, s.conf, groups=s.conv)
    out["threshold_point_estimate"] = recommend_threshold(s.agree, s.conf, margin=False)
    fit = recommend_threshold(s.agree[even], s.conf[even])
    check = None
    if fit is not None:
        sel = odd & (s.conf >= fit)
        check = {"fit_on": "even held-out rows", "threshold": fit, "checked_on": "odd held-out rows",
                 "tokens": int(sel.sum()), "coverage": round(float(sel.sum() / max(1, odd.sum())), 4),
                 "agreement": round(float(s.agree[sel].mean()), 4) if sel.any() else None}
    out["recommended_threshold"] = thr
    out["threshold_check"] = check
    return out
