"""helios-ray: serve early-exit LLMs the HELIOS way (adaptive model and depth selection) on Ray Serve.

Each subcommand is a ``(configure, run)`` pair; heavy imports (torch, transformers, ray) happen inside ``run``
so ``helios-ray --help`` and ``models`` stay fast.  User errors (:class:`HeliosError`, bad config) print one
line on stderr and exit 2; only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from helios_ray.console import emit as _emit
from helios_ray.dtypes import DTYPE_CHOICES
from helios_ray.errors import HeliosError

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


# ----------------------------------------------------------------------------------------------- models
def _cfg_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--models-file", help="extra model registrations (YAML/JSON); default $HELIOS_MODELS_FILE")


def _run_models(a: argparse.Namespace) -> int:
    from helios_ray.models.repository import ModelRepository

    repo = ModelRepository(models_file=a.models_file)
    infos = [i.model_dump(mode="json") for i in repo.all_info()]

    def table(rows: list[dict[str, Any]]) -> str:
        lines = [f"{'name':<20} {'family':<12} {'layers':>6} {'layer MB':>9} {'KV B/tok/layer':>15} {'trained exits':<16} status"]
        for r in rows:
            ex = (r.get("exits") or {}).get("trained") or []
            status = "ready" if r["prepared"] else (r.get("problem") or "not prepared")
            lb = f"{r['layer_bytes'] / 2**20:.1f}" if r.get("layer_bytes") else "-"
            lines.append(f"{r['name']:<20} {r.get('family') or '-':<12} {r.get('num_layers') or '-':>6} {lb:>9} "
                         f"{r.get('kv_bytes_per_token_per_layer') or '-':>15} {','.join(map(str, ex)) or '-':<16} {status}")
        return "\n".join(lines)

    _emit(infos, a.json, table)
    return 0


# ---------------------------------------------------------------------------------------------- prepare
def _cfg_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="models to prepare (default: every built-in model)")
    p.add_argument("--force", action="store_true", help="convert again even if the cache exists")
    p.add_argument("--models-file")


def _run_prepare(a: argparse.Namespace) -> int:
    import time

    from helios_ray.models.repository import BUILTIN_MODELS, ModelRepository

    repo = ModelRepository(models_file=a.models_file)
    names = a.names or [m.name for m in BUILTIN_MODELS]
    for n in names:
        repo.spec(n)
    for n in names:
        t0 = time.time()
        print(f"preparing {n} ...", file=sys.stderr, flush=True)
        path = repo.prepare(n, force=a.force)
        print(f"{n}: ready at {path} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- inspect
def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name (see `helios-ray models`)")
    p.add_argument("--depth", type=int, default=None, help="layers to load (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="auto: bfloat16 on CUDA and on CPUs with bf16 units (AVX512-BF16/AMX), else float32; "
                        "int8 / int4: quantized weights, activations as auto")
    p.add_argument("--exits", default="auto", choices=["auto", "shared"],
                   help="auto: trained exit head at the depth when available; shared: final norm + LM head")
    p.add_argument("--models-file")


def _load(a: argparse.Namespace, **kw: Any):  # noqa: ANN202
    from helios_ray.models.early_exit import load_model
    from helios_ray.models.repository import ModelRepository

    repo = ModelRepository(models_file=a.models_file)
    return load_model(a.model, a.depth, repo=repo, device=a.device, dtype=a.dtype, exits=a.exits, **kw)


def _cfg_inspect(p: argparse.ArgumentParser) -> None:
    _add_load_args(p)
    p.add_argument("--json", action="store_true")


def _run_inspect(a: argparse.Namespace) -> int:
    from helios_ray.models.loading import rss_bytes

    rss0 = rss_bytes()
    m = _load(a)
    load_rss = rss_bytes()
    # Safetensors tensors are mmap-backed: pages become resident when first used.  One forward pass touches
    # every loaded weight, so the RSS reported is what a serving replica actually holds.
    ids = m.encode(prompt="Hello")
    m.generate(ids, max_tokens=1)
    out = {
        "model": m.name,
        "family": m.spec.family,
        "total_layers": m.total_layers,
        "loaded_layers": m.depth,
        "exit_head": m.exit_head.kind,
        "param_bytes": m.param_bytes,
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "load_seconds": round(m.load_seconds, 3),
        "rss_bytes": rss_bytes(),
        "rss_after_load_bytes": load_rss,
        "rss_delta_bytes": rss_bytes() - rss0,
        "device": str(m.device),
        "dtype": ((m.lm.quant + "/") if m.lm.quant else "") + str(m.lm.dtype).replace("torch.", ""),
    }
    _emit(out, a.json, lambda o: "\n".join(f"{k:>20}: {v}" for k, v in o.items()))
    return 0


# --------------------------------------------------------------------------------------------- generate
def _cfg_generate(p: argparse.ArgumentParser) -> None:
    _add_load_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence below this counts as a breach")
    p.add_argument("--confidence", default="max_prob", choices=["max_prob", "margin", "entropy"])
    p.add_argument("--json", action="store_true")


def _run_generate(a: argparse.Namespace) -> int:
    if a.max_tokens < 1:
        raise HeliosError(f"--max-tokens must be >= 1 (got {a.max_tokens})")
    if not 0 < a.threshold <= 1:
        raise HeliosError(f"--threshold must be in (0, 1] (got {a.threshold})")
    m = _load(a, confidence_kind=a.confidence, threshold=a.threshold)
    from helios_ray.engine.detok import TextStream
    from helios_ray.engine.sequence import SamplingParams, finish_text

    enc = m.encode_request(messages=[{"role": "user", "content": a.prompt}]) if a.chat else m.encode_request(a.prompt)
    ids, stops = enc.ids, SamplingParams(max_tokens=a.max_tokens, stop=list(enc.stop))  # a base model: one turn
    if not a.json:
        stream = TextStream(m.tokenizer, stops)
        for i, t in enumerate(m.generate_stream(ids, a.max_tokens)):
            eos = t.token in m.eos_ids
            delta, reason = stream.add(None if eos else t.token, eos, i + 1 >= a.max_tokens)
            print(delta, end="", flush=True)
            if reason:
                break
        print()
        return 0
    g = m.generate(ids, a.max_tokens)
    text, reason, _, _ = finish_text(g.text, stops, False, False, 0)
    out = {
        "model": m.name, "depth": m.depth, "total_layers": m.total_layers, "exit_head": m.exit_head.kind,
        "text": text, "finish_reason": reason or g.finish_reason, "prompt_tokens": g.prompt_tokens,
        "completion_tokens": len(g.tokens), "seconds": round(g.seconds, 3),
        "tokens_per_s": round(len(g.tokens) / g.seconds, 2) if g.seconds else None,
        "breaches": sum(t.breach for t in g.tokens),
        "tokens": [{"token": t.token, "text": t.text, "exit_layer": t.exit_layer,
                    "confidence": round(t.confidence, 4), "breach": t.breach} for t in g.tokens],
    }
    _emit(out, True)
    return 0


COMMANDS: list[Command] = [
    ("models", "list registered models and their static metadata", _cfg_models, _run_models),
    ("prepare", "convert model sources into the safetensors cache (one-time)", _cfg_prepare, _run_prepare),
    ("inspect", "load a model to a depth and report its size", _cfg_inspect, _run_inspect),
    ("generate", "generate with greedy exit at a depth, per-token exit and confidence", _cfg_generate, _run_generate),
]


#: Subcommands that live next to their feature: (name, help, module exposing configure_parser() and run()).
#: The module is imported only when the parser is built, and must not import torch/ray at module level.
PLUGGED: list[tuple[str, str | None, str]] = [
    ("serve", "deploy a Serve config (default deployments/helios.yaml) like `serve run`, until Ctrl-C",
     "helios_ray.serve.launch"),
    ("profile", "profile candidates on real prompts (all exits) and show the PHT and the policy's choice",
     "helios_ray.tuning.profile_cli"),
    ("tune-exits", "train exit heads on a frozen backbone (self-distillation)", "helios_ray.tuning.cli"),
    ("eval-exits", "measure exit agreement/calibration on a prompt file", "helios_ray.tuning.cli:eval"),
    ("quality", None, "helios_ray.tuning.quality_cli"),
    ("simulate", "replay a recorded per-token trace through the HELIOS policy (or steering over groups: --fleet)",
     "helios_ray.control.simulate_cli"),
    ("status", "the fleet, breach counter and last decisions of a running server", "helios_ray.serve.status_cli"),
    ("fleet", "show or move the replica groups of a running server (show | set MODEL [--depth D] | unpin)",
     "helios_ray.serve.fleet_cli"),
]


#: Entry-point group of commands that packages above helios-ray add to it (``helios-ray bench`` comes from
#: :mod:`helios_bench`, which drives the server with the load generator, so the server's own packages never import
#: either).  Each entry names a module with ``HELP``, ``configure_parser()`` and ``run()``.
PLUGIN_GROUP = "helios_ray.commands"


def _command(name: str, help_text: str | None, target: str) -> Command:
    import importlib

    mod_name, _, prefix = target.partition(":")
    mod = importlib.import_module(mod_name)  # a broken module must fail loudly, not drop its command
    configure = getattr(mod, f"{prefix}_configure_parser" if prefix else "configure_parser")
    run = getattr(mod, f"{prefix}_run" if prefix else "run")
    return name, help_text or getattr(mod, "HELP", ""), configure, run


def _plugged() -> list[Command]:
    from importlib.metadata import entry_points

    out = [_command(name, help_text, target) for name, help_text, target in PLUGGED]
    taken = {c[0] for c in COMMANDS + out}
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if ep.name not in taken:  # a plug-in never shadows a built-in command
            out.append(_command(ep.name, None, ep.value))
            taken.add(ep.name)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helios-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, configure, run in COMMANDS + _plugged():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(_run=run)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """HeliosError, and the dataset readers' DatasetError (a missing package or file, a malformed record)."""
    from helios_data import DatasetError

    return HeliosError, DatasetError


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local files; never hit a hub by accident
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except _user_errors() as e:
        print(f"helios-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
