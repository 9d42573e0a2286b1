"""The HELIOS policy: shortlist, choose (model, depth) per SLO, extend-vs-switch on a breach storm.

Pure functions of (candidates, SLO, hardware, PHT, config): no I/O, no clocks except the PHT's
injected one, deterministic (ties go to the lexicographically smaller name). Every outcome is a
:class:`Decision` record carrying the numbers that justified it, so the router can log it, export
it and a human can audit it.

Formulas (``docs/control-plane.md`` has the long form):

* ``cost(c, D)`` -- per-token work at depth D in one unit shared by all compared candidates:
  ``D * flops_per_token_per_layer + head_flops_per_token`` when every candidate has FLOPs, else the
  weight bytes streamed per decode step ``D * layer_bytes + head_bytes (+ exit head)`` when every
  candidate has byte sizes, else ``D`` (equal cost per layer).
* ``batch(c, D) = floor((budget - weight_bytes(D)) / (kv_bytes_per_token(D) * typical_seq_len))``,
  and ``beff = clamp(batch, 1, max_batch)``.
* ``spt(c, D)`` -- seconds per token of one sequence: from the freshest PHT timing of the model at
  depth R (TPOT, else single-stream speed, else engine tokens/s / beff(R)) scaled by
  ``cost(D) / cost(R)``.
* Scores (higher is better): throughput ``beff(D) / spt(D)`` tokens/s, latency ``-spt(D)``,
  energy ``-J/token`` (measured at R, scaled by the cost ratio), batch_size ``batch(D)``. When any
  compared candidate lacks a fresh measurement the whole comparison falls back to the static
  proxies (``spt ~ cost``, ``J/token ~ cost``) so measured and unmeasured numbers are never mixed.
* Storm: ``extend`` costs ``(D' - D) * load_s + horizon * D' * layer_s``; ``switch`` to c at its
  own depth Dc costs ``switch_s(c) + Dc * load_s(c) + horizon * Dc * layer_s(c)``; the cheaper wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import SLO, CandidateInfo, Hardware, PolicyConfig
from .telemetry import PHT, PHTEntry

__all__ = [
    "Action",
    "Trigger",
    "CostModel",
    "DepthChoice",
    "Estimate",
    "Decision",
    "NoFeasiblePlacement",
    "cost_unit",
    "token_cost",
    "max_batch",
    "profile_entry",
    "choose_depth",
    "score_placements",
    "evaluate_candidates",
    "shortlist",
    "choose",
    "on_storm",
]

Action = Literal["deploy", "extend", "switch", "keep"]
Trigger = Literal["start", "profile", "reassess", "storm", "slo_change", "hardware_change", "plan"]
CostUnit = Literal["flops", "bytes", "layers"]
Number = float | int | str | bool | None


class NoFeasiblePlacement(ValueError):
    """No candidate fits the memory budget at any depth the accuracy guard allows."""


class CostModel(BaseModel):
    """Measured (or assumed) costs of changing the placement, for extend-vs-switch.

    Per-model values win; otherwise the candidate's own ``load_seconds_per_layer``; otherwise the
    defaults, which are rough CPU figures from DESIGN.md (SmolLM2: ~60 ms/token over 30 layers ->
    ~2 ms per layer-token).
    """

    model_config = ConfigDict(extra="forbid")

    horizon_tokens: int = Field(
        2000, ge=0, description="Tokens over which the new placement's per-token cost is counted."
    )
    load_seconds_per_layer: dict[str, float] = Field(default_factory=dict)
    switch_seconds: dict[str, float] = Field(
        default_factory=dict,
        description="Fixed cost of switching to a model (drain, embed/head load), per target model.",
    )
    seconds_per_layer_token: dict[str, float] = Field(
        default_factory=dict, description="Per-layer compute time of one token, per model."
    )
    default_load_seconds_per_layer: float = Field(0.05, ge=0.0)
    default_switch_seconds: float = Field(2.0, ge=0.0)
    default_seconds_per_layer_token: float = Field(0.002, gt=0.0)

    def load_seconds(self, candidate: CandidateInfo) -> float:
        if candidate.name in self.load_seconds_per_layer:
            return self.load_seconds_per_layer[candidate.name]
        if candidate.load_seconds_per_layer is not None:
            return candidate.load_seconds_per_layer
        return self.default_load_seconds_per_layer

    def switch_cost(self, candidate: CandidateInfo) -> float:
        return self.switch_seconds.get(candidate.name, self.default_switch_seconds)


class DepthChoice(BaseModel):
    """A depth with the evidence that allowed it."""

    model: str
    depth: int
    exit_share: float | None
    agreement: float | None
    ppl_increase: float | None
    evidence: Literal["pht", "prior", "none", "full"]
    reason: str
    guard_ok: bool = True
    """False only for a depth evaluated as-is (the current placement) whose guard no longer holds."""


class Estimate(BaseModel):
    """One (model, depth) scored for an SLO."""

    model: str
    depth: int
    fits: bool
    batch: int
    weight_bytes: int
    cost: float
    cost_unit: CostUnit
    seconds_per_token: float | None
    tokens_per_s: float | None
    energy_j_per_token: float | None
    basis: Literal["measured", "static"]
    score: float
    choice: DepthChoice
    stale: list[str] = Field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.model}@{self.depth}"


class Decision(BaseModel):
    """One decision of the control loop, with the numbers that justified it."""

    action: Action
    model: str | None
    depth: int | None
    trigger: Trigger = "plan"
    reason: str
    slo: SLO | None = None
    previous_model: str | None = None
    previous_depth: int | None = None
    batch_size: int | None = Field(None, description="Max concurrent sequences at the placement.")
    token_index: int | None = Field(None, description="Served tokens observed before it.")
    request_index: int | None = Field(None, description="Requests completed before it.")
    request: int | None = Field(None, description="Request id whose token triggered it.")
    pos: int | None = Field(None, description="Position of that token in its request.")
    numbers: dict[str, Number] = Field(default_factory=dict)

    @property
    def changes_placement(self) -> bool:
        return self.action != "keep" and (
            (self.model, self.depth) != (self.previous_model, self.previous_depth)
        )


# --------------------------------------------------------------------------- static costs
def cost_unit(candidates: Sequence[CandidateInfo]) -> CostUnit:
    """The most specific cost unit every candidate can express (so costs are comparable)."""
    if candidates and all(c.flops_per_token_per_layer is not None for c in candidates):
        return "flops"
    if candidates and all(c.layer_bytes > 0 for c in candidates):
        return "bytes"
    return "layers"


def token_cost(candidate: CandidateInfo, depth: int, unit: CostUnit) -> float:
    """Per-token decode work of ``candidate`` loaded to ``depth`` (see module docstring)."""
    if unit == "flops":
        return float(
            depth * (candidate.flops_per_token_per_layer or 0) + (candidate.head_flops_per_token or 0)
        )
    if unit == "bytes":
        exit_head = candidate.exit_head_bytes if depth < candidate.num_layers else 0
        return float(depth * candidate.layer_bytes + candidate.head_bytes + exit_head)
    return float(depth)


def max_batch(
    candidate: CandidateInfo, depth: int, hardware: Hardware, config: PolicyConfig
) -> int:
    """Concurrent sequences of ``typical_seq_len`` tokens that fit next to the weights (uncapped;
    0 when the weights alone overflow the budget; ``max_batch`` when KV size is unknown)."""
    free = hardware.memory_budget_bytes - candidate.weight_bytes(depth)
    if free < 0:
        return 0
    per_seq = candidate.kv_bytes_per_token(depth) * config.typical_seq_len
    if per_seq <= 0:
        return config.max_batch
    return free // per_seq


def _beff(batch: int, config: PolicyConfig) -> int:
    return max(1, min(batch, config.max_batch))


# --------------------------------------------------------------------------- evidence
def profile_entry(
    pht: PHT | None, candidate: CandidateInfo
) -> tuple[PHTEntry | None, list[str]]:
    """The PHT entry holding the candidate's fresh exit statistics, and the keys skipped as stale.

    Profile mode loads the full model, so the entry at the full depth is preferred; otherwise the
    deepest entry with per-exit statistics. Freshness is judged on ``profiled_at``: serving timings
    refresh an entry but say nothing about today's exit distribution.
    """
    if pht is None:
        return None, []
    now = pht.now()
    profiled = [e for e in pht.for_model(candidate.name, include_stale=True) if e.exits]
    fresh = [e for e in profiled if not e.profile_is_stale(now, pht.stale_after_s)]
    stale = [
        f"{e.model}@{e.depth}" for e in profiled if e.profile_is_stale(now, pht.stale_after_s)
    ]
    if not fresh:
        return None, stale
    full = [e for e in fresh if e.depth == candidate.num_layers]
    return (full[0] if full else fresh[-1]), stale


def _evidence(
    candidate: CandidateInfo, entry: PHTEntry | None, config: PolicyConfig, depth: int
) -> tuple[float | None, float | None, float | None, Literal["pht", "prior", "none", "full"]]:
    """(exit_share, agreement, ppl_increase, source) for greedy exit at ``depth``."""
    if depth == candidate.num_layers:
        return 1.0, 1.0, 0.0, "full"
    share = agreement = ppl = None
    source: Literal["pht", "prior", "none", "full"] = "none"
    stats = entry.exits.get(depth) if entry is not None and depth <= entry.depth else None
    if entry is not None and stats is not None and stats.tokens >= config.min_samples:
        source = "pht"
        if abs(entry.threshold - config.confidence_threshold) < 1e-12:
            share = entry.exit_share(depth)
        agreement = stats.agreement
        ppl = entry.ppl_increase(depth)
    prior = candidate.exit_prior.get(depth)
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
    return share, agreement, ppl, source


def _guard(
    share: float | None,
    agreement: float | None,
    ppl: float | None,
    config: PolicyConfig,
    *,
    need_share: bool,
    optimistic: bool,
) -> tuple[bool, str]:
    """Whether greedy exit may be used at a depth with this evidence, and why (not)."""
    if agreement is None:
        if not optimistic:
            return False, "agreement with the full model unknown"
    elif agreement < config.min_agreement:
        return False, f"agreement {agreement:.3f} < min_agreement {config.min_agreement}"
    if ppl is not None and ppl > config.max_ppl_increase:
        return False, f"perplexity +{ppl:.1%} > max_ppl_increase {config.max_ppl_increase:.0%}"
    if need_share:
        if share is None:
            if not optimistic:
                return False, "exit share unknown"
        elif share < config.exit_share:
            return False, f"exit share {share:.3f} < exit_share {config.exit_share}"
    return True, "guard holds"


def choose_depth(
    candidate: CandidateInfo,
    pht_entry: PHTEntry | None,
    config: PolicyConfig,
    *,
    optimistic: bool = False,
) -> DepthChoice:
    """The smallest exit depth D where at least ``exit_share`` of tokens exit confidently at or
    before D and the accuracy guard holds (agreement >= min_agreement, perplexity increase <=
    max_ppl_increase when known); the full depth otherwise (always safe: it *is* the full model).

    Evidence comes from the PHT entry when it has enough samples at D, else the exit card priors.
    ``optimistic=True`` treats unknown evidence as passing (used to shortlist what is worth
    profiling); known evidence must still pass.
    """
    rejected: list[str] = []
    for depth in candidate.exits:
        share, agreement, ppl, source = _evidence(candidate, pht_entry, config, depth)
        if source == "full":
            why = "; ".join(rejected) if rejected else "no shallower exit"
            return DepthChoice(
                model=candidate.name,
                depth=depth,
                exit_share=1.0,
                agreement=1.0,
                ppl_increase=0.0,
                evidence="full",
                reason=f"full depth {depth} (always safe): {why}",
            )
        ok, why = _guard(share, agreement, ppl, config, need_share=True, optimistic=optimistic)
        if ok:
            parts = [f"smallest exit meeting the guard ({source} evidence"]
            if share is not None:
                parts.append(f", {share:.0%} of tokens exit by {depth}")
            if agreement is not None:
                parts.append(f", agreement {agreement:.3f}")
            if ppl is not None:
                parts.append(f", perplexity {ppl:+.1%}")
            return DepthChoice(
                model=candidate.name,
                depth=depth,
                exit_share=share,
                agreement=agreement,
                ppl_increase=ppl,
                evidence=source,
                reason="".join(parts) + ")",
            )
        rejected.append(f"{depth}: {why}")
    raise AssertionError("unreachable: the full depth is always an exit")  # pragma: no cover


def _depth_evidence_choice(
    candidate: CandidateInfo, entry: PHTEntry | None, config: PolicyConfig, depth: int
) -> DepthChoice:
    share, agreement, ppl, source = _evidence(candidate, entry, config, depth)
    ok, why = _guard(share, agreement, ppl, config, need_share=True, optimistic=False)
    return DepthChoice(
        model=candidate.name,
        depth=depth,
        exit_share=share,
        agreement=agreement,
        ppl_increase=ppl,
        evidence=source,
        reason=why if ok else f"guard fails: {why}",
        guard_ok=ok,
    )


# --------------------------------------------------------------------------- measurements
def _seconds_per_token(
    candidate: CandidateInfo,
    depth: int,
    pht: PHT | None,
    hardware: Hardware,
    config: PolicyConfig,
    unit: CostUnit,
) -> tuple[float | None, float | None]:
    """(seconds per token of one sequence, J per token) at ``depth`` from fresh PHT timings,
    scaled from the nearest measured depth by the cost ratio; ``None`` where unmeasured."""
    if pht is None:
        return None, None
    entries = pht.for_model(candidate.name)
    # Prefer the measurement at this depth, then the full depth, then the deepest one.
    order = sorted(
        (e for e in entries if e.depth <= candidate.num_layers),
        key=lambda e: (e.depth != depth, e.depth != candidate.num_layers, -e.depth),
    )
    spt = energy = None
    for entry in order:
        scale = token_cost(candidate, depth, unit) / max(
            token_cost(candidate, entry.depth, unit), 1e-300
        )
        if spt is None:
            ref: float | None = None
            if entry.tpot.count:
                ref = entry.tpot.mean
            elif entry.stream_tokens_per_s:
                ref = 1.0 / entry.stream_tokens_per_s
            elif entry.measured_tokens_per_s:
                batch = max_batch(candidate, entry.depth, hardware, config)
                ref = _beff(batch, config) / entry.measured_tokens_per_s
            if ref is not None:
                spt = ref * scale
        if energy is None and entry.energy_per_token is not None:
            energy = entry.energy_per_token * scale
    return spt, energy


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
    raw = []
    for cand, choice in placements:
        depth = choice.depth
        batch = max_batch(cand, depth, hardware, config)
        spt, energy = _seconds_per_token(cand, depth, pht, hardware, config, unit)
        stale: list[str] = []
        if pht is not None:
            now = pht.now()
            stale = [
                f"{e.model}@{e.depth}"
                for e in pht.for_model(cand.name, include_stale=True)
                if e.is_stale(now, pht.stale_after_s)
            ]
            stale += [s for s in profile_entry(pht, cand)[1] if s not in stale]
        raw.append((cand, choice, batch, spt, energy, token_cost(cand, depth, unit), stale))
    fitting = [r for r in raw if r[2] >= 1]
    if slo == SLO.ENERGY:
        measured = bool(fitting) and all(r[4] is not None for r in fitting)
    else:
        measured = bool(fitting) and all(r[3] is not None for r in fitting)
    basis: Literal["measured", "static"] = "measured" if measured else "static"

    estimates = []
    for cand, choice, batch, spt, energy, cost, stale in raw:
        beff = _beff(batch, config)
        per_token = spt if measured else cost
        if slo == SLO.THROUGHPUT:
            score = beff / per_token if per_token and per_token > 0 else math.inf
        elif slo == SLO.LATENCY:
            score = -per_token
        elif slo == SLO.ENERGY:
            score = -(energy if measured and energy is not None else cost)
        else:
            score = float(batch)
        if batch < 1:
            score = -math.inf
        estimates.append(
            Estimate(
                model=cand.name,
                depth=choice.depth,
                fits=batch >= 1,
                batch=batch,
                weight_bytes=cand.weight_bytes(choice.depth),
                cost=cost,
                cost_unit=unit,
                seconds_per_token=spt,
                tokens_per_s=(beff / spt) if spt else None,
                energy_j_per_token=energy,
                basis=basis,
                score=score,
                choice=choice,
                stale=stale,
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
) -> list[Estimate]:
    """Each candidate at its chosen depth (:func:`choose_depth`), scored and sorted best first."""
    placements = []
    for cand in candidates:
        entry, _ = profile_entry(pht, cand)
        placements.append((cand, choose_depth(cand, entry, config, optimistic=optimistic)))
    return score_placements(placements, slo, hardware, pht, config)


def shortlist(
    candidates: Sequence[CandidateInfo],
    slo: SLO | str,
    hardware: Hardware,
    pht: PHT | None,
    config: PolicyConfig,
) -> list[CandidateInfo]:
    """Top-K candidates worth profiling for this SLO and hardware.

    Each is scored at its *minimum useful depth*: the smallest exit that the evidence does not rule
    out (unknown evidence counts as possible: this is what profiling is for). Candidates whose
    weights at that depth leave no room for one sequence are excluded. Ties go to the smaller name.
    """
    by_name = {c.name: c for c in candidates}
    ranked = evaluate_candidates(candidates, slo, hardware, pht, config, optimistic=True)
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


def _estimate_numbers(est: Estimate, prefix: str = "") -> dict[str, Number]:
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
) -> Decision:
    """The best (model, depth) for the SLO under the accuracy guard, as a ``deploy`` decision.

    Raises :class:`NoFeasiblePlacement` when no candidate fits the memory budget.
    """
    slo = SLO(slo)
    ranked = evaluate_candidates(candidates, slo, hardware, pht, config)
    feasible = [e for e in ranked if e.fits]
    if not feasible:
        raise NoFeasiblePlacement(
            f"no candidate fits the memory budget of {hardware.memory_budget_bytes} bytes at a "
            f"depth the accuracy guard allows (candidates: {', '.join(c.name for c in candidates)})"
        )
    best = feasible[0]
    numbers = _estimate_numbers(best)
    numbers["candidates_considered"] = len(ranked)
    numbers["candidates_fitting"] = len(feasible)
    stale = sorted({s for e in ranked for s in e.stale})
    if stale:
        numbers["stale_ignored"] = ",".join(stale)
    reason = f"{slo.value}: {best.key} scores {_fmt_score(slo, best)}"
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
        batch_size=_beff(best.batch, config),
        numbers=numbers,
    )


# --------------------------------------------------------------------------- storms
def _seconds_per_layer(
    candidate: CandidateInfo, pht: PHT | None, costs: CostModel
) -> tuple[float, str]:
    """Per-layer compute seconds of one token: the cost model's, else measured at the full depth
    (TPOT / layers, so the head's share is spread over the layers), else the default."""
    if candidate.name in costs.seconds_per_layer_token:
        return costs.seconds_per_layer_token[candidate.name], "cost model"
    if pht is not None:
        for entry in sorted(
            pht.for_model(candidate.name),
            key=lambda e: (e.depth != candidate.num_layers, -e.depth),
        ):
            if entry.tpot.count and entry.tpot.mean:
                return entry.tpot.mean / entry.depth, "measured TPOT"
            if entry.stream_tokens_per_s:
                return 1.0 / entry.stream_tokens_per_s / entry.depth, "measured tokens/s"
    return costs.default_seconds_per_layer_token, "default"


def on_storm(
    current_model: str,
    current_depth: int,
    candidates: Sequence[CandidateInfo],
    pht: PHT | None,
    measured_costs: CostModel | None,
    config: PolicyConfig,
    *,
    hardware: Hardware | None = None,
    breach_rate: float | None = None,
) -> Decision:
    """Answer a breach storm with the cheaper of *extend* and *switch* (or *keep*).

    * extend: the next exit deeper than ``current_depth`` of the same model whose accuracy guard
      holds (the full depth always does); cost ``(D' - D) * load_s + horizon * D' * layer_s``.
    * switch: every other candidate at its own :func:`choose_depth`; cost
      ``switch_s + Dc * load_s + horizon * Dc * layer_s``. When the current model is already at full
      depth a switch target must also be *better*: its profiled share of confident tokens at Dc has
      to exceed the confident share observed now (``1 - breach_rate``).
    * keep: nothing qualifies (full depth and no better candidate).

    ``hardware``, when given, excludes placements that do not fit the memory budget.
    """
    costs = measured_costs or CostModel()
    by_name = {c.name: c for c in candidates}
    if current_model not in by_name:
        raise ValueError(f"current model {current_model!r} is not among the candidates")
    current = by_name[current_model]
    if breach_rate is None:
        breach_rate = (config.breach_limit + 1) / config.breach_window
    observed_confident = 1.0 - breach_rate

    def fits(cand: CandidateInfo, depth: int) -> bool:
        return hardware is None or max_batch(cand, depth, hardware, config) >= 1

    numbers: dict[str, Number] = {
        "horizon_tokens": costs.horizon_tokens,
        "breach_rate": breach_rate,
    }
    options: list[tuple[float, int, str, int, str]] = []  # (cost, kind, model, depth, detail)

    entry, _ = profile_entry(pht, current)
    layer_s, layer_src = _seconds_per_layer(current, pht, costs)
    skipped: list[str] = []
    for depth in current.exits_above(current_depth):
        share, agreement, ppl, source = _evidence(current, entry, config, depth)
        ok, why = _guard(share, agreement, ppl, config, need_share=False, optimistic=False)
        if ok and fits(current, depth):
            load = (depth - current_depth) * costs.load_seconds(current)
            run = costs.horizon_tokens * depth * layer_s
            numbers.update(
                extend_depth=depth,
                extend_cost_s=load + run,
                extend_load_s=load,
                extend_run_s=run,
                extend_layer_s=layer_s,
                extend_layer_s_source=layer_src,
                extend_agreement=agreement,
            )
            detail = f"load {depth - current_depth} layers {load:.3g}s + run {run:.3g}s"
            options.append((load + run, 0, current.name, depth, detail))
            break
        skipped.append(f"{depth}: {why if not ok else 'does not fit memory'}")
    if skipped:
        numbers["extend_skipped"] = "; ".join(skipped)

    for cand in sorted(candidates, key=lambda c: c.name):
        if cand.name == current.name:
            continue
        c_entry, _ = profile_entry(pht, cand)
        choice = choose_depth(cand, c_entry, config)
        key = f"switch[{cand.name}@{choice.depth}]"
        if not fits(cand, choice.depth):
            numbers[f"{key}_skipped"] = "does not fit memory"
            continue
        confident = choice.exit_share if choice.depth < cand.num_layers else None
        if choice.depth == cand.num_layers and c_entry is not None:
            stats = c_entry.exits.get(cand.num_layers)
            confident = stats.confident_rate if stats and stats.tokens else None
        # A target whose own profile breaches at storm rate would storm too: switching there only
        # ping-pongs between candidates (seen on real traces at threshold 0.9, where both bundled
        # models breach on >80% of tokens even at full depth).
        storm_rate = config.breach_limit / config.breach_window
        if confident is not None and 1.0 - confident > storm_rate:
            numbers[f"{key}_skipped"] = (
                f"would storm too: profiled breach rate {1.0 - confident:.3f} > {storm_rate:.3f}"
            )
            continue
        if current_depth >= current.num_layers:
            if confident is None or confident <= observed_confident:
                numbers[f"{key}_skipped"] = (
                    f"not better: confident share {confident} vs {observed_confident:.3f} now"
                )
                continue
        c_layer_s, _src = _seconds_per_layer(cand, pht, costs)
        load = costs.switch_cost(cand) + choice.depth * costs.load_seconds(cand)
        run = costs.horizon_tokens * choice.depth * c_layer_s
        numbers[f"{key}_cost_s"] = load + run
        numbers[f"{key}_load_s"] = load
        numbers[f"{key}_run_s"] = run
        detail = f"switch+load {load:.3g}s + run {run:.3g}s"
        options.append((load + run, 1, cand.name, choice.depth, detail))

    if not options:
        why = (
            "already at full depth" if current_depth >= current.num_layers else "no deeper exit fits"
        )
        return Decision(
            action="keep",
            model=current.name,
            depth=current_depth,
            trigger="storm",
            reason=f"breach storm but {why} and no better candidate",
            previous_model=current.name,
            previous_depth=current_depth,
            numbers=numbers,
        )
    options.sort(key=lambda o: (o[0], o[1], o[2]))
    cost, kind, model, depth, detail = options[0]
    action: Action = "extend" if kind == 0 else "switch"
    alternative = next((o for o in options[1:] if o[1] != kind), None)
    reason = f"breach storm: {action} to {model}@{depth} costs {cost:.4g}s ({detail})"
    if alternative is not None:
        alt_action = "extend" if alternative[1] == 0 else "switch"
        reason += f" vs {alt_action} to {alternative[2]}@{alternative[3]} {alternative[0]:.4g}s"
        numbers["alternative_cost_s"] = alternative[0]
    numbers["chosen_cost_s"] = cost
    batch = None
    if hardware is not None:
        batch = _beff(max_batch(by_name[model], depth, hardware, config), config)
    return Decision(
        action=action,
        model=model,
        depth=depth,
        trigger="storm",
        reason=reason,
        previous_model=current.name,
        previous_depth=current_depth,
        batch_size=batch,
        numbers=numbers,
    )


def __getattr__(name: str) -> object:
    """``policy.Controller`` is an alias of :class:`helios_ray.control.controller.Controller` (it
    lives in its own module because it is the only stateful piece)."""
    if name in ("Controller", "Placement"):
        from . import controller

        return getattr(controller, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
