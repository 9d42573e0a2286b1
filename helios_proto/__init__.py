"""The ``helios.v1`` gRPC API: ``helios.proto`` and its generated stubs ``helios_pb2`` / ``helios_pb2_grpc``.

A neutral package shared by the server (``helios_ray``) and its clients (``loadgen``), so a client needs no
server code.  The stubs are checked in; ``scripts/gen_proto.sh`` regenerates them and ``tests/test_proto.py``
checks the checked-in files are current.

    from helios_proto import helios_pb2 as pb, helios_pb2_grpc as pbg
"""
