"""Weight-only quantization (serving dtypes ``int8`` and ``int4``): the one place that quantizes, dequantizes
and prices quantized weights.

Why: a decode step reads every weight once per step; on one CPU thread at small batches that read, not the
arithmetic, bounds the step.  int8 weights with one scale per output channel halve the bytes of bf16 (a quarter
of fp32); int4 in groups of 32 with a scale and zero per group takes ~0.6 byte per weight.  Activations, norms,
biases, untied embeddings, exit heads and the KV cache stay at the activation dtype (bf16 where the CPU has bf16
units, else fp32 - see :mod:`helios_ray.dtypes`).

What is quantized: the seven projections of every decoder layer (q, k, v, o, gate, up, down) and the LM head.  A
tied LM head *is* the embedding matrix, so there the embedding is stored once in int8 and its lookup dequantizes
the looked-up rows (:class:`QuantEmbedding`).  Under ``int4`` the layer projections are int4 where the kernel
takes their shape and the LM head stays int8 (:func:`matrix_format` is the rule, for loading and pricing alike).

The int8 matmul has two paths, chosen per call by the number of rows ``M`` (tokens in the step):

* ``M <= PACK_MAX_ROWS`` and bf16 activations on CPU: ``torch._weight_int8pack_mm`` - a GEMV-style kernel that
  reads int8 weights directly; measured 2.4-3.6x faster than a bf16 GEMM at M = 1 (1536x576: 51 vs 121 us; the
  49152x576 head: 2.0 vs 7.2 ms), but its cost grows linearly with M (no reuse of a weight across rows);
* otherwise: dequantize the weight in cache-sized row chunks and run the activation-dtype GEMM, scaling the
  output columns - a fixed dequantization cost per call, then bf16 AMX GEMM speed.  Also the only path on fp32
  activations (``_weight_int8pack_mm`` on fp32 is ~4x slower than an fp32 GEMV here) and on CUDA.

int4 (:class:`Int4Linear`) always uses ``torch._weight_int4pack_mm_for_cpu`` with bf16 activations (as fast as
int8pack per row; dequantizing int4 with torch ops is slower still) and dequantizes otherwise (fp32, CUDA: slow).

Pricing: :func:`weight_bytes` is what one quantized matrix costs; ``loading.param_bytes`` counts the buffers of
the modules below, the repository prices checkpoint shapes with :func:`weight_bytes`; tests check they agree.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANTIZED_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
QMAX = {"int8": 127, "int4": 15}
INT4_GROUP = 32  # in-features per (scale, zero) pair: the block size of the bundled Q4 GGUF checkpoints
INT4_BLOCK_N = 64  # out-features per block of the CPU kernel's packed layout (see _unpack_int4)
# Largest step (rows) for the int8pack kernel; above it the dequantize-then-GEMM path is faster (measured on an
# AMX Xeon, 1 thread: crossover at 14-20 rows for SmolLM2's layers, ~22 for its 49152x576 head; docs/engine.md).
PACK_MAX_ROWS = 16
_CHUNK_BYTES = 1 << 20  # dequantize this many bytes of weight at a time (stays in L2)


def check_format(fmt: str) -> str:
    if fmt not in QMAX:
        raise ValueError(f"unknown weight format {fmt!r} (known: {', '.join(QMAX)})")
    return fmt


def matrix_format(name: str, shape: tuple[int, ...] | torch.Size, tied: bool, fmt: str) -> str | None:
    """The format the parameter with our canonical name (``attn.q.weight``, ``embed.weight``, ...) and shape
    [out, in] is stored in under serving format ``fmt`` (None: not quantized) - the one rule the loader and the
    repository's static pricing both follow.

    ``int4`` applies to the layer projections whose shape the CPU kernel takes (out % 64, in % 32; all bundled
    models' do); the LM head - and so a tied embedding, whose lookup must read single rows out of the kernel's
    blocked layout - stays int8, as do projections of other shapes."""
    base = name.removesuffix(".weight")
    if base == name:
        return None
    layer = base in QUANTIZED_LINEARS
    if not (layer or base == "lm_head" or (tied and base == "embed")):
        return None
    if check_format(fmt) == "int4" and layer and int(shape[0]) % INT4_BLOCK_N == 0 and int(shape[1]) % INT4_GROUP == 0:
        return "int4"
    return "int8"


def weight_bytes(shape: tuple[int, ...] | torch.Size, fmt: str, act_bytes: int) -> int:
    """Bytes of one [out, in] matrix stored in ``fmt``.  int8: 1 byte per weight plus one activation-dtype scale
    per output channel (the int8pack kernel wants scales in the activation dtype).  int4: half a byte per weight
    plus an activation-dtype (scale, zero) pair per group of 32 in-features."""
    out, inp = int(shape[0]), int(shape[1])
    if check_format(fmt) == "int4":
        return out * inp // 2 + (inp // INT4_GROUP) * out * 2 * act_bytes
    return out * inp + out * act_bytes


def quantize(w: Tensor, fmt: str, act_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization of a [out, in] float matrix: (int8 [out, in], scales [out]).
    The scales are rounded to ``act_dtype`` first and the weights quantized against the rounded scales, so the
    dequantized matrix is exactly what the kernels compute with."""
    if fmt != "int8":
        raise ValueError(f"quantize() makes int8 (per channel); use quantize_int4() for {fmt!r}")
    qmax = QMAX["int8"]
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / qmax).clamp(min=torch.finfo(torch.float32).tiny).to(act_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The float matrix ``q`` stands for, in ``dtype`` (the reference the kernels are tested against)."""
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(w: Tensor, act_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Asymmetric int4 per group of 32 in-features (a zero at the group's centre, a step covering its range): a
    Q4_0/Q4_1/Q4_K block of the GGUF sources is one such group (with float32 scales the bundled SmolLM2 comes back
    exactly), so the loss is only the rounding of scale and zero to the activation dtype.

    Returns (packed uint8 [out, in/2] in the CPU kernel's layout, scales_and_zeros [in/32, out, 2] in
    ``act_dtype``), with the kernel's convention ``w = (q - 8) * scale + zero``."""
    w = w.detach().float()
    n, k = w.shape
    g = w.view(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    # The zero is rounded to the activation dtype *first*, then the step that makes z + [-8, 7] * s span the group
    # is rounded to nearest.  Both alternatives tried bias every group the same way and SmolLM2 then answers "What
    # is the capital of France?" with "L'Etoile, la Marseillaise": rounding a min/max scale and zero separately
    # (clamps the extremes, the largest weights) and rounding the step up to keep the extremes (every group ~0.8%
    # larger).  Rounding to nearest keeps the errors unbiased: 120/120 teacher-forced tokens (scripts/int8_vs_fp32).
    zero = (lo + 8 * (hi - lo) / QMAX["int4"]).to(act_dtype)
    z = zero.float()
    scale = torch.maximum((z - lo) / 8, (hi - z) / 7).clamp(min=1e-8).to(act_dtype)
    q = torch.round((g - z[..., None]) / scale.float()[..., None]).add_(8).clamp_(0, QMAX["int4"])
    packed = torch._convert_weight_to_int4pack_for_cpu(q.view(n, k).to(torch.int32).contiguous(), 1)
    return packed, torch.stack([scale.T, zero.T], dim=-1).contiguous()


def _unpack_int4(packed: Tensor, n: int, k: int) -> Tensor:
    """q [out, in] (uint8, 0..15) from the CPU kernel's layout, read off torch 2.13 on AVX512: blocks of 64
    out-features, [out/64, in, 32] bytes, low nibble = row r, high nibble = row r + 32.  :func:`int4_layout_ok`
    checks it on this machine before it is trusted."""
    t = packed.view(n // INT4_BLOCK_N, k, INT4_BLOCK_N // 2)
    return torch.cat([t & 15, t >> 4], dim=2).transpose(1, 2).reshape(n, k)


_LAYOUT_OK: bool | None = None


def int4_layout_ok() -> bool:
    """Whether :func:`_unpack_int4` reads this machine's packed layout (it depends on the CPU's vector width)."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        q = torch.randint(0, 16, (2 * INT4_BLOCK_N, 2 * INT4_GROUP), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        _LAYOUT_OK = packed.shape == (q.shape[0], q.shape[1] // 2) and torch.equal(
            _unpack_int4(packed, *q.shape).to(torch.int32), q)
    return _LAYOUT_OK


def dequantize_int4(packed: Tensor, sz: Tensor, dtype: torch.dtype) -> Tensor:
    """The float [out, in] matrix an int4 pack stands for, in ``dtype``."""
    k, n = sz.shape[0] * INT4_GROUP, sz.shape[1]
    if int4_layout_ok():
        q = _unpack_int4(packed, n, k).float().view(n, k // INT4_GROUP, INT4_GROUP)
        s, z = sz[..., 0].T.float()[..., None], sz[..., 1].T.float()[..., None]
        return ((q - 8) * s + z).view(n, k).to(dtype)
    eye = torch.eye(k, dtype=sz.dtype)  # any layout: the kernel itself applied to the identity
    return torch._weight_int4pack_mm_for_cpu(eye, packed, INT4_GROUP, sz).T.to(dtype)


def _can_pack(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and hasattr(torch, "_weight_int8pack_mm")


def qmatmul(x: Tensor, q: Tensor, scales: Tensor, pack_max_rows: int = PACK_MAX_ROWS) -> Tensor:
    """``x @ dequantize(q, scales).T`` for x [..., in] in the activation dtype, by the faster path for its rows."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m, n = x2.shape[0], q.shape[0]
    if m <= pack_max_rows and _can_pack(x2):
        return torch._weight_int8pack_mm(x2, q, scales).view(*lead, n)
    rows = max(1, _CHUNK_BYTES // (k * x2.element_size()))
    if rows >= n:
        out = F.linear(x2, q.to(x2.dtype))
    else:
        out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        for n0 in range(0, n, rows):
            out[:, n0:n0 + rows] = F.linear(x2, q[n0:n0 + rows].to(x2.dtype))
    return out.mul_(scales).view(*lead, n)


class QuantLinear(nn.Module):
    """A drop-in for ``nn.Linear`` with int8 weights (buffers ``qweight``, ``scales``); bias at the activation
    dtype."""

    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None, fmt: str = "int8"):
        super().__init__()
        self.fmt = check_format(fmt)
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(scales.dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str, act_dtype: torch.dtype) -> "QuantLinear":
        q, s = quantize(lin.weight, fmt, act_dtype)
        return cls(q, s, lin.bias, fmt)

    def dequantized(self) -> Tensor:
        return dequantize(self.qweight, self.scales, self.scales.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = qmatmul(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


class Int4Linear(nn.Module):
    """A drop-in for ``nn.Linear`` with int4 weights in groups of 32 (buffers ``qweight``: the CPU kernel's packed
    layout, ``scales_zeros``).  With bf16 activations on CPU it always runs ``_weight_int4pack_mm_for_cpu``: its
    cost grows with the rows like int8pack's, but dequantizing int4 with torch ops costs more (2.6 ms per 1536x576
    matrix, more than the kernel at 128 rows).  Other activations (fp32, CUDA) dequantize - correct, slow."""

    def __init__(self, packed: Tensor, sz: Tensor, bias: Tensor | None):
        super().__init__()
        self.fmt = "int4"
        self.in_features, self.out_features = sz.shape[0] * INT4_GROUP, sz.shape[1]
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_zeros", sz)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(sz.dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, act_dtype: torch.dtype) -> "Int4Linear":
        packed, sz = quantize_int4(lin.weight, act_dtype)
        return cls(packed, sz, lin.bias)

    def dequantized(self) -> Tensor:
        return dequantize_int4(self.qweight, self.scales_zeros, self.scales_zeros.dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead, n = x.shape[:-1], self.out_features
        x2 = x.reshape(-1, self.in_features)
        if _can_pack(x2) and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.qweight, INT4_GROUP, self.scales_zeros)
        else:
            y = F.linear(x2, self.dequantized().to(x2.dtype))
        y = y.view(*lead, n)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt=int4, group={INT4_GROUP}"


class QuantEmbedding(nn.Module):
    """A tied embedding + LM head stored once in int8: the lookup dequantizes only the looked-up rows,
    :meth:`project` is the LM head (per-row scales of the embedding = per-output-channel scales of the head)."""

    def __init__(self, q: Tensor, scales: Tensor, fmt: str = "int8"):
        super().__init__()
        self.fmt = check_format(fmt)
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str, act_dtype: torch.dtype) -> "QuantEmbedding":
        q, s = quantize(emb.weight, fmt, act_dtype)
        return cls(q, s, fmt)

    def dequantized(self) -> Tensor:
        return dequantize(self.qweight, self.scales, self.scales.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)

    def project(self, x: Tensor) -> Tensor:
        return qmatmul(x, self.qweight, self.scales)


def quantize_linear(name: str, lin: nn.Linear, tied: bool, fmt: str, act_dtype: torch.dtype) -> nn.Module:
    """``lin`` (our canonical name ``name``) in the format :func:`matrix_format` gives it."""
    if matrix_format(f"{name}.weight", lin.weight.shape, tied, fmt) == "int4":
        return Int4Linear.from_linear(lin, act_dtype)
    return QuantLinear.from_linear(lin, "int8", act_dtype)


def replace_projections(block: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    """Swap each plain ``nn.Linear`` projection of a decoder block (those a family lacks are skipped) for
    ``make(name, linear)`` - the one loop behind quantized (here) and oneDNN-packed (models/prepack.py) layers."""
    for name in QUANTIZED_LINEARS:
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        lin = getattr(parent, attr, None)
        if isinstance(lin, nn.Linear):
            setattr(parent, attr, make(name, lin))
    return block


def quantize_block(block: nn.Module, fmt: str, act_dtype: torch.dtype) -> nn.Module:
    """Quantize one decoder block's projections (from its float weights, best read at float32) and cast the rest
    (norms, biases) to ``act_dtype``.  Used at load and when ``set_depth`` grows a quantized model."""
    replace_projections(block, lambda name, lin: quantize_linear(name, lin, False, fmt, act_dtype))
    return block.to(act_dtype)  # casts float parameters only; int8 buffers keep their dtype


def quantize_decoder(lm: nn.Module, fmt: str, act_dtype: torch.dtype) -> nn.Module:
    """Quantize a loaded ``DecoderLM`` in place: every layer, and the LM head (the embedding when tied).
    Sets ``lm.quant = fmt`` so that growing the model quantizes its new layers too."""
    for block in lm.layers:
        quantize_block(block, fmt, act_dtype)
    if lm.lm_head is not None:
        lm.lm_head = quantize_linear("lm_head", lm.lm_head, False, fmt, act_dtype)
    else:
        lm.embed = QuantEmbedding.from_embedding(lm.embed, "int8", act_dtype)  # int8 in every format: see above
    lm.to(act_dtype)
    lm.quant = fmt
    return lm


def quant_float(lin: nn.Module) -> Tensor:
    """A quantized (or oneDNN-packed, models/prepack.py) projection's weights as float32 [out, in]."""
    if not isinstance(lin, (QuantLinear, Int4Linear)):
        return lin.dequantized().float()
    if isinstance(lin, QuantLinear):
        return dequantize(lin.qweight, lin.scales, torch.float32)
    return dequantize_int4(lin.qweight, lin.scales_zeros, torch.float32)
