"""gRPC API: ``helios.proto`` and its generated stubs (checked in; ``scripts/gen_proto.sh`` regenerates them and
a test checks the checked-in files are current)."""
