"""Micro-measurements behind the engine's CPU speed work (docs/engine.md, docs/benchmarks.md), one thread.

Run: ``PYTHONPATH=. python scripts/engine_parts.py``.  Prints, each next to its exactness check:

* a bf16 projection (SmolLM2's 576 -> 1536) as ``F.linear`` vs oneDNN-prepacked (models/prepack.py), 1/16/128 rows;
* decode attention over paged KV (SmolLM2 shape: 9 query / 3 kv heads of 64, 16 sequences x 320 tokens in
  scattered 16-token blocks): gather + SDPA vs the in-place kernel (engine/paged_attention.py), bf16 and fp32;
* the confidence of a batch-16 step over a 49,152-token vocabulary: log-softmax + top-2 + argmax (the old path)
  vs max + logsumexp (models/early_exit.confidence).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from helios_ray.engine import paged_attention as pa
from helios_ray.models.early_exit import confidence
from helios_ray.models.prepack import PackedLinear, available


def best_us(fn, n: int = 100, rounds: int = 5) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    return min(times)


def projections() -> None:
    if not available():
        print("prepack: oneDNN's bf16 path is not available on this CPU")
        return
    w = torch.randn(1536, 576).bfloat16()
    lin = PackedLinear(w, None)
    for rows in (1, 16, 128):
        x = torch.randn(rows, 576).bfloat16()
        plain, packed = best_us(lambda: F.linear(x, w)), best_us(lambda: lin(x))
        print(f"projection 576->1536, {rows:>3} rows: F.linear {plain:7.1f} us, prepacked {packed:7.1f} us "
              f"({plain / packed:.2f}x), identical: {torch.equal(lin(x), F.linear(x, w))}")


def attention() -> None:
    B, Hq, Hkv, d, S, bs = 16, 9, 3, 64, 320, 16
    g = torch.Generator().manual_seed(0)
    nb = B * S // bs + 10
    blocks = torch.randperm(nb, generator=g)[: B * S // bs].view(B, S // bs)
    slots = (blocks[:, :, None] * bs + torch.arange(bs)).reshape(B, S)
    lens = torch.full((B,), S)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    for dtype in (torch.bfloat16, torch.float32):
        kp, vp = (torch.randn(nb * bs, Hkv, d, generator=g).to(dtype) for _ in range(2))
        q = torch.randn(B, Hq, d, generator=g).to(dtype)

        def gather_sdpa() -> torch.Tensor:
            kk = kp.index_select(0, slots.reshape(-1)).view(B, S, Hkv, d).transpose(1, 2)
            vv = vp.index_select(0, slots.reshape(-1)).view(B, S, Hkv, d).transpose(1, 2)
            return F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask, scale=d**-0.5,
                                                  enable_gqa=True)[:, :, 0]

        def kernel() -> torch.Tensor:
            return pa.decode_attention(q, kp, vp, slots, lens, d**-0.5)

        a, b = best_us(gather_sdpa, 50), best_us(kernel, 50)
        diff = (kernel().float() - gather_sdpa().float()).abs().max().item()
        print(f"decode attention {str(dtype)[6:]:>8}, 16 x 320 tokens: gather + SDPA {a / 1e3:.3f} ms, in place "
              f"{b / 1e3:.3f} ms ({a / b:.2f}x), max |difference| {diff:.2g}")


def confidences() -> None:
    logits = torch.randn(16, 49152).bfloat16()

    def old() -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logits.argmax(dim=-1), logp.topk(2, dim=-1).values[..., 0].exp()

    a, b = best_us(old, 20), best_us(lambda: confidence(logits), 20)
    (t0, c0), (t1, c1) = old(), confidence(logits)
    print(f"confidence, 16 x 49152 bf16 logits: old {a / 1e3:.2f} ms, new {b / 1e3:.2f} ms ({a / b:.2f}x), "
          f"same tokens: {torch.equal(t0, t1)}, max |confidence difference| {(c0 - c1).abs().max().item():.2g}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    projections()
    attention()
    confidences()
