#!/usr/bin/env bash
# Regenerate helios_ray/grpc/helios_pb2*.py from helios.proto (the stubs are checked in).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. helios_ray/grpc/helios.proto
