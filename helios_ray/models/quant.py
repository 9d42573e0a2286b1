"""Weight-only quantization (serving dtype ``int8``): the one place that quantizes, dequantizes and prices.

Why: a decode step reads every weight once per step; on one CPU thread at small batches that read, not the
arithmetic, bounds the step.  int8 weights with one scale per output channel halve the bytes of bf16 (a quarter
of fp32) and agree with the float model on ~all greedy tokens (the tests measure it on SmolLM2).  Activations,
norms, biases, untied embeddings and the KV cache stay at the activation dtype (bf16 where the CPU has bf16 units,
else fp32 - see :mod:`helios_ray.dtypes`).

What is quantized: the seven projections of every decoder layer (q, k, v, o, gate, up, down) and the LM head.  A
tied LM head *is* the embedding matrix, so there the embedding is stored once in int8 and its lookup dequantizes
the looked-up rows (:class:`QuantEmbedding`).  Exit heads stay at the activation dtype (small, and trained there).

The matmul has two paths, chosen per call by the number of rows ``M`` (tokens in the step):

* ``M <= PACK_MAX_ROWS`` and bf16 activations on CPU: ``torch._weight_int8pack_mm`` - a GEMV-style kernel that
  reads int8 weights directly; measured 2.6-3.4x faster than a bf16 GEMM at M = 1 (576x1536: 49 vs 127 us; the
  49152x576 head: 1.8 vs 6.2 ms), but its cost grows linearly with M (no reuse of a weight across rows);
* otherwise: dequantize the weight in cache-sized row chunks and run the activation-dtype GEMM, scaling the
  output columns - a fixed dequantization cost per call, then bf16 AMX GEMM speed.  Also the only path on fp32
  activations (``_weight_int8pack_mm`` on fp32 is ~4x slower than an fp32 GEMV here) and on CUDA.

Pricing: :func:`weight_bytes` is what one quantized matrix costs; ``loading.param_bytes`` counts the buffers of
the modules below, the repository prices checkpoint shapes with :func:`weight_bytes`; a test checks they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANTIZED_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
QMAX = {"int8": 127}
# Largest step (rows) for the int8pack kernel; above it the dequantize-then-GEMM path is faster (measured on an
# AMX Xeon, 1 thread: crossover at 14-20 rows for SmolLM2's layers, ~22 for its 49152x576 head; docs/engine.md).
PACK_MAX_ROWS = 16
_CHUNK_BYTES = 1 << 20  # dequantize this many bytes of weight at a time (stays in L2)


def check_format(fmt: str) -> str:
    if fmt not in QMAX:
        raise ValueError(f"unknown weight format {fmt!r} (known: {', '.join(QMAX)})")
    return fmt


def is_quantized(name: str, tied: bool) -> bool:
    """Whether the parameter with our canonical name (``attn.q.weight``, ``embed.weight``, ...) is stored
    quantized - the rule both the loader and the repository's static pricing follow."""
    base = name.removesuffix(".weight")
    if base == name:
        return False
    return base in QUANTIZED_LINEARS or base == "lm_head" or (tied and base == "embed")


def weight_bytes(shape: tuple[int, ...] | torch.Size, fmt: str, act_bytes: int) -> int:
    """Bytes of one [out, in] matrix stored in ``fmt``: 1 byte per weight plus one activation-dtype scale per
    output channel (the int8pack kernel wants scales in the activation dtype)."""
    check_format(fmt)
    out, inp = int(shape[0]), int(shape[1])
    return out * inp + out * act_bytes


def quantize(w: Tensor, fmt: str, act_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization of a [out, in] float matrix: (int8 [out, in], scales [out]).
    The scales are rounded to ``act_dtype`` first and the weights quantized against the rounded scales, so the
    dequantized matrix is exactly what the kernels compute with."""
    qmax = QMAX[check_format(fmt)]
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / qmax).clamp(min=torch.finfo(torch.float32).tiny).to(act_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The float matrix ``q`` stands for, in ``dtype`` (the reference the kernels are tested against)."""
    return (q.float() * scales.float()[:, None]).to(dtype)


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


def _replace_linears(root: nn.Module, fmt: str, act_dtype: torch.dtype) -> None:
    for name in QUANTIZED_LINEARS:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        lin = getattr(parent, attr, None)
        if isinstance(lin, nn.Linear):
            setattr(parent, attr, QuantLinear.from_linear(lin, fmt, act_dtype))


def quantize_block(block: nn.Module, fmt: str, act_dtype: torch.dtype) -> nn.Module:
    """Quantize one decoder block's projections (from its float weights, best read at float32) and cast the rest
    (norms, biases) to ``act_dtype``.  Used at load and when ``set_depth`` grows a quantized model."""
    _replace_linears(block, fmt, act_dtype)
    return block.to(act_dtype)  # casts float parameters only; int8 buffers keep their dtype


def quantize_decoder(lm: nn.Module, fmt: str, act_dtype: torch.dtype) -> nn.Module:
    """Quantize a loaded ``DecoderLM`` in place: every layer, and the LM head (the embedding when tied).
    Sets ``lm.quant = fmt`` so that growing the model quantizes its new layers too."""
    for block in lm.layers:
        quantize_block(block, fmt, act_dtype)
    if lm.lm_head is not None:
        lm.lm_head = QuantLinear.from_linear(lm.lm_head, fmt, act_dtype)
    else:
        lm.embed = QuantEmbedding.from_embedding(lm.embed, fmt, act_dtype)
    lm.to(act_dtype)
    lm.quant = fmt
    return lm
