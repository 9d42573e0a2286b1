"""Truncated loading: build the decoder for layers [0, D) and read exactly the tensors it needs.

The module tree is created on the ``meta`` device (no memory, no random init), then every parameter is
assigned from a tensor read by name from safetensors.  Layers >= D are never constructed and their tensors
are never read, so both parameter bytes and resident memory scale with D (``helios-ray inspect`` shows it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch

from helios_ray.dtypes import serving_dtype, split_dtype
from helios_ray.errors import HeliosError
from helios_ray.models.checkpoint import Checkpoint
from helios_ray.models.decoder import Block, DecoderLM
from helios_ray.models.families import ArchSpec, global_names, layer_names
from helios_ray.models.prepack import enabled as prepack_enabled, prepack_block, prepack_decoder
from helios_ray.models.quant import quantize_block, quantize_decoder
from helios_ray.models.model_info import resolve_name

#: Called with {layer index: float32 block} before a load casts or quantizes them (see ``load_decoder``).
PrepareLayers = Callable[[dict[int, Block]], None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HeliosError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """(activation dtype, weight format or None) of a serving dtype on ``device``.  ``auto``: bfloat16 on CUDA and
    on CPUs with bf16 units (AVX512-BF16/AMX), float32 on other CPUs (bf16 matmuls are emulated there: slower than
    fp32, and they change results); ``int8``: int8 weights with activations at what ``auto`` would pick."""
    try:
        weights, act = split_dtype(serving_dtype(dtype, device.type == "cuda"))
    except ValueError as e:
        raise HeliosError(str(e)) from None
    return _DTYPES[act], weights


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The activation (and KV) dtype of serving dtype ``dtype`` on ``device`` (see :func:`resolve_dtype`)."""
    return resolve_dtype(dtype, device)[0]


def weight_format(dtype: str) -> str | None:
    """The weight format of a serving dtype (``int8``), None for float dtypes."""
    return resolve_dtype(dtype, torch.device("cpu"))[1]


def read_spec(ckpt_dir: Path, tie: str | None = None) -> ArchSpec:
    """The architecture as loaded: the checkpoint's config, with one LM head where the model ties it
    (models/tied_head.py; ``tie``: auto / tied / untied, default ``$HELIOS_TIED_HEAD``) - the memory model reads
    it through here too."""
    from helios_ray.models import tied_head

    return tied_head.spec_as_loaded(Path(ckpt_dir), tie)  # type: ignore[arg-type]


def check_depth(depth: int | None, spec: ArchSpec, name: str = "model") -> int:
    if depth is None:
        return spec.num_layers
    if not isinstance(depth, int) or not 1 <= depth <= spec.num_layers:
        raise HeliosError(f"depth {depth} is out of range for {name}: it has {spec.num_layers} layers (use 1..{spec.num_layers})")
    return depth


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct parameter and buffer storage (a tied LM head is counted once; quantized weights and
    their scales are buffers, see models/quant.py; oneDNN-packed weights have no storage pointer and are counted
    by their module, models/prepack.py)."""
    seen: set[int] = set()
    total = 0
    for p in [*module.parameters(), *module.buffers()]:
        key = p.data_ptr()
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total + sum(m.opaque_bytes for m in module.modules() if hasattr(m, "opaque_bytes"))


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


@dataclass
class LoadStats:
    seconds: float
    tensors_read: int
    bytes_read: int


def _read_tensors(ck: Checkpoint, groups: list[tuple[str, dict]], device: torch.device | str,
                  dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int, int]:
    sd: dict[str, torch.Tensor] = {}
    n_read = n_bytes = 0
    for prefix, names in groups:
        raw: dict[str, torch.Tensor] = {}  # one read per checkpoint tensor (GPT-2's fused c_attn feeds q, k, v)
        for ours, (theirs, transform) in names.items():
            if theirs not in raw:
                raw[theirs] = ck.read(resolve_name(ck, theirs))
                n_read += 1
                n_bytes += raw[theirs].numel() * raw[theirs].element_size()
            sd[prefix + ours] = transform(raw[theirs]).to(device=device, dtype=dtype)
    return sd, n_read, n_bytes


def load_decoder(ckpt_dir: Path, depth: int | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, name: str = "model", weights: str | None = None,
                 prepare_layers: PrepareLayers | None = None) -> tuple[DecoderLM, LoadStats]:
    """Layers [0, depth) at ``dtype``; with ``weights`` (``int8``) the projections and LM head are quantized
    from the checkpoint's float32 values and everything else is cast to ``dtype`` (models/quant.py).
    ``prepare_layers`` sees the float32 layers before any cast or quantization (a healed exit merges its deltas
    there: merged after, a small delta would round away on the bf16 or int grid)."""
    t0 = time.perf_counter()
    if weights == "int4" and torch.device(device).type != "cpu":
        raise HeliosError(f"dtype int4 is CPU-only (its kernel and packed layout are torch's CPU ones); use int8 or "
                          f"bfloat16 on {device}")
    spec = read_spec(ckpt_dir)
    depth = check_depth(depth, spec, name)
    with torch.device("meta"):
        lm = DecoderLM(spec, depth)
    groups = [("", global_names(spec))] + [(f"layers.{i}.", layer_names(spec, i)) for i in range(depth)]
    float_first = bool(weights) or prepare_layers is not None
    with Checkpoint(Path(ckpt_dir)) as ck:
        sd, n_read, n_bytes = _read_tensors(ck, groups, device, torch.float32 if float_first else dtype)
    lm.load_state_dict(sd, strict=True, assign=True)
    del sd
    if prepare_layers is not None:
        prepare_layers({i: lm.layers[i] for i in range(depth)})
    if weights:
        quantize_decoder(lm, weights, dtype)
    elif float_first:
        lm.to(dtype)
    lm.eval().requires_grad_(False)
    if prepack_enabled(device, dtype, weights):
        prepack_decoder(lm)
    return lm, LoadStats(seconds=time.perf_counter() - t0, tensors_read=n_read, bytes_read=n_bytes)


def set_depth(lm: DecoderLM, ckpt_dir: Path, depth: int, prepare_layers: PrepareLayers | None = None) -> LoadStats:
    """Grow or shrink a loaded decoder in place.  Growing reads only layers [old depth, depth) - the cost the
    policy weighs as "extend"; shrinking just drops layers (their memory is freed).  ``prepare_layers``: as in
    :func:`load_decoder`, on the new layers."""
    t0 = time.perf_counter()
    depth = check_depth(depth, lm.spec)
    n_read = n_bytes = 0
    if depth > lm.depth:
        groups = [(f"{i}.", layer_names(lm.spec, i)) for i in range(lm.depth, depth)]
        float_first = bool(lm.quant) or prepare_layers is not None  # quantized/merged from float32, as at load
        with Checkpoint(Path(ckpt_dir)) as ck:
            sd, n_read, n_bytes = _read_tensors(ck, groups, lm.device, torch.float32 if float_first else lm.dtype)
        blocks: dict[int, Block] = {}
        for i in range(lm.depth, depth):
            with torch.device("meta"):
                block = Block(lm.spec, lm.spec.layer_rope[i], lm.spec.layer_window[i])
            block.load_state_dict({k[len(f"{i}."):]: v for k, v in sd.items() if k.startswith(f"{i}.")},
                                  strict=True, assign=True)
            blocks[i] = block
        if prepare_layers is not None:
            prepare_layers(blocks)
        for i, block in blocks.items():
            if lm.quant:
                quantize_block(block, lm.quant, lm.dtype)
            elif float_first:
                block.to(lm.dtype)
            block.eval().requires_grad_(False)
            lm.layers.append(prepack_block(block) if lm.prepacked else block)
    else:
        del lm.layers[depth:]
    lm.depth = depth
    return LoadStats(seconds=time.perf_counter() - t0, tensors_read=n_read, bytes_read=n_bytes)
