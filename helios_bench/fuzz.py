"""``helios-ray bench fuzz``: generated bad (and good) inputs against a live server, HTTP and gRPC.

HTTP cases come from the server's own ``/openapi.json`` (the request bodies are the pydantic schemas the router
validates with, :func:`helios_ray.serve.protocol.openapi_body`) through schemathesis, in both of its modes:
*positive* (bodies the schema allows) and *negative* (bodies that break it).  The server's validators are stricter
than JSON schema can say (a float 3.0 for an integer, ``stream_options`` without ``stream``), so a positive case
may fairly get a 400: such answers (and any negative case that was served) are kept as *notes* to read, not
counted as defects.  gRPC messages are drawn by hypothesis over every field of
``helios.v1.GenerateRequest`` (out-of-range numbers, NaN/inf, empty and huge strings, odd roles, many metadata
pairs) plus raw bytes that are not a protobuf at all.

What counts as a defect, per answer: HTTP 5xx, a 4xx without ``{"error": {"message": ...}}``, a 2xx whose body
is not a completion (or a stream that does not end in ``[DONE]`` or carries an error event), gRPC INTERNAL /
UNKNOWN / UNAVAILABLE or a status without a message, and no answer within the timeout (a hang).  After the run the
server must still answer ``/health`` and a real completion, with the same replica processes it started with (a
replica that died and was replaced is a defect too).

Cases are generated first (deterministic for a seed) and then sent from a thread pool, so the run is as fast as
the server, not as one client.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

#: gRPC codes that mean "the server broke", not "the request was bad".
GRPC_DEFECTS = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "UNIMPLEMENTED"}


# ------------------------------------------------------------------------------------------------ generate
def _cap(body: Any, cap: int | None) -> Any:
    """A generated body with its token counts capped (only for a bounded run on a shared server: see run_fuzz)."""
    if cap is not None and isinstance(body, dict):
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(k), int) and not isinstance(body[k], bool) and body[k] > cap:
                body[k] = cap
    return body


def http_cases(openapi: dict[str, Any], n: int, seed: int, operators: bool, cap: int | None = None,
               models: list[str] | None = None) -> list[Any]:
    """``n`` schemathesis cases spread over the API's operations, half positive and half negative.

    ``operators``: include the placement endpoints (they move the fleet when a case happens to name a real model;
    a run against a shared server leaves them out).  The dashboard's file route is fuzzed too (its path is a
    file name).  ``models``: the served model ids - three in four positive cases name one, since a random string
    only ever reaches the "unknown model" answer and never the generation path."""
    import random

    import hypothesis
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_dict(openapi)
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [op for op in ops if operators or "/placements" not in op.path]

    def draw(op: Any, mode: Any, k: int, op_seed: int) -> list[Any]:
        got: list[Any] = []
        rng = random.Random(op_seed)

        @hypothesis.settings(max_examples=k, deadline=None, database=None, phases=[hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.seed(op_seed)
        @hypothesis.given(op.as_strategy(generation_mode=mode))
        def collect(case: Any) -> None:
            case.body = _cap(case.body, cap)
            if (models and mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body
                    and rng.random() < 0.75):
                case.body["model"] = rng.choice(models)
            got.append((case, mode.value))

        try:
            collect()
        except Exception:  # noqa: BLE001 - a mode schemathesis cannot generate for this operation (no inputs)
            pass
        return got[:k]

    # Every operation gets a few cases (GETs have little to vary: hypothesis stops when it runs out of inputs);
    # the rest goes to the request bodies, where the input space is, in rounds until n are drawn.
    out: list[Any] = []
    for i, op in enumerate(ops):
        for j, mode in enumerate((GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
            out += draw(op, mode, 4, seed * 1000 + i * 2 + j)
    posts = [op for op in ops if op.method.upper() == "POST"]
    rnd = 1
    while len(out) < n and posts and rnd < 50:
        per = max(1, (n - len(out)) // (2 * len(posts)) + 1)
        for i, op in enumerate(posts):
            for j, mode in enumerate((GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
                out += draw(op, mode, per, seed * 1000 + rnd * 100 + i * 2 + j)
        rnd += 1
    return out[:n]


def grpc_messages(n: int, seed: int, cap: int | None = None) -> list[tuple[str, bytes]]:
    """``n`` (method, serialized request) pairs: GenerateRequest with every field drawn wide, and raw bytes."""
    import hypothesis
    from hypothesis import strategies as st

    from helios_proto import helios_pb2 as pb

    text = st.one_of(st.text(max_size=40), st.sampled_from(["helios", "smollm2-135m", "", " ", "\x00"]),
                     st.text(min_size=2000, max_size=4000))
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    messages = st.lists(st.builds(pb.ChatMessage, role=st.one_of(st.sampled_from(["user", "system", "assistant"]),
                                                                  st.text(max_size=8)), content=text), max_size=4)
    req = st.builds(
        pb.GenerateRequest, model=text, prompt=text, messages=messages,
        max_tokens=st.one_of(st.integers(-(2**31), 2**31 - 1 if cap is None else cap), st.integers(0, 24)),
        temperature=st.one_of(st.none(), floats), top_p=st.one_of(st.none(), floats),
        top_k=st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
        seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), stop=st.lists(text, max_size=5),
        ignore_eos=st.one_of(st.none(), st.booleans()),
        metadata=st.dictionaries(st.text(max_size=80), st.text(max_size=600), max_size=20))
    method = st.sampled_from(["Generate", "GenerateStream"])
    item = st.one_of(st.tuples(method, req.map(lambda m: m.SerializeToString())),
                     st.tuples(method, st.binary(max_size=64)))
    out: list[tuple[str, bytes]] = []

    @hypothesis.settings(max_examples=n, deadline=None, database=None, phases=[hypothesis.Phase.generate],
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.seed(seed)
    @hypothesis.given(item)
    def collect(x: tuple[str, bytes]) -> None:
        out.append(x)

    collect()
    return out[:n]


# ------------------------------------------------------------------------------------------------ send
def _http_verdict(case: Any, mode: str, base: str, headers: dict[str, str], timeout: float
                  ) -> tuple[str, str, str]:
    """(outcome, detail, note): outcome is ``2xx``, ``4xx`` or a defect name; detail describes a defect; note
    the exchange (kept for the notes)."""
    import requests

    where = f"{case.method} {case.formatted_path}"
    try:
        r = case.call(base_url=base, headers=headers, timeout=timeout)
    except requests.Timeout:
        return "hang", f"{where}: no answer in {timeout:g} s: {str(case.body)[:200]}", ""
    except requests.RequestException as e:
        return "connection", f"{where}: {type(e).__name__}: {e}"[:300], ""
    what = f"{where} ({mode}) -> {r.status_code}: {r.text[:200]!r} for {str(case.body)[:200]}"
    if r.status_code >= 500:
        return "5xx", what, what
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
            ok = isinstance(msg, str) and msg.strip()
        except Exception:  # noqa: BLE001
            ok = False
        # Serve's proxy answers an unknown path itself (404, text); everything this API routes speaks OpenAI.
        return ("4xx", "", what) if ok or r.status_code == 404 else ("bad_4xx_body", what, what)
    if "text/event-stream" in r.headers.get("content-type", ""):
        if not r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text:
            return "bad_stream", what, what
    elif case.method.upper() == "POST" and case.formatted_path.endswith("completions"):
        try:
            ok = isinstance(r.json()["choices"], list) and r.json()["usage"]["completion_tokens"] >= 0
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            return "bad_2xx_body", what, what
    return "2xx", "", what


def _grpc_verdict(channel: Any, method: str, payload: bytes, md: tuple, timeout: float) -> tuple[str, str]:
    import grpc

    path = f"/helios.v1.HeliosService/{method}"
    try:
        if method == "GenerateStream":
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            for _ in call(payload, metadata=md, timeout=timeout):
                pass
        else:
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                payload, metadata=md, timeout=timeout)
        return "OK", ""
    except grpc.RpcError as e:
        code = e.code().name
        what = f"{method} -> {code}: {e.details()!r} for {payload[:120]!r}"
        if code == "DEADLINE_EXCEEDED":
            return "hang", what
        if code in GRPC_DEFECTS or not (e.details() or "").strip():
            return f"grpc_{code}", what
        return code, ""


def _alive(base: str, headers: dict[str, str]) -> tuple[bool, list[tuple[str, int]]]:
    """Whether /health and one real completion answer, and the (replica, pid) pairs the status lists."""
    import httpx

    try:
        ok = httpx.get(f"{base}/health", timeout=30, trust_env=False).status_code == 200
        r = httpx.post(f"{base}/v1/completions", headers=headers, timeout=120, trust_env=False,
                       json={"model": "helios", "prompt": "Hello", "max_tokens": 2})
        ok = ok and r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        st = httpx.get(f"{base}/v1/helios/status", headers=headers, timeout=30, trust_env=False).json()
        return ok, sorted((x["replica"], x["pid"]) for x in st.get("replicas") or [])
    except Exception:  # noqa: BLE001 - a server that cannot answer is not alive
        return False, []


def run_fuzz(base: str, grpc_target: str | None, app: str, api_key: str | None, admin_key: str | None,
             http: int, grpc_n: int, seed: int = 0, workers: int = 8, timeout: float = 120.0,
             operators: bool = False, max_tokens_cap: int | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fuzz a running server; returns the counts, the defects (up to 20 of each kind) and the liveness checks.

    ``max_tokens_cap`` caps the token counts of generated requests: for the suite's bounded run on the shared test
    cluster, where one valid request for 8,000 tokens with ``ignore_eos`` would take minutes of a 2-core host.  The
    long run (``helios-ray bench fuzz``) leaves it off and serves with a short context instead, so every number
    reaches the server and the large ones are refused there."""
    import grpc
    import httpx

    user = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.time()
    alive_before, replicas_before = _alive(base, user)
    deadline = time.time() + 300
    while not replicas_before and time.time() < deadline:  # a server just started: its replicas report soon
        time.sleep(2)
        alive_before, replicas_before = _alive(base, user)
    openapi = httpx.get(f"{base}/openapi.json", timeout=30, trust_env=False).json()
    models = [m["id"] for m in httpx.get(f"{base}/v1/models", headers=user, timeout=30, trust_env=False).json()["data"]]
    cases = http_cases(openapi, http, seed, operators, max_tokens_cap, models)
    msgs = grpc_messages(grpc_n, seed, max_tokens_cap) if grpc_target and grpc_n else []
    log(f"fuzz: {len(cases)} HTTP cases and {len(msgs)} gRPC messages generated in {time.time() - t0:.0f} s; sending")

    def headers_for(case: Any) -> dict[str, str]:
        admin = "/placements" in case.path and admin_key
        return {"Authorization": f"Bearer {admin_key}"} if admin else user

    outcomes: Counter[str] = Counter()
    defects: dict[str, list[str]] = {}
    by_mode: Counter[str] = Counter()
    notes: dict[str, list[str]] = {"negative:2xx": [], "positive:4xx": []}  # not defects: what to look at

    def record(kind: str, detail: str) -> None:
        if detail:
            defects.setdefault(kind, [])
            if len(defects[kind]) < 20:
                defects[kind].append(detail)

    t1 = time.time()
    with ThreadPoolExecutor(workers) as pool:
        futs = [(mode, pool.submit(_http_verdict, c, mode, base, headers_for(c), timeout)) for c, mode in cases]
        for i, (mode, f) in enumerate(futs, 1):
            kind, detail, note = f.result()
            by_mode[f"{mode}:{kind}"] += 1
            outcomes[kind] += 1
            record(kind, detail)
            if (mode, kind) in (("negative", "2xx"), ("positive", "4xx")) and len(notes[f"{mode}:{kind}"]) < 10:
                notes[f"{mode}:{kind}"].append(note)
            if i % 500 == 0:
                log(f"fuzz: HTTP {i}/{len(futs)} ({time.time() - t1:.0f} s) {dict(outcomes)}")
    http_s = time.time() - t1
    grpc_out: Counter[str] = Counter()
    t2 = time.time()
    if msgs:
        md = (("application", app),) + ((("authorization", f"Bearer {api_key}"),) if api_key else ())
        with grpc.insecure_channel(grpc_target, options=[("grpc.max_receive_message_length", 64 * 2**20)]) as ch:
            with ThreadPoolExecutor(workers) as pool:
                futs2 = [pool.submit(_grpc_verdict, ch, m, p, md, timeout) for m, p in msgs]
                for i, f in enumerate(futs2, 1):
                    kind, detail = f.result()
                    grpc_out[kind] += 1
                    record(kind, detail)
                    if i % 500 == 0:
                        log(f"fuzz: gRPC {i}/{len(futs2)} ({time.time() - t2:.0f} s) {dict(grpc_out)}")
    alive_after, replicas_after = _alive(base, user)
    res = {
        "max_tokens_cap": max_tokens_cap,
        "http": {"requests": len(cases), "outcomes": dict(outcomes),
                 "by_mode": dict(by_mode), "seconds": round(http_s, 1)},
        "grpc": {"messages": len(msgs), "outcomes": dict(grpc_out), "seconds": round(time.time() - t2, 1)},
        "defects": defects, "notes": notes,
        "alive_before": alive_before, "alive_after": alive_after,
        "replicas_unchanged": replicas_before == replicas_after and bool(replicas_after),
        "replicas": {"before": replicas_before, "after": replicas_after},
        "seed": seed, "seconds": round(time.time() - t0, 1),
    }
    from helios_bench.harness import machine

    res["machine"] = machine()
    res["passed"] = bool(cases) and not res["defects"] and alive_after and res["replicas_unchanged"]
    return res


def format_report(res: dict[str, Any]) -> str:
    lines = [f"HTTP: {res['http']['requests']} requests in {res['http']['seconds']} s: {res['http']['outcomes']}",
             f"gRPC: {res['grpc']['messages']} messages in {res['grpc']['seconds']} s: {res['grpc']['outcomes']}",
             f"alive after: {res['alive_after']}; same replica processes: {res['replicas_unchanged']}"]
    for kind, items in res["defects"].items():
        lines.append(f"DEFECT {kind} ({len(items)} shown):")
        lines += [f"  {x}" for x in items[:5]]
    lines.append("PASSED" if res["passed"] else "FAILED")
    return "\n".join(lines) + "\n" + json.dumps({"seed": res["seed"], "seconds": res["seconds"]})


def fuzz_file(config: str, http: int, grpc_n: int, seed: int, workers: int, timeout: float, max_model_len: int,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """The long run: ``config``'s application on a private loopback cluster with fresh users' and admin keys,
    HTTP and gRPC, the operator endpoints included, the context capped at ``max_model_len`` tokens so that a
    valid request for millions of tokens is refused by the server rather than served for an hour."""
    import os
    import secrets

    import yaml

    from helios_bench.harness import LocalCluster, wait_ready

    raw = yaml.safe_load(open(config))
    servicers = (raw.get("grpc_options") or {}).get("grpc_servicer_functions") or []
    app_args = next(a for a in raw["applications"] if a.get("import_path") == "helios_ray.serve.app:build_app")["args"]
    keys = {"HELIOS_FUZZ_API_KEY": secrets.token_hex(16), "HELIOS_FUZZ_ADMIN_KEY": secrets.token_hex(16)}
    os.environ.update(keys)  # before Ray starts: the router inherits them
    args = {"api_key_env": "HELIOS_FUZZ_API_KEY", "admin_key_env": "HELIOS_FUZZ_ADMIN_KEY",
            "engine": {**(app_args.get("engine") or {}), "max_model_len": max_model_len}}
    t0 = time.time()
    with LocalCluster(grpc_servicers=servicers) as c:
        base = c.deploy_file(config, args)
        wait_ready(base, ready=lambda st: bool(st.get("replicas")), what="serve a replica",
                   api_key=keys["HELIOS_FUZZ_API_KEY"])
        log(f"fuzz: {config} ready in {time.time() - t0:.0f} s at {base} (gRPC {c.grpc_target})")
        res = run_fuzz(base, c.grpc_target, c.app, keys["HELIOS_FUZZ_API_KEY"], keys["HELIOS_FUZZ_ADMIN_KEY"],
                       http, grpc_n, seed, workers, timeout, operators=True, log=log)
    res.update(config=config, max_model_len=max_model_len)
    return res
