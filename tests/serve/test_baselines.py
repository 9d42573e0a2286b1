"""The two baselines of ``helios-ray bench serve`` behind the same Router, on the session's cluster:
``mode: early_exit`` (full depth, token-level exit) and ``mode: plain`` (transformers ``generate()``)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N = 16


def _deploy(name: str, args: dict) -> None:
    from ray import serve

    from helios_ray.serve.app import build_app

    base = {"candidates": ["smollm2-135m"], "api_key_env": None,
            "engine": {"torch_threads": 1, "max_num_seqs": 8, "memory_budget": "1GiB"}}
    serve.run(build_app({**base, **args}), name=name, route_prefix=f"/{name}", blocking=False)


def _wait(url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def baselines(cluster):
    from ray import serve

    _deploy("ee", {"mode": "early_exit"})
    _deploy("plain", {"mode": "plain"})
    urls = {"ee": f"{cluster['base']}/ee", "plain": f"{cluster['base']}/plain"}
    for u in urls.values():
        _wait(u)
    yield urls
    serve.delete("ee")
    serve.delete("plain")


def _stream(url: str, messages: list[dict], max_tokens: int, **extra) -> tuple[list[int], list[int], dict]:
    """(token ids, exit layers, finish/usage) of one streamed chat completion."""
    body = {"model": "helios", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    ids, layers, end = [], [], {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            if "helios" in obj:
                ids.append(obj["helios"]["token"])
                layers.append(obj["helios"]["exit_layer"])
            if obj.get("choices") and obj["choices"][0]["finish_reason"]:
                end["finish_reason"] = obj["choices"][0]["finish_reason"]
            if obj.get("usage"):
                end["usage"] = obj["usage"]
    return ids, layers, end


def test_early_exit_mode_serves_token_level_exits(baselines):
    from helios_ray.engine.engine import EngineConfig, LLMEngine
    from helios_ray.engine.sequence import SamplingParams
    from helios_ray.models.early_exit import load_model

    ids, layers, end = _stream(baselines["ee"], CHAT, N, ignore_eos=True)
    assert len(ids) == N and end["usage"]["completion_tokens"] == N
    assert set(layers) <= {20, 24, 30}  # the card's exits at threshold 0.9 and the guard 0.9, plus the last layer
    # The same engine in this process gives the same tokens and the same exits.
    m = load_model("smollm2-135m", token_exits=[20, 24], threshold=0.9)
    eng = LLMEngine(m, EngineConfig(memory_budget=1 << 30))
    seq = eng.add_request(m.encode(messages=CHAT), SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))
    got_layers = []
    while eng.scheduler.has_work:
        got_layers += [ev.exit_layer for ev in eng.step() if ev.token is not None]
    assert seq.output_ids == ids and got_layers == layers
    st = httpx.get(f"{baselines['ee']}/v1/helios/status", timeout=30).json()
    assert st["mode"] == "early_exit" and st["placement"]["depth"] == 30
    assert st["profile_records"] == 0  # no profiler, no mirroring in a baseline


def test_plain_mode_is_transformers_generate(baselines, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, layers, end = _stream(baselines["plain"], CHAT, N)
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False)[0, len(p):].tolist()
    ref = [t for t in ref if t != tok.eos_token_id]
    assert ids == ref[: len(ids)] and len(ids) >= 1
    assert set(layers) == {30}
    assert end["finish_reason"] in ("stop", "length")


def test_plain_mode_batches_rows_that_stop_on_their_own(baselines):
    """Concurrent requests share a static batch; each stops at its own max_tokens, and bad input is a 400."""
    url = baselines["plain"]

    async def one(client: httpx.AsyncClient, n: int) -> int:
        body = {"model": "helios", "prompt": "Once upon a time", "max_tokens": n, "temperature": 0,
                "ignore_eos": True}
        r = await client.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    async def main() -> list[int]:
        async with httpx.AsyncClient() as c:
            return await asyncio.gather(*(one(c, n) for n in (3, 9, 5, 12)))

    assert asyncio.run(main()) == [3, 9, 5, 12]
    r = httpx.post(f"{url}/v1/completions", json={"model": "helios", "prompt": "hi", "max_tokens": 100_000},
                   timeout=60)
    assert r.status_code == 400 and "maximum context" in r.json()["error"]["message"]
    st = httpx.get(f"{url}/v1/helios/status", timeout=30).json()
    assert st["mode"] == "plain"
    ids, _, _ = _stream(url, CHAT, 4)  # still serving
    assert len(ids) >= 1


def _this_hosts_address() -> str | None:
    """A non-loopback address of this host (the one a default route leaves from), or None without one."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.123", 9))  # UDP: picks the route, sends nothing
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") else ip


def test_a_keyless_app_answers_only_this_host_even_where_grpc_listens_on_every_interface(cluster, baselines):
    """Serve's gRPC proxy binds [::]:port whatever http_options.host says: a keyless application (the baselines
    run with api_key_env None) must refuse a caller that comes from another address - here this host's own
    non-loopback address, which the kernel reports as the peer - and answer the loopback (a keyed application
    answering any address that brings its key: tests/serve/test_auth.py)."""
    import grpc

    from helios_proto import helios_pb2 as pb, helios_pb2_grpc as pbg

    ip = _this_hosts_address()
    if ip is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    port = cluster["grpc_port"]

    def call(host: str, app: str, key: str | None = None):
        md = (("application", app),) + ((("authorization", f"Bearer {key}"),) if key else ())
        with grpc.insecure_channel(f"{host}:{port}") as ch:
            return pbg.HeliosServiceStub(ch).Generate(pb.GenerateRequest(model="helios", prompt="Hi", max_tokens=2),
                                                     metadata=md, timeout=120)

    assert call("127.0.0.1", "ee").text is not None
    with pytest.raises(grpc.RpcError) as e:
        call(ip, "ee")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "only on its own host" in e.value.details()
