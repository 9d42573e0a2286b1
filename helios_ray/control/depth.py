"""Which depth of one model may serve: the evidence about each exit and the accuracy guard.

A depth is usable when enough tokens exit confidently by it and greedy exit there agrees with the
full model (and, when log-probabilities are known, barely raises perplexity). Evidence comes from
the PHT's fresh profile when it has enough samples, else from the exit card's priors; the full
depth needs none, which is why it is always the fallback.
"""

from __future__ import annotations

from typing import NamedTuple

from .config import CandidateInfo, PolicyConfig
from .decision import DepthChoice, EvidenceSource
from .quality import QualityGate
from .pht import PHT
from .pht_entry import PHTEntry

__all__ = [
    "ProfileLookup",
    "Evidence",
    "GuardVerdict",
    "profile_entry",
    "exit_evidence",
    "accuracy_guard",
    "choose_depth",
    "evaluate_depth",
]


class ProfileLookup(NamedTuple):
    """The PHT entry holding a candidate's fresh exit statistics, and the keys skipped as stale."""

    entry: PHTEntry | None
    stale: list[str]


class Evidence(NamedTuple):
    """What is known about greedy exit at one depth (``None`` = unknown) and where it came from."""

    share: float | None
    """Share of tokens confident at some exit at or before the depth."""
    agreement: float | None
    ppl_increase: float | None
    source: EvidenceSource
    pass_at_1_drop: float | None = None
    """Full-depth pass@1 minus pass@1 here (the exit card's task-quality measurement)."""


class GuardVerdict(NamedTuple):
    """Whether the accuracy guard allows a depth, and the reason either way (for the log)."""

    ok: bool
    reason: str


def profile_entry(pht: PHT | None, candidate: CandidateInfo) -> ProfileLookup:
    """The PHT entry holding the candidate's fresh exit statistics, and the keys skipped as stale.

    Profile mode loads the full model, so the entry at the full depth is preferred; otherwise the
    deepest entry with per-exit statistics. Freshness is judged on ``profiled_at``: serving timings
    refresh an entry but say nothing about today's exit distribution.
    """
    if pht is None:
        return ProfileLookup(None, [])
    now = pht.now()
    profiled = [e for e in pht.for_model(candidate.name, include_stale=True) if e.exits]
    fresh = [e for e in profiled if not e.profile_is_stale(now, pht.stale_after_s)]
    stale = [
        f"{e.model}@{e.depth}" for e in profiled if e.profile_is_stale(now, pht.stale_after_s)
    ]
    if not fresh:
        return ProfileLookup(None, stale)
    full = [e for e in fresh if e.depth == candidate.num_layers]
    return ProfileLookup(full[0] if full else fresh[-1], stale)


def exit_evidence(
    candidate: CandidateInfo, entry: PHTEntry | None, config: PolicyConfig, depth: int
) -> Evidence:
    """What is known about greedy exit at ``depth``: the PHT's numbers when it has enough samples
    there, the exit card's priors for whatever it lacks."""
    if depth == candidate.num_layers:
        return Evidence(1.0, 1.0, 0.0, "full", 0.0)
    share = agreement = ppl = None
    source: EvidenceSource = "none"
    stats = entry.exits.get(depth) if entry is not None and depth <= entry.depth else None
    if entry is not None and stats is not None and stats.tokens >= config.min_samples:
        source = "pht"
        if abs(entry.threshold - config.confidence_threshold) < 1e-12:
            share = entry.exit_share(depth)
        agreement = stats.agreement
        ppl = entry.ppl_increase(depth)
    prior = candidate.exit_prior.get(depth)
    drop = prior.pass_at_1_drop if prior is not None else None
    if prior is not None:
        if agreement is None:
            agreement = prior.agreement
            source = "prior" if source == "none" else source
        if share is None:
            # A token confident at any exit <= depth exits by depth, so the best single-exit
            # coverage is a lower bound of the cumulative share.
            coverages = [
                cov
                for d, p in candidate.exit_prior.items()
                if d <= depth and (cov := p.coverage_at(config.confidence_threshold)) is not None
            ]
            if coverages:
                share = max(coverages)
                source = "prior" if source == "none" else source
    return Evidence(share, agreement, ppl, source, drop)


def accuracy_guard(
    evidence: Evidence,
    config: PolicyConfig,
    *,
    need_share: bool,
    optimistic: bool,
) -> GuardVerdict:
    """Whether greedy exit may be used at a depth with this evidence, and why (not)."""
    share, agreement, ppl = evidence.share, evidence.agreement, evidence.ppl_increase
    drop = evidence.pass_at_1_drop
    if config.guard_metric == "pass_at_1":
        if drop is None:
            if not optimistic:
                return GuardVerdict(False, "pass@1 at this depth not measured (eval-exits --update-card)")
        elif drop > config.max_pass_at_1_drop + 1e-12:
            return GuardVerdict(
                False, f"pass@1 drop {drop:.3f} > max_pass_at_1_drop {config.max_pass_at_1_drop}"
            )
    elif agreement is None:
        if not optimistic:
            return GuardVerdict(False, "agreement with the full model unknown")
    elif agreement < config.min_agreement:
        return GuardVerdict(
            False, f"agreement {agreement:.3f} < min_agreement {config.min_agreement}"
        )
    if ppl is not None and ppl > config.max_ppl_increase:
        return GuardVerdict(
            False, f"perplexity +{ppl:.1%} > max_ppl_increase {config.max_ppl_increase:.0%}"
        )
    if need_share:
        if share is None:
            if not optimistic:
                return GuardVerdict(False, "exit share unknown")
        elif share < config.exit_share:
            return GuardVerdict(False, f"exit share {share:.3f} < exit_share {config.exit_share}")
    return GuardVerdict(True, "guard holds")


def choose_depth(
    candidate: CandidateInfo,
    pht_entry: PHTEntry | None,
    config: PolicyConfig,
    *,
    optimistic: bool = False,
    gate: QualityGate | None = None,
) -> DepthChoice:
    """The smallest exit depth D where at least ``exit_share`` of tokens exit confidently at or
    before D and the accuracy guard holds (agreement >= min_agreement, perplexity increase <=
    max_ppl_increase when known); the full depth otherwise (always safe: it *is* the full model).

    Evidence comes from the PHT entry when it has enough samples at D, else the exit card priors.
    ``optimistic=True`` treats unknown evidence as passing (used to shortlist what is worth
    profiling); known evidence must still pass.  ``gate``: a truncated depth must also meet the quality floors
    of the traffic it would serve (measured per depth; unmeasured never passes), so truncation never buys speed
    below a floor.  The full depth is returned whatever the gate says: whether the *model* meets the floors is
    the caller's comparison across candidates.
    """
    rejected: list[str] = []
    for depth in candidate.exits:
        evidence = exit_evidence(candidate, pht_entry, config, depth)
        if evidence.source == "full":
            why = "; ".join(rejected) if rejected else "no shallower exit"
            return _depth_choice(
                candidate, depth, evidence, f"full depth {depth} (always safe): {why}"
            )
        verdict = accuracy_guard(evidence, config, need_share=True, optimistic=optimistic)
        if verdict.ok and gate is not None:
            quality = gate.check(candidate, depth)
            if not quality.ok:
                rejected.append(f"{depth}: quality {quality.describe()}")
                continue
        if verdict.ok:
            parts = [f"smallest exit meeting the guard ({evidence.source} evidence"]
            if evidence.share is not None:
                parts.append(f", {evidence.share:.0%} of tokens exit by {depth}")
            if evidence.agreement is not None:
                parts.append(f", agreement {evidence.agreement:.3f}")
            if evidence.ppl_increase is not None:
                parts.append(f", perplexity {evidence.ppl_increase:+.1%}")
            if config.guard_metric == "pass_at_1" and evidence.pass_at_1_drop is not None:
                parts.append(f", pass@1 drop {evidence.pass_at_1_drop:+.3f}")
            return _depth_choice(candidate, depth, evidence, "".join(parts) + ")")
        rejected.append(f"{depth}: {verdict.reason}")
    raise AssertionError("unreachable: the full depth is always an exit")  # pragma: no cover


def evaluate_depth(
    candidate: CandidateInfo, entry: PHTEntry | None, config: PolicyConfig, depth: int
) -> DepthChoice:
    """``depth`` as it is, with its evidence and whether the guard (still) holds there: how the
    controller judges the placement it is already serving rather than picking a new one."""
    evidence = exit_evidence(candidate, entry, config, depth)
    verdict = accuracy_guard(evidence, config, need_share=True, optimistic=False)
    reason = verdict.reason if verdict.ok else f"guard fails: {verdict.reason}"
    return _depth_choice(candidate, depth, evidence, reason, guard_ok=verdict.ok)


def _depth_choice(
    candidate: CandidateInfo,
    depth: int,
    evidence: Evidence,
    reason: str,
    *,
    guard_ok: bool = True,
) -> DepthChoice:
    return DepthChoice(
        model=candidate.name,
        depth=depth,
        exit_share=evidence.share,
        agreement=evidence.agreement,
        ppl_increase=evidence.ppl_increase,
        evidence=evidence.source,
        reason=reason,
        guard_ok=guard_ok,
    )


