"""Exit heads on disk: one safetensors file per model, its heads' kinds in the metadata, loaded by depth.

Kept apart from :mod:`helios_ray.models.exit_heads` (the head types) because building a head from its kind needs
every kind, the healed one (:mod:`helios_ray.models.healed`) included, which itself builds on the head types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from helios_ray.errors import HeliosError
from helios_ray.models.exit_heads import BlockHead, ExitHead, LinearHead, SharedHead
from helios_ray.models.families import ArchSpec
from helios_ray.models.healed import HealedHead


def make_head(kind: str, depth: int, spec: ArchSpec, rank: int | None = None, layers: int | None = None) -> ExitHead:
    if kind == "shared":
        return SharedHead(depth)
    if kind == "linear":
        return LinearHead(depth, spec, rank)
    if kind == "block":
        return BlockHead(depth, spec)
    if kind == "healed":
        return HealedHead(depth, spec, layers or 1, rank or 16)
    raise HeliosError(f"unknown exit head kind {kind!r} (known: shared, linear, block, healed)")


def save_heads(path: Path, heads: dict[int, ExitHead], extra_metadata: dict[str, str] | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Write ``heads`` to ``path``; ``dtype=torch.bfloat16`` halves the file (``load_heads`` casts back)."""
    tensors: dict[str, Tensor] = {}
    meta = {str(d): h.config() for d, h in sorted(heads.items())}
    for d, h in heads.items():
        for name, t in h.state_dict().items():
            tensors[f"exit.{d}.{name}"] = t.detach().to(dtype).contiguous()
    md = {"heads": json.dumps(meta), **(extra_metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=md)
    tmp.replace(path)


def heads_metadata(path: Path) -> dict[int, dict[str, Any]]:
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    if "heads" not in md:
        raise HeliosError(f"{path} is not an exit-heads file (no 'heads' metadata)")
    return {int(k): v for k, v in json.loads(md["heads"]).items()}


def load_heads(
    path: Path, spec: ArchSpec, depths: list[int] | None = None, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[int, ExitHead]:
    """Load the heads at ``depths`` (all when None) from an exits file - and only their tensors."""
    meta = heads_metadata(path)
    wanted = sorted(meta) if depths is None else [d for d in depths if d in meta]
    heads: dict[int, ExitHead] = {}
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        for d in wanted:
            cfg = meta[d]
            if not 1 <= d < spec.num_layers:
                raise HeliosError(f"{path}: exit at depth {d} does not fit a {spec.num_layers}-layer model")
            head = make_head(cfg["kind"], d, spec, cfg.get("rank"), cfg.get("layers"))
            prefix = f"exit.{d}."
            sd = {n[len(prefix):]: f.get_tensor(n) for n in names if n.startswith(prefix)}
            head.load_state_dict(sd, strict=True)
            heads[d] = head.to(device=device, dtype=dtype).eval()
    return heads
