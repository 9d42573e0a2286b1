"""Task quality next to speed, per system and per request class, for ``helios-ray bench serve``.

* **chat** (and code, as a second view): *agreement* - the share of generated tokens equal to the greedy choice
  of the **serving model's** full-depth self given the same prefix (teacher-forced on the system's own output) -
  and *perplexity* ``exp(-mean log p_full(token | prefix))`` under that same model.  In a fleet the response's
  ``model`` field says which model served each request, so each answer is judged against its own model: a fleet
  that routes to a weaker model is judged on task quality by pass@1, not here.
* **code**: HumanEval **pass@1** - the completion (decoded from the generated ids, cut at HumanEval's stop
  sequences) runs with the problem's tests in a sandboxed child with a timeout
  (:func:`helios_ray.tuning.code_eval.check_program`); identical completions are run once.
* **exit depths**: per serving model, the share of tokens that left at each depth.

The scorers (:class:`helios_bench.harness.Scorer`) load each model at full depth in float32 after the cluster is
gone (one process, all CPU threads).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from helios_bench.harness import Scorer, perplexity


class Scorers:
    """One full-depth :class:`Scorer` per serving model, loaded on first use; pass@1 results cached by text."""

    def __init__(self, timeout: float = 10.0):
        self.by_model: dict[str, Scorer] = {}
        self.timeout = timeout
        self._passed: dict[tuple[str, str], bool] = {}
        self._scored: dict[tuple[str, int, tuple[int, ...]], tuple[int, int, float]] = {}
        self.sandbox_s = 0.0  # time in the HumanEval sandbox (the rest of scoring: loading and teacher forcing)
        self.timeouts = 0

    def get(self, model: str) -> Scorer:
        if model not in self.by_model:
            self.by_model[model] = Scorer(model)
        return self.by_model[model]

    def score(self, model: str, index: int, req: Any, token_ids: list[int]) -> tuple[int, int, float]:
        """Teacher-forced (tokens, agreeing, sum log p) of one answer; the same answer of the same model to the
        same request (e.g. two systems at full depth, greedy) is scored once."""
        key = (model, index, tuple(token_ids))
        if key not in self._scored:
            sc = self.get(model)
            self._scored[key] = sc.score(sc.prompt_ids(req), list(token_ids))
        return self._scored[key]

    def passes(self, req: Any, completion: str) -> bool:
        from helios_ray.tuning.code_eval import check_program, humaneval_program

        key = (str(req.meta.get("task_id")), completion)
        if key not in self._passed:
            prog = humaneval_program(req.prompt, completion, req.meta["test"], req.meta["entry_point"])
            res = check_program(prog, timeout=self.timeout)
            self._passed[key] = res.passed
            self.sandbox_s += res.seconds
            self.timeouts += res.status == "timeout"
        return self._passed[key]


def completion_text(scorer: Scorer, token_ids: list[int]) -> str:
    from helios_ray.tuning.code_eval import truncate_at_stop

    return truncate_at_stop(scorer.m.tokenizer.decode(token_ids, skip_special_tokens=True))


def score_records(scorers: Scorers, workload: list[Any], records: list[Any], default_model: str
                  ) -> dict[str, Any]:
    """Per class (``chat``/``code``): agreement and perplexity under the serving model, pass@1 for code; per
    serving model: requests served and the share of tokens per exit depth."""
    acc: dict[str, dict[str, float]] = defaultdict(lambda: {"n": 0, "agree": 0, "lp": 0.0, "unscored": 0,
                                                            "code": 0, "passed": 0})
    depths: dict[str, Counter] = defaultdict(Counter)
    served: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if not r.success:
            continue
        req = workload[r.index % len(workload)]
        model = r.model if r.model and r.model != "helios" else default_model
        served[model][req.kind] += 1
        depths[model].update(str(d) for d in r.exit_layers)
        a = acc[req.kind]
        if len(r.token_ids) != r.output_tokens:
            a["unscored"] += 1
            continue
        sc = scorers.get(model)
        n, agree, lp = scorers.score(model, r.index % len(workload), req, r.token_ids)
        a["n"], a["agree"], a["lp"] = a["n"] + n, a["agree"] + agree, a["lp"] + lp
        if req.kind == "code" and req.meta.get("test"):
            a["code"] += 1
            a["passed"] += int(scorers.passes(req, completion_text(sc, r.token_ids)))
    per_class = {}
    for kind, a in sorted(acc.items()):
        per_class[kind] = {
            "tokens_scored": int(a["n"]), "requests_unscored": int(a["unscored"]),
            "agreement": round(a["agree"] / a["n"], 4) if a["n"] else None,
            "perplexity": perplexity(a["lp"], int(a["n"])),
        }
        if kind == "code":
            per_class[kind].update({"pass_at_1": round(a["passed"] / a["code"], 4) if a["code"] else None,
                                    "problems": int(a["code"]), "passed": int(a["passed"])})
    exit_share = {m: {d: round(c / sum(cnt.values()), 4) for d, c in sorted(cnt.items(), key=lambda kv: int(kv[0]))}
                  for m, cnt in depths.items() if cnt}
    return {"per_class": per_class, "served_by_model": {m: dict(c) for m, c in served.items()},
            "exit_share_by_model": exit_share}


def overall(q: dict[str, Any]) -> dict[str, Any]:
    """Token-weighted agreement and perplexity over all classes (the system's headline quality figures)."""
    n = sum(c["tokens_scored"] for c in q["per_class"].values())
    if not n:
        return {"agreement": None, "perplexity": None, "tokens_scored": 0}
    agree = sum((c["agreement"] or 0) * c["tokens_scored"] for c in q["per_class"].values())
    lp = sum(-math.log(c["perplexity"]) * c["tokens_scored"] for c in q["per_class"].values() if c["perplexity"])
    return {"agreement": round(agree / n, 4), "perplexity": perplexity(lp, n), "tokens_scored": n}
