#!/usr/bin/env bash
# Regenerate helios_proto/helios_pb2*.py from helios_proto/helios.proto (the stubs are checked in).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. helios_proto/helios.proto
