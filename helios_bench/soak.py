"""``helios-ray bench soak``: a deployment file at saturation for N minutes, with faults on a schedule.

What an SRE asks before putting a server on call: does it lose requests when replicas die and placements move,
does its latency drift, does any process grow?  The run:

* serves ``config`` (default ``deployments/helios-fleet.yaml``) on a private loopback cluster as ``serve run``
  would, with fresh users' and admin keys;
* keeps ``clients`` closed-loop clients busy with streamed ShareGPT chats and HumanEval completions (half each,
  ``max_tokens`` each) - more clients than the replicas run at once, so the server is never idle;
* every ``kill_every_s`` SIGKILLs one replica process (round robin over the groups; these are processes this run
  started) and every ``place_every_s`` moves one group live through the admin endpoint (round robin, between
  its starting placement and two layers less);
* samples, every ``sample_every_s``, the RSS of every replica, the router and the brain.

The report: requests completed / failed / resumed (the router's count of streams it moved to a live replica),
p50/p99 latency per minute, every fault with its time, RSS per process over time and its drift after warm-up
(per process: the last sample against the first sample after ``warmup_s`` of that process's life), and a picture.
A failed request is any answer that is not a complete stream: an HTTP error, an error event, a cut connection.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from helios_bench.harness import LocalCluster, pct, status, wait_ready


def groups_of(st: dict[str, Any]) -> list[dict[str, Any]]:
    """The status's replica groups; an application without ``groups`` has one, ``default``."""
    return st.get("groups") or [{"name": "default", "placement": st["placement"]}]


def _workload(seed: int, max_tokens: int) -> list[Any]:
    from helios_bench.fleet_workload import mixed_requests

    return mixed_requests(300, seed, chat_share_first=0.5, chat_share_second=0.5, max_prompt_tokens=256,
                          chat_output_cap=max_tokens, code_max_tokens=max_tokens)


def _send(client: Any, base: str, headers: dict[str, str], req: Any, max_tokens: int) -> tuple[bool, str, int]:
    """One streamed request: (complete, why not, tokens)."""
    chat = req.is_chat
    body: dict[str, Any] = {"model": "helios", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update({"messages": req.messages} if chat else {"prompt": req.prompt})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    tokens, done = 0, False
    try:
        with client.stream("POST", base + path, json=body, headers=headers, timeout=300) as r:
            if r.status_code != 200:
                return False, f"HTTP {r.status_code}: {r.read()[:200]!r}", 0
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    return False, f"error event: {obj['error'].get('message', '')[:200]}", tokens
                tokens += "helios" in obj  # a token chunk carries its exit info; role and finish chunks do not
    except Exception as e:  # noqa: BLE001 - a cut connection is a failed request
        return False, f"{type(e).__name__}: {e}"[:200], tokens
    return (True, "", tokens) if done else (False, "stream ended without [DONE]", tokens)


def _rss(pid: int) -> int | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:  # noqa: BLE001 - a process that just died
        return None


def _sample(st: dict[str, Any], t: float) -> dict[str, Any]:
    """RSS of the router, the brain and every replica (with the placement it reports) from one status."""
    procs = [("router", (st.get("router") or {}).get("pid"), "-"), ("brain", (st.get("brain") or {}).get("pid"), "-")]
    procs += [(f"replica:{r.get('group', 'default')}", r["pid"], f"{r.get('model')}@{r.get('depth')}")
              for r in st.get("replicas") or []]
    return {"t": t, "rss": [{"proc": n, "pid": p, "rss": _rss(p), "at": at} for n, p, at in procs if p],
            "resumed": (st.get("routing") or {}).get("resumed_streams", 0),
            "placements": {g["name"]: f"{g['placement']['model']}@{g['placement']['depth']}" for g in groups_of(st)}}


class _Faults:
    """The schedule: kills and placement changes, round robin over the groups, each logged with its time."""

    def __init__(self, base: str, user: dict[str, str], admin: dict[str, str], kill_every_s: float,
                 place_every_s: float, t0: float, log: Callable[[str], None]):
        self.base, self.user, self.admin, self.t0, self.log = base, user, admin, t0, log
        self.kill_every_s, self.place_every_s = kill_every_s, place_every_s
        st = status(base, user["Authorization"][7:])
        self.groups = [(g["name"], g["placement"]["model"], g["placement"]["depth"]) for g in groups_of(st)]
        self.events: list[dict[str, Any]] = []
        self.kills = self.places = 0
        self.moved: dict[str, bool] = {}

    def due(self, now: float) -> None:
        t = now - self.t0
        for kind, every, act in (("kill", self.kill_every_s, self._kill), ("placement", self.place_every_s, self._place)):
            done = self.kills if kind == "kill" else self.places
            if every and t >= (done + 1) * every:
                if kind == "kill":
                    self.kills += 1
                else:
                    self.places += 1
                try:
                    act(t)
                except Exception as e:  # noqa: BLE001 - a busy server's timeout must not end the run
                    self.events.append({"t": round(t, 1), "kind": kind, "skipped": f"{type(e).__name__}: {e}"[:200]})
                    self.log(f"soak {t / 60:5.1f} min: {kind} skipped ({type(e).__name__})")

    def _kill(self, t: float) -> None:
        name = self.groups[(self.kills - 1) % len(self.groups)][0]
        st = status(self.base, self.user["Authorization"][7:])
        reps = [r for r in st.get("replicas") or [] if r.get("group", "default") == name]
        if not reps:
            self.events.append({"t": round(t, 1), "kind": "kill", "group": name, "skipped": "no live replica"})
            return
        pid = reps[0]["pid"]
        try:
            os.kill(pid, signal.SIGKILL)  # a replica process of this run's own cluster
        except ProcessLookupError:  # it had just died (a stale report): nothing to kill this time
            self.events.append({"t": round(t, 1), "kind": "kill", "group": name, "skipped": f"pid {pid} gone"})
            return
        self.events.append({"t": round(t, 1), "kind": "kill", "group": name, "pid": pid})
        self.log(f"soak {t / 60:5.1f} min: SIGKILL replica pid {pid} of group {name}")

    def _place(self, t: float) -> None:
        import httpx

        name, model, depth = self.groups[(self.places - 1) % len(self.groups)]
        back = self.moved.get(name, False)
        target = depth if back else max(1, depth - 2)
        r = httpx.post(f"{self.base}/v1/helios/placements", headers=self.admin, timeout=60, trust_env=False,
                       json={"group": name, "model": model, "depth": target, "pin": False})
        self.moved[name] = not back
        ev = {"t": round(t, 1), "kind": "placement", "group": name, "model": model, "depth": target,
              "status": r.status_code}
        if r.status_code != 200:
            ev["error"] = r.text[:200]
        self.events.append(ev)
        self.log(f"soak {t / 60:5.1f} min: group {name} -> {model}@{target} (HTTP {r.status_code})")


def run_soak(config: str, minutes: float, clients: int, kill_every_s: float, place_every_s: float,
             max_tokens: int = 64, warmup_s: float = 120.0, sample_every_s: float = 10.0, seed: int = 0,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    import httpx

    keys = {"HELIOS_SOAK_API_KEY": secrets.token_hex(16), "HELIOS_SOAK_ADMIN_KEY": secrets.token_hex(16)}
    os.environ.update(keys)  # before Ray starts: the router inherits them
    user = {"Authorization": f"Bearer {keys['HELIOS_SOAK_API_KEY']}"}
    admin = {"Authorization": f"Bearer {keys['HELIOS_SOAK_ADMIN_KEY']}"}
    reqs = _workload(seed, max_tokens)
    records: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    with LocalCluster() as c:
        base = c.deploy_file(config, {"api_key_env": "HELIOS_SOAK_API_KEY", "admin_key_env": "HELIOS_SOAK_ADMIN_KEY"})
        wait_ready(base, ready=lambda s: all(any(r.get("group", "default") == g["name"] for r in s.get("replicas") or [])
                                             for g in groups_of(s)),
                   what="serve every group", api_key=keys["HELIOS_SOAK_API_KEY"])
        t0 = time.time()
        end = t0 + minutes * 60
        faults = _Faults(base, user, admin, kill_every_s, place_every_s, t0, log)
        lock = threading.Lock()
        counter = iter(range(10**9))

        def client_loop(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            with httpx.Client(trust_env=False) as http:
                while time.time() < end:
                    req = reqs[rng.randrange(len(reqs))]
                    s = time.time()
                    ok, why, toks = _send(http, base, user, req, max_tokens)
                    with lock:
                        records.append({"id": next(counter), "t": round(s - t0, 2), "latency_s": round(time.time() - s, 3),
                                        "ok": ok, "why": why, "tokens": toks, "kind": req.kind})

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
        for th in threads:
            th.start()
        next_sample, next_note = t0, t0 + 60
        while time.time() < end:
            now = time.time()
            faults.due(now)
            if now >= next_sample:
                next_sample += sample_every_s
                try:
                    samples.append(_sample(status(base, keys["HELIOS_SOAK_API_KEY"]), round(now - t0, 1)))
                except Exception:  # noqa: BLE001 - the router busy or restarting: the next sample will do
                    pass
            if now >= next_note:
                next_note += 60
                with lock:
                    done = len(records)
                    bad = sum(1 for r in records if not r["ok"])
                log(f"soak {(now - t0) / 60:5.1f} min: {done} requests, {bad} failed")
            time.sleep(0.5)
        for th in threads:
            th.join(timeout=320)
        try:
            final = status(base, keys["HELIOS_SOAK_API_KEY"])
        except Exception:  # noqa: BLE001 - keep the run's records: the last sample's count stands in
            final = {"routing": {"resumed_streams": samples[-1]["resumed"] if samples else 0}}
    return summarize(records, samples, faults.events, final, config=config, minutes=minutes, clients=clients,
                     warmup_s=warmup_s, max_tokens=max_tokens)


def rss_drift(samples: list[dict[str, Any]], warmup_s: float) -> list[dict[str, Any]]:
    """Per process and placement: RSS at the process's first sample ``warmup_s`` or more into its life, against
    its last sample *at that placement*, and the drift between them.  Per placement because a replica moved to
    another depth holds other weights - a change of size, not a leak; a leak shows as growth at one placement
    (a group moved away and back compares like with like).  The first sample after a move is skipped: it can land
    between freeing the old KV pool and filling the new one.  Rows too short to judge carry no drift."""
    by_key: dict[tuple[int, str], list[tuple[float, int, str]]] = {}
    born: dict[int, float] = {}
    last_at: dict[int, str] = {}
    for s in samples:
        for p in s["rss"]:
            if p["rss"]:
                born.setdefault(p["pid"], s["t"])
                at = p.get("at", "-")
                settled = last_at.get(p["pid"], at) == at  # the first sample after a move is mid-reload
                last_at[p["pid"]] = at
                if settled:
                    by_key.setdefault((p["pid"], at), []).append((s["t"], p["rss"], p["proc"]))
    out = []
    for (pid, at), xs in by_key.items():
        after = [x for x in xs if x[0] >= born[pid] + warmup_s]
        row: dict[str, Any] = {"proc": xs[0][2], "pid": pid, "at": at, "from_t": xs[0][0], "to_t": xs[-1][0],
                               "samples": len(xs)}
        if len(after) >= 2:
            a, b = after[0][1], after[-1][1]
            row.update(rss_after_warmup_mb=round(a / 2**20, 1), rss_last_mb=round(b / 2**20, 1),
                       drift=round(b / a - 1, 4), span_s=round(after[-1][0] - after[0][0], 1))
        out.append(row)
    return out


def summarize(records: list[dict[str, Any]], samples: list[dict[str, Any]], events: list[dict[str, Any]],
              final: dict[str, Any], **run: Any) -> dict[str, Any]:
    per_min: list[dict[str, Any]] = []
    for m in range(int(run["minutes"] + 0.999)):
        rs = [r for r in records if m * 60 <= r["t"] < (m + 1) * 60]
        lat = [r["latency_s"] for r in rs if r["ok"]]
        per_min.append({"minute": m, "completed": sum(r["ok"] for r in rs), "failed": sum(not r["ok"] for r in rs),
                        "tokens": sum(r["tokens"] for r in rs if r["ok"]),
                        "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99)})
    drift = rss_drift(samples, run["warmup_s"])
    measured = [d for d in drift if "drift" in d]
    failures = [r for r in records if not r["ok"]]
    return {
        **run,
        "requests": len(records), "completed": len(records) - len(failures), "failed": len(failures),
        "failures": [{"t": r["t"], "why": r["why"]} for r in failures[:50]],
        "resumed": (final.get("routing") or {}).get("resumed_streams", 0),
        "events": events, "per_minute": per_min, "rss": drift,
        "max_abs_rss_drift": max((abs(d["drift"]) for d in measured), default=None),
        "samples": samples, "machine": _machine(),
    }


def _machine() -> dict[str, Any]:
    from helios_bench.harness import machine

    return machine()


def plot(res: dict[str, Any], path: str | Path) -> Path:
    """Three panels over the run's minutes: completed/failed requests, latency p50/p99, RSS per process; faults as
    vertical lines (red: replica killed, blue: placement change)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    pm = res["per_minute"]
    xs = [m["minute"] + 0.5 for m in pm]
    ax[0].bar(xs, [m["completed"] for m in pm], width=0.8, label="completed", color="#5f9ed3")
    ax[0].bar(xs, [m["failed"] for m in pm], width=0.8, bottom=[m["completed"] for m in pm], label="failed",
              color="#d9534f")
    ax[0].set_ylabel("requests / min")
    ax[0].legend(loc="lower right")
    ax[1].plot(xs, [m["latency_p50_s"] for m in pm], label="p50", marker=".")
    ax[1].plot(xs, [m["latency_p99_s"] for m in pm], label="p99", marker=".")
    ax[1].set_ylabel("request latency (s)")
    ax[1].legend(loc="upper right")
    by_pid: dict[int, tuple[str, list[float], list[float]]] = {}
    for s in res["samples"]:
        for p in s["rss"]:
            if p["rss"]:
                e = by_pid.setdefault(p["pid"], (p["proc"], [], []))
                e[1].append(s["t"] / 60)
                e[2].append(p["rss"] / 2**20)
    for pid, (name, t, r) in by_pid.items():
        ax[2].plot(t, r, label=f"{name} ({pid})", linewidth=1)
    ax[2].set_ylabel("RSS (MiB)")
    ax[2].set_xlabel("minutes")
    ax[2].legend(fontsize=6, ncol=3, loc="upper left")
    for a in ax:
        for ev in res["events"]:
            a.axvline(ev["t"] / 60, color="#d9534f" if ev["kind"] == "kill" else "#337ab7", alpha=0.35, linewidth=1)
    fig.suptitle(f"soak: {res['config']}, {res['clients']} clients, {res['minutes']:g} min - {res['completed']} "
                 f"completed, {res['failed']} failed, {res['resumed']} resumed")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(res: dict[str, Any]) -> str:
    lines = [f"soak {res['config']}: {res['minutes']:g} min, {res['clients']} clients on "
             f"{res['machine'].get('cpu_model') or res['machine']}",
             f"requests {res['requests']}: completed {res['completed']}, failed {res['failed']}, "
             f"resumed {res['resumed']}",
             f"faults: {sum(e['kind'] == 'kill' for e in res['events'])} replica kills, "
             f"{sum(e['kind'] == 'placement' for e in res['events'])} placement changes",
             "minute  done  failed  p50 s  p99 s"]
    for m in res["per_minute"]:
        lines.append(f"{m['minute']:>6} {m['completed']:>5} {m['failed']:>7} {m['latency_p50_s'] or 0:>6.2f} "
                     f"{m['latency_p99_s'] or 0:>6.2f}")
    lines.append("RSS after warm-up -> last, per process and placement (those that lived past their warm-up):")
    for d in res["rss"]:
        if "drift" in d:
            lines.append(f"  {d['proc']:<18} pid {d['pid']:<8} {d['at']:<24} {d['rss_after_warmup_mb']:>8.1f} -> "
                         f"{d['rss_last_mb']:>8.1f} MiB ({d['drift']:+.1%} over {d['span_s'] / 60:.1f} min)")
    for f in res["failures"][:10]:
        lines.append(f"  failed at {f['t']:.0f} s: {f['why']}")
    if res.get("plot"):
        lines.append(f"picture: {res['plot']}")
    return "\n".join(lines)
