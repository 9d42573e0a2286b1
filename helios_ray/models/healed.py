"""Healed truncation: the last k layers of a truncated model, each projection plus a trained low-rank delta.

Why: a model cut at depth D was never trained to stop there.  A separate exit head (``block``) fixes that with
a whole extra layer of weights and KV; *healing* instead fine-tunes the layers the replica loads anyway.  At
depth D the replica runs layers [0, D-k) as shipped and layers [D-k, D) with ``W + B @ A`` merged into their
weights once at load time, then the model's own final norm + LM head.  So a healed exit costs the memory, KV
and FLOPs of plain truncation; only the exits file holds the deltas (rank r: ``r x (in + out)`` per projection,
about 1.5 MB per Qwen2.5-0.5B layer at rank 32 in bfloat16, where one full layer is 30 MB).

Three ways to run one head (:class:`HealedHead`):

* **merged** (serving at depth D): :meth:`HealedHead.merge_into` adds the deltas to the loaded layers in place
  and drops them; the head's transform is then the identity.  A depth change reloads those layers from the
  checkpoint (``EarlyExitLM.set_depth``), because subtracting a rounded delta does not restore the weights.
* **side branch, inference** (profiling on the full model): :meth:`HealedHead.attach` copies layers [D-k, D),
  merges the deltas into the copies, and the head runs them on the hidden state after D-k layers, with its own
  KV entries ``("exit", D, j)``.
* **side branch, training** (``tune-exits``): the copies stay frozen and forward hooks add ``(x A^T) B^T`` to
  each projection, so only A and B receive gradients.
"""

from __future__ import annotations

import copy
from typing import Any, Hashable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helios_ray.errors import HeliosError
from helios_ray.models.decoder import Block, DecoderLM, StepContext
from helios_ray.models.exit_heads import ExitHead
from helios_ray.models.families import ArchSpec
from helios_ray.models.prepack import PackedLinear
from helios_ray.models.quant import Int4Linear, QuantLinear, quant_float

__all__ = ["PROJECTIONS", "HealedHead"]

#: The projections of a block that get a delta (those a family lacks, e.g. a non-gated MLP's gate, are skipped).
PROJECTIONS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def projections(block: nn.Module) -> dict[str, nn.Linear]:
    out: dict[str, nn.Linear] = {}
    for name in PROJECTIONS:
        parent, _, leaf = name.partition(".")
        mod = getattr(getattr(block, parent), leaf, None)
        # quantized: dtype int8/int4 (models/quant.py); packed: bf16 on CPU (models/prepack.py)
        if isinstance(mod, (nn.Linear, QuantLinear, Int4Linear, PackedLinear)):
            out[name] = mod
    return out


def _float_copy(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A private copy of a block whose projections are plain ``nn.Linear`` at ``dtype`` (a quantized model's are
    dequantized), so that a side branch can carry the deltas exactly."""
    out = copy.deepcopy(block)
    for name, lin in projections(out).items():
        if isinstance(lin, nn.Linear):
            continue
        w = quant_float(lin).to(dtype)
        plain = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(w)
            if lin.bias is not None:
                plain.bias.copy_(lin.bias.to(dtype))
        parent, _, leaf = name.partition(".")
        setattr(getattr(out, parent), leaf, plain)
    return out


def _key(j: int, name: str) -> str:
    return f"{j}_{name.replace('.', '_')}"


class HealedHead(ExitHead):
    """Low-rank deltas for layers [depth - layers, depth); see the module docstring for how they run."""

    kind = "healed"

    def __init__(self, depth: int, spec: ArchSpec, layers: int = 1, rank: int = 16):
        super().__init__(depth)
        if not 1 <= layers < depth:
            raise HeliosError(f"a healed exit at depth {depth} can heal 1..{depth - 1} layers (got {layers})")
        if rank < 1:
            raise HeliosError(f"a healed exit needs rank >= 1 (got {rank})")
        self.layers, self.rank = layers, rank
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for j in range(layers):
            i = depth - layers + j
            with torch.device("meta"):
                shapes = {n: tuple(m.weight.shape) for n, m in
                          projections(Block(spec, spec.layer_rope[i], spec.layer_window[i])).items()}
            for name, (fout, fin) in shapes.items():
                # B = 0: an untrained head *is* plain truncation at D, so training can only start from there.
                self.a[_key(j, name)] = nn.Parameter(torch.randn(rank, fin) * fin ** -0.5)
                self.b[_key(j, name)] = nn.Parameter(torch.zeros(fout, rank))
        self.merged = False
        self._branch: list[Block] = []  # plain list: the copies are not part of the head's state
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------------------------------ facts
    @property
    def input_depth(self) -> int:
        return self.depth - self.layers

    @property
    def extra_kv_layers(self) -> int:
        """A merged head adds nothing; a side branch keeps KV for each of its layers."""
        return 0 if self.merged else self.layers

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": self.layers, "rank": self.rank}

    def delta(self, j: int, name: str) -> Tensor:
        """The fp32 weight delta of projection ``name`` in healed layer ``j`` ([out, in])."""
        k = _key(j, name)
        return self.b[k].float() @ self.a[k].float()

    def _add_deltas(self, blocks: list[nn.Module]) -> None:
        """W += B @ A on float blocks, summed in float32 (a quantized projection is refused: on an int grid a
        delta smaller than half a step rounds away, so quantized models merge at load, before quantizing)."""
        with torch.no_grad():
            for j, block in enumerate(blocks):
                for name, lin in projections(block).items():
                    if not isinstance(lin, nn.Linear):
                        raise HeliosError(f"the healed exit at {self.depth} merges into float layers only (a "
                                          "quantized model merges at load, before quantizing)")
                    w = lin.weight
                    w.copy_((w.float() + self.delta(j, name).to(w.device)).to(w.dtype))

    # ----------------------------------------------------------------------------------------- modes
    def merge_layers(self, blocks: dict[int, nn.Module]) -> None:
        """Serving at depth D: add the deltas to layers [D-k, D) among ``blocks`` (index -> block, ideally still
        float32: ``load_decoder``/``set_depth`` call this through ``prepare_layers`` before casting or
        quantizing), then drop them - the head holds no weights any more."""
        if self.merged:
            raise HeliosError(f"the healed exit at {self.depth} is already merged")
        missing = [i for i in range(self.input_depth, self.depth) if i not in blocks]
        if missing or max(blocks, default=-1) >= self.depth:
            raise HeliosError(f"a healed exit at depth {self.depth} merges into a model loaded to that depth, "
                              f"layers {self.input_depth}..{self.depth - 1} (given {sorted(blocks)})")
        self.detach()
        self._add_deltas([blocks[i] for i in range(self.input_depth, self.depth)])
        self.merged = True
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()

    def merge_into(self, lm: DecoderLM) -> None:
        """:meth:`merge_layers` on a model already loaded to depth D in a float dtype."""
        if lm.depth != self.depth:
            raise HeliosError(f"a healed exit at depth {self.depth} merges into a model loaded to that depth "
                              f"(this one has {lm.depth} layers)")
        self.merge_layers({i: lm.layers[i] for i in range(lm.depth)})

    def attach(self, lm: DecoderLM, trainable: bool = False) -> None:
        """Side branch over copies of layers [D-k, D) of ``lm`` (which must hold them): merged copies for
        inference, or frozen copies plus delta hooks for training."""
        if self.merged:
            raise HeliosError(f"the healed exit at {self.depth} is merged into a model; it cannot also branch")
        if lm.depth < self.depth:
            raise HeliosError(f"the healed exit at {self.depth} needs layers up to {self.depth} to branch from "
                              f"(the model has {lm.depth})")
        self.detach()
        self._branch = [_float_copy(lm.layers[i], lm.dtype).requires_grad_(False)
                        for i in range(self.input_depth, self.depth)]
        if not trainable:
            self._add_deltas(self._branch)
            return
        for j, block in enumerate(self._branch):
            for name, lin in projections(block).items():
                a, b = self.a[_key(j, name)], self.b[_key(j, name)]
                self._hooks.append(lin.register_forward_hook(
                    lambda _m, inp, out, a=a, b=b: out + F.linear(F.linear(inp[0], a.to(out.dtype)), b.to(out.dtype))))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._branch = [], []

    def transform(self, h: Tensor, ctx: StepContext | None) -> Tensor:
        """Merged: the loaded layers already are the healed ones.  Side branch: run the healed copies on the
        hidden state after D-k layers."""
        if self.merged:
            return h
        if not self._branch:
            raise HeliosError(f"the healed exit at {self.depth} is neither merged into a model nor attached to one")
        if ctx is None:
            raise ValueError("a healed exit's side branch needs the step context (it has attention)")
        for j, block in enumerate(self._branch):
            h = block(h, ctx, self.cache_key(j))
        return h

    def cache_key(self, j: int) -> Hashable:
        return ("exit", self.depth, j)
