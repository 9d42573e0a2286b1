"""``python -m loadgen``: argument errors, loopback refusal, a real run with JSON + plots, a sweep, gRPC."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loadgen import SCHEMA_RUN, SCHEMA_SWEEP
from loadgen.cli import main
from loadgen.plots import matplotlib_available

FAST = ["--workload", "random", "--random-input-len", "8", "--random-output-len", "3", "--random-range-ratio", "0",
        "--no-progress"]


@pytest.mark.parametrize("argv", [
    ["--rate", "abc"], ["--rate", "0"], ["--burstiness", "0"], ["--num-requests", "0"], ["--max-concurrency", "-1"],
    ["--workload", "nope"], ["--goodput", "foo:1"], ["--goodput", "ttft"], ["--rate", "1", "--sweep", "1,2"],
    ["--sweep", ","], ["--duration", "-3"], ["--bogus"], ["--url", "ftp://127.0.0.1"], ["--grpc", "127.0.0.1"],
    ["--random-range-ratio", "1.5"], ["--duration", "5", "--rate", "inf"],
])
def test_bad_arguments_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m loadgen: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("name", ["smollm2-135m", "/no/such/tokenizer"])
def test_tokenizer_must_be_a_directory(name, capsys):
    assert main(["--tokenizer", name] + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m loadgen: error: --tokenizer") and err.count("\n") == 1
    assert "pass a tokenizer directory" in err and "helios-ray prepare NAME" in err


def test_tokenizer_directory_counts_real_tokens(smollm2_dir):
    from loadgen.cli import _token_counter

    count = _token_counter(str(smollm2_dir))
    assert count("") == 1 and count("hello world, hello world") > count("hello")


@pytest.mark.parametrize("argv", [["--url", "http://192.168.1.10:8000"], ["--url", "http://example.com"],
                                  ["--grpc", "10.0.0.2:9000"]])
def test_non_loopback_refused(argv, capsys):
    assert main(argv + FAST) == 2
    err = capsys.readouterr().err
    assert "refusing non-loopback" in err and "--allow-remote" in err and err.count("\n") == 1


def test_unreachable_server_exit_1(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--url", f"http://127.0.0.1:{port}", "--num-requests", "2"] + FAST) == 1
    err = capsys.readouterr().err
    assert "cannot reach" in err and err.count("\n") == 1


def test_cli_run_writes_json_and_plots(http_server, tmp_path, capsys):
    http_server.reset(ttft=0.01, tpot=0.003, switch_after=2)
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    rc = main(["--url", http_server.url, "--num-requests", "6", "--rate", "60", "--seed", "1",
               "--goodput", "ttft:1000", "tpot:100", "--status-interval", "0.05", "--out", str(out),
               "--plots", str(plots)] + FAST)
    assert rc == 0
    o = capsys.readouterr()
    assert "Successful requests:" in o.out and "TTFT (ms)" in o.out and "Goodput" in o.out
    d = json.loads(out.read_text())
    assert d["schema"] == SCHEMA_RUN and d["summary"]["completed"] == 6 and len(d["records"]) == 6
    assert d["config"]["workload"]["name"] == "random" and d["config"]["arrival"]["rate"] == 60.0
    assert d["summary"]["goodput"]["slos_ms"] == {"ttft": 1000.0, "tpot": 100.0}
    assert all(r["max_tokens"] == 3 for r in d["records"])
    if matplotlib_available():
        for name in ("latency_cdf.png", "exit_depth.png", "decisions.png"):
            assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in o.err


def test_plots_skipped_without_matplotlib(http_server, tmp_path, capsys, monkeypatch):
    import loadgen.plots

    http_server.reset(ttft=0.005, tpot=0.002)
    monkeypatch.setattr(loadgen.plots, "matplotlib_available", lambda: False)
    rc = main(["--url", http_server.url, "--num-requests", "2", "--status-interval", "0", "--plots",
               str(tmp_path / "p")] + FAST)
    assert rc == 0
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_cli_sweep(http_server, tmp_path, capsys):
    http_server.reset(ttft=0.005, tpot=0.002)
    out = tmp_path / "s.json"
    rc = main(["--url", http_server.url, "--num-requests", "3", "--sweep", "30,inf", "--status-interval", "0",
               "--out", str(out), "--plots", str(tmp_path / "p")] + FAST)
    assert rc == 0
    assert "Throughput-latency sweep" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["schema"] == SCHEMA_SWEEP and [p["rate"] for p in d["curve"]] == [30.0, None]
    if matplotlib_available():
        assert (tmp_path / "p" / "sweep.png").exists() and (tmp_path / "p" / "rate-inf_latency_cdf.png").exists()


def test_cli_grpc_closed_loop_json(grpc_server, capsys):
    grpc_server.reset(ttft=0.005, tpot=0.002)
    rc = main(["--grpc", grpc_server.target, "--num-requests", "4", "--max-concurrency", "2", "--json",
               "--status-interval", "0"] + FAST)
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["completed"] == 4 and s["max_in_flight"] <= 2 and s["exit_layer"]["histogram"] == {"3": 8, "5": 4}


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "loadgen", "--burstiness", "x"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("python -m loadgen: error:") and r.stdout == ""
