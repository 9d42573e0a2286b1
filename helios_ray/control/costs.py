"""What a placement costs per token: static work units, batch room, and measured timings.

* ``cost(c, D)`` -- per-token work at depth D in one unit shared by all compared candidates:
  ``D * flops_per_token_per_layer + head_flops_per_token`` when every candidate has FLOPs, else the
  weight bytes streamed per decode step ``D * layer_bytes + head_bytes (+ exit head)`` when every
  candidate has byte sizes, else ``D`` (equal cost per layer).
* ``batch(c, D) = floor((budget - weight_bytes(D)) / (kv_bytes_per_token(D) * typical_seq_len))``,
  and ``beff = clamp(batch, 1, max_batch)``.
* ``spt(c, D)`` -- seconds per token of one sequence: from the freshest PHT timing of the model at
  depth R (TPOT, else single-stream speed, else engine tokens/s / beff(R)) scaled by
  ``cost(D) / cost(R)``.

A common unit matters more than a precise one: candidates are only ever compared with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

from .config import CandidateInfo, Hardware, PolicyConfig
from .pht import PHT

__all__ = [
    "CostUnit",
    "MeasuredCost",
    "cost_unit",
    "token_cost",
    "max_batch",
    "effective_batch",
    "measured_per_token",
    "inner_exit_gain",
]

CostUnit = Literal["flops", "bytes", "layers"]


class MeasuredCost(NamedTuple):
    """Per-token cost of one sequence from PHT timings; ``None`` where nothing fresh is measured."""

    seconds: float | None
    energy_j: float | None


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
    fp = candidate.footprint(depth)  # the one memory model (helios_ray/memory.py), as the engine admits by
    if fp.weight_bytes > hardware.memory_budget_bytes:
        return 0
    if fp.kv_bytes_per_token <= 0:
        return config.max_batch
    return fp.max_sequences(hardware.memory_budget_bytes, config.typical_seq_len)



def effective_batch(batch: int, config: PolicyConfig) -> int:
    """The batch a placement actually runs: at least one sequence, at most ``config.max_batch``."""
    return max(1, min(batch, config.max_batch))


def measured_per_token(
    candidate: CandidateInfo,
    depth: int,
    pht: PHT | None,
    hardware: Hardware,
    config: PolicyConfig,
    unit: CostUnit,
) -> MeasuredCost:
    """Seconds per token of one sequence and J per token at ``depth`` from fresh PHT timings,
    scaled from the nearest measured depth by the cost ratio; ``None`` where unmeasured."""
    if pht is None:
        return MeasuredCost(None, None)
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
                ref = effective_batch(batch, config) / entry.measured_tokens_per_s
            if ref is not None:
                spt = ref * scale
        if energy is None and entry.energy_per_token is not None:
            energy = entry.energy_per_token * scale
    return MeasuredCost(spt, energy)


def inner_exit_gain(candidate: CandidateInfo, depth: int, exit_depth: int, coverage: float,
                    exit_head_flops: float, propagate_flops_per_layer: float) -> float:
    """FLOPs per token that checking a token-level exit at ``exit_depth`` saves a replica loaded to ``depth``
    (negative: the check costs more than it saves).  ``None`` FLOPs on the candidate -> 0 (unknown: no gain).

    Every token reaching the exit pays the check (the exit head, ``exit_head_flops``, plus the LM head); a share
    ``coverage`` of them is confident there and skips layers [exit, D) except one K/V projection per skipped layer
    (state propagation) and the LM head at D::

        gain = coverage * (D - exit) * (layer - propagate) - exit_head - (1 - coverage) * lm_head

    Why it matters: on small models the LM head is as much work as many layers (SmolLM2: ~8, Qwen2.5-0.5B: ~9),
    so a check pays only when nearly every token exits there, far below D.  The paper's HELIOS checks exits inside
    a truncated replica; a replica here does so only where this is positive.
    """
    layer, head = candidate.flops_per_token_per_layer, candidate.head_flops_per_token
    if layer is None or head is None or not 0 < exit_depth < depth:
        return 0.0
    return coverage * (depth - exit_depth) * (layer - propagate_flops_per_layer) - exit_head_flops \
        - (1.0 - coverage) * head
