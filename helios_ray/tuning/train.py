"""Phase 2 of tuning: train one exit head on the cache by self-distillation from the final layer.

Loss: cross-entropy of the head's distribution against the final layer's renormalised top-k
distribution (= KL up to a constant; the KL is what is logged), plus optionally CE to the final
argmax. By default the head's softmax is taken over the batch's candidate vocabulary (every teacher
top-k token in the batch plus random negatives) instead of the whole vocabulary: the 576x49152 LM
head is most of a step's cost, and agreement is always *measured* with the full vocabulary.
Training checkpoints and resumes; the batch order is a pure function of (seed, depth).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from helios_ray.models.decoder import DecoderLM, DenseKVCache
from helios_ray.models.exit_heads import BlockHead, ExitHead
from helios_ray.models.exit_files import make_head
from helios_ray.models.healed import HealedHead
from helios_ray.tuning.cache import Cache
from helios_ray.tuning.config import ExitSpec, TuneConfig, log

__all__ = ["build_head", "head_logits", "distill_loss", "apply_head", "train_head", "autocast"]


def build_head(e: ExitSpec, lm: DecoderLM, block_init: str, seed: int) -> ExitHead:
    """A fresh head for exit ``e``, seeded by (seed, depth) so reruns start from the same weights."""
    torch.manual_seed(seed * 1000 + e.depth)
    head = make_head(e.kind, e.depth, lm.spec, e.rank, e.layers)
    if isinstance(head, BlockHead):
        if block_init == "last-zero":
            head.init_from(lm.layers[lm.spec.num_layers - 1], zero_outputs=True)
        else:
            head.init_from(lm.layers[e.depth], zero_outputs=(block_init == "next-zero"))
    head = head.float().train()
    if isinstance(head, HealedHead):
        head.attach(lm, trainable=True)  # frozen copies of layers [D-k, D) + the deltas as hooks
    return head


def autocast(cfg: TuneConfig) -> Any:
    """bf16 autocast for training and evaluation when the run's compute dtype is bfloat16."""
    from helios_ray.tuning.config import resolved_compute_dtype

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolved_compute_dtype(cfg.compute_dtype) == "bfloat16")


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


def apply_head(head: ExitHead, lm: DecoderLM, h: Tensor, pos: Tensor) -> Tensor:
    """The head's transform of cached hidden states ``h``; a block head (or a healed branch) attends over ``pos``."""
    ctx = lm.context(pos, DenseKVCache()) if head.extra_kv_layers else None
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
        log(f"exit {d}: resuming at step {start}/{steps}")
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
        h, pos, topi, topv = _batch(cache, head.input_depth, order[step * batch_rows:(step + 1) * batch_rows])
        mask = pos >= 0
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        with autocast(cfg):
            z = apply_head(head, lm, h, pos)
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
