"""Exit heads: how a hidden state after D layers becomes next-token logits.

Three kinds, all ending in the model's own (frozen, shared) final norm + LM head, because the 576x49152
head of SmolLM2 is a third of its FLOPs and must not be duplicated per exit:

* ``shared`` - LayerSkip style: the final norm + LM head applied directly ("logit lens").  Exact for
  exit-trained checkpoints (LayerSkip, EE-LLM); weak on models that never learned to exit.
* ``linear`` - EE-Tuning's light adapter: RMS norm, then a residual (optionally low-rank) linear map whose
  output projection starts at zero, so an untrained head *is* the logit lens and training only improves it.
* ``block`` - one transformer block of the model's own family (with its own KV entry), output projections
  zero-initialised for the same reason; the strongest head measured on SmolLM2 (see DESIGN.md).
* ``healed`` - *healed truncation*: the model's own last ``layers`` loaded layers [D-k, D), each projection
  plus a low-rank delta (LoRA, rank r) trained so that the truncated model matches the full one.  A replica at
  depth D merges the deltas into those layers once at load time, so it costs exactly the memory, KV and FLOPs of
  plain truncation; only the file holds the deltas (a few MB where a block head is a whole layer).  Profiling
  on the full model runs the k healed layers as a side branch from layer D-k (see :class:`HealedHead`).

On disk: ``exits.safetensors`` with tensors named ``exit.<D>.<param>`` and a ``__metadata__`` entry
``"heads"`` holding ``{D: {"kind": ..., "rank": ...}}``; the exit card (accuracy, calibration) is the
JSON file next to it and belongs to the tuner.
"""

from __future__ import annotations

from typing import Any, Hashable

from torch import Tensor, nn

from helios_ray.models.decoder import Block, DecoderLM, Norm, StepContext
from helios_ray.models.families import ArchSpec


class ExitHead(nn.Module):
    kind = "shared"

    def __init__(self, depth: int):
        super().__init__()
        self.depth = depth

    def transform(self, h: Tensor, ctx: StepContext | None) -> Tensor:
        """The head's own computation on the hidden state, before the shared final norm + LM head."""
        return h

    def forward(self, h: Tensor, ctx: StepContext | None, lm: DecoderLM) -> Tensor:
        return lm.logits(self.transform(h, ctx))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @property
    def input_depth(self) -> int:
        """How many layers of the model run before this head takes over (a healed head starts below D)."""
        return self.depth

    @property
    def extra_kv_layers(self) -> int:
        """Layers of KV this head keeps beyond the model's loaded layers (it attends)."""
        return 0


class SharedHead(ExitHead):
    kind = "shared"


class LinearHead(ExitHead):
    """h + up(down(norm(h))); ``rank=None`` means one square matrix instead of the low-rank pair."""

    kind = "linear"

    def __init__(self, depth: int, spec: ArchSpec, rank: int | None = None):
        super().__init__(depth)
        hdim = spec.hidden_size
        self.rank = rank
        self.norm = Norm("rms", hdim, 1e-6, False)
        nn.init.ones_(self.norm.weight)
        if rank is None:
            self.down = None
            self.up = nn.Linear(hdim, hdim, bias=True)
        else:
            self.down = nn.Linear(hdim, rank, bias=False)
            self.up = nn.Linear(rank, hdim, bias=True)
            nn.init.normal_(self.down.weight, std=hdim**-0.5)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def transform(self, h: Tensor, ctx: StepContext | None) -> Tensor:
        z = self.norm(h)
        if self.down is not None:
            z = self.down(z)
        return h + self.up(z)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank}


class BlockHead(ExitHead):
    """One decoder block on top of layer D-1; it attends over its own KV entry (key ``("exit", D)``)."""

    kind = "block"

    def __init__(self, depth: int, spec: ArchSpec):
        super().__init__(depth)
        self.block = Block(spec, spec.layer_rope[-1], spec.layer_window[-1])

    @property
    def cache_key(self) -> Hashable:
        return ("exit", self.depth)

    @property
    def extra_kv_layers(self) -> int:
        return 1

    def transform(self, h: Tensor, ctx: StepContext | None) -> Tensor:
        if ctx is None:
            raise ValueError("a block exit head needs the step context (it has attention)")
        return self.block(h, ctx, self.cache_key)

    def init_from(self, layer: Block, zero_outputs: bool = True) -> None:
        """Start from the model's own block; zeroed output projections make it start as the logit lens."""
        self.block.load_state_dict(layer.state_dict())
        if zero_outputs:
            for lin in (self.block.attn.o, self.block.mlp.down):
                nn.init.zeros_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}


def exit_inputs(heads: dict[int, Any]) -> dict[int, tuple[str, int]]:
    """``{depth: (kind, input depth)}`` of loaded heads (:class:`ExitHead`) or of a heads file's metadata
    (``{"kind", "layers"?}``): what :func:`usable_token_exits` decides on."""
    out: dict[int, tuple[str, int]] = {}
    for d, h in heads.items():
        if isinstance(h, ExitHead):
            out[d] = (h.kind, h.input_depth)
        else:
            out[d] = (h["kind"], d - int(h.get("layers") or 0) if h["kind"] == "healed" else d)
    return out


def usable_token_exits(inputs: dict[int, tuple[str, int]], depth: int, exits: list[int]) -> list[int]:
    """The ``exits`` a model loaded to ``depth`` can serve as token-level exits: trained, below D, not healed
    (a healed exit is the greedy exit of a replica at its own depth), and below the layers a healed exit at D
    heals (the hidden states there are healed ones, which those exits never saw).  One rule for load_model,
    set_depth, the early_exit baseline's card choice and the helios replica's inner exits."""
    at_d = inputs.get(depth)
    limit = at_d[1] if at_d is not None and at_d[0] == "healed" else depth
    return sorted(d for d in exits if d < limit and d in inputs and inputs[d][0] != "healed")
