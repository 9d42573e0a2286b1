"""``helios-ray eval-exits``: exit quality on a prompt file, against the full model's own greedy output.

Unlike the held-out scores in an exit card (teacher-forced on training-like rows), this measures what
serving sees: generated tokens, and free-running generation at a loaded depth.  With ``humaneval > 0`` it also
measures task quality: HumanEval pass@1 of greedy completions at each evaluated depth and at full depth.

HumanEval protocol: raw completion of the problem's prompt (signature + docstring), no chat template even for
chat models - the standard protocol, and the one that compares depths on equal terms; greedy; generation stops
at EOS, at HumanEval's stop sequences (:data:`~helios_ray.tuning.code_eval.STOP_SEQUENCES`) or after
``humaneval_max_tokens``; each ``prompt + completion + test + check(entry_point)`` runs in a sandboxed child
process with a timeout (:mod:`helios_ray.tuning.code_eval`), never in this process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from helios_data import Conversation, load_dataset

from helios_ray.models.prompts import encode_conversation
from helios_ray.errors import HeliosError
from helios_ray.tuning.calibration import calibration

__all__ = ["evaluate_exits", "generate_greedy", "pass_at_1", "report_table", "update_card"]


def _prompt_ids(conv: Conversation, tokenizer: Any) -> list[int]:
    """A request's token ids: chats up to their first user turn with the generation prompt, texts as they are."""
    if conv.text is None:
        conv = Conversation(id=conv.id, messages=tuple(conv.prompt_messages), kind=conv.kind, source=conv.source)
        return encode_conversation(conv, tokenizer, add_generation_prompt=True)
    return encode_conversation(conv, tokenizer)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generate_greedy(m: Any, requests: dict[str, tuple[list[int], Any]], batch: int = 16, progress: bool = False,
                    desc: str = "generate") -> dict[str, Any]:
    """Run ``{key: (prompt ids, SamplingParams)}`` through the serving engine ``batch`` at a time (continuous
    batching, as replicas serve) with a progress bar; the finished sequences by key.  The budget is the one memory
    model's: room for ``batch`` of the longest requests next to the weights."""
    from helios_ray.engine.engine import EngineConfig, LLMEngine

    if not requests:
        return {}
    longest = max(len(ids) + params.max_tokens for ids, params in requests.values())
    fp = m.footprint
    budget = fp.weight_bytes + (batch + 1) * (longest + 32) * fp.kv_bytes_per_token
    eng = LLMEngine(m, EngineConfig(memory_budget=budget, max_num_seqs=batch, max_model_len=m.spec.max_positions,
                                    torch_threads=torch.get_num_threads()))
    seqs = {k: eng.add_request(ids, params) for k, (ids, params) in requests.items()}
    bar = tqdm(total=len(seqs), desc=desc, disable=not progress, file=sys.stderr)
    while eng.scheduler.has_work:
        bar.update(sum(1 for ev in eng.step() if ev.finished))
    bar.close()
    return seqs


def pass_at_1(m: Any, problems: list[Conversation], max_tokens: int, timeout: float, progress: bool,
              desc: str, batch: int = 16) -> dict[str, Any]:
    """Greedy completions of every problem at the model's loaded depth, generated ``batch`` at a time by the
    serving engine (continuous batching; the stop sequences end each completion there), each then tested in the
    sandbox."""
    from helios_ray.engine.sequence import SamplingParams
    from helios_ray.tuning.code_eval import STOP_SEQUENCES, check_program, humaneval_program

    t0 = time.perf_counter()
    per: dict[str, str] = {}
    ctx = m.spec.max_positions
    prompts = {c.id: m.encode(prompt=c.text) for c in problems}
    seqs = generate_greedy(m, {k: (ids, SamplingParams(max_tokens=min(max_tokens, ctx - len(ids)), temperature=0.0,
                                                       stop=list(STOP_SEQUENCES)))
                               for k, ids in prompts.items() if len(ids) < ctx}, batch, progress, desc)
    tokens = sum(len(s.output_ids) for s in seqs.values())
    for conv in problems:
        assert conv.text is not None
        if conv.id not in seqs:
            per[conv.id] = "failed: the prompt does not fit the model's context"
            continue
        completion = seqs[conv.id].text  # the engine already cut it before its first stop sequence
        r = check_program(humaneval_program(conv.text, completion, conv.meta["test"], conv.meta["entry_point"]),
                          timeout=timeout)
        per[conv.id] = r.status if r.passed or r.status == "timeout" else f"failed: {r.detail}"[:200]
    passed = sum(v == "passed" for v in per.values())
    return {"pass_at_1": round(passed / max(1, len(problems)), 4), "passed": passed, "problems": len(problems),
            "generated_tokens": tokens, "seconds": round(time.perf_counter() - t0, 1), "results": per}


def evaluate_exits(model: str, prompts: str, max_tokens: int = 16, limit: int | None = None,
                   exits: list[int] | None = None, heads_path: Path | None = None, split: str = "all",
                   models_file: str | None = None, progress: bool = True, repo: Any = None,
                   humaneval: int = 0, pass_at_1_depths: list[int] | None = None, humaneval_max_tokens: int = 256,
                   humaneval_timeout: float = 10.0) -> dict[str, Any]:
    """Exit quality on a prompt file, against the full model's own greedy output.

    * teacher-forced: the full model generates ``max_tokens`` greedy tokens per prompt (profile mode); at every
      generated position each exit's argmax is compared with the final layer's -> agreement + calibration;
    * free-running: the model loaded to depth D only (plus its exit head, as serving loads it) generates greedily
      from the same prompt -> share of prompts whose ``max_tokens`` tokens equal the full model's exactly,
      mean common-prefix share and position-wise token agreement;
    * task quality (``humaneval`` > 0): pass@1 on the first ``humaneval`` HumanEval problems at each of
      ``pass_at_1_depths`` (default: the evaluated exits) and at full depth (module doc: the protocol).
    """
    from helios_ray.models.early_exit import load_model
    from helios_ray.models.repository import ModelRepository

    if max_tokens < 1:
        raise HeliosError(f"--max-tokens must be >= 1 (got {max_tokens})")
    if limit is not None and limit < 1:
        raise HeliosError(f"--limit must be >= 1 (got {limit})")
    if humaneval < 0 or humaneval_max_tokens < 1 or humaneval_timeout <= 0:
        raise HeliosError("--humaneval must be >= 0, --humaneval-max-tokens >= 1 and --humaneval-timeout > 0")
    repo = repo or ModelRepository(models_file=models_file)
    repo.spec(model)
    convs = load_dataset(prompts, split=split, limit=limit, seed=None)  # type: ignore[arg-type]
    if not convs:
        raise HeliosError(f"{prompts}: no prompts")
    if heads_path is not None and not Path(heads_path).exists():
        raise HeliosError(f"exit heads file {heads_path} does not exist")
    heads_file = Path(heads_path) if heads_path else None
    full = load_model(model, repo=repo, device="cpu", exits="all", heads_file=heads_file)
    L = full.total_layers
    trained = sorted(full.heads)
    depths = sorted(set(exits)) if exits else trained
    if not depths:
        raise HeliosError(f"model {model!r} has no trained exit heads; pass --exits to evaluate the logit lens")
    bad = [d for d in depths if not 1 <= d < L]
    if bad:
        raise HeliosError(f"exit layer(s) {bad} out of range for {model}: exits must be in 1..{L - 1}")
    he_depths = sorted(set(pass_at_1_depths if pass_at_1_depths is not None else depths) | {L}) if humaneval else []
    bad = [d for d in he_depths if not 1 <= d <= L]
    if bad:
        raise HeliosError(f"--pass-at-1-depths {bad} out of range for {model}: depths must be in 1..{L}")
    problems: list[Conversation] = []
    if humaneval:
        from helios_data import load_humaneval

        problems = load_humaneval(limit=humaneval)
    measured: dict[str, Any] = {}
    card: dict[str, Any] = {}
    hp = Path(heads_path) if heads_path else repo.exits_path(model)
    if hp is not None and hp.with_suffix(".json").exists():
        card = json.loads(hp.with_suffix(".json").read_text())

    per: dict[int, dict[str, list[Any]]] = {d: {"agree": [], "conf": [], "kind": []} for d in depths}
    refs: list[tuple[Conversation, list[int], list[int]]] = []
    skipped = 0
    for conv in tqdm(convs, desc="full model", disable=not progress, file=sys.stderr):
        ids = _prompt_ids(conv, full.tokenizer)
        if not ids or len(ids) + max_tokens > full.spec.max_positions:
            skipped += 1
            continue
        recs = full.profile_generate(ids, max_tokens, depths)
        for r in recs:
            for d in depths:
                tok, c = r["exits"][d]
                per[d]["agree"].append(tok == r["final"])
                per[d]["conf"].append(c)
                per[d]["kind"].append(conv.kind)
        refs.append((conv, ids, [r["final"] for r in recs]))
    if not refs:
        raise HeliosError(f"{prompts}: every prompt is empty or longer than the model's context")
    if problems:
        measured[str(L)] = {"head": "final", **pass_at_1(full, problems, humaneval_max_tokens, humaneval_timeout,
                                                          progress, f"humaneval depth {L}")}
    del full

    out_exits: dict[str, Any] = {}
    for d in depths:
        agree, conf = np.asarray(per[d]["agree"], bool), np.asarray(per[d]["conf"], float)
        kinds = np.asarray(per[d]["kind"])
        m = load_model(model, depth=d, repo=repo, device="cpu", heads_file=heads_file)
        exact, prefix, pos_agree = [], [], []
        for conv, ids, ref in tqdm(refs, desc=f"depth {d}", disable=not progress, file=sys.stderr):
            got = [t.token for t in m.generate_stream(ids, max_tokens)]
            exact.append(got == ref)
            prefix.append(_common_prefix(got, ref) / max(1, len(ref)))
            pos_agree.append(sum(x == y for x, y in zip(got, ref)) / max(1, len(ref)))
        card_thr = ((card.get("exits") or {}).get(str(d)) or {}).get("recommended_threshold")
        entry: dict[str, Any] = {
            "head": m.exit_head.kind,
            "agreement": round(float(agree.mean()), 4),
            "by_kind": {k: round(float(agree[kinds == k].mean()), 4) for k in sorted(set(kinds.tolist()))},
            "calibration": calibration(agree, conf),
            "card_threshold": card_thr,
            "free_run": {
                "exact_match": round(float(np.mean(exact)), 4),
                "common_prefix": round(float(np.mean(prefix)), 4),
                "token_agreement": round(float(np.mean(pos_agree)), 4),
            },
        }
        if card_thr is not None:
            sel = conf >= card_thr
            entry["at_card_threshold"] = {"coverage": round(float(sel.mean()), 4),
                                          "agreement": round(float(agree[sel].mean()), 4) if sel.any() else None}
        if problems and d in he_depths:
            measured[str(d)] = {"head": m.exit_head.kind, **pass_at_1(m, problems, humaneval_max_tokens,
                                                                       humaneval_timeout, progress, f"humaneval depth {d}")}
            entry["pass_at_1"] = measured[str(d)]["pass_at_1"]
        out_exits[str(d)] = entry
        del m
    for d in he_depths:  # depths asked for pass@1 only
        if str(d) not in measured:
            m = load_model(model, depth=d, repo=repo, device="cpu", heads_file=heads_file)
            measured[str(d)] = {"head": m.exit_head.kind, **pass_at_1(m, problems, humaneval_max_tokens,
                                                                       humaneval_timeout, progress, f"humaneval depth {d}")}
            del m
    humaneval_report = None
    if problems:
        humaneval_report = {
            "problems": len(problems), "max_tokens": humaneval_max_tokens, "timeout_s": humaneval_timeout,
            "protocol": "raw completion of the prompt (no chat template), greedy, HumanEval stop sequences; "
                        "prompt + completion + test + check(entry_point) in a sandboxed subprocess",
            "depths": {k: measured[k] for k in sorted(measured, key=int)},
        }
    return {
        "model": model, "prompts": prompts, "split": split, "num_prompts": len(refs), "skipped": skipped,
        "max_tokens": max_tokens, "generated_tokens": int(sum(len(r) for _, _, r in refs)),
        "total_layers": L, "heads_file": str(hp) if hp else None, "exits": out_exits, "humaneval": humaneval_report,
    }


def update_card(report: dict[str, Any], command: str | None = None) -> Path:
    """Write the report's HumanEval pass@1 into the exit card next to its heads file: ``humaneval`` (protocol,
    problems, ``pass_at_1_full``) at the top and ``pass_at_1`` in each measured exit, so the policy can guard on
    task quality (``candidate_info`` turns them into ``ExitPrior.pass_at_1_drop``)."""
    he = report.get("humaneval")
    if not he:
        raise HeliosError("--update-card needs a HumanEval measurement (--humaneval N > 0)")
    if not report.get("heads_file"):
        raise HeliosError(f"model {report['model']!r} has no exit heads file, so no card to update")
    path = Path(report["heads_file"]).with_suffix(".json")
    if not path.exists():
        raise HeliosError(f"no exit card at {path}")
    card = json.loads(path.read_text())
    depths = he["depths"]
    full = depths.get(str(report["total_layers"]))
    card["humaneval"] = {"problems": he["problems"], "max_tokens": he["max_tokens"], "protocol": he["protocol"],
                         "pass_at_1_full": full["pass_at_1"] if full else None, "command": command}
    for d, e in (card.get("exits") or {}).items():
        e.pop("pass_at_1", None)  # a value from another run (other problems or limits) would mix protocols
        if d in depths:
            e["pass_at_1"] = depths[d]["pass_at_1"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(path)
    return path


def report_table(report: dict[str, Any]) -> str:
    """The report (one line per exit) as Markdown."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"{report['model']}: {report['num_prompts']} prompts from {report['prompts']}, "
             f"{report['generated_tokens']} tokens generated by the full model ({report['max_tokens']} max each)",
             "| exit | head | teacher-forced agreement | by kind | free-run exact | free-run prefix | thr | "
             "coverage@thr | agreement@thr |", "|---|---|---|---|---|---|---|---|---|"]
    for d, e in sorted(report["exits"].items(), key=lambda kv: int(kv[0])):
        at = e.get("at_card_threshold") or {}
        kinds = ", ".join(f"{k} {pct(v)}" for k, v in e["by_kind"].items())
        lines.append(f"| L{d} | {e['head']} | {pct(e['agreement'])} | {kinds} | {pct(e['free_run']['exact_match'])} | "
                     f"{pct(e['free_run']['common_prefix'])} | {e['card_threshold'] or '-'} | "
                     f"{pct(at.get('coverage'))} | {pct(at.get('agreement'))} |")
    he = report.get("humaneval")
    if he:
        lines += ["", f"HumanEval pass@1 on the first {he['problems']} problems ({he['protocol']}):",
                  "| depth | head | pass@1 | passed | tokens | seconds |", "|---|---|---|---|---|---|"]
        for d, r in he["depths"].items():
            lines.append(f"| L{d} | {r['head']} | {pct(r['pass_at_1'])} | {r['passed']}/{r['problems']} | "
                         f"{r['generated_tokens']} | {r['seconds']} |")
    return "\n".join(lines)
