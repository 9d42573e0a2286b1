"""Phase 1 of tuning: token rows from the data, and one pass of the frozen backbone into a disk cache.

The hidden state entering each exit (after D layers) is written as float16 (float32 when the model's
activations exceed float16, as Gemma 3's do) to ``.npy`` memory maps, with the final layer's top-k
log-probabilities and token ids, so training never runs the backbone again. Memory stays bounded by
one batch; the disk holds ``rows x seq_len x (2 * hidden * exits + 6 * k)`` bytes. Rows are whole
windows of a conversation (not isolated tokens) because a ``block`` head attends over its context.
Filling is resumable at row granularity.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from helios_data import Conversation

from helios_ray.models.prompts import encode_conversation
from helios_ray.errors import HeliosError
from helios_ray.models.decoder import DecoderLM, DenseKVCache

__all__ = ["Rows", "response_mask", "build_rows", "Cache", "probe_hidden_dtype", "fill_cache"]


@dataclass
class Rows:
    ids: np.ndarray  # [N, T] int32 (0 where padded)
    valid: np.ndarray  # [N, T] bool
    resp: np.ndarray  # [N, T] bool: inside an assistant turn (all True for plain texts)
    conv_ids: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())


def response_mask(conv: Conversation, tokenizer: Any, ids: list[int]) -> list[bool]:
    """True at positions whose *next* token lies inside an assistant turn (what a served model generates);
    all True for plain texts."""
    from helios_ray.models.prompts import render_conversation
    from helios_ray.models.prompts import has_chat_template

    if conv.text is not None:
        return [True] * len(ids)
    text = render_conversation(conv, tokenizer)
    try:
        enc = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer), return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return [True] * len(ids)  # slow tokenizers have no offsets: count everything
    if list(enc["input_ids"]) != list(ids):
        return [True] * len(ids)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for m in conv.messages:
        body = m["content"].strip()
        at = text.find(body, cursor)
        if at < 0:
            continue
        cursor = at + len(body)
        if m["role"] == "assistant":
            spans.append((at, cursor))
    inside = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return inside[1:] + inside[-1:]  # position i predicts token i + 1


def build_rows(convs: Iterable[Conversation], tokenizer: Any, seq_len: int, budget_tokens: int | None,
               max_rows: int | None = None, min_tokens: int = 8, windows: bool = True) -> Rows:
    """Fixed-length rows of token ids: the first ``seq_len`` tokens of each conversation in turn (shorter ones
    padded), then - if the budget is not met and ``windows`` - their later windows.  Stops at the budget."""
    rows: list[list[int]] = []
    resp_rows: list[list[bool]] = []
    names: list[str] = []
    total = 0
    encoded: list[tuple[str, list[int], list[bool]]] = []

    def full() -> bool:
        return (budget_tokens is not None and total >= budget_tokens) or (max_rows is not None and len(rows) >= max_rows)

    for conv in convs:
        if full():
            break
        ids = encode_conversation(conv, tokenizer)
        if len(ids) < min_tokens:
            continue
        resp = response_mask(conv, tokenizer, ids)
        encoded.append((conv.id, ids, resp))
        rows.append(ids[:seq_len])
        resp_rows.append(resp[:seq_len])
        names.append(conv.id)
        total += len(rows[-1])
    w = 1
    while windows and not full() and any(len(ids) > w * seq_len + min_tokens for _, ids, _ in encoded):
        for cid, ids, resp in encoded:
            if full():
                break
            chunk = ids[w * seq_len:(w + 1) * seq_len]
            if len(chunk) >= min_tokens:
                rows.append(chunk)
                resp_rows.append(resp[w * seq_len:(w + 1) * seq_len])
                names.append(f"{cid}#{w}")
                total += len(chunk)
        w += 1
    n = len(rows)
    ids_a = np.zeros((n, seq_len), dtype=np.int32)
    valid = np.zeros((n, seq_len), dtype=bool)
    resp_a = np.zeros((n, seq_len), dtype=bool)
    for i, (r, m) in enumerate(zip(rows, resp_rows)):
        ids_a[i, :len(r)] = r
        valid[i, :len(r)] = True
        resp_a[i, :len(m)] = m
    return Rows(ids_a, valid, resp_a, names)


class Cache:
    """Memory-mapped arrays of one split: ``ids``, ``valid``, ``resp``, ``h{D}`` (float16), ``topi``, ``topv``."""

    def __init__(self, root: Path, split: str):
        self.root, self.split = root, split

    def path(self, name: str) -> Path:
        return self.root / f"{self.split}_{name}.npy"

    def create(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.lib.format.open_memmap(self.path(name), mode="w+", dtype=dtype, shape=shape)

    def open(self, name: str, mode: str = "r") -> np.ndarray:
        return np.load(self.path(name), mmap_mode=mode)

    def exists(self, name: str) -> bool:
        return self.path(name).exists()


def _hidden_states(lm: DecoderLM, ids: Tensor, pos: Tensor, keep: set[int]) -> tuple[dict[int, Tensor], Tensor]:
    """Hidden states after each layer count in ``keep`` and the final logits' input (after all layers)."""
    ctx = lm.context(pos, DenseKVCache())
    h = lm.embed_tokens(ids, ctx)
    out: dict[int, Tensor] = {}
    for i in range(lm.depth):
        h = lm.layers[i](h, ctx, i)
        if i + 1 in keep:
            out[i + 1] = h
    return out, h


def _topk_logprobs(lm: DecoderLM, h: Tensor, k: int, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """Top-k log-probabilities (over the full vocabulary) and their ids, for [N, H] hidden states."""
    vals, idx = [], []
    for s in range(0, h.shape[0], chunk):
        logits = lm.logits(h[s:s + chunk]).float()
        v, i = logits.topk(k, dim=-1)
        vals.append(v - torch.logsumexp(logits, dim=-1, keepdim=True))
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def probe_hidden_dtype(lm: DecoderLM, rows: Rows, depths: list[int]) -> str:
    """float16 when the hidden states at the exits stay well inside its range on the first row, else float32
    (Gemma 3's residual stream reaches ~1e5, beyond float16's 65504)."""
    n = int(rows.valid[0].sum())
    with torch.inference_mode():
        inner, _ = _hidden_states(lm, torch.from_numpy(rows.ids[:1, :n]).long(), torch.arange(n)[None], set(depths))
    peak = max(float(inner[d].abs().max()) for d in depths)
    return "float16" if peak < 20_000 else "float32"


def fill_cache(cache: Cache, lm: DecoderLM, rows: Rows, depths: list[int], topk: int, state: dict[str, Any],
               save_state: Callable[[], None], batch_rows: int, progress: bool, hidden_dtype: str = "float16") -> None:
    """Run the backbone once over ``rows``; resumable at row granularity through ``state[split]``."""
    n, t = rows.ids.shape
    h_np = np.float16 if hidden_dtype == "float16" else np.float32
    hdim = lm.spec.hidden_size
    key = f"{cache.split}_rows_done"
    if key not in state or not cache.exists("ids"):
        for name, arr in (("ids", rows.ids), ("valid", rows.valid), ("resp", rows.resp)):
            m = cache.create(name, arr.shape, arr.dtype)
            m[:] = arr
            m.flush()
        for d in depths:
            cache.create(f"h{d}", (n, t, hdim), h_np)
        cache.create("topi", (n, t, topk), np.int32)
        cache.create("topv", (n, t, topk), np.float16)
        state[key] = 0
        save_state()
    done = int(state[key])
    if done >= n:
        return
    hs = {d: cache.open(f"h{d}", "r+") for d in depths}
    topi, topv = cache.open("topi", "r+"), cache.open("topv", "r+")
    bar = tqdm(total=n, initial=done, desc=f"cache {cache.split}", unit="row", disable=not progress, file=sys.stderr)
    with torch.inference_mode():
        for s in range(done, n, batch_rows):
            e = min(n, s + batch_rows)
            ids = torch.from_numpy(np.ascontiguousarray(rows.ids[s:e])).long()
            valid = torch.from_numpy(np.ascontiguousarray(rows.valid[s:e]))
            pos = torch.where(valid, torch.arange(t)[None].expand(e - s, t), torch.full_like(ids, -1))
            inner, last = _hidden_states(lm, ids, pos, set(depths))
            for d in depths:
                x = inner[d].float()
                if h_np == np.float16 and x.abs().max() > 60000:
                    raise HeliosError(f"hidden states after layer {d} overflow float16 (|h| > 60000): "
                                      "rerun with --cache-dtype float32")
                hs[d][s:e] = x.numpy().astype(h_np)
            v, i = _topk_logprobs(lm, last.reshape(-1, hdim), topk)
            topv[s:e] = v.reshape(e - s, t, topk).numpy().astype(np.float16)
            topi[s:e] = i.reshape(e - s, t, topk).numpy().astype(np.int32)
            for m in (*hs.values(), topi, topv):
                m.flush()
            state[key] = e
            save_state()
            bar.update(e - s)
    bar.close()
