"""helios-ray: serve early-exit LLMs the HELIOS way (adaptive model and depth selection) on Ray Serve.

Each subcommand is a ``(configure, run)`` pair; heavy imports (torch, transformers, ray) happen inside ``run``
so ``helios-ray --help`` and ``models`` stay fast.  User errors (:class:`HeliosError`, bad config) print one
line on stderr and exit 2; only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from helios_ray.dtypes import DTYPE_CHOICES
from helios_ray.errors import HeliosError

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _emit(obj: Any, as_json: bool, human: Callable[[Any], str] | None = None) -> None:
    if as_json or human is None:
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(human(obj))


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


# ------------------------------------------------------------------------------------------------ bench
def _cfg_bench(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    e = sub.add_parser("engine", help="our engine vs transformers generate() on ShareGPT, side by side")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--batches", default="1,8,16", help="comma-separated batch sizes")
    e.add_argument("--requests", type=int, default=32, help="requests per batched run (batch 1 uses a quarter)")
    e.add_argument("--quick", action="store_true",
                   help="batches 1,8; 8 requests (2 at batch 1); 64 output tokens (~2 min on an idle 2-core host)")
    e.add_argument("--max-prompt-tokens", type=int, default=256)
    e.add_argument("--max-output-tokens", type=int, default=128)
    e.add_argument("--repeats", type=int, default=2, choices=[1, 2], help="2 = A-B-B-A order, times averaged")
    e.add_argument("--budget-mb", type=int, default=2048)
    e.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    e.add_argument("--dtype", default="float32", choices=list(DTYPE_CHOICES),
                   help="the engine's dtype (transformers stays float32, the reference); auto: see generate")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true")
    s = sub.add_parser("serve", help="the helios fleet vs the best single model (full depth, token exits) vs "
                                     "plain transformers on a mixed chat/code workload, on a local Ray cluster "
                                     "(speed, memory and task quality); --edition 1: the one-model ShareGPT run")
    s.add_argument("--edition", type=int, default=2, choices=[1, 2],
                   help="2 (default): fleet, mixed workload, budgets; 1: helios vs baseline vs plain, one model")
    s.add_argument("--model", default=None, help="edition 1: the model (default smollm2-135m); edition 2 takes "
                                               "--candidates")
    s.add_argument("--candidates", default=None,
                   help="edition 2: the fleet's candidates, one group each (default smollm2-135m,qwen2.5-coder-0.5b;"
                        " --quick: smollm2-135m,gemma3-270m); edition 1: helios candidates (default: --model)")
    s.add_argument("--systems", default=None,
                   help="edition 2: of single,plain,helios (default all); edition 1: of helios,baseline,plain")
    s.add_argument("--quick", action="store_true",
                   help="edition 2: 8 short requests, one sweep rate, tight budget only (< 4 min); "
                        "edition 1: 8 short requests, no sweep (< 3 min)")
    s.add_argument("--requests", type=int, default=None, help="requests in the closed-loop run (2: 24, 1: 32)")
    s.add_argument("--concurrency", type=int, default=16, help="closed-loop clients for the headline run")
    s.add_argument("--max-prompt-tokens", type=int, default=512)
    s.add_argument("--max-output-tokens", type=int, default=None,
                   help="cap per request (2: chat reply cap and code max_tokens, default 64; 1: default 128)")
    s.add_argument("--rates", default=None, help="sweep request rates (req/s); 'none' = no sweep "
                                                 "(2: 0.5,1; 1: 0.5,1,2)")
    s.add_argument("--sweep-requests", type=int, default=None, help="requests per sweep rate (2: 8; 1: 12)")
    s.add_argument("--budgets", default="tight,roomy", help="edition 2: budgets with measured runs")
    s.add_argument("--tight-headroom-mb", type=int, default=64,
                   help="edition 2: tight budget = the largest candidate's weights + this")
    s.add_argument("--roomy-budget-mb", type=int, default=None,
                   help="edition 2: roomy budget (default: the largest candidate's weights + 1 GiB)")
    s.add_argument("--best-by", default="throughput", choices=["throughput", "tpot"],
                   help="edition 2: the SLO that picks the best single model")
    s.add_argument("--threshold", type=float, default=0.9, help="exit confidence threshold (all systems)")
    s.add_argument("--min-agreement", type=float, default=0.9, help="accuracy guard (helios depth, baseline exits)")
    s.add_argument("--exit-share", type=float, default=0.5, help="helios: share of tokens that must exit by D")
    s.add_argument("--budget-mb", type=int, default=1024, help="edition 1: memory budget per replica (weights + KV)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None,
                   help="folder for the combined PNG (edition 2) or each system's loadgen JSON and plots (1)")
    s.add_argument("--json", action="store_true")
    x = sub.add_parser("mixed", help="chunked prefill vs prefill-first: prefill layouts and inter-token latency "
                                     "under Poisson arrivals, side by side")
    x.add_argument("--model", default="smollm2-135m")
    x.add_argument("--quick", action="store_true", help="2 and 4 prompts; 8 arrivals x 24 tokens (~2 min)")
    x.add_argument("--chunk-tokens", type=int, default=128, help="max_num_batched_tokens of the chunked side")
    x.add_argument("--budget-mb", type=int, default=2048)
    x.add_argument("--threads", type=int, default=1)
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--json", action="store_true")
    m = sub.add_parser("memory", help="max concurrent sequences the scheduler admits at each depth")
    m.add_argument("--model", default="smollm2-135m")
    m.add_argument("--budget-mb", type=int, default=1024)
    m.add_argument("--depths", default=None, help="comma-separated depths (default: full and 2/3 of it)")
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--block-size", type=int, default=16)
    m.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="serving dtype (weights and KV); int8 / int4: quantized weights, KV at what auto picks")
    m.add_argument("--json", action="store_true")


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeliosError(f"{what} must be comma-separated integers (got {text!r})") from None
    if not vals or any(v < 1 for v in vals):
        raise HeliosError(f"{what} must be positive integers (got {text!r})")
    return vals


def _rates(text: str) -> list[float]:
    if text.strip().lower() in ("none", ""):
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeliosError(f"--rates must be comma-separated numbers or 'none' (got {text!r})") from None


def _run_bench_serve(a: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from helios_ray.bench import serve_bench

    if a.edition == 2:
        return _run_bench_serve2(a)
    rates = _rates(a.rates or "0.5,1,2")
    try:
        cfg = serve_bench.ServeBenchConfig(
            model=a.model or "smollm2-135m", candidates=[c for c in a.candidates.split(",") if c] if a.candidates else None,
            systems=[s for s in (a.systems or "helios,baseline,plain").split(",") if s], threshold=a.threshold,
            min_agreement=a.min_agreement, exit_share=a.exit_share, memory_budget_mb=a.budget_mb,
            concurrency=a.concurrency, requests=a.requests or 32, max_prompt_tokens=a.max_prompt_tokens,
            max_output_tokens=a.max_output_tokens or 128, rates=rates, sweep_requests=a.sweep_requests or 12,
            seed=a.seed, out_dir=a.out)
    except ValidationError as e:
        raise _invalid_options(e) from None
    if a.quick:
        cfg = serve_bench.quick(cfg)
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # Ray's own messages must not mix into the JSON on stdout
        res = serve_bench.bench_serve(cfg, progress=not a.json)
    _emit(res, a.json, serve_bench.format_table)
    return 0


def _invalid_options(e: Any) -> HeliosError:
    """A pydantic ValidationError of a bench config as one CLI line."""
    return HeliosError("invalid bench serve options: " + "; ".join(
        f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()))


def _run_bench_serve2(a: argparse.Namespace) -> int:
    import contextlib

    from pydantic import ValidationError

    from helios_ray.bench import fleet_report, fleet_run, fleet_serve

    kw: dict[str, Any] = {}
    if a.model is not None:
        raise HeliosError("--model is the first edition's option (one model); the second edition compares "
                          "candidates: --candidates A,B (or --edition 1 --model M)")
    if a.candidates:
        kw["candidates"] = [c for c in a.candidates.split(",") if c]
    if a.systems:
        kw["systems"] = [s for s in a.systems.split(",") if s]
    if a.requests:
        kw["requests"] = a.requests
    if a.max_output_tokens:
        kw["chat_output_cap"] = kw["code_max_tokens"] = a.max_output_tokens
    if a.rates is not None:
        kw["rates"] = _rates(a.rates)
    if a.sweep_requests:
        kw["sweep_requests"] = a.sweep_requests
    try:
        cfg = fleet_serve.FleetBenchConfig(
            threshold=a.threshold, min_agreement=a.min_agreement, exit_share=a.exit_share, concurrency=a.concurrency,
            max_prompt_tokens=a.max_prompt_tokens, seed=a.seed,
            budgets=[b for b in a.budgets.split(",") if b], tight_headroom_mb=a.tight_headroom_mb,
            roomy_budget_mb=a.roomy_budget_mb, best_by=a.best_by, out_dir=a.out, **kw)
    except ValidationError as e:
        raise _invalid_options(e) from None
    if a.quick:
        cfg = fleet_serve.quick(cfg)
    with contextlib.redirect_stdout(sys.stderr):  # Ray's own messages must not mix into the JSON on stdout
        res = fleet_run.bench_fleet(cfg, progress=not a.json)
    _emit(res, a.json, fleet_report.format_table)
    return 0


def _run_bench(a: argparse.Namespace) -> int:
    from helios_ray.bench import engine_bench

    if a.bench == "serve":
        return _run_bench_serve(a)
    if a.bench == "mixed":
        from helios_ray.bench import mixed_bench

        res = mixed_bench.bench_mixed(a.model, a.quick, a.seed, a.threads, a.budget_mb, a.chunk_tokens)
        _emit(res, a.json, mixed_bench.format_table)
        return 0
    if a.bench == "engine":
        if a.quick:
            a.batches, a.requests, a.max_output_tokens = "1,8", 8, 64
        res = engine_bench.bench_engine(a.model, _ints(a.batches, "--batches"), a.requests, a.max_prompt_tokens,
                                        a.max_output_tokens, a.budget_mb, a.seed, a.threads, progress=not a.json,
                                        repeats=a.repeats, dtype=a.dtype)
        _emit(res, a.json, lambda r: "\n".join(
            f"batch {x['batch']:>3}: engine {x['engine_tokens_per_s']:>7} tok/s | transformers "
            f"{x['transformers_tokens_per_s']:>7} tok/s | {x['ratio_engine_over_transformers']}x | "
            f"agreement {x['token_agreement_with_transformers']:.1%}" for x in r["runs"]))
    else:
        from helios_ray.models.repository import ModelRepository

        info = ModelRepository().info(a.model)
        if not info.prepared:
            raise HeliosError(info.problem or f"model {a.model!r} is not prepared")
        depths = _ints(a.depths, "--depths") if a.depths else [info.num_layers, max(1, info.num_layers * 2 // 3)]
        res = engine_bench.bench_memory(a.model, a.budget_mb, depths, a.seq_len, a.block_size, a.dtype)
        _emit(res, a.json, lambda r: "\n".join(
            [f"depth {d:>3}: {v['max_concurrent_sequences']} concurrent {r['seq_len']}-token sequences "
             f"({v['kv_blocks']} blocks, weights {v['weight_bytes'] / 2**20:.0f} MiB)" for d, v in r["depths"].items()]
            + [f"ratio: {r['ratio_max_concurrency']}x"]))
    return 0


COMMANDS: list[Command] = [
    ("models", "list registered models and their static metadata", _cfg_models, _run_models),
    ("prepare", "convert model sources into the safetensors cache (one-time)", _cfg_prepare, _run_prepare),
    ("inspect", "load a model to a depth and report its size", _cfg_inspect, _run_inspect),
    ("generate", "generate with greedy exit at a depth, per-token exit and confidence", _cfg_generate, _run_generate),
    ("bench", "benchmarks that print side-by-side ratios (engine, memory, serve)", _cfg_bench, _run_bench),
]


#: Subcommands that live next to their feature: (name, help, module exposing configure_parser() and run()).
#: The module is imported only when the parser is built, and must not import torch/ray at module level.
PLUGGED: list[tuple[str, str, str]] = [
    ("serve", "deploy a Serve config (default deployments/helios.yaml) like `serve run`, until Ctrl-C",
     "helios_ray.serve.launch"),
    ("profile", "profile candidates on real prompts (all exits) and show the PHT and the policy's choice",
     "helios_ray.models.profile_cli"),
    ("tune-exits", "train exit heads on a frozen backbone (self-distillation)", "helios_ray.models.tuning_cli"),
    ("eval-exits", "measure exit agreement/calibration on a prompt file", "helios_ray.models.tuning_cli:eval"),
    ("simulate", "replay a recorded per-token trace through the HELIOS policy (or steering over groups: --fleet)",
     "helios_ray.control.simulate"),
    ("status", "the fleet, breach counter and last decisions of a running server", "helios_ray.serve.status_cli"),
    ("fleet", "show or move the replica groups of a running server (show | set MODEL [--depth D] | unpin)",
     "helios_ray.serve.fleet_cli"),
]


def _plugged() -> list[Command]:
    import importlib

    out: list[Command] = []
    for name, help_text, target in PLUGGED:
        mod_name, _, prefix = target.partition(":")
        mod = importlib.import_module(mod_name)  # a broken module must fail loudly, not drop its command
        configure = getattr(mod, f"{prefix}_configure_parser" if prefix else "configure_parser")
        run = getattr(mod, f"{prefix}_run" if prefix else "run")
        out.append((name, help_text, configure, run))
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
    """HeliosError, and LoadgenError (the dataset readers' DatasetError, bench serve's load generator): imported
    only once an exception is on its way out, so ``helios-ray --help`` does not load loadgen."""
    from loadgen.net import LoadgenError

    return HeliosError, LoadgenError


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
