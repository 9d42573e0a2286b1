"""What a tuning run is asked to do: the exits and their head kinds, every setting, and their checks.

Kept apart from the (torch-heavy) phases so the settings, their hashes (which name the cache and the
trained heads) and their validation read in one place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from helios_ray.errors import HeliosError
from helios_ray.models.families import ArchSpec

__all__ = [
    "HEAD_KINDS",
    "BLOCK_INITS",
    "SAVE_DTYPES",
    "ExitSpec",
    "TuneConfig",
    "parse_exits",
    "check_exits",
    "validate",
    "log",
]

HEAD_KINDS = ("linear", "block", "healed")
BLOCK_INITS = ("next", "next-zero", "last-zero")
#: ``--save-dtype`` choices: the dtype the heads are stored (and evaluated) in.
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExitSpec:
    """One exit to train: after ``depth`` layers, a head of ``kind`` (``rank``: low-rank linear heads and the
    deltas of healed layers; ``layers``: how many of the last loaded layers a healed exit heals).
    Frozen because it is hashed into the trained head's key."""

    depth: int
    kind: str = "block"
    rank: int | None = None
    layers: int | None = None

    @property
    def input_depth(self) -> int:
        """The layer count whose hidden state the head starts from (a healed head starts ``layers`` below)."""
        return self.depth - (self.layers or 0) if self.kind == "healed" else self.depth


@dataclass
class TuneConfig:
    """Every setting of a tuning run. :meth:`cache_key` and :meth:`head_key` hash the ones that change what
    is cached or trained, so a rerun reuses exactly what still matches."""

    model: str
    exits: list[ExitSpec]
    data: str = "sharegpt"
    #: Training tokens to cache (non-padding tokens, summed over rows).
    tokens: int = 140_000
    seq_len: int = 512
    topk: int = 32
    #: Optimiser steps per head; None = ``epochs`` (block heads) / ``linear_epochs`` passes over the cache.
    steps: int | None = None
    epochs: float = 3.0
    linear_epochs: float = 1.0
    batch_tokens: int = 2048
    #: Peak learning rate (measured on SmolLM2 L24: 3e-4 -> 57%, 1e-3 -> 62%, 3e-3 and 6e-3 -> 65%).
    lr: float = 3e-3
    ce_weight: float = 0.0
    #: ``sampled``: softmax over the batch's teacher tokens + ``negatives`` random ones; ``full``: whole vocab.
    vocab: str = "sampled"
    negatives: int = 4096
    #: Block head start: ``last-zero`` = the last layer with zeroed output projections (starts as the lens at D;
    #: measured best), ``next-zero`` = layer D the same way, ``next`` = a copy of layer D (the lens at D+1).
    block_init: str = "last-zero"
    seed: int = 0
    eval_conversations: int = 100
    eval_seq_len: int = 512
    #: Score every n-th held-out position (the head still runs on all of them).
    eval_stride: int = 2
    #: Storage of the cached hidden states: ``auto`` = float16 unless the model's activations need float32.
    cache_dtype: str = "auto"
    #: Compute dtype of the backbone pass (the teacher) and of training (autocast): ``auto`` = bfloat16 on CPUs
    #: with bf16 units (3x faster here; the teacher is then the bf16 model that ``dtype: auto`` serves).
    compute_dtype: str = "auto"
    out: Path | None = None
    work_dir: Path | None = None
    resume: bool = False
    save_dtype: str = "float32"
    checkpoint_every: int = 50
    models_file: str | None = None
    progress: bool = True
    command: str | None = None

    def cache_key(self) -> str:
        """Identity of the cache: everything that changes what phase 1 writes."""
        keep: dict[str, Any] = {k: getattr(self, k) for k in ("model", "data", "tokens", "seq_len", "topk", "seed",
                                                              "eval_conversations", "eval_seq_len", "cache_dtype")}
        if self.compute_dtype != "float32":  # keeps the keys of fp32 caches made before the option existed
            keep["compute_dtype"] = resolved_compute_dtype(self.compute_dtype)
        if Path(self.data).is_file():  # a user file: its content, not just its name
            keep["data_sha256"] = hashlib.sha256(Path(self.data).read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def head_key(self, e: ExitSpec) -> str:
        keep = {k: getattr(self, k) for k in ("steps", "epochs", "linear_epochs", "batch_tokens", "lr", "ce_weight",
                                              "vocab", "negatives", "block_init", "seed")}
        keep.update(asdict(e), cache=self.cache_key())
        if e.layers is None:
            keep.pop("layers")  # keeps the keys of heads trained before healed exits existed
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def parse_exits(text: str, default_kind: str, rank: int | None = None, heal_layers: int = 2,
                heal_rank: int = 32) -> list[ExitSpec]:
    """``"12,16:linear,20,24,22:healed3"`` -> exit specs (a ``:KIND`` suffix overrides ``default_kind`` for that
    exit; ``healedK`` heals the last K loaded layers, plain ``healed`` ``heal_layers`` of them)."""
    out: list[ExitSpec] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        d, _, kind = part.partition(":")
        try:
            depth = int(d)
        except ValueError:
            raise HeliosError(f"--exits: {part!r} is not a layer number (expected e.g. 12,16,20,24)") from None
        kind = kind or default_kind
        layers = None
        if kind.startswith("healed"):
            k = kind[len("healed"):] or str(heal_layers)
            if not k.isdigit() or not 1 <= int(k) < depth:
                raise HeliosError(f"exit {depth}: {kind!r} must be healed or healedK with 1 <= K < {depth}")
            kind, layers = "healed", int(k)
        if kind not in HEAD_KINDS:
            raise HeliosError(f"unknown exit head kind {kind!r} for exit {depth} (trainable kinds: {', '.join(HEAD_KINDS)})")
        r = rank if kind == "linear" else heal_rank if kind == "healed" else None
        out.append(ExitSpec(depth, kind, r, layers))
    if not out:
        raise HeliosError("--exits: give at least one exit layer, e.g. --exits 20,24")
    depths = [e.depth for e in out]
    if len(set(depths)) != len(depths):
        raise HeliosError(f"--exits: layer listed twice in {text!r}")
    return sorted(out, key=lambda e: e.depth)


def check_exits(exits: list[ExitSpec], spec: ArchSpec, name: str) -> None:
    for e in exits:
        if not 1 <= e.depth < spec.num_layers:
            raise HeliosError(
                f"exit layer {e.depth} is out of range for {name}: it has {spec.num_layers} layers, so exits must be "
                f"in 1..{spec.num_layers - 1} (layer {spec.num_layers} is the model's own head)"
            )


def validate(cfg: TuneConfig) -> None:
    """Reject bad settings before any data or model is read (they would fail hours later)."""
    if cfg.vocab not in ("sampled", "full"):
        raise HeliosError(f"--vocab must be 'sampled' or 'full' (got {cfg.vocab!r})")
    if cfg.block_init not in BLOCK_INITS:
        raise HeliosError(f"--block-init must be one of {', '.join(BLOCK_INITS)} (got {cfg.block_init!r})")
    if cfg.cache_dtype not in ("auto", "float16", "float32"):
        raise HeliosError(f"--cache-dtype must be auto, float16 or float32 (got {cfg.cache_dtype!r})")
    if cfg.compute_dtype not in ("auto", "float32", "bfloat16"):
        raise HeliosError(f"--compute-dtype must be auto, float32 or bfloat16 (got {cfg.compute_dtype!r})")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise HeliosError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}")
    for name, v in (("--tokens", cfg.tokens), ("--seq-len", cfg.seq_len), ("--topk", cfg.topk),
                    ("--batch-tokens", cfg.batch_tokens), ("--eval-conversations", cfg.eval_conversations),
                    ("--eval-seq-len", cfg.eval_seq_len), ("--eval-stride", cfg.eval_stride)):
        if v < 1:
            raise HeliosError(f"{name} must be >= 1 (got {v})")
    for e in cfg.exits:
        if e.kind == "healed" and (e.rank or 0) < 1:
            raise HeliosError(f"exit {e.depth}: --heal-rank must be >= 1 (got {e.rank})")
    if cfg.steps is not None and cfg.steps < 1:
        raise HeliosError(f"--steps must be >= 1 (got {cfg.steps})")


@functools.lru_cache(maxsize=None)
def resolved_compute_dtype(name: str) -> str:
    """``auto`` -> bfloat16 where the CPU has bf16 units (see :mod:`helios_ray.dtypes`), else float32."""
    from helios_ray.dtypes import serving_dtype

    return serving_dtype(name, cuda=False) if name == "auto" else name


def log(msg: str) -> None:
    """Progress for a person, on stderr: stdout carries the card (``--json``)."""
    print(msg, file=sys.stderr, flush=True)
