"""``python -m loadgen``: run a load test (or a rate sweep) against helios-ray and write the results.

Bad arguments print one line on stderr and exit 2; an unreachable server exits 1; a run where no request
succeeded exits 1; otherwise 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from typing import Any, Callable, Sequence

from loadgen.net import LoadgenError

PROG = "python -m loadgen"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the whole usage)
        raise LoadgenError(message)


def _rate(s: str) -> float:
    v = s.strip().lower()
    if v in ("inf", "infinity", "max"):
        return math.inf
    try:
        r = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rate {s!r}: a number > 0 or 'inf'") from None
    if not r > 0 or math.isinf(r) and v not in ("inf",):
        raise argparse.ArgumentTypeError(f"invalid rate {s!r}: a number > 0 or 'inf'")
    return r


def _rates(s: str) -> list[float]:
    parts = [p for p in s.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("--sweep needs a comma-separated list of rates, e.g. 0.5,1,2,inf")
    return [_rate(p) for p in parts]


def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _pos_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {s!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {s!r}") from None
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Load generator for helios-ray (OpenAI HTTP streaming or helios.v1 gRPC).")
    t = p.add_argument_group("target")
    t.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL (default %(default)s)")
    t.add_argument("--grpc", metavar="HOST:PORT", help="send requests over gRPC GenerateStream to this target")
    t.add_argument("--model", default="helios", help="model name in requests (default %(default)s)")
    t.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    t.add_argument("--application", default="helios", help="gRPC 'application' metadata (default %(default)s)")
    t.add_argument("--endpoint", choices=("auto", "chat", "completions"), default="auto",
                   help="HTTP endpoint: auto = chat for chat prompts, completions for plain prompts")
    t.add_argument("--allow-remote", action="store_true", help="allow non-loopback targets (off by default)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=("sharegpt", "random", "humaneval", "shift"), default="sharegpt")
    w.add_argument("--seed", type=int, default=0, help="workload sampling and arrival seed (default 0)")
    w.add_argument("--split", choices=("all", "train", "heldout"), default="all", help="ShareGPT split")
    w.add_argument("--min-prompt-tokens", type=_nonneg_int, default=4)
    w.add_argument("--max-prompt-tokens", type=_pos_int, default=1024)
    w.add_argument("--min-output-tokens", type=_nonneg_int, default=4, help="ShareGPT: drop shorter replies")
    w.add_argument("--max-output-tokens", type=_pos_int, help="ShareGPT: drop longer replies")
    w.add_argument("--output-cap", type=_pos_int, help="clip every request's max_tokens to this")
    w.add_argument("--random-input-len", type=_pos_int, default=128)
    w.add_argument("--random-output-len", type=_pos_int, default=64)
    w.add_argument("--random-range-ratio", type=float, default=0.5)
    w.add_argument("--shift", default="sharegpt,humaneval", metavar="A,B",
                   help="the two phases of the shift workload (default %(default)s)")
    w.add_argument("--tokenizer", metavar="DIR",
                   help="count tokens with the tokenizer in this directory (an HF tokenizer or a prepared model "
                        "directory; `helios-ray prepare NAME` prints it) instead of chars/4")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    w.add_argument("--ignore-eos", action="store_true", help="HTTP: ask the server to ignore EOS (exact lengths)")
    a = p.add_argument_group("arrivals and bounds")
    a.add_argument("--rate", type=_rate, help="requests/s (Poisson/gamma); default inf = no pacing")
    a.add_argument("--burstiness", type=_pos_float, default=1.0, help="gamma shape; 1.0 = Poisson")
    a.add_argument("--max-concurrency", type=_pos_int, help="at most N requests in flight (closed loop without "
                                                            "--rate)")
    a.add_argument("--num-requests", type=_pos_int, help="requests to send (default 50 unless --duration)")
    a.add_argument("--duration", type=_pos_float, help="stop issuing after this many seconds")
    a.add_argument("--drain-timeout", type=_nonneg_float, default=30.0,
                   help="after --duration, seconds in-flight requests may still take (default 30)")
    a.add_argument("--request-timeout", type=_pos_float, default=300.0)
    a.add_argument("--sweep", type=_rates, metavar="R1,R2,...", help="run at each rate (inf allowed)")
    a.add_argument("--sweep-pause", type=_nonneg_float, default=0.0, help="seconds between sweep runs")
    o = p.add_argument_group("measurement and output")
    o.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:100 e2e:5000")
    o.add_argument("--status-interval", type=_nonneg_float, default=2.0,
                   help="poll /v1/helios/status every S seconds (0 = off; gRPC Status with --grpc)")
    o.add_argument("--out", help="write the JSON result here")
    o.add_argument("--plots", metavar="DIR", help="write PNG plots here (needs matplotlib)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    return p


def _token_counter(name: str | None) -> Callable[[str], int] | None:
    if not name:
        return None
    from pathlib import Path

    path = Path(name)
    if not path.is_dir():
        raise LoadgenError(f"--tokenizer {name!r} is not a directory: pass a tokenizer directory (for a helios-ray "
                           f"model, the one `helios-ray prepare NAME` prints as 'NAME: ready at DIR')")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise LoadgenError(f"--tokenizer {name!r}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
    return lambda text: max(1, len(tok(text, add_special_tokens=False)["input_ids"]))


def _make(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from loadgen.clients import GrpcClient, HttpClient
    from loadgen.metrics import parse_slos
    from loadgen.workloads import approx_tokens, build_workload

    if args.rate is not None and args.sweep:
        raise LoadgenError("use either --rate or --sweep")
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise LoadgenError("--random-range-ratio must be in [0, 1)")
    if not 0.0 <= args.temperature <= 2.0:
        raise LoadgenError("--temperature must be in [0, 2]")
    if args.min_prompt_tokens > args.max_prompt_tokens:
        raise LoadgenError("--min-prompt-tokens is larger than --max-prompt-tokens")
    if args.max_output_tokens is not None and args.min_output_tokens > args.max_output_tokens:
        raise LoadgenError("--min-output-tokens is larger than --max-output-tokens")
    shift = tuple(x.strip() for x in args.shift.split(","))
    if len(shift) != 2:
        raise LoadgenError("--shift takes two workloads, e.g. sharegpt,humaneval")
    if args.num_requests is None and args.duration is None:
        args.num_requests = 50
    rates = args.sweep or [args.rate if args.rate is not None else math.inf]
    if args.num_requests is None and any(math.isinf(r) for r in rates) and args.max_concurrency is None:
        raise LoadgenError("rate inf without --max-concurrency needs --num-requests")
    args.slos = parse_slos(args.goodput)
    http = HttpClient(args.url, args.model, args.api_key, endpoint=args.endpoint, temperature=args.temperature,
                      ignore_eos=args.ignore_eos, request_timeout=args.request_timeout,
                      allow_remote=args.allow_remote)
    client: Any = http
    if args.grpc:
        if args.ignore_eos:
            raise LoadgenError("--ignore-eos is HTTP only (the gRPC API has no such field)")
        client = GrpcClient(args.grpc, args.model, args.api_key, application=args.application,
                            temperature=args.temperature, request_timeout=args.request_timeout,
                            allow_remote=args.allow_remote)
    count = _token_counter(args.tokenizer) or approx_tokens
    sg = {"min_prompt_tokens": args.min_prompt_tokens, "max_prompt_tokens": args.max_prompt_tokens,
          "min_output_tokens": args.min_output_tokens, "max_output_tokens": args.max_output_tokens,
          "output_cap": args.output_cap, "split": args.split}
    he = {"output_cap": args.output_cap or 256}
    rnd = {"input_len": args.random_input_len, "output_len": args.random_output_len,
           "range_ratio": args.random_range_ratio}
    if args.output_cap:
        rnd["output_len"] = min(args.random_output_len, args.output_cap)
    wl = build_workload(args.workload, args.num_requests, args.seed, duration=args.duration, count_tokens=count,
                        sharegpt=sg, humaneval=he, random=rnd, shift=shift)  # type: ignore[arg-type]
    return client, http, wl


async def _run(args: argparse.Namespace, client: Any, http: Any, wl: Any) -> Any:
    from loadgen.clients import RequestError
    from loadgen.runner import run_load, sweep
    from loadgen.arrivals import Arrival

    try:
        await client.check()
    except RequestError as e:
        raise ConnectionError(e.message) from None
    status_client = client if args.status_interval > 0 else None
    kw: dict[str, Any] = dict(num_requests=args.num_requests, duration=args.duration, slos=args.slos,
                              status_client=status_client, status_interval=args.status_interval,
                              request_timeout=args.request_timeout, drain_timeout=args.drain_timeout,
                              progress=not args.no_progress)
    try:
        if args.sweep:
            return await sweep(client, wl, args.sweep, burstiness=args.burstiness,
                               max_concurrency=args.max_concurrency, seed=args.seed, pause_s=args.sweep_pause, **kw)
        arr = Arrival(rate=args.rate if args.rate is not None else math.inf, burstiness=args.burstiness,
                      max_concurrency=args.max_concurrency, seed=args.seed)
        return await run_load(client, wl, arr, **kw)
    finally:
        await client.aclose()
        if http is not client:
            await http.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    from loadgen.results import format_curve, format_summary, write_result
    from loadgen.runner import SweepResult

    try:
        args = build_parser().parse_args(argv)
        client, http, wl = _make(args)
    except LoadgenError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_run(args, client, http, wl))
    except ConnectionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    runs = result.runs if isinstance(result, SweepResult) else [result]
    if args.json:
        doc = {"curve": result.curve, "summaries": [r.summary for r in runs]} if isinstance(result, SweepResult) \
            else result.summary
        from loadgen.results import _clean

        print(json.dumps(_clean(doc), indent=1))
    else:
        for r in runs:
            rate = r.config["arrival"]["rate"]
            title = f"{r.config['client']['interface']} {r.config['workload']['name']} @ " \
                    f"{'inf' if rate is None else format(rate, 'g')} req/s"
            print(format_summary(r.summary, title, r.status))
        if isinstance(result, SweepResult):
            print(format_curve(result.curve))
    if args.out:
        print(f"results: {write_result(result, args.out)}", file=sys.stderr)
    if args.plots:
        from loadgen.plots import PlotsUnavailable, plot_run, plot_sweep

        try:
            paths = plot_sweep(result, args.plots, per_run=True) if isinstance(result, SweepResult) \
                else plot_run(result, args.plots)
            print(f"plots: {', '.join(str(p) for p in paths)}", file=sys.stderr)
        except PlotsUnavailable as e:
            print(str(e), file=sys.stderr)
    return 0 if any(r.summary.get("completed") for r in runs) else 1
