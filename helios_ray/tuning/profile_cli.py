"""``helios-ray profile``: profile candidates on real prompts and show the PHT, each candidate's depth under the
accuracy guard, and the policy's choice.

Imported whenever the CLI parser is built, so torch, the models and the control plane are imported inside
:func:`run`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from helios_ray.errors import HeliosError


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidates", default=None,
                   help="comma-separated registered models (default: every registered model)")
    p.add_argument("--prompts", type=int, default=5, help="prompts per candidate (HELIOS default 5)")
    p.add_argument("--data", default="sharegpt", help="sharegpt, humaneval, or a JSONL file of prompts")
    p.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--slo", default="throughput", help="throughput, latency, energy or batch_size")
    p.add_argument("--budget-mb", type=int, default=2048, help="memory budget per replica for the choice")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8", "int4"],
                   help="serving dtype the candidates are profiled and priced at (auto: as a replica serves)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace-out", help="also write the per-token trace (JSONL) here, for `helios-ray simulate`")
    p.add_argument("--models-file")
    p.add_argument("--json", action="store_true")


def run(a: argparse.Namespace) -> int:
    from helios_ray.control import PHT, SLO, Hardware, PolicyConfig, choose, choose_depth, write_trace
    from helios_ray.control.depth import profile_entry
    from helios_ray.control.trace import parse_record
    from helios_data import load_dataset
    from helios_ray.models.early_exit import load_model
    from helios_ray.tuning.profiling import candidate_info, profile_prompts
    from helios_ray.models.repository import ModelRepository

    if a.prompts < 1 or a.max_tokens < 1:
        raise HeliosError("--prompts and --max-tokens must be >= 1")
    try:
        slo = SLO(a.slo)
    except ValueError:
        raise HeliosError(f"unknown SLO {a.slo!r} (known: {', '.join(s.value for s in SLO)})") from None
    repo = ModelRepository(models_file=a.models_file)
    names = list(repo.names) if a.candidates is None else [n.strip() for n in a.candidates.split(",") if n.strip()]
    if not names:
        raise HeliosError("--candidates is empty")
    import torch

    from helios_ray.dtypes import serving_dtype

    dtype = serving_dtype(a.dtype, torch.cuda.is_available())  # priced as the profiled model is loaded
    infos = [candidate_info(repo, n, dtype) for n in names]
    convs = load_dataset(a.data, split=a.split, limit=a.prompts, seed=a.seed)
    if not convs:
        raise HeliosError(f"no prompts found in {a.data!r} ({a.split} split)")
    prompts = [{"request": i, "kind": c.kind, "prompt": c.prompt, "messages": c.prompt_messages or None}
               for i, c in enumerate(convs)]
    config = PolicyConfig()
    pht = PHT.from_config(config)
    records: list[dict[str, Any]] = []
    for n in names:
        model = load_model(n, repo=repo, exits="all", dtype=a.dtype)
        recs = profile_prompts(model, prompts, a.max_tokens, progress=not a.json)
        for r in recs:
            pht.observe_token(parse_record(r)) if r["type"] == "token" else pht.observe_request(parse_record(r))
        records += recs
        del model
    if a.trace_out:
        write_trace(a.trace_out, [parse_record(r) for r in records])
    hw = Hardware(device="cpu", memory_budget_bytes=a.budget_mb << 20)
    decision = choose(infos, slo, hw, pht, config)
    # each candidate's own depth under the guard, not only the winner's: what truncation each one would get
    depths = {c.name: choose_depth(c, profile_entry(pht, c).entry, config).model_dump(mode="json") for c in infos}
    out = {"candidates": names, "prompts": len(prompts), "data": a.data, "slo": slo.value, "dtype": dtype,
           "pht": pht.summary(), "depths": depths, "choice": decision.model_dump(mode="json")}
    print(json.dumps(out, indent=2, default=str) if a.json else _profile_text(out))
    return 0


def _profile_text(o: dict[str, Any]) -> str:
    lines = [f"profiled {', '.join(o['candidates'])} on {o['prompts']} {o['data']} prompts ({o['dtype']}, SLO "
             f"{o['slo']}); each candidate's depth under the accuracy guard:"]
    for name, d in o["depths"].items():
        lines.append(f"  {name:<20} depth {d['depth']:>3}  {d['reason']}")
    c = o["choice"]
    lines.append(f"choice: {c['model']}@{c['depth']} - {c['reason']}")
    return "\n".join(lines) + "\n(--json for the performance history table and the decision's numbers)"
