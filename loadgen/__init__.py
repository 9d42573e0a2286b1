"""Load generator for helios-ray: async HTTP (OpenAI SSE) and gRPC streaming clients, ShareGPT / random /
HumanEval / shift workloads, Poisson/gamma or closed-loop arrivals, TTFT/TPOT/ITL/E2E/goodput, exit layers
and the placement timeline, JSON results and PNG plots.  See docs/loadgen.md.

    import asyncio
    from loadgen import Arrival, HttpClient, build_workload, run_load, write_result

    async def main():
        async with HttpClient("http://127.0.0.1:8000") as client:
            wl = build_workload("sharegpt", num_requests=50, seed=0)
            return await run_load(client, wl, Arrival(rate=2.0), num_requests=50, slos={"ttft": 500, "tpot": 100})

    write_result(asyncio.run(main()), "results.json")
"""

from loadgen.version import __version__  # noqa: F401  (re-exported)

from loadgen.arrivals import Arrival, arrival_times, arrival_times_iter, gamma_intervals
from loadgen.clients import Client, EndEvent, GrpcClient, HttpClient, ReceivedToken, RequestError
from loadgen.metrics import RequestRecord, meets_slos, parse_slos, stats, summarize
from loadgen.net import LoadgenError, RemoteTargetError, is_loopback_host
from loadgen.results import format_curve, format_summary, load_result, write_result
from loadgen.runner import (
    SCHEMA_RUN, SCHEMA_SWEEP, RunResult, StatusPoller, SweepResult, curve_point, run_load, sweep,
)
from loadgen.workloads import (
    WORKLOADS, PoolWorkload, Request, ShiftWorkload, Workload, approx_tokens, build_workload, humaneval_requests,
    random_requests, sharegpt_requests,
)

__all__ = [
    "SCHEMA_RUN", "SCHEMA_SWEEP", "WORKLOADS", "Arrival", "Client", "EndEvent", "GrpcClient", "HttpClient",
    "LoadgenError", "PoolWorkload", "ReceivedToken", "RemoteTargetError", "Request", "RequestError", "RequestRecord",
    "RunResult", "ShiftWorkload", "StatusPoller", "SweepResult", "Workload", "approx_tokens", "arrival_times",
    "arrival_times_iter", "build_workload", "curve_point", "format_curve", "format_summary", "gamma_intervals",
    "humaneval_requests", "is_loopback_host", "load_result", "meets_slos", "parse_slos", "random_requests",
    "run_load", "stats", "summarize", "sweep", "write_result",
]
