"""Decode attention that reads the paged KV in place: a small C kernel, built on first use, called via ctypes.

Why: SDPA needs each sequence's keys as one dense tensor, so a decode step used to gather every sequence's blocks
into a fresh copy for every layer (``index_select``) and then read that copy again - the KV crossed memory three
times and the gather alone was ~12% of a batch-16 step (docs/benchmarks.md).  The kernel
(``csrc/paged_attention.c``) walks each sequence's slot map and reads every key and value row once, with the
softmax and the accumulation in float32 like SDPA's CPU path.

Why C through ctypes rather than a torch C++ extension: the file has no torch headers, so it compiles in about a
second with the host's ``cc`` (no ninja, no 40-second build of torch's headers) and for the host's own CPU
(``-march=native``): the shared object is cached under ``<HELIOS_CACHE_DIR>/kernels`` by a hash of the source,
the flags, the compiler and the CPU's feature flags, so another CPU never loads it.  Where no compiler exists or the
build fails, :func:`kernel` says why and the engine keeps the gather path (``engine.decode_attention: auto``).

CPU tensors with float32 or bfloat16 pools only; CUDA keeps SDPA over gathered blocks.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from helios_ray.dtypes import cpu_flags
from helios_ray.errors import HeliosError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.c"
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
          "-fassociative-math", "-fno-signed-zeros")
POOL_DTYPES = (torch.float32, torch.bfloat16)


class KernelUnavailable(HeliosError):
    """The in-place decode attention kernel cannot be built or loaded on this host (the message says why)."""


def _cache_dir() -> Path:
    from helios_ray.paths import cache_root  # the one place the cache root is decided

    return cache_root() / "kernels"


def _compiler() -> str:
    asked = os.environ.get("CC")
    cc = shutil.which(asked) if asked else (shutil.which("cc") or shutil.which("gcc"))
    if not cc:
        raise KernelUnavailable(f"C compiler {asked!r} (CC) not found" if asked else
                                "no C compiler found (install gcc, or set CC) for the paged decode attention kernel")
    return cc


def _host_key(cc: str, cflags: tuple[str, ...]) -> str:
    """What the object depends on: source, flags, compiler, and the CPU as ``-march=native`` resolves it (the
    resolved target options, not only /proc/cpuinfo's flags, which some platforms do not list), so that a cache
    shared between nodes never hands one CPU another's instructions."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    target = subprocess.run([cc, *[f for f in cflags if f.startswith("-m")], "-Q", "--help=target"],
                            capture_output=True, text=True, check=False).stdout
    parts = [SOURCE.read_text(), " ".join(cflags), version, target, platform.machine(), " ".join(sorted(cpu_flags()))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _writable(d: Path) -> Path:
    """``d``, or a per-user temporary directory when ``d`` cannot be written (a read-only shared cache)."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"helios-ray-kernels-{os.getuid()}"
    fallback.mkdir(parents=True, exist_ok=True)
    log.info("kernel cache %s is not writable; building in %s", d, fallback)
    return fallback


def build(cflags: tuple[str, ...] = CFLAGS) -> Path:
    """The kernel's shared object for this host, compiled unless the cache already holds it."""
    cc = _compiler()
    name = f"paged_attention-{_host_key(cc, cflags)}.so"
    if (_cache_dir() / name).exists():
        return _cache_dir() / name
    try:
        out = _writable(_cache_dir()) / name
    except OSError as e:
        raise KernelUnavailable(f"no writable directory to build the paged decode attention kernel in: {e}") from None
    if out.exists():
        return out
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *cflags, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KernelUnavailable(f"building the paged decode attention kernel failed ({cc}): "
                                    f"{proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: replicas building at once never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the paged decode attention kernel: %s", out)
    return out


@functools.lru_cache(maxsize=4)
def load(cflags: tuple[str, ...] = CFLAGS) -> ctypes.CDLL | KernelUnavailable:
    """The kernel built with ``cflags`` (a variant such as ``-mno-avx512f`` exercises the portable C path), or
    why it is unavailable.  Cached: one build and one load per process."""
    try:
        lib = ctypes.CDLL(str(build(cflags)))
    except KernelUnavailable as e:
        return e
    except OSError as e:
        return KernelUnavailable(f"loading the paged decode attention kernel failed: {e}")
    fn = lib.helios_paged_decode_attention
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, p, ctypes.c_int, p, i64, p, p, i64, i64, i64, i64, ctypes.c_float, i64, ctypes.c_float,
                   ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def kernel() -> ctypes.CDLL:
    """The loaded kernel library; raises :class:`KernelUnavailable` with the reason (cached, one build)."""
    lib = load()
    if isinstance(lib, KernelUnavailable):
        raise lib
    return lib


def resolve(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode attention reads the paged KV in place (``EngineConfig.decode_attention``).

    ``auto`` falls back to the gather path, with one log line saying why; ``paged`` asked for explicitly is an
    error where the kernel cannot serve (CUDA, a float16 cache, no compiler).
    """
    if mode == "gather":
        return False
    if device.type != "cpu" or dtype not in POOL_DTYPES:
        if mode == "paged":
            raise HeliosError(f"decode_attention: paged runs on CPU with a float32 or bfloat16 KV cache, not "
                              f"{dtype} on {device.type}; use 'auto' or 'gather'")
        return False
    try:
        kernel()
    except KernelUnavailable as e:
        if mode == "paged":
            raise
        log.warning("%s; decode attention gathers the paged KV instead (slower)", e)
        return False
    return True


def supports(pool: Tensor) -> bool:
    """Whether the kernel can read this pool (CPU, float32 or bfloat16)."""
    return pool.device.type == "cpu" and pool.dtype in POOL_DTYPES


def decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor, lens: Tensor, scale: float,
                     window: int | None = None, softcap: float | None = None, lib: ctypes.CDLL | None = None
                     ) -> Tensor:
    """Attention of one query token per sequence over its paged keys.

    q ``[B, Hq, d]``; pools ``[N, Hkv, d]``; ``slots[b, p]`` the pool slot of row b's key at position p for
    ``p < lens[b]`` (the query is at ``lens[b] - 1``).  Returns ``[B, Hq, d]`` in q's dtype.
    """
    B, Hq, d = q.shape
    N, Hkv, dk = k_pool.shape
    if dk != d or v_pool.shape != k_pool.shape or Hq % Hkv or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k_pool.shape)}, v {tuple(v_pool.shape)}")
    if not supports(k_pool):
        raise ValueError(f"the kernel reads CPU float32/bfloat16 pools, not {k_pool.dtype} on {k_pool.device}")
    if slots.dtype != torch.int64 or lens.dtype != torch.int64 or slots.shape[0] != B or lens.shape != (B,):
        raise ValueError("slots [B, S] and lens [B] must be int64")
    assert k_pool.is_contiguous() and v_pool.is_contiguous()
    qf = q.to(torch.float32).contiguous()
    # bf16 queries over bf16 pools also go as they are: with AVX512-BF16 the key dots run on bf16 pairs
    qh = q.contiguous() if (q.dtype == torch.bfloat16 and k_pool.dtype == torch.bfloat16) else None
    slots, lens = slots.contiguous(), lens.contiguous()
    out = torch.empty(B, Hq, d, dtype=torch.float32)
    rc = (lib or kernel()).helios_paged_decode_attention(
        qf.data_ptr(), qh.data_ptr() if qh is not None else None, k_pool.data_ptr(), v_pool.data_ptr(), int(k_pool.dtype == torch.bfloat16),
        slots.data_ptr(), slots.stride(0), lens.data_ptr(), out.data_ptr(), B, Hq, Hkv, d, float(scale),
        int(window or 0), float(softcap or 0.0), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged decode attention could not allocate its score buffer")
    return out if q.dtype == torch.float32 else out.to(q.dtype)
