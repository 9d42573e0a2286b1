"""Per-call time of the quantized matmul paths (models/quant.py) vs a bf16 nn.Linear, 1 thread, by rows M.

Run: PYTHONPATH=. python scripts/quant_matmul_paths.py   (SmolLM2-135M shapes; ~2 min).  int4 is only used for the
layer projections (the LM head stays int8), so the head row has no int4 column.
"""
import time

import torch

from helios_ray.models import quant

torch.set_num_threads(1)


def best_us(f, n: int = 20) -> float:
    f()
    f()
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


for N, K in [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]:
    lin = torch.nn.Linear(K, N, bias=False)
    q, s = quant.quantize(lin.weight, "int8", torch.bfloat16)
    q4 = quant.Int4Linear.from_linear(lin, torch.bfloat16) if N < 10000 else None
    wb = lin.weight.bfloat16()
    for M in [1, 2, 4, 8, 12, 16, 24, 32, 64, 128]:
        x = torch.randn(M, K).bfloat16()
        n = 5 if N > 10000 else 20
        a = best_us(lambda: torch.nn.functional.linear(x, wb), n)
        p = best_us(lambda: quant.qmatmul(x, q, s, pack_max_rows=10**9), n)
        d = best_us(lambda: quant.qmatmul(x, q, s, pack_max_rows=0), n)
        i4 = f"{best_us(lambda: q4(x), n):8.0f} us" if q4 is not None else "       -   "
        print(f"{N}x{K} M={M:>3}: bf16 {a:8.0f} us | int8pack {p:8.0f} us | int8 dequant+gemm {d:8.0f} us | "
              f"int4pack {i4}", flush=True)
