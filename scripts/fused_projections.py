"""Fused q/k/v and gate/up projections vs separate ones: one SmolLM2 layer's projection GEMMs, 1 thread.

Run: python scripts/fused_projections.py
Measured on the AMD EPYC (AVX2) host: fusing is not faster here (q/k/v within noise, gate/up 8-30% slower: the
fused output's halves are strided for the elementwise SiLU * up), so the decoder keeps separate projections.
"""

import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
h, inter = 576, 1536


def bench(f, n: int = 200) -> float:
    for _ in range(10):
        f()
    best = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best.append((time.perf_counter() - t) / n)
    return min(best) * 1e6


for M in (1, 16, 32, 128):
    x = torch.randn(M, h)
    wq, wk, wv = torch.randn(576, h), torch.randn(192, h), torch.randn(192, h)
    wqkv = torch.cat([wq, wk, wv])
    wg, wu = torch.randn(inter, h), torch.randn(inter, h)
    wgu = torch.cat([wg, wu])
    a = bench(lambda: (F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)))
    b = bench(lambda: F.linear(x, wqkv).split([576, 192, 192], -1))
    c = bench(lambda: F.silu(F.linear(x, wg)) * F.linear(x, wu))
    d = bench(lambda: (lambda gu: F.silu(gu[:, :inter]) * gu[:, inter:])(F.linear(x, wgu)))
    print(f"M={M}: qkv separate {a:.0f} us, fused {b:.0f} us | gate/up separate {c:.0f} us, fused {d:.0f} us")
