"""Per-call time of the two int8 matmul paths (models/quant.py) vs a bf16 nn.Linear, 1 thread, by rows M.

Run: PYTHONPATH=. python scripts/int8_matmul_paths.py   (SmolLM2-135M shapes; ~1 min)
"""
import time

import torch

torch.set_num_threads(1)
from helios_ray.models import quant
def t(f, n=20):
    f(); f(); best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n): f()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6
for N, K in [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]:
    lin = torch.nn.Linear(K, N, bias=False)
    q, s = quant.quantize(lin.weight, "int8", torch.bfloat16)
    wb = lin.weight.bfloat16()
    for M in [1, 2, 4, 8, 12, 16, 24, 32, 64, 128]:
        x = torch.randn(M, K).bfloat16()
        n = 5 if N > 10000 else 20
        a = t(lambda: torch.nn.functional.linear(x, wb), n)
        p = t(lambda: quant.qmatmul(x, q, s, pack_max_rows=10**9), n)
        d = t(lambda: quant.qmatmul(x, q, s, pack_max_rows=0), n)
        print(f"{N}x{K} M={M:>3}: bf16 {a:8.0f} us | int8pack {p:8.0f} us | dequant+gemm {d:8.0f} us", flush=True)
