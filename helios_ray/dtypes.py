"""Which dtype to serve in: bfloat16 where the hardware computes it natively, float32 elsewhere.

Torch-free, so the control plane (which prices weights and KV at the serving dtype) resolves ``auto`` exactly as
the replica that loads the model does.

A serving dtype names the activations (and KV) and, for weight-only quantization, the weight format too:
``int8`` resolves to ``int8/bfloat16`` (int8 weights, bf16 activations and KV) where bf16 is native and to
``int8/float32`` elsewhere.  The resolved name travels to the pricing code, so the bytes it counts are the bytes
the replica loads (the same ``int8`` costs 2 or 4 bytes per KV element depending on the host).  ``int4`` likewise.
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


FLOAT_DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_FORMATS = ("int8", "int4")  # weight-only quantized formats (helios_ray/models/quant.py)
DTYPE_CHOICES = ("auto", *FLOAT_DTYPES, *WEIGHT_FORMATS)  # what a user may write (config, CLI)


def serving_dtype(dtype: str, cuda: bool, flags: set[str] | None = None) -> str:
    """Resolve ``auto`` (bfloat16 on CUDA and on bf16-capable CPUs, else float32) and a weight format
    (``int8`` -> ``int8/<that activation dtype>``); float names and resolved names pass through."""
    native = "bfloat16" if cuda or cpu_has_bf16(flags) else "float32"
    if dtype == "auto":
        return native
    if dtype in WEIGHT_FORMATS:
        return f"{dtype}/{native}"
    return dtype


def split_dtype(dtype: str) -> tuple[str | None, str]:
    """(weight format or None, activation dtype) of a resolved serving dtype: ``int8/bfloat16`` ->
    ``("int8", "bfloat16")``, ``float32`` -> ``(None, "float32")``.  A bare ``int8`` (not resolved for a host)
    is an error: its bytes depend on the host."""
    name = str(dtype).removeprefix("torch.")
    weights, _, act = name.rpartition("/")
    if weights and weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r} in dtype {dtype!r} (known: {', '.join(WEIGHT_FORMATS)})")
    if act in WEIGHT_FORMATS:
        raise ValueError(f"dtype {dtype!r} is not resolved for a host: use serving_dtype({act!r}, cuda) "
                         f"(-> {act}/bfloat16 or {act}/float32)")
    if act not in FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_CHOICES)})")
    return weights or None, act
