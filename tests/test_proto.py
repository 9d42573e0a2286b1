"""The checked-in gRPC stubs are what scripts/gen_proto.sh generates from helios.proto today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_stubs_match_the_proto(tmp_path):
    pkg = tmp_path / "helios_proto"
    pkg.mkdir(parents=True)
    shutil.copy(ROOT / "helios_proto" / "helios.proto", pkg / "helios.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    "helios_proto/helios.proto"], cwd=tmp_path, check=True)
    for name in ("helios_pb2.py", "helios_pb2_grpc.py"):
        assert (pkg / name).read_text() == (ROOT / "helios_proto" / name).read_text(), (
            f"{name} is stale: run scripts/gen_proto.sh")
