"""The fleet on a real local cluster: two replica groups at once (SmolLM2 and Gemma 3, each at full depth), and a
router that learns - from the outcomes of the requests it relays - which group serves which kind of request.

Nothing is told which group is for what: the groups differ only in their model.  On this machine SmolLM2 breaches
the 0.9 confidence threshold less on HumanEval code and Gemma less on ShareGPT chats (docs/serving.md, "The
fleet"), so once the predictor trusts its numbers most code goes one way and most chat the other; when the mix
shifts from chat-heavy to code-heavy, the share of the group that serves code follows.  A group moved through the
admin endpoint under load shows its new placement in the status and in the metrics."""

from __future__ import annotations

import json
import math
import re
import threading

import httpx
import pytest

from tests.serve.waits import wait_until

pytestmark = pytest.mark.slow

APP, PREFIX = "fleet", "/fleet"


@pytest.fixture(scope="module")
def fleet(cluster):
    from ray import serve

    from helios_ray.serve.app import build_app

    args = {
        "candidates": ["smollm2-135m", "gemma3-270m"], "api_key_env": "HELIOS_TEST_API_KEY",
        "profiler": False, "mirror_fraction": 0.0, "dtype": "float32",
        "groups": [{"name": "smol", "candidates": ["smollm2-135m"], "initial": {"model": "smollm2-135m"},
                    "max_replicas": 2},
                   {"name": "gemma", "candidates": ["gemma3-270m"], "initial": {"model": "gemma3-270m"},
                    "max_replicas": 2}],
        "fleet_slots": 3,  # one slot for the group that serves more
        "engine": {"memory_budget": "2GiB", "max_num_seqs": 8, "torch_threads": 1},  # Gemma's fp32 weights: 1.1 GB
        # The test's budget: trust a (placement, kind) after 3 requests instead of 8.
        "steering": {"min_observations": 3, "max_uncertainty": 0.9},
        "policy": {"reassess_every": 1000},  # one candidate per group at full depth: nothing for it to move
    }
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    base = f"{cluster['base']}{PREFIX}"

    def ready() -> bool:
        try:
            st = httpx.get(f"{base}/v1/helios/status", headers=cluster["headers"], timeout=10).json()
            return len(st.get("replicas") or []) == 2
        except Exception:
            return False

    wait_until(ready, 300, "both groups' replicas reporting")
    yield {**cluster, "base": base}
    serve.delete(APP)


def _prompts():
    from helios_data import load_humaneval, load_sharegpt

    chats = [c.prompt_messages for c in load_sharegpt(limit=40, seed=1, split="heldout", min_len=8, max_len=400)]
    code = [c.prompt for c in load_humaneval(limit=40)]
    return chats, code


def _send(c, kind: str, payload) -> str:
    """One request; returns the group that served it (from the response's ``helios`` block)."""
    if kind == "chat":
        r = httpx.post(f"{c['base']}/v1/chat/completions", headers=c["headers"], timeout=180,
                       json={"model": "helios", "messages": payload, "max_tokens": 6, "ignore_eos": True})
    else:
        r = httpx.post(f"{c['base']}/v1/completions", headers=c["headers"], timeout=180,
                       json={"model": "helios", "prompt": payload, "max_tokens": 6, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["helios"]["group"]


def _run(c, plan: list[tuple[str, object]], workers: int = 2) -> list[tuple[str, str]]:
    """Send ``plan`` (kind, payload) with ``workers`` concurrent clients; (kind, group) per request, in order."""
    out: list[tuple[str, str] | None] = [None] * len(plan)
    errors: list[str] = []
    nxt = iter(range(len(plan)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            kind, payload = plan[i]
            try:
                out[i] = (kind, _send(c, kind, payload))
            except Exception as e:  # noqa: BLE001 - a failed request fails the test below
                errors.append(f"{kind}: {e!r}")

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return [o for o in out if o is not None]


def _mix(chats, code, n_chat: int, n_code: int) -> list[tuple[str, object]]:
    """``n_chat`` chats and ``n_code`` code prompts, spread evenly through the sequence (mixed, not in blocks)."""
    plan = [((i + 0.5) / n_chat, "chat", chats.pop()) for i in range(n_chat)]
    plan += [((i + 0.5) / n_code, "code", code.pop()) for i in range(n_code)]
    return [(kind, payload) for _, kind, payload in sorted(plan, key=lambda p: (p[0], p[1]))]


def test_steering_learns_what_each_group_delivers_and_follows_it(fleet):
    chats, code = _prompts()
    _run(fleet, _mix(chats, code, 8, 8))  # learning: every (group, kind) explored
    steady = _run(fleet, _mix(chats, code, 8, 8))
    st = httpx.get(f"{fleet['base']}/v1/helios/status", headers=fleet["headers"], timeout=30).json()
    assert {g["name"] for g in st["groups"]} == {"smol", "gemma"}
    steering = st["routing"]["steering"]
    diag = json.dumps(steering)[:4000]
    assert steering["routes"]["predicted"] >= 8, diag  # the predictor became trusted and decides
    keys = {g["name"]: f"{g['placement']['model']}@{g['placement']['depth']}" for g in st["groups"]}
    placements = steering["placements"]
    # Learned: every (group, kind) was observed, with a value per kind the router measured.
    for key in keys.values():
        observed = placements[key]["observed"]
        assert {"chat", "code"} <= set(observed) and all(observed[k]["value"] >= 0 for k in ("chat", "code")), diag
    # Followed: each route decided by prediction went to the group predicted to deliver the most at that moment
    # (the values are logged per route; comparing with end-of-run observations instead was timing-dependent).
    by_prediction = [r for r in steering["recent"] if r["reason"] == "predicted"]
    assert len(by_prediction) >= 8, diag
    for r in by_prediction:
        assert set(r["values"]) <= set(keys) and r["values"][r["group"]] == max(r["values"].values()), (r, diag)
    # ... and the requests really went there: the last routes, in order, are the groups that answered the steady
    # phase (one client at a time finishes out of order, so compare the multisets per kind)
    for kind in ("chat", "code"):
        logged = sorted(r["group"] for r in steering["recent"][-len(steady):] if r["kind"] == kind)
        answered = sorted(g for k, g in steady if k == kind)
        assert logged == answered, (kind, logged, answered, diag)
    # Learned: what was predicted for a route is what that request then delivered, within a factor of 3 for the
    # median route (tokens/s on a shared 2-core host varies; an unlearned predictor is off by far more)
    ratios = sorted(abs(math.log(max(r["predicted"]["tokens_per_s"], 1e-6) / max(r["observed"]["tokens_per_s"], 1e-6)))
                    for r in by_prediction if r["predicted"] and r["observed"] and r["observed"]["tokens_per_s"] > 0)
    assert ratios and ratios[len(ratios) // 2] < math.log(3), (ratios, diag)
    errors = [p["mae"] for p in placements.values() if p["mae"]]
    assert errors and all(0.0 <= e["breach_rate"] <= 1.0 and e["samples"] > 0 for e in errors), diag
    split = steering["split"]
    for kind in ("chat", "code"):
        assert sum((split.get(g) or {}).get(kind, 0) for g in keys) >= 16, diag  # every request counted

    # The fleet plan gives the third slot to the group that served more tokens, and Serve starts its replica.
    sizes: dict[str, tuple[int, int]] = {}

    def resized() -> bool:
        doc = httpx.get(f"{fleet['base']}/v1/helios/status", headers=fleet["headers"], timeout=30).json()
        sizes.update({g["name"]: (g["replicas_planned"], len(g["replicas"])) for g in doc["groups"]})
        sizes["plan"] = doc["fleet_plan"]
        return sorted(v for k, v in sizes.items() if k != "plan") == [(1, 1), (2, 2)]

    wait_until(resized, 120, f"one group resized to 2 replicas: {sizes}")
    last = sizes["plan"]["last_resize"]
    grown = next(g for g in keys if last["to"][g] == 2)
    assert last["demand_share"][grown] == max(last["demand_share"].values()), last

    def exported() -> bool:  # trusted predictions were scored against what happened (Grafana's fleet row)
        text = httpx.get(fleet["metrics"], timeout=10).text
        return "ray_helios_route_prediction_error_count" in text and "ray_helios_routed_requests_total" in text

    wait_until(exported, 60, "the steering metrics exported")


def test_moving_a_group_under_load_shows_in_status_and_metrics(fleet):
    chats, code = _prompts()
    failures: list[str] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                _send(fleet, "code", code[0])
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))

    t = threading.Thread(target=load)
    t.start()
    try:
        r = httpx.post(f"{fleet['base']}/v1/helios/placements", headers=fleet["headers"], timeout=60,
                       json={"group": "gemma", "model": "gemma3-270m", "depth": 14})
        assert r.status_code == 200, r.text
        assert r.json()["placement"]["depth"] == 14

        def moved() -> bool:
            st = httpx.get(f"{fleet['base']}/v1/helios/status", headers=fleet["headers"], timeout=30).json()
            g = next(g for g in st["groups"] if g["name"] == "gemma")
            reps = [x for x in st["replicas"] if x["group"] == "gemma"]
            return g["placement"]["depth"] == 14 and g["pinned"] and reps and all(x["depth"] == 14 for x in reps)

        wait_until(moved, 120, "group gemma at depth 14 in the status")

        def metric() -> bool:
            text = httpx.get(fleet["metrics"], timeout=10).text
            return bool(re.search(r'helios_group_placement_depth\{[^}]*group="gemma"[^}]*model="gemma3-270m"[^}]*\} '
                                  r'14(\.0)?\b', text))

        wait_until(metric, 60, "helios_group_placement_depth for group gemma at 14")
        bad = httpx.post(f"{fleet['base']}/v1/helios/placements", headers=fleet["headers"], timeout=60,
                         json={"group": "gemma", "model": "smollm2-135m"})
        assert bad.status_code == 404 and "not a candidate of group 'gemma'" in bad.json()["error"]["message"]
    finally:
        done.set()
        t.join()
    assert not failures, failures
