"""The HELIOS policy: shortlist what to profile, choose the (model, depth) that best serves an SLO.

Pure functions of (candidates, SLO, hardware, PHT, config): no I/O, no clocks except the PHT's
injected one, deterministic (ties go to the lexicographically smaller name). Every outcome is a
:class:`~helios_ray.control.decision.Decision` carrying the numbers that justified it, so the router
can log it, export it and a human can audit it. Costs are in :mod:`.costs`, the per-model depth
and its accuracy guard in :mod:`.depth`, the answer to a breach storm in :mod:`.storm`
(``docs/control-plane.md`` has the long form).

Scores (higher is better): throughput ``beff(D) / spt(D)`` tokens/s, latency ``-spt(D)``, energy
``-J/token`` (measured at R, scaled by the cost ratio), batch_size ``batch(D)``. When any compared
candidate lacks a fresh measurement the whole comparison falls back to the static proxies
(``spt ~ cost``, ``J/token ~ cost``) so measured and unmeasured numbers are never mixed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

from .config import SLO, CandidateInfo, Hardware, PolicyConfig
from .costs import (
    CostUnit,
    cost_unit,
    effective_batch,
    max_batch,
    measured_per_token,
    token_cost,
)
from .decision import Decision, DepthChoice, Estimate, NoFeasiblePlacement, Number
from .depth import choose_depth, profile_entry
from .pht import PHT
from .quality import QualityGate, QualityVerdict

__all__ = [
    "score_placements",
    "evaluate_candidates",
    "shortlist",
    "estimate_numbers",
    "choose",
]


class _Scored(NamedTuple):
    """One placement's inputs to scoring, gathered before the measured-vs-static basis is known."""

    cand: CandidateInfo
    choice: DepthChoice
    batch: int
    spt: float | None
    energy: float | None
    cost: float
    stale: list[str]


def score_placements(
    placements: Sequence[tuple[CandidateInfo, DepthChoice]],
    slo: SLO | str,
    hardware: Hardware,
    pht: PHT | None,
    config: PolicyConfig,
    *,
    unit: CostUnit | None = None,
) -> list[Estimate]:
    """Score (candidate, depth) pairs for the SLO, best first (ties: by name, then depth).

    Measured numbers are used only when every fitting placement has them (see module docstring).
    """
    slo = SLO(slo)
    unit = unit or cost_unit([c for c, _ in placements])
    raw: list[_Scored] = []
    for cand, choice in placements:
        depth = choice.depth
        batch = max_batch(cand, depth, hardware, config)
        measured_cost = measured_per_token(cand, depth, pht, hardware, config, unit)
        stale: list[str] = []
        if pht is not None:
            now = pht.now()
            stale = [
                f"{e.model}@{e.depth}"
                for e in pht.for_model(cand.name, include_stale=True)
                if e.is_stale(now, pht.stale_after_s)
            ]
            stale += [s for s in profile_entry(pht, cand).stale if s not in stale]
        raw.append(
            _Scored(
                cand,
                choice,
                batch,
                measured_cost.seconds,
                measured_cost.energy_j,
                token_cost(cand, depth, unit),
                stale,
            )
        )
    fitting = [r for r in raw if r.batch >= 1]
    if slo == SLO.ENERGY:
        measured = bool(fitting) and all(r.energy is not None for r in fitting)
    else:
        measured = bool(fitting) and all(r.spt is not None for r in fitting)
    basis: Literal["measured", "static"] = "measured" if measured else "static"

    estimates = []
    for r in raw:
        beff = effective_batch(r.batch, config)
        per_token = r.spt if measured else r.cost
        if slo == SLO.THROUGHPUT:
            score = beff / per_token if per_token and per_token > 0 else math.inf
        elif slo == SLO.LATENCY:
            score = -per_token
        elif slo == SLO.ENERGY:
            score = -(r.energy if measured and r.energy is not None else r.cost)
        else:
            score = float(r.batch)
        if r.batch < 1:
            score = -math.inf
        estimates.append(
            Estimate(
                model=r.cand.name,
                depth=r.choice.depth,
                fits=r.batch >= 1,
                batch=r.batch,
                weight_bytes=r.cand.weight_bytes(r.choice.depth),
                cost=r.cost,
                cost_unit=unit,
                seconds_per_token=r.spt,
                tokens_per_s=(beff / r.spt) if r.spt else None,
                energy_j_per_token=r.energy,
                basis=basis,
                score=score,
                choice=r.choice,
                stale=r.stale,
            )
        )
    estimates.sort(key=lambda e: (-e.score, e.model, e.depth))
    return estimates


def evaluate_candidates(
    candidates: Sequence[CandidateInfo],
    slo: SLO | str,
    hardware: Hardware,
    pht: PHT | None,
    config: PolicyConfig,
    *,
    optimistic: bool = False,
    gate: QualityGate | None = None,
) -> list[Estimate]:
    """Each candidate at its chosen depth (:func:`choose_depth`, under the quality ``gate``), scored and sorted
    best first."""
    placements = []
    for cand in candidates:
        entry = profile_entry(pht, cand).entry
        placements.append((cand, choose_depth(cand, entry, config, optimistic=optimistic, gate=gate)))
    return score_placements(placements, slo, hardware, pht, config)


def quality_first(
    ranked: Sequence[Estimate], candidates: Sequence[CandidateInfo], gate: QualityGate | None
) -> tuple[list[Estimate], dict[str, QualityVerdict]]:
    """``ranked`` reordered so that placements meeting the quality floors come first (best score first among
    them), then the near misses by how little traffic and quality they miss, then by score: quality first, then
    speed.  Without a gate (or floors) the order is unchanged."""
    if gate is None:
        return list(ranked), {}
    by_name = {c.name: c for c in candidates}
    verdicts = {e.key: gate.check(by_name[e.model], e.depth) for e in ranked}
    order = sorted(range(len(ranked)), key=lambda i: (not verdicts[ranked[i].key].ok,
                                                      verdicts[ranked[i].key].failed_share,
                                                      verdicts[ranked[i].key].deficit, i))
    return [ranked[i] for i in order], verdicts


def shortlist(
    candidates: Sequence[CandidateInfo],
    slo: SLO | str,
    hardware: Hardware,
    pht: PHT | None,
    config: PolicyConfig,
    *,
    gate: QualityGate | None = None,
) -> list[CandidateInfo]:
    """Top-K candidates worth profiling for this SLO and hardware.

    Each is scored at its *minimum useful depth*: the smallest exit that the evidence does not rule
    out (unknown evidence counts as possible: this is what profiling is for). Candidates whose
    weights at that depth leave no room for one sequence are excluded. Ties go to the smaller name.
    Candidates that meet the quality floors come before those that do not (profiling a model the floors
    exclude is wasted while another could be chosen).
    """
    by_name = {c.name: c for c in candidates}
    ranked = evaluate_candidates(candidates, slo, hardware, pht, config, optimistic=True, gate=gate)
    ranked, _ = quality_first(ranked, candidates, gate)
    return [by_name[e.model] for e in ranked if e.fits][: config.top_k]


def _fmt_score(slo: SLO, estimate: Estimate) -> str:
    if estimate.basis == "measured":
        if slo == SLO.THROUGHPUT:
            return f"{estimate.score:.4g} tok/s"
        if slo == SLO.LATENCY:
            return f"{-estimate.score * 1e3:.4g} ms/token"
        if slo == SLO.ENERGY:
            return f"{-estimate.score:.4g} J/token"
    if slo == SLO.BATCH_SIZE:
        return f"{estimate.batch} sequences"
    formula = "batch/cost" if slo == SLO.THROUGHPUT else "-cost"
    return f"{estimate.score:.4g} (static {formula}, cost in {estimate.cost_unit})"


def estimate_numbers(est: Estimate, prefix: str = "") -> dict[str, Number]:
    """An estimate flattened into a decision's ``numbers`` (the audit trail of why it won)."""
    return {
        f"{prefix}score": est.score,
        f"{prefix}basis": est.basis,
        f"{prefix}cost": est.cost,
        f"{prefix}cost_unit": est.cost_unit,
        f"{prefix}batch": est.batch,
        f"{prefix}weight_bytes": est.weight_bytes,
        f"{prefix}tokens_per_s": est.tokens_per_s,
        f"{prefix}seconds_per_token": est.seconds_per_token,
        f"{prefix}energy_j_per_token": est.energy_j_per_token,
        f"{prefix}exit_share": est.choice.exit_share,
        f"{prefix}agreement": est.choice.agreement,
        f"{prefix}ppl_increase": est.choice.ppl_increase,
        f"{prefix}evidence": est.choice.evidence,
    }


def choose(
    candidates: Sequence[CandidateInfo],
    slo: SLO | str,
    hardware: Hardware,
    pht: PHT | None,
    config: PolicyConfig,
    *,
    gate: QualityGate | None = None,
) -> Decision:
    """The best (model, depth) for the SLO under the accuracy guard, as a ``deploy`` decision: among the
    placements that meet the quality ``gate`` (the floors of the classes the traffic holds), the best score; when
    none meets it, the one that misses the least (traffic share, then quality deficit), said in the reason.

    Raises :class:`NoFeasiblePlacement` when no candidate fits the memory budget.
    """
    slo = SLO(slo)
    ranked = evaluate_candidates(candidates, slo, hardware, pht, config, gate=gate)
    ranked, verdicts = quality_first(ranked, candidates, gate)
    feasible = [e for e in ranked if e.fits]
    if not feasible:
        raise NoFeasiblePlacement(
            f"no candidate fits the memory budget of {hardware.memory_budget_bytes} bytes at a "
            f"depth the accuracy guard allows (candidates: {', '.join(c.name for c in candidates)})"
        )
    best = feasible[0]
    numbers = estimate_numbers(best)
    numbers["candidates_considered"] = len(ranked)
    numbers["candidates_fitting"] = len(feasible)
    verdict = verdicts.get(best.key)
    if verdict is not None:
        for cls, value in verdict.values.items():
            numbers[f"quality_{cls}"] = value
        for cls, floor in (gate.floors if gate else {}).items():
            numbers[f"floor_{cls}"] = floor.value
        numbers["meets_floors"] = verdict.ok
        numbers["candidates_meeting_floors"] = sum(1 for e in feasible if verdicts[e.key].ok)
    stale = sorted({s for e in ranked for s in e.stale})
    if stale:
        numbers["stale_ignored"] = ",".join(stale)
    reason = f"{slo.value}: {best.key} scores {_fmt_score(slo, best)}"
    if verdict is not None:
        reason = (f"quality: {best.key} {verdict.describe()}; " if verdict.ok else
                  f"quality: no placement meets the floors, {best.key} misses the least ({verdict.describe()}); "
                  ) + reason
    if len(feasible) > 1:
        runner = feasible[1]
        numbers["runner_up"] = runner.key
        numbers["runner_up_score"] = runner.score
        reason += f", ahead of {runner.key} at {_fmt_score(slo, runner)}"
    reason += f"; depth: {best.choice.reason}"
    if stale:
        reason += f"; ignored stale history {', '.join(stale)}"
    return Decision(
        action="deploy",
        model=best.model,
        depth=best.depth,
        trigger="plan",
        reason=reason,
        slo=slo,
        batch_size=effective_batch(best.batch, config),
        numbers=numbers,
    )
