"""``helios-ray tune-exits``: train exit heads for a frozen backbone by self-distillation from its final
layer (EE-Tuning style), and write them with the exit card that measures them.

A :class:`TuningRun` ties the phases together, each resumable and in its own module:

1. **Cache** (:mod:`.cache`): the full model runs once over fixed-length token rows and the
   hidden state entering each exit goes to disk with the final layer's top-k. The held-out rows (other
   conversations, chosen by hash of the conversation id) are cached the same way, with the hidden state
   after D+1 layers too (to report the logit lens one layer deeper next to a block head, which costs a
   layer).
2. **Train** (:mod:`.train`) each head on the cache: the backbone never runs again.
3. **Evaluate** (:mod:`.calibration`) every head on the held-out rows with the full vocabulary:
   teacher-forced top-1 agreement with the final layer (all tokens, and assistant-turn tokens only), the
   logit lens at D (and D+1) for comparison, a calibration table and a recommended confidence threshold.

Heads go to ``exits.safetensors`` (:func:`~helios_ray.models.exit_heads.save_heads`), the measurements to
the exit card ``exits.json`` (written here). Settings are in :mod:`.config`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from helios_data import load_dataset
from helios_ray.errors import HeliosError
from helios_ray.models.exit_heads import ExitHead, SharedHead
from helios_ray.models.exit_files import save_heads
from helios_ray.models.loading import load_decoder, read_spec
from helios_ray.tuning.cache import Cache, build_rows, fill_cache, probe_hidden_dtype
from helios_ray.tuning.calibration import TARGET_AGREEMENT, score_exit, summarize
from helios_ray.tuning.config import (
    SAVE_DTYPES,
    ExitSpec,
    TuneConfig,
    check_exits,
    log,
    resolved_compute_dtype,
    validate,
)
from helios_ray.models.healed import HealedHead
from helios_ray.tuning.train import autocast, build_head, train_head

__all__ = ["CARD_FORMAT", "TuningRun", "tune_exits", "card_table", "environment_threads"]

CARD_FORMAT = 1


def _work_dir(cfg: TuneConfig) -> Path:
    from helios_ray.paths import cache_root

    return Path(cfg.work_dir) if cfg.work_dir else cache_root() / "tuning" / f"{cfg.model}-{cfg.cache_key()}"


class TuningRun:
    """One tuning run: the frozen backbone, the cache (filled on construction) and the per-head steps."""

    def __init__(self, cfg: TuneConfig, repo: Any = None):
        from transformers import AutoTokenizer

        from helios_ray.models.repository import ModelRepository

        self.t_start, self.cpu_start = time.perf_counter(), time.process_time()
        validate(cfg)
        self.cfg = cfg
        self.repo = repo = repo or ModelRepository(models_file=cfg.models_file)
        repo.spec(cfg.model)  # unknown model -> UnknownModelError, before anything is read
        ckpt_dir = repo.checkpoint_dir(cfg.model)
        self.spec = spec = read_spec(ckpt_dir)
        check_exits(cfg.exits, spec, cfg.model)
        if cfg.topk > spec.vocab_size:
            raise HeliosError(f"--topk {cfg.topk} exceeds the vocabulary ({spec.vocab_size})")
        self.out_dir = Path(cfg.out) if cfg.out else repo.cache_dir / "exits" / cfg.model

        # data first: an empty or malformed file fails before the model is loaded
        train_convs = load_dataset(cfg.data, split="train", seed=cfg.seed)
        held_convs = load_dataset(cfg.data, split="heldout", seed=cfg.seed)
        seen: set[str] = set()  # one chunk per chat: 100 held-out conversations are 100 different chats
        held_convs = [c for c in held_convs if not (c.group in seen or seen.add(c.group))]  # type: ignore[func-returns-value]
        if not held_convs:
            raise HeliosError(f"data {cfg.data!r} has no held-out records (5% of ids by hash): give it more records")
        if not train_convs:
            raise HeliosError(f"data {cfg.data!r} has no training records")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
        except (OSError, ValueError) as e:
            raise HeliosError(f"model {cfg.model!r} has no usable tokenizer in {ckpt_dir}: {e}") from None

        self.work = work = _work_dir(cfg)
        work.mkdir(parents=True, exist_ok=True)
        self.state_path = work / "state.json"
        self.state: dict[str, Any] = {}
        # what the heads start from (a healed exit: the hidden state below the layers it heals); held out, also
        # the lens at D and one layer deeper (next to a block head, which costs a layer)
        depths = sorted({e.input_depth for e in cfg.exits})
        eval_depths = sorted(set(depths) | {e.depth for e in cfg.exits}
                             | {e.depth + 1 for e in cfg.exits if e.depth + 1 < spec.num_layers})
        # The cache is a pure function of cache_key() (+ the depths it holds): reuse it whenever it matches,
        # finished or not.  Heads are reused only with --resume.
        if self.state_path.exists():
            old = json.loads(self.state_path.read_text())
            if (old.get("cache_key") == cfg.cache_key() and set(depths) <= set(old.get("depths", []))
                    and set(eval_depths) <= set(old.get("eval_depths", []))):
                self.state = old
                log(f"reusing the cache in {work}")
            else:
                log(f"{work} holds a cache for other settings: starting it over")
                for p in list(work.glob("*.npy")) + list(work.glob("heads/*")) + [self.state_path]:
                    p.unlink()
        if not self.state:
            self.state = {"cache_key": cfg.cache_key(), "depths": depths, "eval_depths": eval_depths}
        self.save_state()
        depths, eval_depths = self.state["depths"], self.state["eval_depths"]

        self.lm, _ = load_decoder(ckpt_dir, None, "cpu", torch.float32, cfg.model)
        self.compute_dtype = resolved_compute_dtype(cfg.compute_dtype)
        # the teacher pass at the compute dtype (bf16 is ~3x faster where the CPU has bf16 units); training and
        # evaluation keep fp32 weights and autocast
        _teacher: list[Any] = []

        def teacher() -> Any:  # loaded only when a cache still has rows to fill
            if not _teacher:
                _teacher.append(self.lm if self.compute_dtype == "float32" else load_decoder(
                    ckpt_dir, None, "cpu", getattr(torch, self.compute_dtype), cfg.model)[0])
            return _teacher[0]
        self.train_cache, self.eval_cache = Cache(work, "train"), Cache(work, "eval")
        self.batch_rows = max(1, cfg.batch_tokens // cfg.seq_len)
        st = self.state
        if st.get("train_rows_done", -1) < st.get("train_rows", 0) or "train_rows" not in st:
            t0 = time.perf_counter()
            rows = build_rows(train_convs, self.tokenizer, cfg.seq_len, cfg.tokens)
            if rows.tokens == 0:
                raise HeliosError(f"data {cfg.data!r} yields no training tokens (every record is shorter than 8 tokens)")
            st["train_rows"], st["train_tokens"] = int(rows.ids.shape[0]), rows.tokens
            if "hidden_dtype" not in st:
                st["hidden_dtype"] = (probe_hidden_dtype(self.lm, rows, eval_depths) if cfg.cache_dtype == "auto"
                                      else cfg.cache_dtype)
            fill_cache(self.train_cache, teacher(), rows, depths, cfg.topk, st, self.save_state,
                       max(1, 1024 // cfg.seq_len), cfg.progress, st["hidden_dtype"])
            st["train_cache_seconds"] = round(st.get("train_cache_seconds", 0) + time.perf_counter() - t0, 1)
            self.save_state()
        if st.get("eval_rows_done", -1) < st.get("eval_rows", 0) or "eval_rows" not in st:
            t0 = time.perf_counter()
            rows = build_rows(held_convs, self.tokenizer, cfg.eval_seq_len, None, max_rows=cfg.eval_conversations,
                              windows=False)
            st["eval_rows"], st["eval_tokens"] = int(rows.ids.shape[0]), rows.tokens
            st["eval_conversation_ids"] = rows.conv_ids
            fill_cache(self.eval_cache, teacher(), rows, eval_depths, 1, st, self.save_state,
                       max(1, 1024 // cfg.eval_seq_len), cfg.progress, st.get("hidden_dtype", "float16"))
            st["eval_cache_seconds"] = round(st.get("eval_cache_seconds", 0) + time.perf_counter() - t0, 1)
            self.save_state()
        self.heads_dir = work / "heads"
        self.heads_dir.mkdir(exist_ok=True)

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.state_path)

    @property
    def train_tokens(self) -> int:
        return int(self.state["train_tokens"])

    def train(self, e: ExitSpec) -> tuple[ExitHead, dict[str, Any]]:
        """Train (or, with --resume, reload) the head for exit ``e``; the stored-dtype rounding is applied."""
        from safetensors.torch import load_file, save_file

        cfg = self.cfg
        key = cfg.head_key(e)
        done_file = self.heads_dir / f"{e.depth}-{key}.safetensors"
        res_file = self.heads_dir / f"{e.depth}-{key}.json"
        ckpt = self.heads_dir / f"{e.depth}-{key}.ckpt"
        head = build_head(e, self.lm, cfg.block_init, cfg.seed)
        if cfg.resume and done_file.exists() and res_file.exists():
            head.load_state_dict(load_file(str(done_file)))
            log(f"exit {e.depth}: already trained ({done_file.name}), reusing it")
            return self._for_inference(head), json.loads(res_file.read_text())
        if not cfg.resume:
            ckpt.unlink(missing_ok=True)
        epochs = cfg.linear_epochs if e.kind == "linear" else cfg.epochs
        steps = cfg.steps or max(1, math.ceil(epochs * self.train_tokens / (self.batch_rows * cfg.seq_len)))
        lr = cfg.lr
        res = train_head(head, self.lm, self.train_cache, steps, self.batch_rows, lr, cfg, ckpt, cfg.progress)
        assert res is not None
        save_dtype = SAVE_DTYPES[cfg.save_dtype]
        if save_dtype != torch.float32:  # evaluate exactly what is shipped
            with torch.no_grad():
                for p in head.parameters():
                    p.copy_(p.to(save_dtype).float())
        res["train_tokens_seen"] = steps * self.batch_rows * cfg.seq_len
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(done_file))
        res_file.write_text(json.dumps(res))
        ckpt.unlink(missing_ok=True)
        return self._for_inference(head), res

    def _for_inference(self, head: ExitHead) -> ExitHead:
        """A trained healed head runs from here on as a merged side branch (no hooks), like profiling runs it."""
        if isinstance(head, HealedHead):
            head.attach(self.lm)
        return head.eval()

    def lens(self, d: int) -> float | None:
        """Held-out agreement of the logit lens after ``d`` layers (1.0 at the full depth)."""
        if d >= self.spec.num_layers:
            return 1.0
        lens = self.state.setdefault("lens", {})
        key = f"{d}/{self.cfg.eval_stride}"
        if key not in lens and self.eval_cache.exists(f"h{d}"):
            with autocast(self.cfg):  # measured at the same compute dtype as the heads
                sc = score_exit(SharedHead(d), self.lm, self.eval_cache, d, self.cfg.eval_stride)
            lens[key] = round(float(sc.agree.mean()), 4)
            self.save_state()
        return lens.get(key)

    def evaluate(self, e: ExitSpec, head: ExitHead, res: dict[str, Any]) -> dict[str, Any]:
        """The exit card entry for one trained head."""
        with autocast(self.cfg):
            s = summarize(score_exit(head.eval(), self.lm, self.eval_cache, e.input_depth, self.cfg.eval_stride))
        n_params = sum(p.numel() for p in head.parameters())
        return {
            "kind": e.kind, **({"rank": e.rank} if e.kind in ("linear", "healed") else {}),
            **({"layers": e.layers} if e.kind == "healed" else {}),
            **({"init": self.cfg.block_init} if e.kind == "block" else {}),
            "parameters": n_params, "bytes": n_params * torch.finfo(SAVE_DTYPES[self.cfg.save_dtype]).bits // 8,
            # a healed exit is merged into the layers a replica loads anyway: no weights or KV beyond truncation
            "serving_extra_bytes": 0 if e.kind == "healed" else None,
            "extra_kv_layers": 1 if e.kind == "block" else 0,
            "train_tokens": self.train_tokens, "train_tokens_seen": res["train_tokens_seen"], "steps": res["steps"],
            "lr": res["lr"], "train_seconds": res["seconds"], "kl_first": res["kl_first"], "kl_last": res["kl_last"],
            "lens_agreement": self.lens(e.depth),
            "lens_agreement_next_layer": self.lens(e.depth + 1) if e.kind == "block" else None,
            **s,
        }

    def write(self, heads: dict[int, ExitHead], card_exits: dict[str, Any]) -> dict[str, Any]:
        cfg, spec, st = self.cfg, self.spec, self.state
        self.out_dir.mkdir(parents=True, exist_ok=True)
        heads_path = self.out_dir / "exits.safetensors"
        save_heads(heads_path, heads, {"model": cfg.model, "card": "exits.json"}, dtype=SAVE_DTYPES[cfg.save_dtype])
        card = {
            "format": CARD_FORMAT,
            "model": cfg.model,
            "family": spec.family,
            "total_layers": spec.num_layers,
            "heads_file": heads_path.name,
            "heads_file_bytes": heads_path.stat().st_size,
            "heads_dtype": cfg.save_dtype,
            "confidence": "max_prob",
            "target_agreement": TARGET_AGREEMENT,
            "data": {
                "source": cfg.data, "seq_len": cfg.seq_len, "train_rows": st["train_rows"],
                "train_tokens": self.train_tokens, "heldout_rows": st["eval_rows"],
                "heldout_tokens": st["eval_tokens"], "heldout_seq_len": cfg.eval_seq_len,
                "heldout_scored_every": cfg.eval_stride,
                "split": "held out iff sha256(conversation group id) falls in the first 5%",
            },
            "teacher": {"layer": spec.num_layers, "topk": cfg.topk, "dtype": self.compute_dtype},
            "training": {
                "vocab": cfg.vocab, "negatives": cfg.negatives if cfg.vocab == "sampled" else None,
                "ce_weight": cfg.ce_weight, "batch_tokens": self.batch_rows * cfg.seq_len, "epochs": cfg.epochs,
                "linear_epochs": cfg.linear_epochs, "lr": cfg.lr,
                "seed": cfg.seed, "block_init": cfg.block_init, "optimizer": "AdamW(0.9, 0.95), cosine to 10%",
                "compute_dtype": self.compute_dtype,
                "cache_seconds": round(st.get("train_cache_seconds", 0) + st.get("eval_cache_seconds", 0), 1),
                "threads": torch.get_num_threads(),
                "wall_seconds": round(time.perf_counter() - self.t_start, 1),
                "cpu_seconds_this_invocation": round(time.process_time() - self.cpu_start, 1),
            },
            "command": cfg.command,
            "exits": card_exits,
        }
        card_path = self.out_dir / "exits.json"
        tmp = card_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(card, indent=2) + "\n")
        tmp.replace(card_path)
        return card


def tune_exits(cfg: TuneConfig, repo: Any = None) -> dict[str, Any]:
    """Cache, train every head, evaluate on held-out rows; writes ``exits.safetensors`` + ``exits.json``."""
    run = TuningRun(cfg, repo)
    heads: dict[int, ExitHead] = {}
    results: dict[int, dict[str, Any]] = {}
    for e in cfg.exits:
        heads[e.depth], results[e.depth] = run.train(e)
    card_exits = {}
    for e in tqdm(cfg.exits, desc="evaluate", disable=not cfg.progress, file=sys.stderr):
        card_exits[str(e.depth)] = run.evaluate(e, heads[e.depth], results[e.depth])
    return run.write(heads, card_exits)


def card_table(card: dict[str, Any]) -> str:
    """The measured table (one line per exit) as Markdown."""
    lines = ["| exit | head | params | lens @D | lens @D+1 | head agreement | on assistant tokens | thr* | "
             "coverage@thr | agreement@thr (out-of-sample) | train tokens | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d, e in sorted(card["exits"].items(), key=lambda kv: int(kv[0])):
        thr = e.get("recommended_threshold")
        row = next((r for r in e["calibration"] if r["threshold"] == thr), None)
        chk = e.get("threshold_check") or {}
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines.append(
            f"| L{d} | {_kind(e)} | {e['parameters'] / 1e6:.2f}M | {pct(e['lens_agreement'])} | "
            f"{pct(e['lens_agreement_next_layer'])} | **{pct(e['agreement'])}** | {pct(e['agreement_response'])} | "
            f"{thr if thr is not None else '-'} | {pct(row['coverage']) if row else '-'} | "
            f"{pct(row['agreement']) if row else '-'} ({pct(chk.get('agreement'))} @ {chk.get('threshold', '-')}) | "
            f"{e['train_tokens']} | {e['train_seconds']} |")
    return "\n".join(lines)


def _kind(e: dict[str, Any]) -> str:
    if e["kind"] == "healed":
        return f"healed {e.get('layers')} layers, rank {e.get('rank')}"
    return e["kind"] + (f" r{e['rank']}" if e.get("rank") else "")


def environment_threads(n: int | None) -> None:
    """``--threads``: torch's intra-op threads, and OpenMP's unless the environment already set them."""
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
