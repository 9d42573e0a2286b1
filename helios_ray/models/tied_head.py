"""One LM head for a model that ties it: the rule, its tolerance, and which copy to keep.

Qwen2.5-Coder's GGUF files store ``output.weight`` beside ``token_embd.weight`` in two quantizations (the 0.5B's:
Q8_0 and Q5_0), so the converted checkpoint says ``tie_word_embeddings: false`` and carries both matrices - 272 MB
of a 1.26 GB bf16 replica for a matrix the original model does not have (it ties them).  Loading one matrix for
both gives that memory back to the KV cache, i.e. to batch.

**The rule** (used by the loader and by the memory model, through :func:`apply`): an untied checkpoint converted
from a GGUF file whose head and embedding have the same shape is loaded tied when their relative difference
``||head - embed|| / ||head||`` is at most :data:`TOLERANCE` (0.10).  Why that number: two quantizations of one matrix differ by their rounding
error only - 0.044 for Qwen2.5-Coder-0.5B's Q8_0 head against its Q5_0 embedding (every element within one Q5_0
step of the other) - while two different matrices of that shape differ by more than 1 (1.24 for the same head
against its embedding with rows shuffled).  0.10 sits far from the second and above the first with room for a
coarser format (Q4 rounds about twice as coarsely as Q5).

**The copy kept** is the one stored at more bits per weight in the source file (the GGUF's tensor sizes): the
closer of the two to the original weights.  For Qwen that is the Q8_0 ``output.weight``, which then also serves
as the embedding.

**Forcing either**: ``HELIOS_TIED_HEAD=untied`` loads both matrices as stored, ``tied`` ties whenever the shapes
match (whatever the difference), ``auto`` (default) applies the rule.  The measurement that decided it - the
relative difference, both GGUF tensor types, the copy kept - is written once per prepared model to
``tied_head.json`` beside its checkpoint (docs/engine.md has the agreement and pass@1 of both loads).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal

TOLERANCE = 0.10
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
RECORD = "tied_head.json"
Mode = Literal["auto", "tied", "untied"]


def mode() -> Mode:
    m = os.environ.get("HELIOS_TIED_HEAD", "auto").strip().lower() or "auto"
    if m not in ("auto", "tied", "untied"):
        from helios_ray.errors import HeliosError

        raise HeliosError(f"HELIOS_TIED_HEAD must be auto, tied or untied (got {m!r})")
    return m  # type: ignore[return-value]


def _source_sizes(ckpt_dir: Path) -> dict[str, int]:
    """Bytes of the head and the embedding in the GGUF the checkpoint was converted from (empty when unknown)."""
    try:
        src = Path(json.loads((ckpt_dir / "helios.json").read_text())["converted_from"])
        from gguf import GGUFReader

        sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(src)).tensors
                 if t.name in ("output.weight", "token_embd.weight")}
        return {HEAD: sizes["output.weight"], EMBED: sizes["token_embd.weight"]}
    except Exception:  # noqa: BLE001 - no GGUF source (a safetensors model) or it moved: keep the head
        return {}


def _stamp(ckpt_dir: Path) -> list[list[Any]]:
    """What the record was measured on: each weights file's name, size and modification time."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(Path(ckpt_dir).glob("*.safetensors"))]


def record(ckpt_dir: Path) -> dict[str, Any] | None:
    """The measurement for an untied checkpoint with head and embedding of one shape (None otherwise), computed
    once and kept in ``tied_head.json``."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / RECORD
    stamp = _stamp(ckpt_dir)
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("checkpoint") == stamp:
            return rec  # else the weights changed since (re-prepared, copied over): measure again
    from helios_ray.models.checkpoint import Checkpoint

    with Checkpoint(ckpt_dir) as ck:
        names = set(ck.names)
        if HEAD not in names or EMBED not in names or ck.shape(HEAD) != ck.shape(EMBED):
            return None
        head, embed = ck.read(HEAD), ck.read(EMBED)
    diff2 = norm2 = 0.0
    for i in range(0, head.shape[0], 8192):  # in row chunks: no third vocabulary-sized matrix in memory
        h, e = head[i:i + 8192].double(), embed[i:i + 8192].double()
        diff2 += float(((h - e) ** 2).sum())
        norm2 += float((h ** 2).sum())
    del head, embed
    rel = (diff2 / max(norm2, 1e-24)) ** 0.5
    sizes = _source_sizes(ckpt_dir)
    keep = EMBED if sizes and sizes[EMBED] > sizes[HEAD] else HEAD
    rec = {"checkpoint": stamp, "relative_difference": round(rel, 5), "tolerance": TOLERANCE, "within": rel <= TOLERANCE, "keep": keep,
           "source_bytes": sizes or None}
    try:
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(rec, indent=2))
        tmp.replace(path)
    except OSError:  # a read-only model volume: the measurement holds for this process anyway
        pass
    return rec


def apply(spec: Any, ckpt_dir: Path, how: Mode | None = None) -> Any:
    """``spec`` (an ArchSpec read from the checkpoint's config) as it is loaded: tied, reading the kept copy for
    both, when the rule (or ``HELIOS_TIED_HEAD``) says so; unchanged otherwise."""
    how = how or mode()
    if spec.tie_word_embeddings or how == "untied" or spec.family not in ("llama", "mistral", "qwen2", "gemma3_text"):
        return spec
    rec = record(ckpt_dir)
    # auto ties only what a quantized file split in two: a GGUF that stored the head beside its embedding (a
    # safetensors model whose head drifted from a tied start is untied on purpose; `tied` forces it)
    if rec is None or (how == "auto" and not (rec["within"] and rec.get("source_bytes"))):
        return spec
    return dataclasses.replace(spec, tie_word_embeddings=True, embed_source=rec["keep"])


def spec_as_loaded(ckpt_dir: Path, how: Mode | None = None) -> Any:
    """The architecture a checkpoint is loaded with: its config's, with one LM head where the rule says so - the
    one entry point for the loader (``loading.read_spec``) and the memory model (``model_info``)."""
    from helios_ray.models.families import spec_from_config

    return apply(spec_from_config(json.loads((Path(ckpt_dir) / "config.json").read_text())), Path(ckpt_dir), how)

