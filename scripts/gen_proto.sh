#!/usr/bin/env bash
# Regenerate helios_proto/helios_pb2*.py from helios_proto/helios.proto (the stubs are checked in).
# Run it with the grpcio-tools that pyproject.toml's dev extra pins (`pip install -e ".[dev]"`): the stubs carry that
# release's version lines, and tests/test_proto.py checks both the stubs and the pin.  To move to a newer grpcio-tools,
# change the pin, reinstall, run this, and raise the grpcio/protobuf floors in pyproject.toml to what the new stubs name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. helios_proto/helios.proto
