"""Generated inputs against the session's live cluster (``helios_bench.fuzz``): schemathesis cases from the server's
own OpenAPI schema, positive and negative, and hypothesis-drawn gRPC messages plus raw bytes.  Every answer must be
a 2xx or a clear 4xx (gRPC: a non-internal status with a message), nothing may hang, and afterwards the server
answers with the same replica processes.  A bounded run (token counts capped: see ``run_fuzz``); the long run is
``helios-ray bench fuzz`` (docs/security.md)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_generated_requests_get_2xx_or_clear_4xx_and_kill_nothing(cluster):
    from helios_bench.fuzz import format_report, run_fuzz

    res = run_fuzz(cluster["base"], cluster["grpc"], cluster["app"], cluster["key"], None, http=160, grpc_n=100,
                   seed=7, workers=4, timeout=90, max_tokens_cap=8, log=lambda _: None)
    assert res["http"]["requests"] >= 150 and res["grpc"]["messages"] == 100
    assert res["http"]["outcomes"].get("2xx", 0) >= 10 and res["http"]["outcomes"].get("4xx", 0) >= 50, res["http"]
    assert res["passed"], format_report(res)


def test_what_the_fuzzer_found_stays_fixed(cluster):
    """Regressions from `helios-ray bench fuzz`: a float64 temperature that is 0 in float32 made the sampler divide
    0/0, and a top_p that is 0 in float32 dropped every token (the batch's step failed, and an answer that ended before its first token then failed the router's token
    counter: a plain-text 500); bytes that are not a protobuf were Serve's UNKNOWN instead of INVALID_ARGUMENT."""
    import grpc
    import httpx

    for extra in ({"temperature": 5e-324}, {"temperature": 1e-30}, {"top_p": 1e-300}):
        r = httpx.post(f"{cluster['base']}/v1/completions", headers=cluster["headers"], timeout=120,
                       json={"model": "helios", "prompt": "Hello", "max_tokens": 3, **extra})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    md = (("application", cluster["app"]), ("authorization", f"Bearer {cluster['key']}"))
    with grpc.insecure_channel(cluster["grpc"]) as ch:
        call = ch.unary_unary("/helios.v1.HeliosService/Generate", request_serializer=None,
                              response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xc8\xf7\x95", metadata=md, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid helios.v1 message" in e.value.details()
