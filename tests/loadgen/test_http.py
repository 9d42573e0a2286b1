"""The load generator against a real local SSE server (uvicorn on 127.0.0.1) with injected delays."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time

import pytest

from loadgen import (
    SCHEMA_RUN, SCHEMA_SWEEP, Arrival, HttpClient, LoadgenError, RemoteTargetError, Request, build_workload,
    load_result, run_load, sweep, write_result,
)

TTFT, TPOT = 0.08, 0.02
# Timings are checked by what a correct measurement implies, never by wall-clock ceilings (this runs on a shared,
# loaded 2-core host).  A token cannot arrive before the server sends it, so lower bounds are exact: the first
# token no earlier than TTFT, the last no earlier than TTFT + (n - 1) * TPOT.  A busy client can receive tokens
# late and then in a burst, so nothing bounds a single gap from below or any interval from above.
EPS = 0.002    # timer resolution on the lower bounds


def chat(i: int, n: int = 6, text: str = "hello") -> Request:
    return Request(id=str(i), kind="chat", prompt=text, max_tokens=n, messages=[{"role": "user", "content": text}])


def plain(i: int, n: int = 6, text: str = "def f():") -> Request:
    return Request(id=str(i), kind="code", prompt=text, max_tokens=n)


def run(client_kw: dict, reqs, arrival=None, **kw):
    async def go():
        async with HttpClient(**client_kw) as c:
            return await run_load(c, reqs, arrival or Arrival(), progress=False, **kw)
    return asyncio.run(go())


def test_ttft_tpot_e2e_match_injected_delays(http_server):
    b = http_server.reset(ttft=TTFT, tpot=TPOT)
    n = 6
    reqs = [chat(0, n), plain(1, n), chat(2, n), plain(3, n)]
    res = run({"url": http_server.url}, reqs, Arrival(rate=20, seed=0), status_interval=0)
    assert res.summary["completed"] == 4 and res.summary["failed"] == 0
    for r in res.records:
        assert r.success and r.output_tokens == n and r.chunks == n and r.prompt_tokens == 7
        assert r.ttft_s >= TTFT - EPS                  # the role-only chunk (sent at once) is not the first token
        assert len(r.itl_s) == n - 1 and all(gap >= 0 for gap in r.itl_s)  # one gap per later token
        last_token = r.ttft_s + sum(r.itl_s)
        assert TTFT + (n - 1) * TPOT - EPS <= last_token <= r.e2e_s  # gaps add up to the last token; E2E after it
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / (n - 1))
        assert r.exit_layers == [3, 5, 3, 5, 3, 5]
        assert r.confidences == pytest.approx([0.5, 0.51, 0.52, 0.53, 0.54, 0.55])
        assert r.model == "tiny" and r.finish_reason == "length"
    s = res.summary
    for key in ("ttft", "tpot", "e2e"):  # the summary's statistics are those of the records, in milliseconds
        assert s[f"{key}_ms"]["median"] == pytest.approx(1000 * statistics.median(getattr(r, f"{key}_s")
                                                                                   for r in res.records))
    assert s["exit_layer"]["histogram"] == {"3": 12, "5": 12}
    assert s["total_output_tokens"] == 4 * n
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    # chat requests went to the chat endpoint with messages, plain prompts to completions; streaming with usage
    assert b.paths == ["/v1/chat/completions", "/v1/completions"] * 2
    assert all(body["stream"] and body["stream_options"] == {"include_usage": True} and body["max_tokens"] == n
               and body["model"] == "helios" and body["temperature"] == 0.0 for body in b.received)
    assert "messages" in b.received[0] and b.received[1]["prompt"] == "def f():"


def test_output_tokens_without_usage_and_api_key(http_server):
    b = http_server.reset(ttft=0.01, tpot=0.005, send_usage=False, api_key="sekret")
    res = run({"url": http_server.url, "api_key": "sekret"}, [chat(0, 4), plain(1, 3)], status_interval=0)
    assert [r.output_tokens for r in res.records] == [4, 3] and res.summary["failed"] == 0
    assert b.headers[0]["authorization"] == "Bearer sekret"
    res = run({"url": http_server.url, "api_key": "wrong"}, [chat(0, 4)], status_interval=0)
    r = res.records[0]
    assert not r.success and r.status == 401 and "invalid or missing API key" in r.error


def test_errors_are_counted(http_server):
    http_server.reset(ttft=0.01, tpot=0.005)
    reqs = [chat(0, 4), chat(1, 4, "BAD prompt"), plain(2, 5, "MIDERR here"), plain(3, 4)]
    res = run({"url": http_server.url}, reqs, Arrival(rate=50), status_interval=0, slos={"ttft": 1000})
    s = res.summary
    assert (s["completed"], s["failed"]) == (2, 2)
    bad, mid = res.records[1], res.records[2]
    assert bad.status == 400 and bad.error == "HTTP 400: bad prompt" and bad.ttft_s is None
    assert mid.status == "stream_error" and "replica died" in mid.error and mid.chunks == 2
    assert s["errors"] == {"HTTP 400: bad prompt": 1, "stream error: replica died": 1}
    assert s["goodput"]["good"] == 2 and s["total_output_tokens"] == 8


def test_connection_refused_is_an_error_not_a_crash():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = run({"url": f"http://127.0.0.1:{port}"}, [chat(0)], status_interval=0)
    assert res.summary["failed"] == 1 and res.records[0].status == "transport"


def test_closed_loop_never_exceeds_max_concurrency(http_server):
    b = http_server.reset(ttft=0.02, tpot=0.005)
    res = run({"url": http_server.url}, [chat(i, 3) for i in range(12)], Arrival(max_concurrency=3),
              status_interval=0)
    assert res.summary["completed"] == 12
    assert b.max_in_flight <= 3 and res.summary["max_in_flight"] == 3
    assert res.config["arrival"]["mode"] == "closed"
    # open loop with a cap: arrivals queue for a slot and the wait is recorded
    b = http_server.reset(ttft=0.03, tpot=0.005)
    res = run({"url": http_server.url}, [chat(i, 3) for i in range(8)], Arrival(rate=200, max_concurrency=2, seed=1),
              status_interval=0)
    assert res.summary["completed"] == 8 and b.max_in_flight <= 2 and res.summary["max_in_flight"] == 2
    assert max(r.queued_s for r in res.records) > 0.02


def test_poisson_schedule_is_followed(http_server):
    """Open loop: every request is sent at its scheduled time whether or not earlier ones have finished.  The
    25 arrivals span ~0.67 s and every request waits 2 s for its first token, so an open-loop generator has all
    25 in flight at once and starts each one before any finishes; a closed loop (or one that lets responses
    hold back the schedule) cannot.  No wall-clock ceiling on the lag: it would flake on a loaded host."""
    b = http_server.reset(ttft=2.0, tpot=0.001)
    res = run({"url": http_server.url}, [plain(i, 2) for i in range(25)], Arrival(rate=50, seed=4),
              status_interval=0)
    lag = [r.start_s - r.scheduled_s for r in res.records]
    assert res.summary["completed"] == 25 and min(lag) >= 0  # never sent early
    assert b.max_in_flight == 25 and res.summary["max_in_flight"] == 25
    assert max(r.start_s for r in res.records) < min(r.start_s + r.e2e_s for r in res.records)
    expected = [r.scheduled_s for r in res.records]
    from loadgen import arrival_times

    assert expected == pytest.approx(list(arrival_times(25, 50, 1.0, seed=4)))


def test_duration_bound_stops_by_itself_and_drains(http_server):
    http_server.reset(ttft=0.01, tpot=0.005)
    wl = build_workload("random", None, seed=0, random={"input_len": 8, "output_len": 3})
    t = time.perf_counter()
    res = run({"url": http_server.url}, wl, Arrival(rate=30, seed=2), duration=0.4, status_interval=0)
    assert time.perf_counter() - t < 60  # returned by itself (generous: a hang, not a slow host, fails this)
    assert 3 <= len(res.records) <= 30 and all(r.scheduled_s < 0.4 for r in res.records)
    assert res.summary["failed"] == 0 and res.config["num_requests"] is None
    # requests still running at duration + drain_timeout are cancelled and counted as failed
    http_server.reset(ttft=5.0, tpot=0.005)
    t = time.perf_counter()
    res = run({"url": http_server.url}, wl, Arrival(max_concurrency=2), duration=0.2, drain_timeout=0.1,
              status_interval=0)
    # cancelled, and the run did not wait for the 5 s first token (0.3 s expected; 5 s is margin, not a target)
    assert time.perf_counter() - t < 5.0
    assert res.summary["failed"] == 2 and all(r.status == "cancelled" and r.ttft_s is None for r in res.records)


def test_request_timeout(http_server):
    http_server.reset(ttft=1.0, tpot=0.005)
    res = run({"url": http_server.url}, [chat(0, 2)], status_interval=0, request_timeout=0.2)
    assert res.records[0].status == "timeout" and res.summary["failed"] == 1


def test_status_polling_records_placement_changes(http_server):
    http_server.reset(ttft=0.05, tpot=0.01, switch_after=3)
    res = run({"url": http_server.url}, [chat(i, 4) for i in range(6)], Arrival(rate=15, seed=0),
              status_interval=0.05)
    st = res.status
    # polled before and after the switch (how many polls fit in the run depends on the host's load, not on loadgen)
    assert st["polls"] >= 2 and st["errors"] == 0
    assert [p["version"] for p in st["placements"]] == [1, 2] and st["placements"][0]["t"] == 0.0
    assert len(st["changes"]) == 1
    ch = st["changes"][0]
    assert ch["to"] == {"model": "tiny", "depth": 4} and ch["action"] == "deploy"
    assert 0.0 < ch["t"] < res.summary["duration_s"]
    assert st["replicas"] == [{"replica": "r1", "depth": 4}]


def test_shift_workload_over_http(http_server):
    b = http_server.reset(ttft=0.005, tpot=0.002)
    wl = build_workload("shift", 6, seed=0, sharegpt={"output_cap": 3}, humaneval={"max_tokens": 2})
    res = run({"url": http_server.url}, wl, Arrival(rate=100), num_requests=6, status_interval=0)
    assert [r.kind for r in res.records] == ["chat"] * 3 + ["code"] * 3
    assert [r.phase for r in res.records] == [0] * 3 + [1] * 3
    assert sorted(b.paths) == ["/v1/chat/completions"] * 3 + ["/v1/completions"] * 3
    assert set(res.summary["by_kind"]) == {"chat", "code"}


def test_result_file_schema(http_server, tmp_path):
    http_server.reset(ttft=0.01, tpot=0.005, switch_after=1)
    res = run({"url": http_server.url, "api_key": "s3cr3t"}, [chat(0, 3), plain(1, 2, "BAD")], Arrival(rate=40),
              slos=["ttft:500", "tpot:100"], status_interval=0.05)
    p = write_result(res, tmp_path / "sub" / "run.json")
    d = json.loads(p.read_text())
    assert d["schema"] == SCHEMA_RUN and isinstance(d["started_at"], float)
    assert set(d) == {"schema", "started_at", "config", "summary", "status", "records"}
    cfg = d["config"]
    assert cfg["client"] == {"interface": "http", "url": http_server.url, "model": "helios", "endpoint": "auto",
                             "temperature": 0.0, "ignore_eos": False, "seed": None, "api_key": True}
    assert "s3cr3t" not in p.read_text()  # the key itself is never written
    assert cfg["arrival"] == {"rate": 40.0, "burstiness": 1.0, "max_concurrency": None, "seed": 0, "mode": "open"}
    assert cfg["slos_ms"] == {"ttft": 500.0, "tpot": 100.0} and cfg["num_requests"] == 2
    s = d["summary"]
    for key in ("completed", "failed", "duration_s", "request_throughput", "output_throughput", "goodput",
                "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "exit_layer", "confidence", "by_kind", "errors"):
        assert key in s
    for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert {"n", "mean", "median", "p90", "p99", "min", "max", "std"} <= set(s[m])
    assert s["goodput"]["good"] == 1
    rec = d["records"][0]
    assert {"index", "id", "kind", "interface", "max_tokens", "scheduled_s", "start_s", "ttft_s", "tpot_s", "e2e_s",
            "itl_s", "output_tokens", "exit_layers", "confidences", "success", "error", "status"} <= set(rec)
    assert d["records"][1]["success"] is False and d["records"][1]["status"] == 400
    assert d["status"]["changes"][0]["version"] == 2
    back = load_result(p)
    assert back.summary == d["summary"] and back.records[0].itl_s == rec["itl_s"]


def test_sweep_curve(http_server, tmp_path):
    http_server.reset(ttft=0.01, tpot=0.003)

    async def go():
        async with HttpClient(http_server.url) as c:
            return await sweep(c, [plain(i, 3) for i in range(4)], [20.0, math.inf], seed=1, status_interval=0,
                               progress=False, slos={"ttft": 1000})
    sw = asyncio.run(go())
    assert [p["rate"] for p in sw.curve] == [20.0, None] and len(sw.runs) == 2
    assert all(p["completed"] == 4 and p["request_throughput"] > 0 and p["ttft_median"] > 0 for p in sw.curve)
    assert sw.curve[1]["request_throughput"] > sw.curve[0]["request_throughput"]  # unpaced is faster
    d = json.loads(write_result(sw, tmp_path / "sweep.json").read_text())
    assert d["schema"] == SCHEMA_SWEEP and d["config"]["rates"] == [20.0, None] and len(d["runs"]) == 2
    assert d["runs"][0]["schema"] == SCHEMA_RUN


def test_non_loopback_targets_are_refused():
    for url in ("http://10.1.2.3:8000", "http://example.com", "https://8.8.8.8", "http://[2001:db8::1]:80"):
        with pytest.raises(RemoteTargetError):
            HttpClient(url)
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000", "http://127.5.0.1"):
        HttpClient(url)
    HttpClient("http://example.com", allow_remote=True)  # constructing sends nothing
    for bad in ("ftp://127.0.0.1", "127.0.0.1:8000", "http://127.0.0.1:99999"):
        with pytest.raises(LoadgenError):
            HttpClient(bad)
    with pytest.raises(LoadgenError):
        run({"url": "http://127.0.0.1:1"}, [chat(0)], num_requests=0)


def test_request_bodies_validate_against_helios_protocol():
    """What HttpClient sends passes the real router's request schemas (unknown fields are rejected there)."""
    from helios_ray.serve.protocol import ChatCompletionRequest, CompletionRequest

    c = HttpClient(ignore_eos=True, seed=3)
    for req in (Request(id="0", kind="chat", prompt="hi", max_tokens=5,
                        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]),
                plain(1, 7)):
        path, body = c.body(req)
        schema = ChatCompletionRequest if path == "/v1/chat/completions" else CompletionRequest
        p = schema.model_validate(body).sampling()
        assert (p.max_tokens, p.temperature, p.seed, p.ignore_eos) == (req.max_tokens, 0.0, 3, True)
        assert schema.model_validate(body).include_usage
    path, body = HttpClient(endpoint="chat").body(plain(2, 3, "def g():"))
    assert path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "def g():"}]
    assert "ignore_eos" not in body and "seed" not in body
