"""``helios-ray status``: rendering a real status-document shape, and the one-line errors (no cluster)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from helios_bench.harness import free_port
from helios_ray.cli import main
from helios_ray.serve.status_cli import render
from helios_ray.serve.timeline import Timeline

NOW = 1_700_000_600.0


def _doc() -> dict:
    """A status document as HeliosBrain.status() + the Router build it (the shape, with a real Timeline)."""
    tl = Timeline()
    tl.decision(NOW - 500, {"action": "deploy", "trigger": "start", "model": "smollm2-135m", "depth": 30,
                            "reason": "no profile yet: full depth", "previous_model": None, "previous_depth": None})
    tl.decision(NOW - 30, {"action": "extend", "trigger": "storm", "model": "smollm2-135m", "depth": 20,
                           "reason": "12 breaches in 20 tokens", "previous_model": "smollm2-135m",
                           "previous_depth": 12})
    for i in range(40):
        tl.request(NOW - 55 + i, "smollm2-135m", 20, 16, 3.0, 0.25)
    tl.exits("smollm2-135m", [20] * 90 + [12] * 10)
    changes = [{"version": 2, "at": NOW - 60, "from": {"model": "smollm2-135m", "depth": 30},
                "to": {"model": "smollm2-135m", "depth": 12}, "action": "manual", "trigger": "operator",
                "reason": "set_placement"}]
    replica = {"replica": "x1k9f2ab", "pid": 4242, "mode": "helios",
               "model": "smollm2-135m", "depth": 20, "total_layers": 30, "exit_head": "trained",
               "token_exits": [], "placement_version": 3, "running": 2, "waiting": 1, "kv_blocks_used": 12,
               "kv_blocks_total": 1377, "weight_bytes": 396456192, "kv_bytes_per_token": 30720,
               "memory_budget_bytes": 1 << 30, "max_concurrent_1k": 40, "tokens_out": 4012, "breaches": 911,
               "steps": 300, "requests": 40, "last_batch": 2, "switches": 2,
               "last_change": {"kind": "depth", "seconds": 0.8}, "energy_j_per_token": None,
               "reported_at": NOW - 1}
    return json.loads(json.dumps({
        "placement": {"version": 3, "model": "smollm2-135m", "depth": 20}, "changed_at": NOW - 30,
        "changes": changes, "replicas": [replica], "requests": 512, "tokens_observed": 16384,
        "profile_records": 940, "slo": "throughput", "candidates": ["smollm2-135m", "gemma3-270m"],
        "mode": "helios",
        "controller": {"breaches": {"window": 100, "limit": 50, "threshold": 0.9, "tokens": 64, "breaches": 7,
                                    "storm": False, "total_tokens": 16384, "total_breaches": 911},
                       "decisions": [], "pht": [], "shortlist": []},
        "timeline": tl.snapshot(NOW, changes),
        "profiler": {"queued": 0, "profiled": 12, "dropped": 0},
    }))


def test_render_shows_placement_replicas_breaches_and_decisions():
    text = render(_doc(), "http://127.0.0.1:8000", now=NOW)
    lines = text.splitlines()
    assert lines[0].startswith("helios-ray http://127.0.0.1:8000  mode helios  SLO throughput  requests 512")
    i = lines.index("PLACEMENT")
    assert lines[i + 1].split() == ["group", "model", "depth", "of", "version", "replicas", "changed", "steered"]
    assert lines[i + 2].split() == ["default", "smollm2-135m", "20", "30", "3", "1/1", "30", "s", "ago", "-"]
    row = lines[lines.index("REPLICAS") + 2].split()
    assert row[:9] == ["x1k9f2ab", "default", "4242", "smollm2-135m@20", "3", "2", "1", "12/1377", "1%"]
    assert "BREACHES  7 / 50 in the last 64 of 100 tokens (confidence < 0.9); all-time 911 / 16,384" in text
    assert "STORM" not in text
    assert "EXITS  smollm2-135m: 100 tokens; layer 20 90%, layer 12 10%" in text
    assert "latest TTFT p50 250 ms" in text
    dec = lines[lines.index("LAST DECISIONS") + 1:]
    assert dec[0].split()[:4] == ["when", "action", "trigger", "change"]
    assert "extend" in dec[1] and "smollm2-135m@12 -> smollm2-135m@20" in dec[1] and "30 s ago" in dec[1]
    assert "manual" in dec[2] and "operator" in dec[2] and "60 s ago" in dec[2]
    assert "deploy" in dec[3] and "start" in dec[3] and "8 min ago" in dec[3]


def test_render_copes_with_an_idle_fleet_and_an_older_server():
    doc = _doc()
    doc["replicas"] = []
    doc["controller"]["breaches"]["storm"] = True
    doc["controller"]["decisions"] = [{"action": "deploy", "trigger": "start", "model": "m", "depth": 30,
                                       "reason": "priors", "previous_model": None, "previous_depth": None}]
    del doc["timeline"]  # a server from before the timeline
    text = render(doc, now=NOW)
    assert "(no replica has reported in the last 10 s)" in text and "STORM" in text
    assert "deploy" in text and "m@30" in text


class _Server:
    def __init__(self, status: int, body: bytes):
        outer = self
        self.auth: list[str | None] = []

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.auth.append(self.headers.get("Authorization"))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_unreachable_server_is_one_line_and_exit_2(capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["status", "--url", url, "--timeout", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("helios-ray status: error: cannot reach ")
    assert "/v1/helios/status" in err


def test_401_is_one_line_and_exit_2(capsys, monkeypatch):
    srv = _Server(401, b'{"error": {"message": "invalid or missing API key"}}')
    try:
        monkeypatch.delenv("HELIOS_API_KEY", raising=False)
        assert main(["status", "--url", srv.url]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "401 unauthorized: the server requires an API key" in err
        monkeypatch.setenv("HELIOS_API_KEY", "from-env")
        assert main(["status", "--url", srv.url]) == 2
        assert "the API key was rejected" in capsys.readouterr().err
        assert srv.auth == [None, "Bearer from-env"]
    finally:
        srv.close()


def test_not_a_helios_server_and_bad_watch(capsys):
    srv = _Server(200, b"<html>hello</html>")
    try:
        assert main(["status", "--url", srv.url]) == 2
        assert "not JSON" in capsys.readouterr().err
    finally:
        srv.close()
    assert main(["status", "--watch", "0"]) == 2
    assert "--watch must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("as_json", [False, True])
def test_prints_the_document_or_the_tables(capsys, as_json):
    doc = _doc()
    srv = _Server(200, json.dumps(doc).encode())
    try:
        args = ["status", "--url", srv.url + "/", "--api-key", "k"] + (["--json"] if as_json else [])
        assert main(args) == 0
        out = capsys.readouterr().out
        if as_json:
            assert json.loads(out) == doc
        else:
            assert "PLACEMENT" in out and "smollm2-135m" in out
        assert srv.auth == ["Bearer k"]
    finally:
        srv.close()


def test_render_shows_each_group_of_a_fleet_with_its_steered_share():
    doc = _doc()
    rep = doc["replicas"][0]
    doc["replicas"] = [{**rep, "group": "chat"}, {**rep, "replica": "SERVE_REPLICA::code#q7", "group": "code",
                                                   "model": "qwen2.5-coder-0.5b", "depth": 24, "total_layers": 24}]
    doc["groups"] = [
        {"name": "chat", "placement": {"model": "smollm2-135m", "depth": 20, "version": 3}, "pinned": False},
        {"name": "code", "placement": {"model": "qwen2.5-coder-0.5b", "depth": 24, "version": 1}, "pinned": True}]
    doc["routing"] = {"steering": {"split": {"chat": {"chat": 30, "code": 2}, "code": {"code": 8}}}}
    lines = render(doc, now=NOW).splitlines()
    i = lines.index("PLACEMENT")
    assert lines[i + 1].split() == ["group", "model", "depth", "of", "version", "replicas", "pin", "steered"]
    assert lines[i + 2].split() == ["chat", "smollm2-135m", "20", "30", "3", "1/1", "policy", "80%", "chat:30", "code:2"]
    assert lines[i + 3].split() == ["code", "qwen2.5-coder-0.5b", "24", "24", "1", "1/1", "pinned", "20%", "code:8"]
