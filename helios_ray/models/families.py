"""Decoder families: from a Hugging Face ``config.json`` and tensor names to our canonical decoder.

The decoder in :mod:`helios_ray.models.decoder` is one readable implementation parameterised by
:class:`ArchSpec`.  This module is the only place that knows how Llama, Qwen2, Gemma 3, OPT and GPT-2 differ:
norm flavour, biases, gated or plain MLP, rotary or learned positions, sandwich norms, embedding scale, and
what each tensor is called in the checkpoint.  Adding a family means adding one ``_spec_*`` function and one
name map here; the model code does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from helios_ray.errors import UnsupportedModelError

NormKind = Literal["rms", "rms_gemma", "layer"]


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters for one attention type (Gemma 3 has one per local/global type)."""

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0


@dataclass(frozen=True)
class ArchSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm: NormKind
    norm_eps: float
    act: str
    gated_mlp: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norm_bias: bool
    qk_norm: bool = False
    sandwich_norms: bool = False
    attn_scale: float = 1.0
    learned_positions: bool = False
    learned_pos_offset: int = 0
    max_positions: int = 2048
    #: per layer: the rope spec key ("" for models without rope) and the sliding window (None = full).
    layer_rope: tuple[str, ...] = ()
    layer_window: tuple[int | None, ...] = ()
    rope: dict[str, RopeSpec] = field(default_factory=dict)
    embed_scale: float | None = None
    tie_word_embeddings: bool = True
    #: the checkpoint tensor the embedding is read from when it is not the family's own name: a tied load of an
    #: untied checkpoint that keeps the head's copy (models/tied_head.py).
    embed_source: str | None = None
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope_params(cfg: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """Normalise transformers 4.x (``rope_theta`` + ``rope_scaling``) and 5.x (``rope_parameters``)."""
    params = cfg.get("rope_parameters")
    if params is not None:
        if layer_type is not None and layer_type in params:
            params = params[layer_type]
        return dict(params)
    out: dict[str, Any] = dict(cfg.get("rope_scaling") or {})
    out.setdefault("rope_type", out.pop("type", "default"))
    out["rope_theta"] = cfg.get("rope_theta", 10000.0)
    return out


def _rope(cfg: dict[str, Any], head_dim: int, layer_type: str | None = None) -> RopeSpec:
    p = _rope_params(cfg, layer_type)
    rope_type = p.get("rope_type", "default")
    dim = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
    base = float(p["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = 1.0
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv = inv / float(p["factor"])
    elif rope_type == "llama3":
        # Same arithmetic as transformers' _compute_llama3_parameters.
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_ctx = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(is_medium, smoothed, inv_l)
    else:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported yet")
    return RopeSpec(inv_freq=tuple(inv.tolist()), attention_scaling=scaling)


def spec_from_config(cfg: dict[str, Any]) -> ArchSpec:
    """Build the ArchSpec for a Hugging Face config dict (as in ``config.json``)."""
    mt = cfg.get("model_type", "")
    if mt in ("gemma3", "gemma3_text") and "text_config" in cfg:
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        mt = "gemma3_text"
    builders: dict[str, Callable[[dict[str, Any]], ArchSpec]] = {
        "llama": _spec_llama,
        "mistral": _spec_llama,
        "qwen2": _spec_llama,
        "gemma3_text": _spec_gemma3,
        "opt": _spec_opt,
        "gpt2": _spec_gpt2,
    }
    if mt not in builders:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported (supported: {', '.join(sorted(builders))})"
        )
    return builders[mt](cfg)


def _spec_llama(cfg: dict[str, Any]) -> ArchSpec:
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // nh
    n = cfg["num_hidden_layers"]
    qwen = cfg["model_type"] == "qwen2"
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    if cfg["model_type"] == "mistral" and cfg.get("sliding_window"):
        window = cfg["sliding_window"]
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {cfg.get('hidden_act')!r} is not supported for {cfg['model_type']}")
    return ArchSpec(
        family=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=h,
        num_layers=n,
        num_heads=nh,
        num_kv_heads=cfg.get("num_key_value_heads") or nh,
        head_dim=hd,
        intermediate_size=cfg["intermediate_size"],
        norm="rms",
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        act="silu",
        gated_mlp=True,
        qkv_bias=qwen or bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)) and not qwen,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        norm_bias=False,
        attn_scale=hd**-0.5,
        max_positions=cfg.get("max_position_embeddings", 2048),
        layer_rope=("default",) * n,
        layer_window=(window,) * n,
        rope={"default": _rope(cfg, hd)},
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        pad_token_id=cfg.get("pad_token_id"),
    )


def _spec_gemma3(cfg: dict[str, Any]) -> ArchSpec:
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // nh
    n = cfg["num_hidden_layers"]
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError("bidirectional Gemma 3 variants are encoders, not decoders")
    types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % cfg.get("sliding_window_pattern", 6) else "full_attention" for i in range(n)
    ]
    rope: dict[str, RopeSpec] = {}
    if "rope_parameters" in cfg and "full_attention" in (cfg["rope_parameters"] or {}):
        for t in set(types):
            rope[t] = _rope(cfg, hd, t)
    else:  # transformers 4.x layout: global rope_theta (+ scaling), local base frequency
        rope["full_attention"] = _rope(cfg, hd)
        rope["sliding_attention"] = _rope({"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}, hd)
    return ArchSpec(
        family="gemma3_text",
        vocab_size=cfg["vocab_size"],
        hidden_size=h,
        num_layers=n,
        num_heads=nh,
        num_kv_heads=cfg.get("num_key_value_heads") or nh,
        head_dim=hd,
        intermediate_size=cfg["intermediate_size"],
        norm="rms_gemma",
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        act=cfg.get("hidden_activation", "gelu_pytorch_tanh"),
        gated_mlp=True,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=False,
        norm_bias=False,
        qk_norm=True,
        sandwich_norms=True,
        attn_scale=float(cfg.get("query_pre_attn_scalar", hd)) ** -0.5,
        max_positions=cfg.get("max_position_embeddings", 32768),
        layer_rope=tuple(types),
        layer_window=tuple(cfg.get("sliding_window") if t == "sliding_attention" else None for t in types),
        rope=rope,
        embed_scale=h**0.5,
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        attn_logit_softcap=cfg.get("attn_logit_softcapping"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        pad_token_id=cfg.get("pad_token_id"),
    )


def _spec_opt(cfg: dict[str, Any]) -> ArchSpec:
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    n = cfg["num_hidden_layers"]
    if cfg.get("word_embed_proj_dim", h) != h:
        raise UnsupportedModelError("OPT checkpoints with project_in/project_out (e.g. opt-350m) are not supported")
    if not cfg.get("do_layer_norm_before", True):
        raise UnsupportedModelError("post-LN OPT variants are not supported")
    bias = cfg.get("enable_bias", True)
    return ArchSpec(
        family="opt",
        vocab_size=cfg["vocab_size"],
        hidden_size=h,
        num_layers=n,
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=cfg["ffn_dim"],
        norm="layer",
        norm_eps=1e-5,
        act=cfg.get("activation_function", "relu"),
        gated_mlp=False,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        norm_bias=cfg.get("layer_norm_elementwise_affine", True),
        attn_scale=(h // nh) ** -0.5,
        learned_positions=True,
        learned_pos_offset=2,
        max_positions=cfg.get("max_position_embeddings", 2048),
        layer_rope=("",) * n,
        layer_window=(None,) * n,
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        pad_token_id=cfg.get("pad_token_id"),
    )


def _spec_gpt2(cfg: dict[str, Any]) -> ArchSpec:
    h, nh = cfg["n_embd"], cfg["n_head"]
    n = cfg["n_layer"]
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
        raise UnsupportedModelError("GPT-2 attention variants (inverse layer scaling/upcast) are not supported")
    return ArchSpec(
        family="gpt2",
        vocab_size=cfg["vocab_size"],
        hidden_size=h,
        num_layers=n,
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=cfg.get("n_inner") or 4 * h,
        norm="layer",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        act=cfg.get("activation_function", "gelu_new"),
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        norm_bias=True,
        attn_scale=(h // nh) ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0,
        learned_positions=True,
        learned_pos_offset=0,
        max_positions=cfg.get("n_positions", 1024),
        layer_rope=("",) * n,
        layer_window=(None,) * n,
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        pad_token_id=cfg.get("pad_token_id"),
    )


# ---------------------------------------------------------------------------------------------------------
# Tensor names.  Each entry maps our canonical name to (checkpoint name, how to get our tensor from it).
# ---------------------------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _conv1d(t: torch.Tensor) -> torch.Tensor:  # GPT-2 Conv1D stores [in, out]
    return t.t().contiguous()


def _chunk(i: int, n: int, transpose: bool) -> Transform:
    def f(t: torch.Tensor) -> torch.Tensor:
        t = t.t() if transpose else t
        return t.chunk(n, dim=0)[i].contiguous()

    return f


def layer_names(spec: ArchSpec, i: int) -> dict[str, tuple[str, Transform]]:
    """Our canonical tensor names for layer ``i`` -> (checkpoint name, transform)."""
    f = spec.family
    m: dict[str, tuple[str, Transform]] = {}
    if f in ("llama", "mistral", "qwen2", "gemma3_text"):
        p = f"model.layers.{i}."
        m["attn_norm.weight"] = (p + "input_layernorm.weight", _identity)
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            m[f"attn.{ours}.weight"] = (p + f"self_attn.{theirs}.weight", _identity)
            if spec.qkv_bias:
                m[f"attn.{ours}.bias"] = (p + f"self_attn.{theirs}.bias", _identity)
        m["attn.o.weight"] = (p + "self_attn.o_proj.weight", _identity)
        if spec.o_bias:
            m["attn.o.bias"] = (p + "self_attn.o_proj.bias", _identity)
        for ours in ("gate", "up", "down"):
            m[f"mlp.{ours}.weight"] = (p + f"mlp.{ours}_proj.weight", _identity)
            if spec.mlp_bias:
                m[f"mlp.{ours}.bias"] = (p + f"mlp.{ours}_proj.bias", _identity)
        if f == "gemma3_text":
            m["attn.q_norm.weight"] = (p + "self_attn.q_norm.weight", _identity)
            m["attn.k_norm.weight"] = (p + "self_attn.k_norm.weight", _identity)
            m["post_attn_norm.weight"] = (p + "post_attention_layernorm.weight", _identity)
            m["mlp_norm.weight"] = (p + "pre_feedforward_layernorm.weight", _identity)
            m["post_mlp_norm.weight"] = (p + "post_feedforward_layernorm.weight", _identity)
        else:
            m["mlp_norm.weight"] = (p + "post_attention_layernorm.weight", _identity)
    elif f == "opt":
        p = f"model.decoder.layers.{i}."
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            m[f"attn.{ours}.weight"] = (p + f"self_attn.{theirs}.weight", _identity)
            if spec.qkv_bias:
                m[f"attn.{ours}.bias"] = (p + f"self_attn.{theirs}.bias", _identity)
        m["attn_norm.weight"] = (p + "self_attn_layer_norm.weight", _identity)
        m["attn_norm.bias"] = (p + "self_attn_layer_norm.bias", _identity)
        m["mlp_norm.weight"] = (p + "final_layer_norm.weight", _identity)
        m["mlp_norm.bias"] = (p + "final_layer_norm.bias", _identity)
        for ours, theirs in (("up", "fc1"), ("down", "fc2")):
            m[f"mlp.{ours}.weight"] = (p + f"{theirs}.weight", _identity)
            if spec.mlp_bias:
                m[f"mlp.{ours}.bias"] = (p + f"{theirs}.bias", _identity)
    elif f == "gpt2":
        p = f"transformer.h.{i}."
        for j, ours in enumerate("qkv"):
            m[f"attn.{ours}.weight"] = (p + "attn.c_attn.weight", _chunk(j, 3, transpose=True))
            m[f"attn.{ours}.bias"] = (p + "attn.c_attn.bias", _chunk(j, 3, transpose=False))
        m["attn.o.weight"] = (p + "attn.c_proj.weight", _conv1d)
        m["attn.o.bias"] = (p + "attn.c_proj.bias", _identity)
        m["attn_norm.weight"] = (p + "ln_1.weight", _identity)
        m["attn_norm.bias"] = (p + "ln_1.bias", _identity)
        m["mlp_norm.weight"] = (p + "ln_2.weight", _identity)
        m["mlp_norm.bias"] = (p + "ln_2.bias", _identity)
        m["mlp.up.weight"] = (p + "mlp.c_fc.weight", _conv1d)
        m["mlp.up.bias"] = (p + "mlp.c_fc.bias", _identity)
        m["mlp.down.weight"] = (p + "mlp.c_proj.weight", _conv1d)
        m["mlp.down.bias"] = (p + "mlp.c_proj.bias", _identity)
    else:  # pragma: no cover - spec_from_config rejects these first
        raise UnsupportedModelError(f"family {f!r}")
    return m


def global_names(spec: ArchSpec) -> dict[str, tuple[str, Transform]]:
    """Embeddings, positions, final norm and (untied) lm_head."""
    f = spec.family
    m: dict[str, tuple[str, Transform]] = {}
    if f in ("llama", "mistral", "qwen2", "gemma3_text"):
        m["embed.weight"] = (spec.embed_source or "model.embed_tokens.weight", _identity)
        m["final_norm.weight"] = ("model.norm.weight", _identity)
    elif f == "opt":
        m["embed.weight"] = ("model.decoder.embed_tokens.weight", _identity)
        m["pos_embed.weight"] = ("model.decoder.embed_positions.weight", _identity)
        m["final_norm.weight"] = ("model.decoder.final_layer_norm.weight", _identity)
        m["final_norm.bias"] = ("model.decoder.final_layer_norm.bias", _identity)
    elif f == "gpt2":
        m["embed.weight"] = ("transformer.wte.weight", _identity)
        m["pos_embed.weight"] = ("transformer.wpe.weight", _identity)
        m["final_norm.weight"] = ("transformer.ln_f.weight", _identity)
        m["final_norm.bias"] = ("transformer.ln_f.bias", _identity)
    if not spec.tie_word_embeddings:
        m["lm_head.weight"] = ("lm_head.weight", _identity)
    return m
