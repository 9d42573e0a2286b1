from __future__ import annotations

import pytest

from tests.loadgen.servers import GrpcServer, HttpServer


@pytest.fixture(scope="session")
def http_server():
    srv = HttpServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def grpc_server():
    srv = GrpcServer().start()
    yield srv
    srv.stop()
