"""What ``grpc_servicer_functions`` names: the generated registration, with request decoding that cannot crash.

Serve's gRPC proxy decodes each request with the registration's ``request_deserializer`` before any of our code
runs; the generated one (``GenerateRequest.FromString``) raises on bytes that are not a protobuf, and the proxy
answers that with ``UNKNOWN: Unexpected <class DecodeError>`` - a server error for a client's mistake (found by
``helios-ray bench fuzz``).  Here a request that does not decode becomes an :class:`Undecodable`, which the
router's one request mapper turns into ``INVALID_ARGUMENT`` with a message like every other bad request.

The generated module stays untouched (it is checked against ``helios.proto`` line for line); this module reuses
its handlers and swaps only the deserializer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from helios_proto import helios_pb2_grpc


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not the method's message (it crosses to the router pickled, by reference)."""

    message: str


def tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, and whatever else a corrupt buffer raises
            return Undecodable(f"{type(e).__name__}: {e}")

    return decode


class _Capture:
    """Stands in for the server while the generated function registers its handlers."""

    def __init__(self) -> None:
        self.registered: tuple[str, dict[str, Any]] | None = None

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered = (service, handlers)


def add_HeliosServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - gRPC's naming
    import grpc

    cap = _Capture()
    helios_pb2_grpc.add_HeliosServiceServicer_to_server(servicer, cap)
    assert cap.registered is not None, "the generated registration changed shape"
    service, handlers = cap.registered
    handlers = {m: h._replace(request_deserializer=tolerant(h.request_deserializer)) for m, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
