"""Recompute the chat score of the shipped quality records from the answers their measurement saved.

The first measurement (scripts/measure_quality.sh) scored chat answers by the reference's teacher-forced top-1
agreement; that ranks a base model's echoes above a small model's real answers (docs/quality.md), so the chat
score became the content-word overlap F1 with the reference's own answer.  Generation is greedy and deterministic, so the
answers saved with ``--answers`` (docs/data/quality-answers/) are exactly what ``helios-ray quality`` generates;
this script re-scores them with the same function (``helios_ray.tuning.quality.chat_score``), keeps the old value as
``agreement``, and rewrites the records' chat protocol.  Run from the repository root:
``python scripts/rescore_chat.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from helios_ray.tuning.quality import chat_score

ROOT = Path(__file__).resolve().parents[1]
ANSWERS = ROOT / "docs" / "data" / "quality-answers"
RECORDS = ROOT / "helios_ray" / "assets" / "exits"
HOW = ("greedy answers through the prompt encoder, by the placement and by the reference at full depth; score = mean "
       "content-word overlap F1 of the two answers; the reference's teacher-forced top-1 agreement and perplexity on the "
       "placement's answers beside it")


def main() -> None:
    saved = [json.loads(p.read_text()) for p in sorted(ANSWERS.glob("*.json"))]
    reference = "qwen2.5-coder-0.5b"
    full = next(s for s in saved if s["model"] == reference and "24" in s["answers"])
    reference_answers = full["answers"]["24"]  # the reference at its full depth, the answers it compares with
    for s in saved:
        s["reference"], s["reference_answers"] = reference, reference_answers
    by_model: dict[str, dict[str, dict[str, str]]] = {}
    for s in saved:
        by_model.setdefault(s["model"], {}).update(s["answers"])
    for model, answers in by_model.items():
        path = RECORDS / model / "quality.json"
        rec = json.loads(path.read_text())
        assert rec["protocol"]["chat"]["reference"] == reference
        for depth, p in rec["placements"].items():
            chat = p["chat"]
            if "agreement" not in chat:  # the first scoring's value is the teacher-forced agreement
                chat["agreement"] = chat["score"]
            chat["score"] = chat_score(answers[depth], reference_answers)
        rec["protocol"]["chat"]["how"] = HOW
        rec["rescored"] = "chat scores recomputed from docs/data/quality-answers by scripts/rescore_chat.py"
        path.write_text(json.dumps(rec, indent=2) + "\n")
        print(model, {d: p["chat"]["score"] for d, p in rec["placements"].items()})
    for p, s in zip(sorted(ANSWERS.glob("*.json")), saved):
        p.write_text(json.dumps(s, indent=1) + "\n")


if __name__ == "__main__":
    main()
