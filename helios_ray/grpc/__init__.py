"""gRPC API: re-exports :mod:`helios_proto` (``helios.proto`` and its generated stubs), where the API now lives.

``helios_ray.grpc.helios_pb2`` and ``helios_ray.grpc.helios_pb2_grpc`` stay importable (including as dotted
paths such as a Serve config's ``grpc_servicer_functions``) and are the very modules of :mod:`helios_proto`;
new code should import :mod:`helios_proto` directly.
"""

import sys

from helios_proto import helios_pb2, helios_pb2_grpc

sys.modules[f"{__name__}.helios_pb2"] = helios_pb2
sys.modules[f"{__name__}.helios_pb2_grpc"] = helios_pb2_grpc

__all__ = ["helios_pb2", "helios_pb2_grpc"]
