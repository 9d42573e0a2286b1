"""The answer to a breach storm: extend the current model deeper, switch to another one, or keep.

Each option is priced in seconds over a horizon of tokens, so that loading a few more layers and
draining to another model compare in one unit:

* extend costs ``(D' - D) * load_s + horizon * D' * layer_s``;
* switch to c at its own depth Dc costs
  ``switch_s(c) + Dc * load_s(c) + horizon * Dc * layer_s(c)``;

and the cheaper wins. Pure and deterministic like :mod:`.policy`; the numbers behind every option
land in the decision so a storm answer can be audited.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from .config import CandidateInfo, Hardware, PolicyConfig
from .costs import effective_batch, max_batch
from .decision import Decision, Number
from .depth import accuracy_guard, choose_depth, exit_evidence, profile_entry
from .pht import PHT
from .quality import QualityGate

__all__ = ["CostModel", "LayerSeconds", "StormOption", "seconds_per_layer", "on_storm"]

StormAction = Literal["extend", "switch"]


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


class LayerSeconds(NamedTuple):
    """Compute seconds of one token through one layer, and where the figure came from."""

    seconds: float
    source: Literal["cost model", "measured TPOT", "measured tokens/s", "default"]


class StormOption(NamedTuple):
    """One way to answer a storm, priced over the cost model's horizon."""

    action: StormAction
    model: str
    depth: int
    load_s: float
    """One-off: loading the extra layers (extend) or draining and loading the target (switch)."""
    run_s: float
    """Per-token compute of the new placement over the horizon."""
    detail: str

    @property
    def cost_s(self) -> float:
        return self.load_s + self.run_s

    def rank(self) -> tuple[float, int, str]:
        """Cheapest first; on a tie extend (no drain) before switch, then by model name."""
        return (self.cost_s, 0 if self.action == "extend" else 1, self.model)


def seconds_per_layer(candidate: CandidateInfo, pht: PHT | None, costs: CostModel) -> LayerSeconds:
    """Per-layer compute seconds of one token: the cost model's, else measured at the full depth
    (TPOT / layers, so the head's share is spread over the layers), else the default."""
    if candidate.name in costs.seconds_per_layer_token:
        return LayerSeconds(costs.seconds_per_layer_token[candidate.name], "cost model")
    if pht is not None:
        for entry in sorted(
            pht.for_model(candidate.name),
            key=lambda e: (e.depth != candidate.num_layers, -e.depth),
        ):
            if entry.tpot.count and entry.tpot.mean:
                return LayerSeconds(entry.tpot.mean / entry.depth, "measured TPOT")
            if entry.stream_tokens_per_s:
                return LayerSeconds(
                    1.0 / entry.stream_tokens_per_s / entry.depth, "measured tokens/s"
                )
    return LayerSeconds(costs.default_seconds_per_layer_token, "default")


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
    gate: QualityGate | None = None,
) -> Decision:
    """Answer a breach storm with the cheaper of *extend* and *switch* (or *keep*).

    * extend: the next exit deeper than ``current_depth`` of the same model whose accuracy guard
      holds (the full depth always does); cost ``(D' - D) * load_s + horizon * D' * layer_s``.
    * switch: every other candidate at its own :func:`~helios_ray.control.depth.choose_depth`; cost
      ``switch_s + Dc * load_s + horizon * Dc * layer_s``. When the current model is already at full
      depth a switch target must also be *better*: its profiled share of confident tokens at Dc has
      to exceed the confident share observed now (``1 - breach_rate``).
    * keep: nothing qualifies (full depth and no better candidate).

    ``hardware``, when given, excludes placements that do not fit the memory budget; ``gate``, when given,
    excludes placements below the quality floors of the traffic (a storm is never answered by lowering quality).
    """
    costs = measured_costs or CostModel()
    by_name = {c.name: c for c in candidates}
    if current_model not in by_name:
        raise ValueError(f"current model {current_model!r} is not among the candidates")
    current = by_name[current_model]
    if breach_rate is None:
        breach_rate = (config.breach_limit + 1) / config.breach_window

    def fits(cand: CandidateInfo, depth: int) -> bool:
        return hardware is None or max_batch(cand, depth, hardware, config) >= 1

    numbers: dict[str, Number] = {
        "horizon_tokens": costs.horizon_tokens,
        "breach_rate": breach_rate,
    }
    options: list[StormOption] = []
    extend = _extend_option(current, current_depth, pht, costs, config, fits, numbers, gate)
    if extend is not None:
        options.append(extend)
    options += _switch_options(
        current, current_depth, candidates, pht, costs, config, fits, 1.0 - breach_rate, numbers, gate
    )

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
    options.sort(key=StormOption.rank)
    best = options[0]
    alternative = next((o for o in options[1:] if o.action != best.action), None)
    reason = (
        f"breach storm: {best.action} to {best.model}@{best.depth} costs {best.cost_s:.4g}s "
        f"({best.detail})"
    )
    if alternative is not None:
        reason += (
            f" vs {alternative.action} to {alternative.model}@{alternative.depth} "
            f"{alternative.cost_s:.4g}s"
        )
        numbers["alternative_cost_s"] = alternative.cost_s
    numbers["chosen_cost_s"] = best.cost_s
    batch = None
    if hardware is not None:
        room = max_batch(by_name[best.model], best.depth, hardware, config)
        batch = effective_batch(room, config)
    return Decision(
        action=best.action,
        model=best.model,
        depth=best.depth,
        trigger="storm",
        reason=reason,
        previous_model=current.name,
        previous_depth=current_depth,
        batch_size=batch,
        numbers=numbers,
    )


def _extend_option(
    current: CandidateInfo,
    current_depth: int,
    pht: PHT | None,
    costs: CostModel,
    config: PolicyConfig,
    fits: Callable[[CandidateInfo, int], bool],
    numbers: dict[str, Number],
    gate: QualityGate | None = None,
) -> StormOption | None:
    """The next deeper exit of the current model whose guard holds and that fits, if any; why the
    shallower ones were skipped goes to ``numbers``."""
    entry = profile_entry(pht, current).entry
    layer = seconds_per_layer(current, pht, costs)
    option = None
    skipped: list[str] = []
    for depth in current.exits_above(current_depth):
        evidence = exit_evidence(current, entry, config, depth)
        verdict = accuracy_guard(evidence, config, need_share=False, optimistic=False)
        below = (gate is not None and depth < current.num_layers and not gate.check(current, depth).ok)
        if verdict.ok and not below and fits(current, depth):
            load = (depth - current_depth) * costs.load_seconds(current)
            run = costs.horizon_tokens * depth * layer.seconds
            numbers.update(
                extend_depth=depth,
                extend_cost_s=load + run,
                extend_load_s=load,
                extend_run_s=run,
                extend_layer_s=layer.seconds,
                extend_layer_s_source=layer.source,
                extend_agreement=evidence.agreement,
            )
            detail = f"load {depth - current_depth} layers {load:.3g}s + run {run:.3g}s"
            option = StormOption("extend", current.name, depth, load, run, detail)
            break
        skipped.append(f"{depth}: " + (verdict.reason if not verdict.ok else
                                         "below the quality floors" if below else "does not fit memory"))
    if skipped:
        numbers["extend_skipped"] = "; ".join(skipped)
    return option


def _switch_options(
    current: CandidateInfo,
    current_depth: int,
    candidates: Sequence[CandidateInfo],
    pht: PHT | None,
    costs: CostModel,
    config: PolicyConfig,
    fits: Callable[[CandidateInfo, int], bool],
    observed_confident: float,
    numbers: dict[str, Number],
    gate: QualityGate | None = None,
) -> list[StormOption]:
    """Every other candidate at its own depth that fits and would not storm too (and, when the
    current model is already at full depth, is better); why the others were skipped goes to
    ``numbers``."""
    options: list[StormOption] = []
    for cand in sorted(candidates, key=lambda c: c.name):
        if cand.name == current.name:
            continue
        c_entry = profile_entry(pht, cand).entry
        choice = choose_depth(cand, c_entry, config, gate=gate)
        key = f"switch[{cand.name}@{choice.depth}]"
        if gate is not None and not (quality := gate.check(cand, choice.depth)).ok:
            numbers[f"{key}_skipped"] = f"quality: {quality.describe()}"
            continue
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
        layer = seconds_per_layer(cand, pht, costs)
        load = costs.switch_cost(cand) + choice.depth * costs.load_seconds(cand)
        run = costs.horizon_tokens * choice.depth * layer.seconds
        numbers[f"{key}_cost_s"] = load + run
        numbers[f"{key}_load_s"] = load
        numbers[f"{key}_run_s"] = run
        detail = f"switch+load {load:.3g}s + run {run:.3g}s"
        options.append(StormOption("switch", cand.name, choice.depth, load, run, detail))
    return options
