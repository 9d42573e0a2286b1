"""Does torch.compile pay in the engine's decode step?  The MLP of every layer (two thirds of a layer's FLOPs, and
free of the per-group Python loop the packed attention has, which would break the graph) compiled with inductor,
dynamic shapes, against the same engine uncompiled, in one process, batch 16, bf16 where the CPU has it.

    PYTHONPATH=. python scripts/compile_mlp.py

Measured on the AMX host (1 thread, quiet): 4.45 s uncompiled vs 4.48 / 4.49 s compiled for 16 ShareGPT requests
(<= 32 tokens each) after a 20.7 s compile (rerun, inductor's cache warm: 4.36 vs 4.45 / 4.75 s); token agreement 79% with the uncompiled run (other bf16 rounding in
fused kernels).  Not kept: docs/benchmarks.md, "Engine speed".
"""

from __future__ import annotations

import time

import torch

from helios_bench.engine_bench import run_engine, sharegpt_requests
from helios_ray.models.early_exit import load_model


def main() -> None:
    torch.set_num_threads(1)
    m = load_model("smollm2-135m", exits="shared", dtype="auto")
    reqs = sharegpt_requests(m, 16, 0, 256, 32)
    run_engine(m, reqs[:2], 2, 1 << 30)  # warm-up
    t_plain, out_plain, _ = run_engine(m, reqs, 16, 1 << 30)
    t0 = time.perf_counter()
    for block in m.lm.layers:
        block.mlp = torch.compile(block.mlp, dynamic=True)
    run_engine(m, reqs[:2], 2, 1 << 30)  # compiles
    warm = time.perf_counter() - t0
    t1, out_c, _ = run_engine(m, reqs, 16, 1 << 30)
    t2, _, _ = run_engine(m, reqs, 16, 1 << 30)
    same = sum(a == b for x, y in zip(out_plain, out_c) for a, b in zip(x, y)) / sum(len(x) for x in out_plain)
    print(f"uncompiled {t_plain:.2f} s; compile {warm:.1f} s; compiled {t1:.2f} / {t2:.2f} s; "
          f"token agreement {same:.1%}")


if __name__ == "__main__":
    main()
