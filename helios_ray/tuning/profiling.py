"""Profile candidates on real prompts: per-token exit records for the performance history table.

This is the bridge between the runtime and the (pure) control plane: the full model runs in profile mode over a
few prompts, and every generated token becomes a trace record - each exit's argmax and confidence next to the
final layer's argmax and log-probability - in exactly the format ``helios_ray.control.trace`` reads.  The same
function serves ``helios-ray profile``, the recorded traces the simulator tests replay, and the Serve profiling
actor on mirrored traffic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

from helios_ray.control.config import CalibrationPoint, CandidateInfo, ExitPrior
from helios_ray.models.early_exit import EarlyExitLM


def default_profile_exits(num_layers: int) -> list[int]:
    """Without trained exits, sample the upper part of the stack through the shared head (40%..90% depth).
    Every extra exit costs one LM-head product per token, the largest matmul of small models."""
    return sorted({max(1, round(num_layers * f)) for f in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)} - {num_layers})


def profile_exits(model: EarlyExitLM) -> list[int]:
    trained = sorted(d for d in model.heads if d < model.total_layers)
    return trained or default_profile_exits(model.total_layers)


def profile_prompts(model: EarlyExitLM, prompts: Iterable[dict[str, Any]], max_tokens: int = 16,
                    exits: list[int] | None = None, request_offset: int = 0, progress: bool = False
                    ) -> list[dict[str, Any]]:
    """Trace records for ``prompts`` (dicts with ``prompt`` or ``messages``, optional ``kind``, ``request``).

    Token records carry every profiled exit plus the full depth itself (``exits[L]`` = the final layer), so a
    replica at any profiled depth can be replayed; request records carry timing of the profile run.
    """
    exits = exits if exits is not None else profile_exits(model)
    prompts = list(prompts)
    records: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=f"profiling {model.name}", unit="prompt")
    L = model.total_layers
    for i, p in enumerate(prompts):
        req = int(p.get("request", request_offset + i))
        kind = p.get("kind")
        ids = model.encode(p.get("prompt"), p.get("messages"))  # exactly as a replica serves it
        t0 = time.perf_counter()
        toks = model.profile_generate(ids, max_tokens, exits)
        dt = time.perf_counter() - t0
        for t in toks:
            ex = {str(d): [tok, conf] for d, (tok, conf) in t["exits"].items()}
            ex[str(L)] = [t["final"], t["final_confidence"]]
            records.append({"type": "token", "model": model.name, "request": req, "kind": kind, "pos": t["pos"],
                            "exits": ex, "final": t["final"], "final_logprob": t["final_logprob"]})
        records.append({"type": "request", "model": model.name, "request": req, "kind": kind,
                        "prompt_tokens": len(ids), "output_tokens": len(toks), "seconds": round(dt, 4)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return records


def candidate_info(repo: Any, name: str, dtype: str = "float32") -> CandidateInfo:
    """Static metadata of a registered model in the control plane's terms, with its exit card as prior.

    Sizes are at ``dtype`` (the serving dtype) through :mod:`helios_ray.memory`, the model the engine admits by:
    exit heads cost their parameters at that dtype, and a block exit head one more layer of KV per token."""
    from helios_ray import memory

    info = repo.info(name, dtype=dtype)
    if not info.prepared:
        from helios_ray.errors import ModelUnavailableError

        raise ModelUnavailableError(info.problem or f"model {name!r} is not prepared")
    assert info.num_layers and info.layer_bytes is not None and info.hidden_size and info.vocab_size
    exits = sorted(set((info.exits.trained if info.exits else []) + [info.num_layers]))
    kinds = info.exits.kinds if info.exits else {}
    prior: dict[int, ExitPrior] = {}
    exit_head_bytes = 0
    card_path = Path(info.exits.card_path) if info.exits and info.exits.card_path else None
    if card_path is not None and card_path.exists():
        card = json.loads(card_path.read_text())
        for key, e in (card.get("exits") or {}).items():
            d = int(key)
            if d not in exits:
                continue
            cal = [CalibrationPoint(threshold=c["threshold"], coverage=c["coverage"], agreement=c["agreement"])
                   for c in e.get("calibration", []) if c.get("agreement") is not None]
            if e.get("agreement") is not None:
                full = (card.get("humaneval") or {}).get("pass_at_1_full")
                drop = round(full - e["pass_at_1"], 4) if full is not None and e.get("pass_at_1") is not None else None
                prior[d] = ExitPrior(agreement=e["agreement"], calibration=cal, pass_at_1_drop=drop)
            if kinds.get(d) != "healed":  # a healed exit is merged into the loaded layers: no extra weights
                exit_head_bytes = max(exit_head_bytes, memory.param_bytes(int(e.get("parameters", 0)), dtype))
    attends = any(kind == "block" for d, kind in kinds.items() if int(d) < info.num_layers)
    kv_layer = info.kv_bytes_per_token_per_layer or 0
    return CandidateInfo(
        name=name, num_layers=info.num_layers, embed_bytes=info.embed_bytes or 0, layer_bytes=info.layer_bytes,
        head_bytes=info.head_bytes or 0, exit_head_bytes=exit_head_bytes,
        kv_bytes_per_token_per_layer=kv_layer, exit_kv_bytes_per_token=kv_layer if attends else 0,
        exits=exits, exit_prior=prior, free_exits=sorted(d for d, k in kinds.items() if k == "healed"),
        flops_per_token_per_layer=2 * (info.layer_params or info.layer_bytes // memory.dtype_bytes(dtype)),
        head_flops_per_token=2 * info.hidden_size * info.vocab_size,
        quality=quality_values(repo.quality(name)), chat_capable=bool(info.chat_capable),
    )


#: The value each request class's floor is checked against in a quality record (helios_ray.tuning.quality).
QUALITY_METRICS = {"code": "pass_at_1", "chat": "score"}


def quality_values(record: dict[str, Any] | None) -> dict[int, dict[str, float]]:
    """``{depth: {class: value}}`` from a stored quality record (``quality.json``): pass@1 for code, the reference
    score for chat; what :class:`~helios_ray.control.config.CandidateInfo` carries to the floors."""
    out: dict[int, dict[str, float]] = {}
    for depth, rec in ((record or {}).get("placements") or {}).items():
        vals = {cls: float(rec[cls][metric]) for cls, metric in QUALITY_METRICS.items()
                if isinstance(rec.get(cls), dict) and rec[cls].get(metric) is not None}
        if vals:
            out[int(depth)] = vals
    return out


def token_exits_from_card(repo: Any, name: str, threshold: float, min_agreement: float, depth: int | None = None
                          ) -> list[int]:
    """The trained exits worth checking at ``threshold``: those whose exit card says the tokens confident there
    agree with the full model at least ``min_agreement`` of the time.

    Why not every trained exit: an exit check costs an exit head plus the LM head (for SmolLM2 the LM head alone
    is as much work as 8 layers), and an exit whose confident tokens are often wrong breaks the accuracy guard
    the rest of the system keeps.  A framework operator would make the same cut.  The agreement used is the
    calibration row at the largest card threshold <= ``threshold`` (agreement rises with the threshold, so this
    never overstates it).  Only exits a model at ``depth`` can use as token-level exits qualify
    (:func:`~helios_ray.models.exit_heads.usable_token_exits`: no healed exits, none inside healed layers).
    """
    from helios_ray.models.exit_heads import exit_inputs, usable_token_exits
    from helios_ray.models.exit_files import heads_metadata

    info = candidate_info(repo, name)
    static = repo.info(name)
    meta = heads_metadata(Path(static.exits.heads_path)) if static.exits and static.exits.heads_path else {}
    out: list[int] = []
    for d, prior in sorted(info.exit_prior.items()):
        rows = [c for c in prior.calibration if c.threshold <= threshold + 1e-12]
        if rows and max(rows, key=lambda c: c.threshold).agreement >= min_agreement:
            out.append(d)
    return usable_token_exits(exit_inputs(meta), depth or info.num_layers, out)


def inner_exits(repo: Any, name: str, depth: int, threshold: float, min_agreement: float,
                dtype: str = "float32") -> dict[str, Any]:
    """The trained exits below ``depth`` that a helios replica loaded to ``depth`` checks token by token.

    An exit qualifies when its card trusts it at ``threshold`` (:func:`token_exits_from_card`) *and* the cost
    model says the check pays (:func:`helios_ray.control.costs.inner_exit_gain` > 0, coverage from the card's
    calibration at the smallest threshold >= ``threshold``, so coverage is never overstated).  Exits at or above the
    first layer a healed exit at ``depth`` heals are skipped: their input would be healed hidden states they were
    not trained on.  Returns ``{"exits": [...], "considered": {d: {coverage, gain_flops, pays}}}`` so the choice
    can be shown, not only made.
    """
    from helios_ray import memory
    from helios_ray.control.costs import inner_exit_gain

    info = candidate_info(repo, name, dtype)
    static = repo.info(name, dtype=dtype)
    trusted = set(token_exits_from_card(repo, name, threshold, min_agreement, depth))
    kv_elems = info.kv_bytes_per_token_per_layer // memory.dtype_bytes(dtype)
    propagate = 2 * (static.hidden_size or 0) * kv_elems
    card = json.loads(Path(static.exits.card_path).read_text()) if static.exits and static.exits.card_path and \
        Path(static.exits.card_path).exists() else {"exits": {}}
    considered: dict[int, dict[str, Any]] = {}
    for d in sorted(trusted):
        coverage = info.exit_prior[d].coverage_at(threshold) or 0.0  # conservative: the card's row at or above
        head_flops = 2 * int(card["exits"].get(str(d), {}).get("parameters", 0))
        gain = inner_exit_gain(info, depth, d, coverage, head_flops, propagate)
        considered[d] = {"coverage": round(coverage, 4), "gain_flops": round(gain), "pays": gain > 0}
    return {"exits": [d for d, c in considered.items() if c["pays"]], "considered": considered}
