"""``helios-ray quality``: measure a model's quality record per placement and request class (argument parsing only;
the measurement is :mod:`.quality`, imported when the command runs)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

HELP = "measure a model's quality per depth and request class (HumanEval pass@1, chat answers vs a reference's)"


def _depths(text: str | None) -> list[int] | None:
    from helios_ray.errors import HeliosError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeliosError(f"--depths must be comma-separated integers (got {text!r})") from None


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name (see `helios-ray models`)")
    p.add_argument("--depths", help="comma-separated depths (default: full depth and every trained exit)")
    p.add_argument("--code", type=int, default=164, help="HumanEval problems for code pass@1 (default all 164; 0: skip)")
    p.add_argument("--code-max-tokens", type=int, default=384, help="room for a body to finish (default 384)")
    p.add_argument("--chat", type=int, default=40, help="held-out ShareGPT prompts for the chat score (0: skip)")
    p.add_argument("--chat-max-tokens", type=int, default=64)
    p.add_argument("--reference", help="the model whose answers chat answers are compared with (default: the largest "
                                        "prepared chat-capable model)")
    p.add_argument("--dtype", default="auto", help="serving dtype of the measured placements (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--update-card", action="store_true",
                   help="merge the result into quality.json beside the model's exit card (what the policy reads)")
    p.add_argument("--out", help="write quality.json into this folder instead (e.g. a copy to ship)")
    p.add_argument("--answers", help="also write every chat answer to this JSON file (to read what was scored)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--models-file")


def _table(r: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    proto = r["protocol"]
    lines = [f"{r['model']} ({r['total_layers']} layers, chat-capable: {r['chat_capable']}); code: HumanEval pass@1 on "
             f"{proto['code']['problems']} problems; chat: score under {proto['chat']['reference']} on "
             f"{proto['chat']['prompts']} held-out prompts",
             "| depth | exit head | code pass@1 | chat score | chat perplexity |", "|---|---|---|---|---|"]
    for d, p in r["placements"].items():
        code, chat = p.get("code") or {}, p.get("chat") or {}
        lines.append(f"| {d} | {p['exit_head']} | {pct(code.get('pass_at_1'))} "
                     f"({code.get('passed', '-')}/{code.get('problems', '-')}) | {pct(chat.get('score'))} | "
                     f"{chat.get('perplexity', '-')} |")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from helios_ray.models.repository import ModelRepository
    from helios_ray.tuning.quality import measure_quality, write_quality

    if a.threads:
        torch.set_num_threads(a.threads)
    repo = ModelRepository(models_file=a.models_file)
    report = measure_quality(a.model, _depths(a.depths), code_problems=a.code, code_max_tokens=a.code_max_tokens,
                             chat_prompts=a.chat, chat_max_tokens=a.chat_max_tokens, reference=a.reference,
                             dtype=a.dtype, repo=repo, progress=not a.no_progress,
                             answers_out=Path(a.answers) if a.answers else None)
    command = "helios-ray quality " + " ".join(shlex.quote(x) for x in sys.argv[2:])
    if a.update_card or a.out:
        folder = Path(a.out) if a.out else repo.quality_dir(a.model)
        path = write_quality(folder, report, command)
        print(f"quality record written to {path}", file=sys.stderr)
    print(json.dumps(report, indent=2) if a.json else _table(report))
    return 0
