"""EarlyExitLM: a truncated decoder plus its exit head, and "profile mode" over every exit.

Serving (HELIOS "greedy exit"): the model holds layers [0, D) and the exit head at D; every token leaves at D.
Its confidence there is still measured - a token below the threshold is a *confidence breach*, the signal
the control plane counts to decide when to load more layers or switch models.

Token-level exit (``token_exits``; how EE-LLM frameworks serve today, and helios-ray's full-depth baseline):
every layer is loaded, and each token leaves at the first exit in ``token_exits`` where it is confident, else
at D.  In a batch the rows that exited drop out of the remaining layers; their KV entries for those layers are
filled from the exit hidden state (CALM's state propagation: one K/V projection per skipped layer) so that
later tokens which do go deeper attend over every position.

Profile mode: the full model evaluates every available exit for each generated token and reports each exit's
argmax and confidence next to the final layer's argmax.  Generation follows the final layer, so the record
answers "had this token exited at D, would it have been the same?" - the raw material for exit histograms and
the accuracy guard.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from torch import Tensor

from helios_ray import memory
from helios_ray.errors import HeliosError, InvalidRequestError
from helios_ray.memory import Footprint, ModelParts
from helios_ray.models.decoder import DecoderLM, DenseKVCache, KVCache
from helios_ray.models.exit_files import load_heads
from helios_ray.models.exit_heads import BlockHead, ExitHead, SharedHead, exit_inputs, usable_token_exits
from helios_ray.models.healed import HealedHead
from helios_ray.models.prompts import EncodedPrompt, encode_request, has_chat_template
from helios_ray.models.loading import (
    check_depth, load_decoder, param_bytes, pick_device, pick_dtype, read_spec, weight_format,
)

ConfidenceKind = Literal["max_prob", "margin", "entropy"]


def confidence(logits: Tensor, kind: ConfidenceKind = "max_prob") -> tuple[Tensor, Tensor]:
    """(argmax token, confidence in [0, 1]) for logits [..., V].

    ``max_prob``: top-1 softmax probability (CALM/EE-LLM default).  ``margin``: top-1 minus top-2 probability.
    ``entropy``: 1 - H(p)/log V, so that 1 means certain and 0 uniform.
    """
    lf = logits.float()  # one conversion: torch's CPU reductions over a bf16 vocabulary are ~2x slower
    if kind == "max_prob":
        # max + logsumexp instead of log_softmax + topk + argmax: the same numbers from two passes over the
        # vocabulary instead of four (16 rows of SmolLM2's 49k vocabulary: 9.3 -> 2.8 ms, scripts/engine_parts.py)
        top1, token = lf.max(dim=-1)  # first index on ties, as argmax and greedy decoding everywhere else
        return token, (top1 - torch.logsumexp(lf, dim=-1)).exp()
    logp = torch.log_softmax(lf, dim=-1)
    top = logp.topk(2, dim=-1)
    token = lf.argmax(dim=-1)
    p1 = top.values[..., 0].exp()
    if kind == "margin":
        conf = p1 - top.values[..., 1].exp()
    elif kind == "entropy":
        ent = -(logp.exp() * logp).sum(-1)
        conf = 1.0 - ent / math.log(logits.shape[-1])
    else:
        raise HeliosError(f"unknown confidence measure {kind!r}")
    return token, conf


@dataclass
class TokenExit:
    token: int
    text: str
    exit_layer: int
    confidence: float
    breach: bool


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[TokenExit] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    seconds: float = 0.0


class EarlyExitLM:
    """A loaded (possibly truncated) model, its tokenizer and its exit heads."""

    def __init__(self, name: str, lm: DecoderLM, heads: dict[int, ExitHead], tokenizer: Any,
                 confidence_kind: ConfidenceKind = "max_prob", threshold: float = 0.9,
                 load_seconds: float = 0.0, ckpt_dir: Path | None = None, heads_path: Path | None = None,
                 token_exits: list[int] | None = None):
        self.name, self.lm, self.tokenizer = name, lm, tokenizer
        missing = [d for d in (token_exits or []) if d not in heads or d >= lm.depth]
        if missing:
            raise HeliosError(f"token-level exits {missing} of {name!r} have no loaded exit head below depth {lm.depth}")
        usable = set(usable_token_exits(exit_inputs(heads), lm.depth, token_exits or []))
        unusable = [d for d in (token_exits or []) if d not in usable]
        if unusable:
            raise HeliosError(f"exits {unusable} of {name!r} cannot be token-level exits at depth {lm.depth}: a healed "
                              "exit serves only as the greedy exit of a replica at its depth, and an exit inside the "
                              "layers a healed exit at D heals would read hidden states it was not trained on")
        self.token_exits = sorted(token_exits or [])
        self.ckpt_dir, self.heads_path = ckpt_dir, heads_path
        self.heads = heads
        self.confidence_kind = confidence_kind
        self.threshold = threshold
        self.load_seconds = load_seconds
        spec = lm.spec
        eos = set(spec.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = eos

    # ------------------------------------------------------------------------------------- facts
    @property
    def spec(self):  # noqa: ANN201 - ArchSpec
        return self.lm.spec

    @property
    def depth(self) -> int:
        return self.lm.depth

    @property
    def total_layers(self) -> int:
        return self.lm.spec.num_layers

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def exit_head(self) -> ExitHead:
        """The head tokens leave through: the trained head at D, else the shared head (exact at full depth)."""
        return self.heads.get(self.depth) or SharedHead(self.depth)

    @property
    def serving_heads(self) -> list[ExitHead]:
        """The exit heads a served token can pass through: the one at D and the token-level exits."""
        heads = [self.heads[d] for d in self.token_exits]
        if self.depth in self.heads:
            heads.append(self.heads[self.depth])
        return heads

    @property
    def parts(self) -> ModelParts:
        """This model's part sizes at its loaded dtype, measured from the modules (for :mod:`helios_ray.memory`)."""
        lm, s = self.lm, self.spec
        embed = param_bytes(lm.embed) + (param_bytes(lm.pos_embed) if lm.pos_embed is not None else 0)
        head = param_bytes(lm.final_norm) + (param_bytes(lm.lm_head) if lm.lm_head is not None else 0)
        heads = self.serving_heads
        return ModelParts(
            num_layers=s.num_layers, embed_bytes=embed, layer_bytes=param_bytes(lm.layers[0]), head_bytes=head,
            kv_bytes_per_token_per_layer=memory.kv_bytes_per_token(1, s.num_kv_heads, s.head_dim,
                                                                   lm.dtype.itemsize),
            exit_head_bytes=max((param_bytes(h) for h in heads), default=0),
            exit_head_attends=any(h.extra_kv_layers for h in heads),
        )

    @property
    def footprint(self) -> Footprint:
        """Weights + exit heads and KV bytes per token as loaded, by the one memory model."""
        heads = self.serving_heads
        return memory.footprint(self.parts, self.depth, exit_heads=sum(1 for h in heads if param_bytes(h)),
                                attending_exit_heads=sum(h.extra_kv_layers for h in heads))

    @property
    def param_bytes(self) -> int:
        return self.footprint.weight_bytes

    @property
    def kv_layers(self) -> int:
        """Layers that keep KV: the loaded ones plus every block exit head a token can pass (they attend; a merged
        healed exit is the loaded layers themselves)."""
        return self.depth + sum(h.extra_kv_layers for h in self.serving_heads)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token costs at this depth (block exit heads count as layers)."""
        return self.footprint.kv_bytes_per_token

    @property
    def has_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    def set_depth(self, depth: int) -> float:
        """Load more layers (reading only the new ones) or drop some, and switch to the exit head at the new
        depth.  Returns the seconds it took.  The caller owns the KV cache: its contents are invalid after."""
        from helios_ray.models.loading import set_depth as _set_depth

        if self.ckpt_dir is None:
            raise HeliosError(f"model {self.name!r} was not loaded from a checkpoint; cannot change depth")
        t0 = time.perf_counter()
        current = self.heads.get(self.depth)
        if isinstance(current, HealedHead) and current.merged:
            # the healed layers hold merged deltas: drop them so that growing reads the originals again
            _set_depth(self.lm, self.ckpt_dir, current.input_depth)
            del self.heads[current.depth]
        if self.heads_path is not None and depth not in self.heads and depth < self.total_layers:
            self.heads.update(load_heads(self.heads_path, self.spec, [depth], dtype=self.lm.dtype, device=self.device))
        new = self.heads.get(depth)
        if isinstance(new, HealedHead) and not new.merged:
            # the layers it heals are read again and merged in float32 before the cast (see load_model)
            _set_depth(self.lm, self.ckpt_dir, min(self.lm.depth, new.input_depth))
            _set_depth(self.lm, self.ckpt_dir, depth, prepare_layers=new.merge_layers)
        else:
            _set_depth(self.lm, self.ckpt_dir, depth)
        self.token_exits = usable_token_exits(exit_inputs(self.heads), depth, self.token_exits)
        self.heads = {d: h for d, h in self.heads.items() if d == depth or d in self.token_exits}
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------- tokenizing
    def encode(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a plain prompt or a chat (see :mod:`helios_ray.models.prompts`; callers that serve
        chats to base models use :meth:`encode_request` to also get the turn-marker stop strings)."""
        return self.encode_request(prompt, messages).ids

    def encode_request(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None
                       ) -> EncodedPrompt:
        return encode_request(self.tokenizer, prompt, messages)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --------------------------------------------------------------------------------- forward
    def new_cache(self) -> DenseKVCache:
        return DenseKVCache()

    @torch.inference_mode()
    def forward_exit(self, ids: Tensor, q_pos: Tensor, cache: KVCache, last_only: bool = True) -> Tensor:
        """Logits at the exit (depth D) for [B, T] tokens at positions q_pos (-1 = padding)."""
        ctx = self.lm.context(q_pos, cache)
        h = self.lm.run_layers(self.lm.embed_tokens(ids, ctx), ctx)
        head = self.exit_head
        h = head.transform(h, ctx)
        if last_only:
            h = h[:, -1:]
        return self.lm.logits(h)

    @torch.inference_mode()
    def step(self, ids: Tensor, q_pos: Tensor, cache: KVCache) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One serving step for the last position of each row: (token [B], confidence [B], logits [B, V],
        exit layer [B]).  Greedy exit at D, or token-level exit when ``token_exits`` is set."""
        if self.token_exits:
            return self._step_token_exit(ids, q_pos, cache)
        logits = self.forward_exit(ids, q_pos, cache, last_only=True)[:, -1]
        token, conf = confidence(logits, self.confidence_kind)
        return token, conf, logits, torch.full_like(token, self.depth)

    @torch.inference_mode()
    def step_packed(self, ids: Tensor, q_pos: Tensor, cache: KVCache, rows: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One packed serving step ([1, N] tokens of many sequences, see ``engine/packed.py``): like
        :meth:`step` for the positions ``rows`` (each sampling sequence's last token).  The LM head runs on
        those rows only.  Greedy exit at D (token-level exit models use :meth:`step`)."""
        ctx = self.lm.context(q_pos, cache)
        h = self.lm.run_layers(self.lm.embed_tokens(ids, ctx), ctx)
        h = self.exit_head.transform(h, ctx)
        logits = self.lm.logits(h[0, rows])
        token, conf = confidence(logits, self.confidence_kind)
        return token, conf, logits, torch.full_like(token, self.depth)

    def _step_token_exit(self, ids: Tensor, q_pos: Tensor, cache: KVCache) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each row leaves at its first confident exit; the rest of the batch runs on without it.

        A prefill step (T > 1) runs every layer and every exit head on all positions - the prompt's KV is needed
        at every depth - and only its last token chooses its exit.  A decode step skips, for the rows that
        exited, everything above their exit except one K/V projection per skipped layer (state propagation).
        """
        lm = self.lm
        B, T = ids.shape
        prefill = T > 1
        ctx = lm.context(q_pos, cache)
        h = lm.embed_tokens(ids, ctx)
        dev = h.device
        tokens = torch.zeros(B, dtype=torch.long, device=dev)
        conf = torch.zeros(B, dtype=torch.float32, device=dev)
        layer = torch.full((B,), self.depth, dtype=torch.long, device=dev)
        exited = torch.zeros(B, dtype=torch.bool, device=dev)
        logits_out = torch.zeros(B, self.spec.vocab_size, dtype=h.dtype, device=dev)
        rows = torch.arange(B, device=dev)  # the original row of each row still running
        done = 0
        for d in self.token_exits:
            h = lm.run_layers(h, ctx, done, d)
            done = d
            lg = lm.logits(self.heads[d].transform(h, ctx)[:, -1])
            tok, c = confidence(lg, self.confidence_kind)
            out = (c >= self.threshold) & ~exited[rows]
            if not bool(out.any()):
                continue
            idx = rows[out]
            tokens[idx], conf[idx], logits_out[idx] = tok[out], c[out].float(), lg[out]
            layer[idx], exited[idx] = d, True
            if prefill:
                continue  # the prompt's KV is needed at every depth: nothing is skipped
            self._propagate(h[out], ctx if bool(out.all()) else ctx.select(out), d)
            keep = ~out
            if not bool(keep.any()):
                return tokens, conf, logits_out, layer
            h, ctx, rows = h[keep], ctx.select(keep), rows[keep]
        h = lm.run_layers(h, ctx, done, self.depth)
        lg = lm.logits(self.exit_head.transform(h, ctx)[:, -1])
        tok, c = confidence(lg, self.confidence_kind)
        fin = ~exited[rows]
        idx = rows[fin]
        tokens[idx], conf[idx], logits_out[idx] = tok[fin], c[fin].float(), lg[fin]
        return tokens, conf, logits_out, layer

    def _propagate(self, h: Tensor, ctx: Any, exit_depth: int) -> None:
        """KV entries above ``exit_depth`` for rows that exited there: every deeper layer and deeper block head."""
        for i in range(exit_depth, self.depth):
            self.lm.layers[i].propagate_kv(h, ctx, i)
        for d in self.token_exits:
            head = self.heads[d]
            if d > exit_depth and isinstance(head, BlockHead):
                head.block.propagate_kv(h, ctx, head.cache_key)  # type: ignore[attr-defined]

    @torch.inference_mode()
    def profile_step(self, ids: Tensor, q_pos: Tensor, cache: KVCache, exits: list[int]) -> dict[str, Any]:
        """Every exit in ``exits`` (< D) plus the final layer, for the last position of each sequence.

        Returns ``{"exits": {d: (tokens [B], conf [B])}, "final": (tokens [B], conf [B]), "final_logits": [B,V]}``.
        Block heads run on every position so that their own KV entries stay complete.
        """
        ctx = self.lm.context(q_pos, cache)
        h = self.lm.embed_tokens(ids, ctx)
        out: dict[int, tuple[Tensor, Tensor]] = {}
        heads = {d: self.heads.get(d) or SharedHead(d) for d in set(exits) if d < self.depth}
        done = 0
        for d in sorted(heads, key=lambda d: (heads[d].input_depth, d)):  # a healed head starts below its exit
            head = heads[d]
            h = self.lm.run_layers(h, ctx, done, head.input_depth)
            done = head.input_depth
            z = head.transform(h, ctx)
            out[d] = confidence(self.lm.logits(z[:, -1]), self.confidence_kind)
        h = self.lm.run_layers(h, ctx, done, self.depth)
        final_logits = self.lm.logits(self.exit_head.transform(h, ctx)[:, -1])
        return {"exits": out, "final": confidence(final_logits, self.confidence_kind), "final_logits": final_logits}

    # ------------------------------------------------------------------------------ generation
    def _check_context(self, n_prompt: int, max_tokens: int) -> None:
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1 (got {max_tokens})")
        limit = self.spec.max_positions
        if n_prompt + max_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {limit} tokens"
            )

    @torch.inference_mode()
    def generate_stream(self, prompt_ids: list[int], max_tokens: int = 32,
                        sample: Callable[[Tensor], Tensor] | None = None) -> Iterator[TokenExit]:
        """Single-sequence generation with greedy exit at D (the serving engine batches; this is for
        the CLI, tests and profiling).  ``sample`` maps logits [1, V] -> token [1]; default greedy."""
        self._check_context(len(prompt_ids), max_tokens)
        cache = self.new_cache()
        dev = self.device
        ids = torch.tensor([prompt_ids], device=dev)
        pos = torch.arange(len(prompt_ids), device=dev)[None]
        from helios_ray.models.detok import IncrementalDecoder

        detok = IncrementalDecoder(self.tokenizer)  # one short window per token, not the whole output again
        for i in range(max_tokens):
            token, conf, logits, layer = self.step(ids, pos, cache)
            if sample is not None:
                token = sample(logits)
            t = int(token[0])
            piece, _ = detok.add(t)  # settled text only: an incomplete UTF-8 character waits for its next byte
            c = float(conf[0])
            yield TokenExit(token=t, text=piece, exit_layer=int(layer[0]), confidence=c, breach=c < self.threshold)
            if t in self.eos_ids:
                return
            ids = token.view(1, 1).to(dev)
            pos = torch.tensor([[len(prompt_ids) + i]], device=dev)

    def generate(self, prompt_ids: list[int], max_tokens: int = 32) -> Generation:
        t0 = time.perf_counter()
        g = Generation(prompt_tokens=len(prompt_ids))
        for tok in self.generate_stream(prompt_ids, max_tokens):
            g.tokens.append(tok)
        g.seconds = time.perf_counter() - t0
        ids = [t.token for t in g.tokens]
        g.finish_reason = "stop" if ids and ids[-1] in self.eos_ids else "length"
        g.text = self.decode([i for i in ids if i not in self.eos_ids])
        return g

    @torch.inference_mode()
    def profile_generate(self, prompt_ids: list[int], max_tokens: int, exits: list[int] | None = None
                         ) -> list[dict[str, Any]]:
        """Generate following the final layer; per token, every exit's (argmax, confidence) and the final
        argmax and its log-probability.  Requires the full model (depth == total layers)."""
        if self.depth != self.total_layers:
            raise HeliosError("profile mode needs the full model loaded (depth = total layers)")
        self._check_context(len(prompt_ids), max_tokens)
        exits = self.available_exits() if exits is None else exits
        cache = self.new_cache()
        dev = self.device
        ids = torch.tensor([prompt_ids], device=dev)
        pos = torch.arange(len(prompt_ids), device=dev)[None]
        records: list[dict[str, Any]] = []
        for i in range(max_tokens):
            r = self.profile_step(ids, pos, cache, exits)
            final_tok, final_conf = r["final"]
            t = int(final_tok[0])
            logprob = float(torch.log_softmax(r["final_logits"][0].float(), -1)[t])
            records.append({
                "pos": i,
                "exits": {d: (int(tok[0]), round(float(c[0]), 5)) for d, (tok, c) in r["exits"].items()},
                "final": t,
                "final_confidence": round(float(final_conf[0]), 5),
                "final_logprob": round(logprob, 5),
            })
            if t in self.eos_ids:
                break
            ids = final_tok.view(1, 1)
            pos = torch.tensor([[len(prompt_ids) + i]], device=dev)
        return records

    def available_exits(self) -> list[int]:
        """Trained exits if the model has any, otherwise every layer through the shared head."""
        if self.heads:
            return sorted(d for d in self.heads if d < self.depth)
        return list(range(1, self.depth))


def load_model(name: str, depth: int | None = None, *, repo: Any = None, device: str = "auto", dtype: str = "auto",
               exits: Literal["auto", "shared", "all"] | Path = "auto", confidence_kind: ConfidenceKind = "max_prob",
               threshold: float = 0.9, token_exits: list[int] | None = None,
               heads_file: Path | None = None) -> EarlyExitLM:
    """Load registered model ``name`` truncated to ``depth`` layers with its exit head.

    ``exits``: ``auto`` loads the trained head at D when one exists (shared head otherwise); ``shared`` forces
    the logit lens; ``all`` loads every trained head (profile mode); a path is ``auto`` from that file.
    ``heads_file``: read the heads from this file instead of the model's registered/shipped one.
    ``token_exits``: serve with token-level exit at these trained exits (each below ``depth``).
    """
    from transformers import AutoTokenizer

    from helios_ray.models.repository import ModelRepository

    repo = repo or ModelRepository()
    repo.spec(name)  # unknown name -> UnknownModelError before anything else
    ckpt_dir = repo.checkpoint_dir(name)
    spec = read_spec(ckpt_dir)
    depth = check_depth(depth, spec, name)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    t0 = time.perf_counter()
    heads: dict[int, ExitHead] = {}
    if isinstance(exits, Path):
        exits, heads_file = "auto", exits
    heads_path = None if exits == "shared" else (Path(heads_file) if heads_file else repo.exits_path(name))
    if heads_path is not None:
        if not heads_path.exists():
            raise HeliosError(f"exit heads file {heads_path} does not exist")
        wanted = None if exits == "all" else sorted({depth, *(token_exits or [])})
        heads = {d: h for d, h in load_heads(heads_path, spec, wanted, dtype=dt, device=dev).items()
                 if not (isinstance(h, HealedHead) and d > depth)}  # a healed exit above D has nothing to heal
    at_d = heads.get(depth)
    # serving at D through a healed exit: its deltas go into the float32 layers before they are cast or quantized
    prepare = at_d.merge_layers if isinstance(at_d, HealedHead) and depth < spec.num_layers else None
    lm, _ = load_decoder(ckpt_dir, depth, dev, dt, name, weights=weight_format(dtype), prepare_layers=prepare)
    for d, head in heads.items():
        if isinstance(head, HealedHead) and d < depth:
            head.attach(lm)  # profiling a deeper model: a side branch from layer d-k
    bad = [d for d in (token_exits or []) if d not in heads or d >= depth]
    if bad:
        have = sorted(d for d in heads if d < depth)
        raise HeliosError(f"model {name!r} has no trained exit head at {bad} below depth {depth} for token-level "
                          f"exit (trained: {have or 'none'})")
    tok = AutoTokenizer.from_pretrained(str(ckpt_dir))
    return EarlyExitLM(name, lm, heads, tok, confidence_kind, threshold, load_seconds=time.perf_counter() - t0,
                       ckpt_dir=ckpt_dir, heads_path=heads_path, token_exits=token_exits)
