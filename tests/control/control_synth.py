"""Synthetic-but-realistic profile-mode traces for the control-plane tests.

Two models with complementary exits, as HELIOS observes them:

* ``alpha`` (30 layers, exits 12/16/20/24/30): chat tokens mostly confident at exit 20; code
  tokens are unconfident at 20 but confident at 24.
* ``beta`` (24 layers, exits 8/12/16/20/24, cheaper per layer): chat tokens only confident at its
  full depth; code tokens confident already at 16.

Per token a "difficulty" draw u decides confidence at every exit at once (confident at exit e iff
u < p_conf[e], p increasing with depth), so exits are monotone like real ones; a second draw v
decides agreement with the full model the same way. Timings are proportional to FLOPs.
"""

from __future__ import annotations

import random

from functools import lru_cache

from helios_ray.control import CandidateInfo, ExitPrior, TraceRequest, TraceToken
from helios_ray.control.config import CalibrationPoint

# p(confident at exit), p(agrees with the full model at exit)
PROFILES: dict[str, dict[str, tuple[dict[int, float], dict[int, float]]]] = {
    "alpha": {
        "chat": (
            {12: 0.05, 16: 0.20, 20: 0.90, 24: 0.95, 30: 0.97},
            {12: 0.50, 16: 0.75, 20: 0.98, 24: 0.99, 30: 1.00},
        ),
        "code": (
            {12: 0.02, 16: 0.05, 20: 0.10, 24: 0.90, 30: 0.95},
            {12: 0.30, 16: 0.50, 20: 0.60, 24: 0.98, 30: 1.00},
        ),
    },
    "beta": {
        "chat": (
            {8: 0.02, 12: 0.05, 16: 0.20, 20: 0.35, 24: 0.90},
            {8: 0.30, 12: 0.50, 16: 0.70, 20: 0.85, 24: 1.00},
        ),
        "code": (
            {8: 0.05, 12: 0.30, 16: 0.90, 20: 0.95, 24: 0.97},
            {8: 0.50, 12: 0.80, 16: 0.98, 20: 0.99, 24: 1.00},
        ),
    },
}

FLOPS = {"alpha": (10_000_000, 5_000_000, 30), "beta": (12_000_000, 6_000_000, 24)}
SECONDS_PER_FLOP = 1e-10  # alpha full: 305 MFLOP -> 30.5 ms/token
TTFT_S = 0.1


def candidates(with_priors: bool = True) -> list[CandidateInfo]:
    """Static metadata matching the synthetic models (exit cards describe chat traffic)."""
    alpha_prior = {
        20: ExitPrior(
            agreement=0.97,
            calibration=[CalibrationPoint(threshold=0.9, coverage=0.85, agreement=0.99)],
        ),
        24: ExitPrior(agreement=0.99),
    }
    beta_prior = {16: ExitPrior(agreement=0.70), 20: ExitPrior(agreement=0.85)}
    out = []
    for name, exits, prior in (
        ("alpha", [12, 16, 20, 24], alpha_prior),
        ("beta", [8, 12, 16, 20], beta_prior),
    ):
        per_layer, head, layers = FLOPS[name]
        out.append(
            CandidateInfo(
                name=name,
                num_layers=layers,
                embed_bytes=40_000_000,
                layer_bytes=per_layer // 2,
                head_bytes=20_000_000,
                kv_bytes_per_token_per_layer=2048,
                exits=exits,
                exit_prior=prior if with_priors else {},
                flops_per_token_per_layer=per_layer,
                head_flops_per_token=head,
            )
        )
    return out


def seconds_per_token(model: str, depth: int | None = None) -> float:
    per_layer, head, layers = FLOPS[model]
    return (per_layer * (depth or layers) + head) * SECONDS_PER_FLOP


@lru_cache(maxsize=8)
def make_trace(
    n_requests: int,
    *,
    drift_at: int | None = None,
    tokens_per_request: int = 20,
    seed: int = 0,
    models: tuple[str, ...] = ("alpha", "beta"),
) -> tuple[TraceToken | TraceRequest, ...]:
    """Requests 0..n-1; ``kind`` is chat before ``drift_at`` and code from it on.

    Cached: tests treat the records as immutable, and building them is the slow part.
    """
    rng = random.Random(seed)
    records: list[TraceToken | TraceRequest] = []
    for req in range(n_requests):
        kind = "code" if drift_at is not None and req >= drift_at else "chat"
        for model in models:
            p_conf, p_agree = PROFILES[model][kind]
            for pos in range(tokens_per_request):
                u, v = rng.random(), rng.random()
                final = rng.randrange(1000, 50_000)
                exits = {}
                for depth in sorted(p_conf):
                    confident = u < p_conf[depth]
                    conf = 0.9 + 0.1 * rng.random() if confident else 0.3 + 0.55 * rng.random()
                    token = final if v < p_agree[depth] else final + 1
                    exits[depth] = (token, round(conf, 4))
                records.append(
                    TraceToken(
                        model=model, request=req, kind=kind, pos=pos, exits=exits, final=final
                    )
                )
            spt = seconds_per_token(model)
            records.append(
                TraceRequest(
                    model=model,
                    request=req,
                    kind=kind,
                    prompt_tokens=50,
                    output_tokens=tokens_per_request,
                    seconds=TTFT_S + (tokens_per_request - 1) * spt,
                    ttft_s=TTFT_S,
                )
            )
    return tuple(records)


def token(
    model: str,
    request: int,
    pos: int,
    exits: dict[int, tuple[int, float] | tuple[int, float, float]],
    final: int = 7,
    final_logprob: float | None = None,
    kind: str = "chat",
) -> TraceToken:
    """A hand-made token record."""
    return TraceToken(
        model=model,
        request=request,
        pos=pos,
        kind=kind,
        exits=exits,
        final=final,
        final_logprob=final_logprob,
    )
