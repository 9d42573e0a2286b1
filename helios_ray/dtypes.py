"""Which dtype to serve in: bfloat16 where the hardware computes it natively, float32 elsewhere.

Torch-free, so the control plane (which prices weights and KV at the serving dtype) resolves ``auto`` exactly as
the replica that loads the model does.
"""

from __future__ import annotations

from pathlib import Path


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of this Linux host (empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU has bfloat16 matmul units (AVX512-BF16 or AMX-BF16).

    Without them torch emulates bf16 matmuls through fp32 - slower than fp32 itself and less exact - so ``auto``
    picks bf16 on CPU only when these flags are present.  ``torch.backends.cpu.get_cpu_capability()`` ('AVX2',
    'AVX512', ...) does not tell bf16 apart, so the flags decide."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def serving_dtype(dtype: str, cuda: bool, flags: set[str] | None = None) -> str:
    """Resolve ``auto``: bfloat16 on CUDA and on bf16-capable CPUs, else float32; other names pass through."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if cuda or cpu_has_bf16(flags) else "float32"
