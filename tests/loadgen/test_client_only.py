"""loadgen is a client only: no module of it imports (or names) the server package ``helios_ray``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import loadgen

ROOT = Path(loadgen.__file__).resolve().parent


def test_no_loadgen_source_names_helios_ray():
    offenders = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py") if "helios_ray" in p.read_text()]
    assert not offenders, offenders


def test_importing_and_using_loadgen_loads_no_helios_ray():
    code = """
import sys
import loadgen, loadgen.cli, helios_data, loadgen.plots, loadgen.results
from loadgen import GrpcClient, Request, build_workload
GrpcClient("127.0.0.1:9000").message(Request(id="0", kind="chat", prompt="hi", max_tokens=2))  # helios_proto
build_workload("humaneval", 2, seed=0)                                                          # helios_data
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "helios_ray")
assert not loaded, loaded
assert "helios_proto.helios_pb2" in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
