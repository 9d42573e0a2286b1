"""The load generator against a real local gRPC HeliosService with injected delays."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from loadgen import Arrival, GrpcClient, RemoteTargetError, Request, LoadgenError, run_load

TTFT, TPOT = 0.08, 0.02
EPS = 0.002    # timer resolution on the lower bounds; no wall-clock ceilings (why: tests/loadgen/test_http.py)


def run(client_kw: dict, reqs, arrival=None, **kw):
    async def go():
        async with GrpcClient(**client_kw) as c:
            return await run_load(c, reqs, arrival or Arrival(), progress=False, **kw)
    return asyncio.run(go())


def chat(i, n=6, text="hello"):
    return Request(id=str(i), kind="chat", prompt=text, max_tokens=n, messages=[{"role": "user", "content": text}])


def plain(i, n=6, text="def f():"):
    return Request(id=str(i), kind="code", prompt=text, max_tokens=n)


def test_grpc_timings_tokens_and_metadata(grpc_server):
    b = grpc_server.reset(ttft=TTFT, tpot=TPOT, api_key="k1")
    n = 5
    res = run({"target": grpc_server.target, "api_key": "k1"}, [chat(0, n), plain(1, n), chat(2, n)],
              Arrival(rate=20, seed=0), status_interval=0)
    assert res.summary["completed"] == 3
    for r in res.records:
        assert r.success and r.interface == "grpc" and r.output_tokens == n and r.chunks == n
        assert r.ttft_s >= TTFT - EPS
        assert len(r.itl_s) == n - 1 and all(gap >= 0 for gap in r.itl_s)
        last_token = r.ttft_s + sum(r.itl_s)
        assert TTFT + (n - 1) * TPOT - EPS <= last_token <= r.e2e_s
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / (n - 1))
        assert r.exit_layers == [3, 5, 3, 5, 3] and r.breaches == 1
        assert r.confidences == pytest.approx([0.5, 0.51, 0.52, 0.53, 0.54])
        assert (r.model, r.depth, r.finish_reason, r.prompt_tokens) == ("tiny", 6, "length", 7)
    s = res.summary
    for key in ("ttft", "tpot", "e2e"):  # the summary's statistics are those of the records, in milliseconds
        assert s[f"{key}_ms"]["median"] == pytest.approx(1000 * statistics.median(getattr(r, f"{key}_s")
                                                                                   for r in res.records))
    assert all(h["application"] == "helios" and h["authorization"] == "Bearer k1" for h in b.headers)
    assert b.received[0]["messages"] == ["hello"] and b.received[1]["prompt"] == "def f():"
    assert all(body["max_tokens"] == n for body in b.received)
    assert res.summary["served_models"] == {"tiny@6": 3}


def test_grpc_errors_and_status(grpc_server):
    grpc_server.reset(ttft=0.01, tpot=0.005, switch_after=1)
    reqs = [chat(0, 3), plain(1, 3, "BAD"), plain(2, 4, "MIDERR"), plain(3, 3)]
    res = run({"target": grpc_server.target}, reqs, Arrival(rate=40), status_interval=0.05)
    s = res.summary
    assert (s["completed"], s["failed"]) == (2, 2)
    assert res.records[1].status == "INVALID_ARGUMENT" and "bad prompt" in res.records[1].error
    assert res.records[2].status == "UNAVAILABLE" and res.records[2].chunks == 2
    # the gRPC Status RPC feeds the same decisions timeline
    assert res.status["polls"] >= 1 and res.status["changes"][0]["version"] == 2
    res = run({"target": grpc_server.target, "application": "other"}, [chat(0, 2)], status_interval=0)
    assert res.records[0].status == "NOT_FOUND"


def test_grpc_closed_loop_concurrency(grpc_server):
    b = grpc_server.reset(ttft=0.02, tpot=0.005)
    res = run({"target": grpc_server.target}, [plain(i, 3) for i in range(9)], Arrival(max_concurrency=3),
              status_interval=0)
    assert res.summary["completed"] == 9 and b.max_in_flight <= 3 and res.summary["max_in_flight"] == 3


def test_grpc_target_checks():
    for t in ("10.0.0.1:9000", "example.com:9000", "[2001:db8::1]:9000"):
        with pytest.raises(RemoteTargetError):
            GrpcClient(t)
    for t in ("127.0.0.1:9000", "localhost:9000", "[::1]:9000", "unix:/tmp/x.sock"):
        GrpcClient(t)
    for bad in ("127.0.0.1", "127.0.0.1:x", ":9000"):
        with pytest.raises(LoadgenError):
            GrpcClient(bad)
