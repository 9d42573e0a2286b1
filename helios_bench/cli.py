"""``helios-ray bench``: the benchmarks that print side-by-side ratios (engine, memory, mixed, serve).

The parsers and the glue from options to the bench modules; every measurement lives in its module
(``engine_bench``, ``mixed_bench``, ``fleet_*`` for ``serve``), on the shared :mod:`helios_bench.harness`.
Plugged into ``helios-ray`` through the ``helios_ray.commands`` entry point (pyproject.toml), because the
benchmarks drive the server with the load generator and sit above both; nothing heavy is imported until a bench
runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from helios_ray.console import emit as _emit
from helios_ray.dtypes import DTYPE_CHOICES
from helios_ray.errors import HeliosError


HELP = "benchmarks that print side-by-side ratios (engine, memory, mixed, serve), and fuzz / soak runs"


class _Parser(argparse.ArgumentParser):
    """The bench commands' parser: a usage error is one line (``prog: error: message``) and exit 2, like the
    benches' own errors.  An option the bench does not know is reported here too: left to the ``helios-ray``
    parser it would print that parser's usage first.  ``hints``: option -> text added to the error that names it
    (where a removed option went)."""

    def __init__(self, *args: Any, hints: dict[str, str] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.hints = hints or {}

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns, extra

    def error(self, message: str) -> NoReturn:
        hint = "".join(h for opt, h in self.hints.items() if opt in message)
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH", parser_class=_Parser)
    e = sub.add_parser("engine", help="our engine vs transformers generate() on ShareGPT, side by side")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--batches", default="1,8,16", help="comma-separated batch sizes")
    e.add_argument("--requests", type=int, default=32, help="requests per batched run (batch 1 uses a quarter)")
    e.add_argument("--quick", action="store_true",
                   help="batches 1,8; 8 requests (2 at batch 1); 64 output tokens (~2 min on 2 cores)")
    e.add_argument("--max-prompt-tokens", type=int, default=256)
    e.add_argument("--max-output-tokens", type=int, default=128)
    e.add_argument("--repeats", type=int, default=2, choices=[1, 2], help="2 = A-B-B-A order, times averaged")
    e.add_argument("--budget-mb", type=int, default=2048)
    e.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    e.add_argument("--dtype", default="float32", choices=list(DTYPE_CHOICES),
                   help="the engine's dtype (transformers stays float32, the reference); auto: see generate")
    e.add_argument("--decode-attention", default="auto", choices=["auto", "paged", "gather"],
                   help="the engine's decode attention (engine.decode_attention)")
    e.add_argument("--prefill-prompts", type=int, default=None,
                   help="long prompts (384-512 tokens) for the prefill tokens/s comparison (default 8, --quick 2; "
                        "0 = skip)")
    e.add_argument("--compare-gather", action="store_true",
                   help="also run the engine with decode_attention=gather per batch and print the ratio")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true")
    s = sub.add_parser("serve", help="the helios fleet vs the best single model (full depth, token exits) vs "
                                     "plain transformers on a mixed chat/code workload, on a local Ray cluster "
                                     "(speed, memory and task quality); --model M: the same run for one model",
                       hints={"--edition": "; --edition is gone: bench serve has one code path, and --model M is "
                                           "the one-model run",
                              "--budget-mb": "; budgets per replica are --budgets tight,roomy with "
                                             "--tight-headroom-mb and --roomy-budget-mb"})
    s.add_argument("--model", default=None,
                   help="the one-model preset: candidates = [M] and a chat-only ShareGPT workload, i.e. helios vs M "
                        "at full depth with token exits (the early-exit baseline) vs plain generate() of M; "
                        "not with --candidates")
    s.add_argument("--candidates", default=None,
                   help="the fleet's candidates, one group each (default smollm2-135m,qwen2.5-coder-0.5b; "
                        "--quick: smollm2-135m,gemma3-270m)")
    s.add_argument("--systems", default=None, help="of single,plain,helios (default all)")
    s.add_argument("--quick", action="store_true",
                   help="8 short requests, one sweep rate, tight budget only (~6.5 min on 2 cores with the "
                        "default candidates)")
    s.add_argument("--requests", type=int, default=None, help="requests in the closed-loop run (default 24)")
    s.add_argument("--concurrency", type=int, default=16, help="closed-loop clients for the headline run")
    s.add_argument("--max-prompt-tokens", type=int, default=512)
    s.add_argument("--max-output-tokens", type=int, default=None,
                   help="chat reply cap and code max_tokens (default 64)")
    s.add_argument("--rates", default=None, help="sweep request rates (req/s); 'none' = no sweep (default 0.5,1)")
    s.add_argument("--sweep-requests", type=int, default=None, help="requests per sweep rate (default 8)")
    s.add_argument("--budgets", default="tight,roomy", help="budgets with measured runs (of tight,roomy)")
    s.add_argument("--tight-headroom-mb", type=int, default=64,
                   help="tight budget = the largest candidate's weights + this")
    s.add_argument("--roomy-budget-mb", type=int, default=None,
                   help="roomy budget (default: the largest candidate's weights + 1 GiB)")
    s.add_argument("--best-by", default="throughput", choices=["throughput", "tpot"],
                   help="the SLO that picks the best single model")
    s.add_argument("--threshold", type=float, default=0.9, help="exit confidence threshold (all systems)")
    s.add_argument("--min-agreement", type=float, default=0.9,
                   help="accuracy guard (helios depth, the single models' token exits)")
    s.add_argument("--exit-share", type=float, default=0.5, help="helios: share of tokens that must exit by D")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="folder for the combined PNG (bench_serve.png)")
    s.add_argument("--json", action="store_true")
    x = sub.add_parser("mixed", help="chunked prefill vs prefill-first: prefill layouts and inter-token latency "
                                     "under Poisson arrivals, side by side")
    x.add_argument("--model", default="smollm2-135m")
    x.add_argument("--quick", action="store_true", help="2 and 4 prompts; 8 arrivals x 24 tokens (~1.5 min on 2 cores)")
    x.add_argument("--chunk-tokens", type=int, default=128, help="max_num_batched_tokens of the chunked side")
    x.add_argument("--budget-mb", type=int, default=2048)
    x.add_argument("--threads", type=int, default=1)
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--json", action="store_true")
    f = sub.add_parser("fuzz", help="generated HTTP requests (from the server's OpenAPI schema) and gRPC messages: "
                                    "every answer a 2xx or a clear 4xx, nothing hangs, no replica dies")
    f.add_argument("config", nargs="?", default="deployments/helios.yaml",
                   help="the Serve config file to fuzz on a private loopback cluster (default deployments/helios.yaml)")
    f.add_argument("--http", type=int, default=5000, help="generated HTTP requests (default 5000)")
    f.add_argument("--grpc", type=int, default=1000, help="generated gRPC messages (default 1000)")
    f.add_argument("--workers", type=int, default=8, help="requests in flight at once (default 8)")
    f.add_argument("--timeout", type=float, default=120.0, help="seconds before an answer counts as a hang")
    f.add_argument("--max-model-len", type=int, default=256,
                   help="the served context (default 256): larger token counts are refused by the server")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--json", action="store_true")
    k = sub.add_parser("soak", help="a deployment file at saturation for N minutes with replica kills and placement "
                                    "changes on a schedule: requests lost, latency and every process's RSS over time")
    k.add_argument("config", nargs="?", default="deployments/helios-fleet.yaml",
                   help="the Serve config file (default deployments/helios-fleet.yaml)")
    k.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    k.add_argument("--clients", type=int, default=24, help="closed-loop streaming clients (default 24)")
    k.add_argument("--kill-every", type=float, default=300.0, help="seconds between replica SIGKILLs (0 = none)")
    k.add_argument("--place-every", type=float, default=120.0, help="seconds between placement changes (0 = none)")
    k.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    k.add_argument("--warmup", type=float, default=120.0,
                   help="seconds of each process's life before its RSS counts (default 120)")
    k.add_argument("--out", default="docs/data/soak", help="where the JSON and the picture go")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--json", action="store_true")
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
    """Options -> :class:`~helios_bench.fleet_serve.FleetBenchConfig` (``--model``: the one-model preset), then the
    run with Ray's output kept off the JSON on stdout."""
    import contextlib

    from pydantic import ValidationError

    from helios_bench import fleet_report, fleet_run, fleet_serve

    kw: dict[str, Any] = {}
    if a.model is not None:
        if a.candidates:
            raise HeliosError("--model M is the one-model run (candidates = [M], chats only): give --model or "
                              "--candidates, not both")
        kw.update(fleet_serve.one_model(a.model))
    elif a.candidates:
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


def _invalid_options(e: Any) -> HeliosError:
    """A pydantic ValidationError of the bench config as one CLI line."""
    return HeliosError("invalid bench serve options: " + "; ".join(
        f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()))


def run(a: argparse.Namespace) -> int:
    """Run one bench; the load generator's bad-input errors are this command's bad input (one line, exit 2)."""
    from loadgen import LoadgenError

    try:
        return _run(a)
    except LoadgenError as e:
        raise HeliosError(str(e)) from None


def _run(a: argparse.Namespace) -> int:
    from helios_bench import engine_bench

    if a.bench == "serve":
        return _run_bench_serve(a)
    if a.bench == "soak":
        import contextlib
        import json
        from pathlib import Path

        from helios_bench import soak

        if a.minutes <= 0 or a.clients < 1:
            raise HeliosError("--minutes must be positive and --clients at least 1")
        with contextlib.redirect_stdout(sys.stderr):
            res = soak.run_soak(a.config, a.minutes, a.clients, a.kill_every, a.place_every, a.max_tokens,
                                a.warmup, seed=a.seed, log=lambda m: print(m, file=sys.stderr))
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        res["plot"] = str(soak.plot(res, out / "soak.png"))
        (out / "soak.json").write_text(json.dumps(res, indent=1))
        _emit(res, a.json, soak.format_report)
        return 0 if res["failed"] == 0 else 1
    if a.bench == "fuzz":
        import contextlib

        from helios_bench import fuzz

        with contextlib.redirect_stdout(sys.stderr):
            res = fuzz.fuzz_file(a.config, a.http, a.grpc, a.seed, a.workers, a.timeout, a.max_model_len,
                                 log=lambda m: print(m, file=sys.stderr))
        _emit(res, a.json, fuzz.format_report)
        return 0 if res["passed"] else 1
    if a.bench == "mixed":
        from helios_bench import mixed_bench

        res = mixed_bench.bench_mixed(a.model, a.quick, a.seed, a.threads, a.budget_mb, a.chunk_tokens)
        _emit(res, a.json, mixed_bench.format_table)
        return 0
    if a.bench == "engine":
        if a.quick:
            a.batches, a.requests, a.max_output_tokens = "1,8", 8, 64
        if a.prefill_prompts is None:
            a.prefill_prompts = 2 if a.quick else 8
        res = engine_bench.bench_engine(a.model, _ints(a.batches, "--batches"), a.requests, a.max_prompt_tokens,
                                        a.max_output_tokens, a.budget_mb, a.seed, a.threads, progress=not a.json,
                                        repeats=a.repeats, dtype=a.dtype, decode_attention=a.decode_attention,
                                        compare_gather=a.compare_gather, prefill_prompts=a.prefill_prompts)
        _emit(res, a.json, lambda r: "\n".join(
            f"batch {x['batch']:>3}: engine {x['engine_tokens_per_s']:>7} tok/s | transformers "
            f"{x['transformers_tokens_per_s']:>7} tok/s | {x['ratio_engine_over_transformers']}x | "
            f"agreement {x['token_agreement_with_transformers']:.1%}"
            + (f" | generate() {x['transformers_same_dtype']['dtype']} "
               f"{x['transformers_same_dtype']['tokens_per_s']} tok/s, {x['transformers_same_dtype']['ratio_engine_over_it']}x"
               if "transformers_same_dtype" in x else "")
            + (f" | gather {x['gather']['engine_tokens_per_s']} tok/s, engine/gather "
               f"{x['gather']['ratio_engine_over_gather']}x" if "gather" in x else "") for x in r["runs"])
            + ("\nprefill: engine {engine_prompt_tokens_per_s} prompt tok/s | transformers "
               "{transformers_prompt_tokens_per_s} | {ratio_engine_over_transformers}x | first-token agreement "
               "{first_token_agreement:.1%}".format(**r["prefill"]) if "prefill" in r else ""))
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
