"""bf16 projection weights reordered once into oneDNN's blocked layout, for CPU serving.

Why: on CPU a bf16 ``F.linear`` hands oneDNN a plain ``[out, in]`` weight, and oneDNN reorders it into its
blocked GEMM layout on *every call* - for a decode step's 1-32-row matmuls that reorder costs about as much as the
product itself.  Measured here (AMX Xeon, 1 thread, SmolLM2's 576->1536; ``PYTHONPATH=. python
scripts/engine_parts.py``): 1 / 16 / 128 rows 158 -> 85, 180 -> 100, 366 -> 271 us, bit-identical outputs.  This is what inductor's weight "freezing"
does for compiled CPU models, without compiling anything.

What: the seven projections of each decoder layer, and an untied LM head, become :class:`PackedLinear` when the
model serves bf16 on a CPU (no weight format: int8/int4 keep their own kernels).  A tied LM head stays the
embedding matrix (a packed copy would hold the vocabulary twice; HELIOS spends memory on batch instead).  The
packed weight occupies the same bytes as the plain one (``opaque_bytes``, counted by ``loading.param_bytes``) and
replaces it, so the memory model is unchanged.  ``HELIOS_PREPACK=0`` turns it off (an escape hatch; nothing
differs but speed).

Healed exits merge into float32 layers before any cast (``prepare_layers``), so they never meet a packed weight;
code that needs the float matrix (a side branch, training) reads :meth:`PackedLinear.dequantized`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from helios_ray.models.quant import replace_projections

BATCH_HINT = 16  # oneDNN picks the blocked layout for this many rows; measured best from 1 to 300 rows here


def available() -> bool:
    """oneDNN with its bf16 path (AVX-512 BW/VL/DQ): without it the reorder raises, and plain F.linear is used."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def enabled(device: torch.device | str, dtype: torch.dtype, weights: str | None) -> bool:
    """Whether a model loaded for (device, dtype, weight format) gets packed projections."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and not weights and available()
            and os.environ.get("HELIOS_PREPACK", "1") != "0")


class PackedLinear(nn.Module):
    """``nn.Linear`` (bf16, CPU, inference) with its weight in oneDNN's blocked layout."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # An opaque oneDNN tensor: no storage pointer, so a plain attribute rather than a buffer.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "PackedLinear":
        return cls(lin.weight, lin.bias)

    @property
    def opaque_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def dequantized(self) -> Tensor:
        """The weight as a plain [out, in] tensor (a copy)."""
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def __deepcopy__(self, memo: dict) -> "PackedLinear":  # the opaque tensor has no storage to copy
        return PackedLinear(self.dequantized(), None if self.bias is None else self.bias.clone())

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # .to()/.float()/.cuda() would convert the bias and skip the opaque weight, leaving a module whose parts
        # disagree: refuse instead (a packed model serves bf16 on this CPU; reload it to change either)
        raise RuntimeError("a oneDNN-packed projection cannot change dtype or device: load the model again "
                           "(HELIOS_PREPACK=0 keeps plain weights)")

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - nn.Module's signature
        destination[prefix + "weight"] = self.dequantized()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_block(block: nn.Module) -> nn.Module:
    """Pack one decoder block's projections in place (at load, and when ``set_depth`` grows the model)."""
    return replace_projections(block, lambda _name, lin: PackedLinear.from_linear(lin))


def prepack_decoder(lm: nn.Module) -> nn.Module:
    """Pack every layer and an untied LM head; ``lm.prepacked`` tells ``set_depth`` to pack new layers too."""
    for block in lm.layers:
        prepack_block(block)
    if isinstance(lm.lm_head, nn.Linear):
        lm.lm_head = PackedLinear.from_linear(lm.lm_head)
    lm.prepacked = True
    return lm
