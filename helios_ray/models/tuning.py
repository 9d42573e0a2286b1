"""Train exit heads for a frozen backbone by self-distillation from its final layer (EE-Tuning style).

Two phases, both resumable:

1. **Cache** (one pass over the data): the full model runs once over fixed-length token rows; the hidden state
   entering each exit (after D layers) is written as float16 (float32 when the model's activations exceed
   float16, as Gemma 3's do) to ``.npy`` memory maps, with the final layer's
   top-k log-probabilities and token ids.  Memory stays bounded by one batch; the disk holds
   ``rows x seq_len x (2 * hidden * exits + 6 * k)`` bytes.  Rows are whole windows of a conversation
   (not isolated tokens) because a ``block`` head attends over its context.  The held-out rows (other
   conversations, chosen by hash of the conversation id) are cached the same way, with the hidden state after
   D+1 layers too (to report the logit lens one layer deeper next to a block head, which costs a layer).
2. **Train** each head on the cache: the backbone never runs again.  Loss: cross-entropy of the head's
   distribution against the final layer's renormalised top-k distribution (= KL up to a constant; the KL is
   what is logged), plus optionally CE to the final argmax.  By default the head's softmax is taken over the
   batch's candidate vocabulary (every teacher top-k token in the batch plus random negatives) instead of the
   whole vocabulary: the 576x49152 LM head is most of a step's cost, and agreement is always *measured* with
   the full vocabulary.

Then every head is evaluated on the held-out rows with the full vocabulary: teacher-forced top-1 agreement
with the final layer (all tokens, and assistant-turn tokens only), the logit lens at D (and D+1) for
comparison, a calibration table and a recommended confidence threshold.  Heads go to ``exits.safetensors``
(:func:`~helios_ray.models.exit_heads.save_heads`), the measurements to the exit card ``exits.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from helios_ray.data import Conversation, encode, load_dataset
from helios_ray.errors import HeliosError
from helios_ray.models.decoder import DecoderLM, DenseKVCache
from helios_ray.models.early_exit import confidence
from helios_ray.models.exit_heads import BlockHead, ExitHead, SharedHead, make_head, save_heads
from helios_ray.models.families import ArchSpec
from helios_ray.models.loading import load_decoder, read_spec

#: Confidence thresholds of the calibration table.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
#: A threshold is only recommended if agreement among the tokens above it reaches this...
TARGET_AGREEMENT = 0.95
#: ...measured on at least this many tokens (fewer is noise).
MIN_CONFIDENT_TOKENS = 30
CARD_FORMAT = 1
HEAD_KINDS = ("linear", "block")
BLOCK_INITS = ("next", "next-zero", "last-zero")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ExitSpec:
    depth: int
    kind: str = "block"
    rank: int | None = None


@dataclass
class TuneConfig:
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
        if Path(self.data).is_file():  # a user file: its content, not just its name
            keep["data_sha256"] = hashlib.sha256(Path(self.data).read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def head_key(self, e: ExitSpec) -> str:
        keep = {k: getattr(self, k) for k in ("steps", "epochs", "linear_epochs", "batch_tokens", "lr", "ce_weight",
                                              "vocab", "negatives", "block_init", "seed")}
        keep.update(asdict(e), cache=self.cache_key())
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def parse_exits(text: str, default_kind: str, rank: int | None = None) -> list[ExitSpec]:
    """``"12,16:linear,20,24"`` -> exit specs (a ``:KIND`` suffix overrides ``default_kind`` for that exit)."""
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
        if kind not in HEAD_KINDS:
            raise HeliosError(f"unknown exit head kind {kind!r} for exit {depth} (trainable kinds: {', '.join(HEAD_KINDS)})")
        out.append(ExitSpec(depth, kind, rank if kind == "linear" else None))
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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ data rows
@dataclass
class Rows:
    ids: np.ndarray  # [N, T] int32 (0 where padded)
    valid: np.ndarray  # [N, T] bool
    resp: np.ndarray  # [N, T] bool: inside an assistant turn (all True for plain texts)
    conv_ids: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())


def response_mask(conv: Conversation, tokenizer: Any, ids: list[int]) -> list[bool]:
    """True at positions whose *next* token lies inside an assistant turn (what a served model generates);
    all True for plain texts."""
    from helios_ray.data import render
    from helios_ray.data.conversation import has_chat_template

    if conv.text is not None:
        return [True] * len(ids)
    text = render(conv, tokenizer)
    try:
        enc = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer), return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return [True] * len(ids)  # slow tokenizers have no offsets: count everything
    if list(enc["input_ids"]) != list(ids):
        return [True] * len(ids)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for m in conv.messages:
        body = m["content"].strip()
        at = text.find(body, cursor)
        if at < 0:
            continue
        cursor = at + len(body)
        if m["role"] == "assistant":
            spans.append((at, cursor))
    inside = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return inside[1:] + inside[-1:]  # position i predicts token i + 1


def build_rows(convs: Iterable[Conversation], tokenizer: Any, seq_len: int, budget_tokens: int | None,
               max_rows: int | None = None, min_tokens: int = 8, windows: bool = True) -> Rows:
    """Fixed-length rows of token ids: the first ``seq_len`` tokens of each conversation in turn (shorter ones
    padded), then - if the budget is not met and ``windows`` - their later windows.  Stops at the budget."""
    rows: list[list[int]] = []
    resp_rows: list[list[bool]] = []
    names: list[str] = []
    total = 0
    encoded: list[tuple[str, list[int], list[bool]]] = []

    def full() -> bool:
        return (budget_tokens is not None and total >= budget_tokens) or (max_rows is not None and len(rows) >= max_rows)

    for conv in convs:
        if full():
            break
        ids = encode(conv, tokenizer)
        if len(ids) < min_tokens:
            continue
        resp = response_mask(conv, tokenizer, ids)
        encoded.append((conv.id, ids, resp))
        rows.append(ids[:seq_len])
        resp_rows.append(resp[:seq_len])
        names.append(conv.id)
        total += len(rows[-1])
    w = 1
    while windows and not full() and any(len(ids) > w * seq_len + min_tokens for _, ids, _ in encoded):
        for cid, ids, resp in encoded:
            if full():
                break
            chunk = ids[w * seq_len:(w + 1) * seq_len]
            if len(chunk) >= min_tokens:
                rows.append(chunk)
                resp_rows.append(resp[w * seq_len:(w + 1) * seq_len])
                names.append(f"{cid}#{w}")
                total += len(chunk)
        w += 1
    n = len(rows)
    ids_a = np.zeros((n, seq_len), dtype=np.int32)
    valid = np.zeros((n, seq_len), dtype=bool)
    resp_a = np.zeros((n, seq_len), dtype=bool)
    for i, (r, m) in enumerate(zip(rows, resp_rows)):
        ids_a[i, :len(r)] = r
        valid[i, :len(r)] = True
        resp_a[i, :len(m)] = m
    return Rows(ids_a, valid, resp_a, names)


# ------------------------------------------------------------------------------------- phase 1: cache
class Cache:
    """Memory-mapped arrays of one split: ``ids``, ``valid``, ``resp``, ``h{D}`` (float16), ``topi``, ``topv``."""

    def __init__(self, root: Path, split: str):
        self.root, self.split = root, split

    def path(self, name: str) -> Path:
        return self.root / f"{self.split}_{name}.npy"

    def create(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.lib.format.open_memmap(self.path(name), mode="w+", dtype=dtype, shape=shape)

    def open(self, name: str, mode: str = "r") -> np.ndarray:
        return np.load(self.path(name), mmap_mode=mode)

    def exists(self, name: str) -> bool:
        return self.path(name).exists()


def _hidden_states(lm: DecoderLM, ids: Tensor, pos: Tensor, keep: set[int]) -> tuple[dict[int, Tensor], Tensor]:
    """Hidden states after each layer count in ``keep`` and the final logits' input (after all layers)."""
    ctx = lm.context(pos, DenseKVCache())
    h = lm.embed_tokens(ids, ctx)
    out: dict[int, Tensor] = {}
    for i in range(lm.depth):
        h = lm.layers[i](h, ctx, i)
        if i + 1 in keep:
            out[i + 1] = h
    return out, h


def _topk_logprobs(lm: DecoderLM, h: Tensor, k: int, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """Top-k log-probabilities (over the full vocabulary) and their ids, for [N, H] hidden states."""
    vals, idx = [], []
    for s in range(0, h.shape[0], chunk):
        logits = lm.logits(h[s:s + chunk]).float()
        v, i = logits.topk(k, dim=-1)
        vals.append(v - torch.logsumexp(logits, dim=-1, keepdim=True))
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def probe_hidden_dtype(lm: DecoderLM, rows: Rows, depths: list[int]) -> str:
    """float16 when the hidden states at the exits stay well inside its range on the first row, else float32
    (Gemma 3's residual stream reaches ~1e5, beyond float16's 65504)."""
    n = int(rows.valid[0].sum())
    with torch.inference_mode():
        inner, _ = _hidden_states(lm, torch.from_numpy(rows.ids[:1, :n]).long(), torch.arange(n)[None], set(depths))
    peak = max(float(inner[d].abs().max()) for d in depths)
    return "float16" if peak < 20_000 else "float32"


def fill_cache(cache: Cache, lm: DecoderLM, rows: Rows, depths: list[int], topk: int, state: dict[str, Any],
               save_state: Callable[[], None], batch_rows: int, progress: bool, hidden_dtype: str = "float16") -> None:
    """Run the backbone once over ``rows``; resumable at row granularity through ``state[split]``."""
    n, t = rows.ids.shape
    h_np = np.float16 if hidden_dtype == "float16" else np.float32
    hdim = lm.spec.hidden_size
    key = f"{cache.split}_rows_done"
    if key not in state or not cache.exists("ids"):
        for name, arr in (("ids", rows.ids), ("valid", rows.valid), ("resp", rows.resp)):
            m = cache.create(name, arr.shape, arr.dtype)
            m[:] = arr
            m.flush()
        for d in depths:
            cache.create(f"h{d}", (n, t, hdim), h_np)
        cache.create("topi", (n, t, topk), np.int32)
        cache.create("topv", (n, t, topk), np.float16)
        state[key] = 0
        save_state()
    done = int(state[key])
    if done >= n:
        return
    hs = {d: cache.open(f"h{d}", "r+") for d in depths}
    topi, topv = cache.open("topi", "r+"), cache.open("topv", "r+")
    bar = tqdm(total=n, initial=done, desc=f"cache {cache.split}", unit="row", disable=not progress, file=sys.stderr)
    with torch.inference_mode():
        for s in range(done, n, batch_rows):
            e = min(n, s + batch_rows)
            ids = torch.from_numpy(np.ascontiguousarray(rows.ids[s:e])).long()
            valid = torch.from_numpy(np.ascontiguousarray(rows.valid[s:e]))
            pos = torch.where(valid, torch.arange(t)[None].expand(e - s, t), torch.full_like(ids, -1))
            inner, last = _hidden_states(lm, ids, pos, set(depths))
            for d in depths:
                x = inner[d].float()
                if h_np == np.float16 and x.abs().max() > 60000:
                    raise HeliosError(f"hidden states after layer {d} overflow float16 (|h| > 60000): "
                                      "rerun with --cache-dtype float32")
                hs[d][s:e] = x.numpy().astype(h_np)
            v, i = _topk_logprobs(lm, last.reshape(-1, hdim), topk)
            topv[s:e] = v.reshape(e - s, t, topk).numpy().astype(np.float16)
            topi[s:e] = i.reshape(e - s, t, topk).numpy().astype(np.int32)
            for m in (*hs.values(), topi, topv):
                m.flush()
            state[key] = e
            save_state()
            bar.update(e - s)
    bar.close()


# ------------------------------------------------------------------------------------ phase 2: train
def build_head(e: ExitSpec, lm: DecoderLM, block_init: str, seed: int) -> ExitHead:
    torch.manual_seed(seed * 1000 + e.depth)
    head = make_head(e.kind, e.depth, lm.spec, e.rank)
    if isinstance(head, BlockHead):
        if block_init == "last-zero":
            head.init_from(lm.layers[lm.spec.num_layers - 1], zero_outputs=True)
        else:
            head.init_from(lm.layers[e.depth], zero_outputs=(block_init == "next-zero"))
    return head.float().train()


def head_logits(lm: DecoderLM, z: Tensor, cand: Tensor | None) -> Tensor:
    """Shared final norm + LM head on ``z``, over the candidate vocabulary ``cand`` (all when None)."""
    w = lm.lm_head_weight if cand is None else lm.lm_head_weight[cand]
    logits = F.linear(lm.final_norm(z), w)
    cap = lm.spec.final_logit_softcap
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def distill_loss(lm: DecoderLM, z: Tensor, topi: Tensor, topv: Tensor, mask: Tensor, vocab: str, negatives: int,
                 ce_weight: float, gen: torch.Generator) -> tuple[Tensor, float]:
    """(loss to minimise, KL to the teacher's renormalised top-k) for head outputs ``z`` [N, H] (valid rows)."""
    z, topi, topv = z[mask], topi[mask].long(), topv[mask].float()
    p = torch.softmax(topv, dim=-1)
    if vocab == "full":
        logq = torch.log_softmax(head_logits(lm, z, None).float(), dim=-1)
        lq = logq.gather(-1, topi)
    else:
        V = lm.spec.vocab_size
        neg = torch.randint(0, V, (negatives,), generator=gen)
        cand = torch.unique(torch.cat([topi.reshape(-1), neg]))
        where = torch.full((V,), -1, dtype=torch.long)
        where[cand] = torch.arange(cand.numel())
        logq = torch.log_softmax(head_logits(lm, z, cand).float(), dim=-1)
        lq = logq.gather(-1, where[topi])
    ce = -(p * lq).sum(-1)
    kl = (ce + (p * torch.log(p.clamp_min(1e-12))).sum(-1)).mean()
    loss = ce.mean()
    if ce_weight:
        loss = loss + ce_weight * (-lq[:, 0]).mean()
    return loss, float(kl.detach())


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, min(20, steps // 10))
    if step < warm:
        return lr * (step + 1) / warm
    prog = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


def _apply_head(head: ExitHead, lm: DecoderLM, h: Tensor, pos: Tensor) -> Tensor:
    ctx = lm.context(pos, DenseKVCache()) if isinstance(head, BlockHead) else None
    return head.transform(h, ctx)


def _batch(cache: Cache, d: int, rows: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rows = np.sort(rows)
    valid = torch.from_numpy(np.ascontiguousarray(cache.open("valid")[rows]))
    t = valid.shape[1]
    pos = torch.where(valid, torch.arange(t)[None].expand_as(valid), torch.full(valid.shape, -1))
    h = torch.from_numpy(np.ascontiguousarray(cache.open(f"h{d}")[rows])).float()
    topi = torch.from_numpy(np.ascontiguousarray(cache.open("topi")[rows]))
    topv = torch.from_numpy(np.ascontiguousarray(cache.open("topv")[rows]))
    return h, pos, topi, topv


def train_head(head: ExitHead, lm: DecoderLM, cache: Cache, steps: int, batch_rows: int, lr: float, cfg: TuneConfig,
               ckpt: Path, progress: bool, stop_after: int | None = None) -> dict[str, Any] | None:
    """Train ``head`` on the cached rows; checkpoints every ``cfg.checkpoint_every`` steps to ``ckpt`` and
    resumes from it.  ``stop_after``: checkpoint after that many steps and return None (an interruption)."""
    d = head.depth
    n = cache.open("valid").shape[0]
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    hist: list[float] = []
    start, seconds = 0, 0.0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        start, hist, seconds = int(st["step"]), list(st["kl"]), float(st["seconds"])
        _log(f"exit {d}: resuming at step {start}/{steps}")
    # The batch order is a pure function of (seed, depth): a resumed run sees the batches it would have seen.
    order_rng = np.random.default_rng(cfg.seed * 1000 + d)
    per_epoch = max(1, n // batch_rows)
    order = np.concatenate([order_rng.permutation(n)[: per_epoch * batch_rows]
                            for _ in range(math.ceil(steps / per_epoch) + 1)])
    bar = tqdm(total=steps, initial=start, desc=f"exit {d} ({head.kind})", unit="step", disable=not progress,
               file=sys.stderr)
    tokens_seen = 0
    for step in range(start, steps):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + d * 10_007 + step)
        h, pos, topi, topv = _batch(cache, d, order[step * batch_rows:(step + 1) * batch_rows])
        mask = pos >= 0
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        z = _apply_head(head, lm, h, pos)
        loss, kl = distill_loss(lm, z, topi, topv, mask, cfg.vocab, cfg.negatives, cfg.ce_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append(round(kl, 5))
        tokens_seen += int(mask.sum())
        seconds += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(kl=f"{kl:.3f}")
        stop = stop_after is not None and step + 1 >= stop_after
        if ((step + 1) % cfg.checkpoint_every == 0 or stop) and step + 1 < steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step + 1, "kl": hist,
                        "seconds": seconds}, tmp)
            tmp.replace(ckpt)
        if stop:
            bar.close()
            return None
    bar.close()
    head.eval()
    k = max(1, min(10, len(hist) // 5))
    return {"steps": steps, "lr": lr, "seconds": round(seconds, 1), "kl_first": round(float(np.mean(hist[:k])), 4),
            "kl_last": round(float(np.mean(hist[-k:])), 4), "kl_curve": hist[:: max(1, len(hist) // 50)]}


# ----------------------------------------------------------------------------------------- evaluation
@dataclass
class ExitScores:
    """Per held-out token: does the exit's argmax equal the final layer's, and the exit's confidence."""

    agree: np.ndarray  # bool [N]
    conf: np.ndarray  # float [N]
    resp: np.ndarray  # bool [N]
    conv: np.ndarray  # int [N] (row index, for out-of-sample threshold checks)


@torch.no_grad()
def score_exit(head: ExitHead, lm: DecoderLM, cache: Cache, d: int, stride: int = 1, batch_rows: int = 4,
               chunk: int = 512) -> ExitScores:
    """Run ``head`` over every held-out row (a block head needs the whole context) and score every
    ``stride``-th position with the full vocabulary (the LM head is most of the cost)."""
    valid_all = cache.open("valid")
    n = valid_all.shape[0]
    agree, conf, resp, conv = [], [], [], []
    resp_all, topi_all = cache.open("resp"), cache.open("topi")
    for s in range(0, n, batch_rows):
        rows = np.arange(s, min(n, s + batch_rows))
        valid = torch.from_numpy(np.ascontiguousarray(valid_all[rows]))
        t = valid.shape[1]
        pos = torch.where(valid, torch.arange(t)[None].expand_as(valid), torch.full(valid.shape, -1))
        h = torch.from_numpy(np.ascontiguousarray(cache.open(f"h{d}")[rows])).float()
        valid = valid & (torch.arange(t) % stride == 0)[None]
        z = _apply_head(head, lm, h, pos)[valid]
        teacher = torch.from_numpy(np.ascontiguousarray(topi_all[rows][..., 0]))[valid]
        for c in range(0, z.shape[0], chunk):
            tok, cf = confidence(lm.logits(z[c:c + chunk]))
            agree.append((tok == teacher[c:c + chunk]).numpy())
            conf.append(cf.numpy())
        resp.append(np.asarray(resp_all[rows])[valid.numpy()])
        conv.append(np.broadcast_to(rows[:, None], valid.shape)[valid.numpy()])
    cat = np.concatenate
    return ExitScores(cat(agree), cat(conf).astype(np.float64), cat(resp), cat(conv))


def calibration(agree: np.ndarray, conf: np.ndarray,
                thresholds: Iterable[float] = THRESHOLDS) -> list[dict[str, float | None]]:
    """Rows ``{threshold, coverage, agreement}``: the share of tokens at or above the threshold and how often those
    agree with the final layer (``agreement`` is None when no token is that confident)."""
    out: list[dict[str, float | None]] = []
    for t in thresholds:
        sel = conf >= t
        cov = float(sel.mean()) if len(conf) else 0.0
        agr = round(float(agree[sel].mean()), 4) if sel.any() else None
        out.append({"threshold": t, "coverage": round(cov, 4), "agreement": agr})
    return out


def wilson_lower(k: int, n: int, z: float = 1.645) -> float:
    """One-sided 95% lower confidence bound of a proportion k/n (Wilson score interval)."""
    if n == 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def recommend_threshold(agree: np.ndarray, conf: np.ndarray, target: float = TARGET_AGREEMENT,
                        min_tokens: int = MIN_CONFIDENT_TOKENS, margin: bool = True,
                        groups: np.ndarray | None = None) -> float | None:
    """Smallest table threshold whose agreement among confident tokens is >= ``target`` (None if none is).

    With ``margin`` the agreement must reach the target with 95% confidence (Wilson lower bound) and, when
    ``groups`` (conversation index per token) is given, also on the even and on the odd conversations
    separately - tokens of one conversation are correlated, so a bound over tokens alone is too optimistic.
    That way the promise "tokens above the threshold agree >= 95% of the time" survives new text.  Without
    ``margin`` this is the plain point-estimate rule."""
    halves = [] if groups is None or not margin else [groups % 2 == 0, groups % 2 == 1]
    for t in THRESHOLDS:
        sel = conf >= t
        n, k = int(sel.sum()), int(agree[sel].sum())
        if n < min_tokens or (wilson_lower(k, n) if margin else k / n) < target:
            continue
        if all((agree[sel & h].mean() if (sel & h).any() else 0.0) >= target for h in halves):
            return t
    return None


def summarize(s: ExitScores) -> dict[str, Any]:
    """Agreement, the calibration table and a recommended threshold (with a statistical margin, on every
    held-out row), plus an out-of-sample check of the rule: fitted on even held-out rows, measured on odd ones,
    so the calibration claim is not only fitted to the numbers that report it."""
    out: dict[str, Any] = {
        "agreement": round(float(s.agree.mean()), 4) if len(s.agree) else 0.0,
        "agreement_response": round(float(s.agree[s.resp].mean()), 4) if s.resp.any() else None,
        "tokens": int(len(s.agree)),
        "response_tokens": int(s.resp.sum()),
        "mean_confidence": round(float(s.conf.mean()), 4) if len(s.conf) else 0.0,
        "calibration": calibration(s.agree, s.conf),
    }
    even, odd = s.conv % 2 == 0, s.conv % 2 == 1
    thr = recommend_threshold(s.agree, s.conf, groups=s.conv)
    out["threshold_point_estimate"] = recommend_threshold(s.agree, s.conf, margin=False)
    fit = recommend_threshold(s.agree[even], s.conf[even])
    check = None
    if fit is not None:
        sel = odd & (s.conf >= fit)
        check = {"fit_on": "even held-out rows", "threshold": fit, "checked_on": "odd held-out rows",
                 "tokens": int(sel.sum()), "coverage": round(float(sel.sum() / max(1, odd.sum())), 4),
                 "agreement": round(float(s.agree[sel].mean()), 4) if sel.any() else None}
    out["recommended_threshold"] = thr
    out["threshold_check"] = check
    return out


# ----------------------------------------------------------------------------------------------- main
def _work_dir(cfg: TuneConfig) -> Path:
    from helios_ray.models.repository import cache_root

    return Path(cfg.work_dir) if cfg.work_dir else cache_root() / "tuning" / f"{cfg.model}-{cfg.cache_key()}"


def validate(cfg: TuneConfig) -> None:
    if cfg.vocab not in ("sampled", "full"):
        raise HeliosError(f"--vocab must be 'sampled' or 'full' (got {cfg.vocab!r})")
    if cfg.block_init not in BLOCK_INITS:
        raise HeliosError(f"--block-init must be one of {', '.join(BLOCK_INITS)} (got {cfg.block_init!r})")
    if cfg.cache_dtype not in ("auto", "float16", "float32"):
        raise HeliosError(f"--cache-dtype must be auto, float16 or float32 (got {cfg.cache_dtype!r})")
    if cfg.save_dtype not in _DTYPES:
        raise HeliosError(f"--save-dtype must be one of {', '.join(_DTYPES)}")
    for name, v in (("--tokens", cfg.tokens), ("--seq-len", cfg.seq_len), ("--topk", cfg.topk),
                    ("--batch-tokens", cfg.batch_tokens), ("--eval-conversations", cfg.eval_conversations),
                    ("--eval-seq-len", cfg.eval_seq_len), ("--eval-stride", cfg.eval_stride)):
        if v < 1:
            raise HeliosError(f"{name} must be >= 1 (got {v})")
    if cfg.steps is not None and cfg.steps < 1:
        raise HeliosError(f"--steps must be >= 1 (got {cfg.steps})")


class TuningRun:
    """One tuning run: the frozen backbone, the cache (filled on construction) and the per-head steps."""

    def __init__(self, cfg: TuneConfig, repo: Any = None):
        from transformers import AutoTokenizer

        from helios_ray.models.repository import ModelRepository

        self.t_start, self.cpu_start = time.perf_counter(), time.process_time()
        validate(cfg)
        self.cfg = cfg
        self.repo = repo = repo or ModelRepository(models_file=cfg.models_file)
        repo.spec(cfg.model)  # unknown model -> UnknownModelError, before anything is read
        ckpt_dir = repo.checkpoint_dir(cfg.model)
        self.spec = spec = read_spec(ckpt_dir)
        check_exits(cfg.exits, spec, cfg.model)
        if cfg.topk > spec.vocab_size:
            raise HeliosError(f"--topk {cfg.topk} exceeds the vocabulary ({spec.vocab_size})")
        self.out_dir = Path(cfg.out) if cfg.out else repo.cache_dir / "exits" / cfg.model

        # data first: an empty or malformed file fails before the model is loaded
        train_convs = load_dataset(cfg.data, split="train", seed=cfg.seed)
        held_convs = load_dataset(cfg.data, split="heldout", seed=cfg.seed)
        seen: set[str] = set()  # one chunk per chat: 100 held-out conversations are 100 different chats
        held_convs = [c for c in held_convs if not (c.group in seen or seen.add(c.group))]  # type: ignore[func-returns-value]
        if not held_convs:
            raise HeliosError(f"data {cfg.data!r} has no held-out records (5% of ids by hash): give it more records")
        if not train_convs:
            raise HeliosError(f"data {cfg.data!r} has no training records")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
        except (OSError, ValueError) as e:
            raise HeliosError(f"model {cfg.model!r} has no usable tokenizer in {ckpt_dir}: {e}") from None

        self.work = work = _work_dir(cfg)
        work.mkdir(parents=True, exist_ok=True)
        self.state_path = work / "state.json"
        self.state: dict[str, Any] = {}
        depths = sorted({e.depth for e in cfg.exits})
        eval_depths = sorted(set(depths) | {d + 1 for d in depths if d + 1 < spec.num_layers})
        # The cache is a pure function of cache_key() (+ the depths it holds): reuse it whenever it matches,
        # finished or not.  Heads are reused only with --resume.
        if self.state_path.exists():
            old = json.loads(self.state_path.read_text())
            if (old.get("cache_key") == cfg.cache_key() and set(depths) <= set(old.get("depths", []))
                    and set(eval_depths) <= set(old.get("eval_depths", []))):
                self.state = old
                _log(f"reusing the cache in {work}")
            else:
                _log(f"{work} holds a cache for other settings: starting it over")
                for p in list(work.glob("*.npy")) + list(work.glob("heads/*")) + [self.state_path]:
                    p.unlink()
        if not self.state:
            self.state = {"cache_key": cfg.cache_key(), "depths": depths, "eval_depths": eval_depths}
        self.save_state()
        depths, eval_depths = self.state["depths"], self.state["eval_depths"]

        self.lm, _ = load_decoder(ckpt_dir, None, "cpu", torch.float32, cfg.model)
        self.train_cache, self.eval_cache = Cache(work, "train"), Cache(work, "eval")
        self.batch_rows = max(1, cfg.batch_tokens // cfg.seq_len)
        st = self.state
        if st.get("train_rows_done", -1) < st.get("train_rows", 0) or "train_rows" not in st:
            t0 = time.perf_counter()
            rows = build_rows(train_convs, self.tokenizer, cfg.seq_len, cfg.tokens)
            if rows.tokens == 0:
                raise HeliosError(f"data {cfg.data!r} yields no training tokens (every record is shorter than 8 tokens)")
            st["train_rows"], st["train_tokens"] = int(rows.ids.shape[0]), rows.tokens
            if "hidden_dtype" not in st:
                st["hidden_dtype"] = (probe_hidden_dtype(self.lm, rows, eval_depths) if cfg.cache_dtype == "auto"
                                      else cfg.cache_dtype)
            fill_cache(self.train_cache, self.lm, rows, depths, cfg.topk, st, self.save_state,
                       max(1, 1024 // cfg.seq_len), cfg.progress, st["hidden_dtype"])
            st["train_cache_seconds"] = round(st.get("train_cache_seconds", 0) + time.perf_counter() - t0, 1)
            self.save_state()
        if st.get("eval_rows_done", -1) < st.get("eval_rows", 0) or "eval_rows" not in st:
            t0 = time.perf_counter()
            rows = build_rows(held_convs, self.tokenizer, cfg.eval_seq_len, None, max_rows=cfg.eval_conversations,
                              windows=False)
            st["eval_rows"], st["eval_tokens"] = int(rows.ids.shape[0]), rows.tokens
            st["eval_conversation_ids"] = rows.conv_ids
            fill_cache(self.eval_cache, self.lm, rows, eval_depths, 1, st, self.save_state,
                       max(1, 1024 // cfg.eval_seq_len), cfg.progress, st.get("hidden_dtype", "float16"))
            st["eval_cache_seconds"] = round(st.get("eval_cache_seconds", 0) + time.perf_counter() - t0, 1)
            self.save_state()
        self.heads_dir = work / "heads"
        self.heads_dir.mkdir(exist_ok=True)

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.state_path)

    @property
    def train_tokens(self) -> int:
        return int(self.state["train_tokens"])

    def train(self, e: ExitSpec) -> tuple[ExitHead, dict[str, Any]]:
        """Train (or, with --resume, reload) the head for exit ``e``; the stored-dtype rounding is applied."""
        from safetensors.torch import load_file, save_file

        cfg = self.cfg
        key = cfg.head_key(e)
        done_file = self.heads_dir / f"{e.depth}-{key}.safetensors"
        res_file = self.heads_dir / f"{e.depth}-{key}.json"
        ckpt = self.heads_dir / f"{e.depth}-{key}.ckpt"
        head = build_head(e, self.lm, cfg.block_init, cfg.seed)
        if cfg.resume and done_file.exists() and res_file.exists():
            head.load_state_dict(load_file(str(done_file)))
            _log(f"exit {e.depth}: already trained ({done_file.name}), reusing it")
            return head.eval(), json.loads(res_file.read_text())
        if not cfg.resume:
            ckpt.unlink(missing_ok=True)
        epochs = cfg.epochs if e.kind == "block" else cfg.linear_epochs
        steps = cfg.steps or max(1, math.ceil(epochs * self.train_tokens / (self.batch_rows * cfg.seq_len)))
        lr = cfg.lr
        res = train_head(head, self.lm, self.train_cache, steps, self.batch_rows, lr, cfg, ckpt, cfg.progress)
        assert res is not None
        save_dtype = _DTYPES[cfg.save_dtype]
        if save_dtype != torch.float32:  # evaluate exactly what is shipped
            with torch.no_grad():
                for p in head.parameters():
                    p.copy_(p.to(save_dtype).float())
        res["train_tokens_seen"] = steps * self.batch_rows * cfg.seq_len
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(done_file))
        res_file.write_text(json.dumps(res))
        ckpt.unlink(missing_ok=True)
        return head, res

    def lens(self, d: int) -> float | None:
        """Held-out agreement of the logit lens after ``d`` layers (1.0 at the full depth)."""
        if d >= self.spec.num_layers:
            return 1.0
        lens = self.state.setdefault("lens", {})
        key = f"{d}/{self.cfg.eval_stride}"
        if key not in lens and self.eval_cache.exists(f"h{d}"):
            sc = score_exit(SharedHead(d), self.lm, self.eval_cache, d, self.cfg.eval_stride)
            lens[key] = round(float(sc.agree.mean()), 4)
            self.save_state()
        return lens.get(key)

    def evaluate(self, e: ExitSpec, head: ExitHead, res: dict[str, Any]) -> dict[str, Any]:
        """The exit card entry for one trained head."""
        s = summarize(score_exit(head.eval(), self.lm, self.eval_cache, e.depth, self.cfg.eval_stride))
        n_params = sum(p.numel() for p in head.parameters())
        return {
            "kind": e.kind, **({"rank": e.rank} if e.kind == "linear" else {}),
            **({"init": self.cfg.block_init} if e.kind == "block" else {}),
            "parameters": n_params, "bytes": n_params * torch.finfo(_DTYPES[self.cfg.save_dtype]).bits // 8,
            "extra_kv_layers": 1 if e.kind == "block" else 0,
            "train_tokens": self.train_tokens, "train_tokens_seen": res["train_tokens_seen"], "steps": res["steps"],
            "lr": res["lr"], "train_seconds": res["seconds"], "kl_first": res["kl_first"], "kl_last": res["kl_last"],
            "lens_agreement": self.lens(e.depth),
            "lens_agreement_next_layer": self.lens(e.depth + 1) if e.kind == "block" else None,
            **s,
        }

    def write(self, heads: dict[int, ExitHead], card_exits: dict[str, Any]) -> dict[str, Any]:
        cfg, spec, st = self.cfg, self.spec, self.state
        self.out_dir.mkdir(parents=True, exist_ok=True)
        heads_path = self.out_dir / "exits.safetensors"
        save_heads(heads_path, heads, {"model": cfg.model, "card": "exits.json"}, dtype=_DTYPES[cfg.save_dtype])
        card = {
            "format": CARD_FORMAT,
            "model": cfg.model,
            "family": spec.family,
            "total_layers": spec.num_layers,
            "heads_file": heads_path.name,
            "heads_file_bytes": heads_path.stat().st_size,
            "heads_dtype": cfg.save_dtype,
            "confidence": "max_prob",
            "target_agreement": TARGET_AGREEMENT,
            "data": {
                "source": cfg.data, "seq_len": cfg.seq_len, "train_rows": st["train_rows"],
                "train_tokens": self.train_tokens, "heldout_rows": st["eval_rows"],
                "heldout_tokens": st["eval_tokens"], "heldout_seq_len": cfg.eval_seq_len,
                "heldout_scored_every": cfg.eval_stride,
                "split": "held out iff sha256(conversation group id) falls in the first 5%",
            },
            "teacher": {"layer": spec.num_layers, "topk": cfg.topk},
            "training": {
                "vocab": cfg.vocab, "negatives": cfg.negatives if cfg.vocab == "sampled" else None,
                "ce_weight": cfg.ce_weight, "batch_tokens": self.batch_rows * cfg.seq_len, "epochs": cfg.epochs,
                "linear_epochs": cfg.linear_epochs, "lr": cfg.lr,
                "seed": cfg.seed, "block_init": cfg.block_init, "optimizer": "AdamW(0.9, 0.95), cosine to 10%",
                "cache_seconds": round(st.get("train_cache_seconds", 0) + st.get("eval_cache_seconds", 0), 1),
                "threads": torch.get_num_threads(),
                "wall_seconds": round(time.perf_counter() - self.t_start, 1),
                "cpu_seconds_this_invocation": round(time.process_time() - self.cpu_start, 1),
            },
            "command": cfg.command,
            "exits": card_exits,
        }
        card_path = self.out_dir / "exits.json"
        tmp = card_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(card, indent=2) + "\n")
        tmp.replace(card_path)
        return card


def tune_exits(cfg: TuneConfig, repo: Any = None) -> dict[str, Any]:
    """Cache, train every head, evaluate on held-out rows; writes ``exits.safetensors`` + ``exits.json``."""
    run = TuningRun(cfg, repo)
    heads: dict[int, ExitHead] = {}
    results: dict[int, dict[str, Any]] = {}
    for e in cfg.exits:
        heads[e.depth], results[e.depth] = run.train(e)
    card_exits = {}
    for e in tqdm(cfg.exits, desc="evaluate", disable=not cfg.progress, file=sys.stderr):
        card_exits[str(e.depth)] = run.evaluate(e, heads[e.depth], results[e.depth])
    return run.write(heads, card_exits)


# ---------------------------------------------------------------------------------------- table text
def card_table(card: dict[str, Any]) -> str:
    """The measured table (one line per exit) as Markdown."""
    lines = ["| exit | head | params | lens @D | lens @D+1 | head agreement | on assistant tokens | thr* | "
             "coverage@thr | agreement@thr (out-of-sample) | train tokens | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d, e in sorted(card["exits"].items(), key=lambda kv: int(kv[0])):
        thr = e.get("recommended_threshold")
        row = next((r for r in e["calibration"] if r["threshold"] == thr), None)
        chk = e.get("threshold_check") or {}
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines.append(
            f"| L{d} | {e['kind']} | {e['parameters'] / 1e6:.2f}M | {pct(e['lens_agreement'])} | "
            f"{pct(e['lens_agreement_next_layer'])} | **{pct(e['agreement'])}** | {pct(e['agreement_response'])} | "
            f"{thr if thr is not None else '-'} | {pct(row['coverage']) if row else '-'} | "
            f"{pct(row['agreement']) if row else '-'} ({pct(chk.get('agreement'))} @ {chk.get('threshold', '-')}) | "
            f"{e['train_tokens']} | {e['train_seconds']} |")
    return "\n".join(lines)


def environment_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))



# ------------------------------------------------------------------------------------ eval-exits
def _prompt_ids(conv: Conversation, tokenizer: Any) -> list[int]:
    """A request's token ids: chats up to their first user turn with the generation prompt, texts as they are."""
    if conv.text is None:
        conv = Conversation(id=conv.id, messages=tuple(conv.prompt_messages), kind=conv.kind, source=conv.source)
        return encode(conv, tokenizer, add_generation_prompt=True)
    return encode(conv, tokenizer)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def evaluate_exits(model: str, prompts: str, max_tokens: int = 16, limit: int | None = None,
                   exits: list[int] | None = None, heads_path: Path | None = None, split: str = "all",
                   models_file: str | None = None, progress: bool = True, repo: Any = None) -> dict[str, Any]:
    """Exit quality on a prompt file, against the full model's own greedy output.

    * teacher-forced: the full model generates ``max_tokens`` greedy tokens per prompt (profile mode); at every
      generated position each exit's argmax is compared with the final layer's -> agreement + calibration;
    * free-running: the model loaded to depth D only (plus its exit head, as serving loads it) generates greedily
      from the same prompt -> share of prompts whose ``max_tokens`` tokens equal the full model's exactly,
      mean common-prefix share and position-wise token agreement.
    """
    from helios_ray.models.early_exit import load_model
    from helios_ray.models.repository import ModelRepository

    if max_tokens < 1:
        raise HeliosError(f"--max-tokens must be >= 1 (got {max_tokens})")
    if limit is not None and limit < 1:
        raise HeliosError(f"--limit must be >= 1 (got {limit})")
    repo = repo or ModelRepository(models_file=models_file)
    repo.spec(model)
    convs = load_dataset(prompts, split=split, limit=limit, seed=None)  # type: ignore[arg-type]
    if not convs:
        raise HeliosError(f"{prompts}: no prompts")
    if heads_path is not None and not Path(heads_path).exists():
        raise HeliosError(f"exit heads file {heads_path} does not exist")
    full = load_model(model, repo=repo, device="cpu", exits=Path(heads_path) if heads_path else "all")
    L = full.total_layers
    trained = sorted(full.heads)
    depths = sorted(set(exits)) if exits else trained
    if not depths:
        raise HeliosError(f"model {model!r} has no trained exit heads; pass --exits to evaluate the logit lens")
    bad = [d for d in depths if not 1 <= d < L]
    if bad:
        raise HeliosError(f"exit layer(s) {bad} out of range for {model}: exits must be in 1..{L - 1}")
    card: dict[str, Any] = {}
    hp = Path(heads_path) if heads_path else repo.exits_path(model)
    if hp is not None and hp.with_suffix(".json").exists():
        card = json.loads(hp.with_suffix(".json").read_text())

    per: dict[int, dict[str, list[Any]]] = {d: {"agree": [], "conf": [], "kind": []} for d in depths}
    refs: list[tuple[Conversation, list[int], list[int]]] = []
    skipped = 0
    for conv in tqdm(convs, desc="full model", disable=not progress, file=sys.stderr):
        ids = _prompt_ids(conv, full.tokenizer)
        if not ids or len(ids) + max_tokens > full.spec.max_positions:
            skipped += 1
            continue
        recs = full.profile_generate(ids, max_tokens, depths)
        for r in recs:
            for d in depths:
                tok, c = r["exits"][d]
                per[d]["agree"].append(tok == r["final"])
                per[d]["conf"].append(c)
                per[d]["kind"].append(conv.kind)
        refs.append((conv, ids, [r["final"] for r in recs]))
    if not refs:
        raise HeliosError(f"{prompts}: every prompt is empty or longer than the model's context")
    del full

    out_exits: dict[str, Any] = {}
    for d in depths:
        agree, conf = np.asarray(per[d]["agree"], bool), np.asarray(per[d]["conf"], float)
        kinds = np.asarray(per[d]["kind"])
        m = load_model(model, depth=d, repo=repo, device="cpu", exits=Path(heads_path) if heads_path else "auto")
        exact, prefix, pos_agree = [], [], []
        for conv, ids, ref in tqdm(refs, desc=f"depth {d}", disable=not progress, file=sys.stderr):
            got = [t.token for t in m.generate_stream(ids, max_tokens)]
            exact.append(got == ref)
            prefix.append(_common_prefix(got, ref) / max(1, len(ref)))
            pos_agree.append(sum(x == y for x, y in zip(got, ref)) / max(1, len(ref)))
        card_thr = ((card.get("exits") or {}).get(str(d)) or {}).get("recommended_threshold")
        entry: dict[str, Any] = {
            "head": m.exit_head.kind,
            "agreement": round(float(agree.mean()), 4),
            "by_kind": {k: round(float(agree[kinds == k].mean()), 4) for k in sorted(set(kinds.tolist()))},
            "calibration": calibration(agree, conf),
            "card_threshold": card_thr,
            "free_run": {
                "exact_match": round(float(np.mean(exact)), 4),
                "common_prefix": round(float(np.mean(prefix)), 4),
                "token_agreement": round(float(np.mean(pos_agree)), 4),
            },
        }
        if card_thr is not None:
            sel = conf >= card_thr
            entry["at_card_threshold"] = {"coverage": round(float(sel.mean()), 4),
                                          "agreement": round(float(agree[sel].mean()), 4) if sel.any() else None}
        out_exits[str(d)] = entry
    return {
        "model": model, "prompts": prompts, "split": split, "num_prompts": len(refs), "skipped": skipped,
        "max_tokens": max_tokens, "generated_tokens": int(sum(len(r) for _, _, r in refs)),
        "total_layers": L, "heads_file": str(hp) if hp else None, "exits": out_exits,
    }


def report_table(report: dict[str, Any]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"{report['model']}: {report['num_prompts']} prompts from {report['prompts']}, "
             f"{report['generated_tokens']} tokens generated by the full model ({report['max_tokens']} max each)",
             "| exit | head | teacher-forced agreement | by kind | free-run exact | free-run prefix | thr | "
             "coverage@thr | agreement@thr |", "|---|---|---|---|---|---|---|---|---|"]
    for d, e in sorted(report["exits"].items(), key=lambda kv: int(kv[0])):
        at = e.get("at_card_threshold") or {}
        kinds = ", ".join(f"{k} {pct(v)}" for k, v in e["by_kind"].items())
        lines.append(f"| L{d} | {e['head']} | {pct(e['agreement'])} | {kinds} | {pct(e['free_run']['exact_match'])} | "
                     f"{pct(e['free_run']['common_prefix'])} | {e['card_threshold'] or '-'} | "
                     f"{pct(at.get('coverage'))} | {pct(at.get('agreement'))} |")
    return "\n".join(lines)
