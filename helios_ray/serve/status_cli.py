"""``helios-ray status``: the live page's picture in a terminal, from ``GET /v1/helios/status``.

    helios-ray status                          # http://127.0.0.1:8000, key from $HELIOS_API_KEY when set
    helios-ray status --url http://host:8000 --watch 5
    helios-ray status --json | jq .placement   # the status document, for scripts

An unreachable server, a 401 or any other failure is one line on stderr and exit code 2.  ``--watch`` redraws
every N seconds (default 2) until Ctrl-C; a server that goes away meanwhile is shown and retried.  No Ray import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from helios_ray.errors import HeliosError

DEFAULT_URL = "http://127.0.0.1:8000"


def add_connection_options(p: argparse.ArgumentParser) -> None:
    """Where the server is and how to talk to it: shared by ``status`` and ``fleet``."""
    p.add_argument("--url", default=os.environ.get("HELIOS_URL", DEFAULT_URL),
                   help=f"the Serve HTTP address (with any route prefix); default $HELIOS_URL or {DEFAULT_URL}")
    p.add_argument("--json", action="store_true", help="print the server's JSON answer instead of a table")
    p.add_argument("--api-key", default=None, help="API key (default: $HELIOS_API_KEY)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_connection_options(p)
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until Ctrl-C")


# ------------------------------------------------------------------------------------------------ fetching
def call_api(url: str, path: str, api_key: str | None, timeout: float = 10.0, body: dict[str, Any] | None = None,
             client: Any = None) -> dict[str, Any]:
    """GET ``path`` (POST ``body`` when given) on a helios-ray server: its JSON answer, or HeliosError with a
    one-line reason (unreachable, 401, an error body's message, not JSON)."""
    import httpx

    target = url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    http = client or httpx
    try:
        r = (http.post(target, headers=headers, json=body, timeout=timeout) if body is not None
             else http.get(target, headers=headers, timeout=timeout))
    except httpx.TimeoutException:
        raise HeliosError(f"{target}: no answer within {timeout:g} s") from None
    except httpx.HTTPError as e:
        raise HeliosError(f"cannot reach {target}: {e or type(e).__name__} (is the server running? --url)") from None
    if r.status_code == 401 and "admin" not in r.text:
        how = "the API key was rejected" if api_key else "the server requires an API key"
        raise HeliosError(f"{target}: 401 unauthorized: {how} (--api-key or $HELIOS_API_KEY)")
    try:
        doc = r.json()
    except ValueError:
        if r.status_code != 200:
            raise HeliosError(f"{target}: HTTP {r.status_code}: {r.text[:200].strip()}") from None
        raise HeliosError(f"{target}: the answer is not JSON (is this a helios-ray server?)") from None
    if r.status_code != 200:
        msg = doc.get("error", {}).get("message") if isinstance(doc, dict) else None
        raise HeliosError(f"{target}: HTTP {r.status_code}: {msg or r.text[:200].strip()}")
    return doc


def fetch(url: str, api_key: str | None, timeout: float = 10.0, client: Any = None) -> dict[str, Any]:
    """The status document, or HeliosError with a one-line reason."""
    doc = call_api(url, "/v1/helios/status", api_key, timeout, client=client)
    if not isinstance(doc, dict) or "placement" not in doc:
        raise HeliosError(f"{url.rstrip('/')}/v1/helios/status: not a helios-ray status document (no placement)")
    return doc


# ------------------------------------------------------------------------------------------------ rendering
def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    s = max(0, round(now - t))
    return f"{s} s ago" if s < 90 else f"{round(s / 60)} min ago" if s < 5400 else f"{round(s / 3600)} h ago"


def _where(p: dict[str, Any] | None) -> str:
    return f"{p.get('model')}@{p.get('depth')}" if p else "-"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def render(doc: dict[str, Any], url: str = "", now: float | None = None, decisions: int = 8) -> str:
    """The status document as text: placement/groups, replicas, breach counter, throughput, exits, decisions."""
    tl = doc.get("timeline") or {}
    now = now if now is not None else tl.get("now") or time.time()
    p = doc.get("placement") or {}
    reps = doc.get("replicas") or []
    out = ["helios-ray" + (f" {url}" if url else "") + f"  mode {doc.get('mode', '-')}  SLO {doc.get('slo', '-')}  "
           f"requests {doc.get('requests', 0):,}  tokens observed {doc.get('tokens_observed', 0):,}", ""]
    if (doc.get("access") or {}).get("open_to_other_hosts"):
        out[-1:] = ["WARNING: no API key and allow_unauthenticated: anyone who reaches this server may call it", ""]
    groups = doc.get("groups") or [{"name": "default", "placement": p, "pinned": doc.get("pinned")}]
    split = ((doc.get("routing") or {}).get("steering") or {}).get("split") or {}
    steered = sum(sum(k.values()) for k in split.values())
    out.append("PLACEMENT")
    rows = []
    for g in groups:
        gp = g.get("placement") or {}
        mine = [r for r in reps if r.get("group", "default") == g["name"]] if doc.get("groups") else reps
        on = [r for r in mine if r.get("model") == gp.get("model") and r.get("depth") == gp.get("depth")]
        total = next((r.get("total_layers") for r in mine if r.get("model") == gp.get("model")), None)
        kinds = split.get(g["name"]) or {}
        share = (f"{100 * sum(kinds.values()) / steered:.0f}% " + " ".join(f"{k}:{v}" for k, v in sorted(kinds.items()))
                 if steered else "-")
        changed = _ago(doc.get("changed_at"), now) if len(groups) == 1 else ("pinned" if g.get("pinned") else "policy")
        rows.append([g["name"], gp.get("model"), gp.get("depth"), total, gp.get("version"), f"{len(on)}/{len(mine)}",
                     changed, share])
    out += _table(["group", "model", "depth", "of", "version", "replicas", "changed" if len(groups) == 1 else "pin",
                   "steered"], rows)
    out += _quality(doc, groups, split)
    out += ["", "REPLICAS"]
    if reps:
        out += _table(["replica", "group", "pid", "model@depth", "version", "running", "waiting", "KV blocks", "KV %",
                       "tokens out", "breaches"],
                      [[str(r.get("replica", ""))[-14:], r.get("group", "default"), r.get("pid"), f"{r.get('model')}@{r.get('depth')}",
                        r.get("placement_version"), r.get("running"), r.get("waiting"),
                        f"{r.get('kv_blocks_used', 0)}/{r.get('kv_blocks_total', 0)}",
                        f"{100 * r.get('kv_blocks_used', 0) / max(1, r.get('kv_blocks_total') or 0):.0f}%",
                        f"{r.get('tokens_out', 0):,}", f"{r.get('breaches', 0):,}"] for r in reps])
    else:
        out.append("  (no replica has reported in the last 10 s)")
    b = (doc.get("controller") or {}).get("breaches") or {}
    if b:
        storm = "  STORM" if b.get("storm") else ""
        out += ["", f"BREACHES  {b.get('breaches', 0)} / {b.get('limit', '-')} in the last {b.get('tokens', 0)} "
                    f"of {b.get('window', '-')} tokens (confidence < {b.get('threshold', '-')}){storm}; "
                    f"all-time {b.get('total_breaches', 0):,} / {b.get('total_tokens', 0):,}"]
    series = [s for s in tl.get("series") or [] if s.get("requests") or s.get("tokens_per_s")]
    if tl.get("series"):
        done = tl["series"][:-1][-6:]  # the last bucket is still filling: the minute before it
        secs = len(done) * (tl.get("interval_s") or 10)
        tps = sum(s.get("tokens_per_s") or 0 for s in done) / max(1, len(done))
        last = next((s for s in reversed(tl["series"]) if s.get("ttft_p50") is not None), None)
        out += ["", f"THROUGHPUT  {tps:.1f} output tok/s over the last {secs:g} s"
                    + (f"; latest TTFT p50 {_ms(last.get('ttft_p50'))}, TPOT p50 {_ms(last.get('tpot_p50'))}"
                       if last else "") + ("" if series else " (idle)")]
    for model, hist in sorted((tl.get("exit_layers") or {}).items()):
        n = sum(hist.values())
        top = sorted(hist.items(), key=lambda kv: -kv[1])[:4]
        out.append(f"EXITS  {model}: {n:,} tokens; " + ", ".join(f"layer {k} {100 * v / n:.0f}%" for k, v in top))
    events = (tl.get("events") or [])[-decisions:]
    if not events:  # an older server without the timeline: the controller's decisions, unstamped
        events = [{"at": None, "action": d.get("action"), "trigger": d.get("trigger"), "reason": d.get("reason"),
                   "from": {"model": d.get("previous_model"), "depth": d.get("previous_depth")}
                   if d.get("previous_model") else None, "to": {"model": d.get("model"), "depth": d.get("depth")}}
                  for d in ((doc.get("controller") or {}).get("decisions") or [])[-decisions:]]
    out += ["", "LAST DECISIONS"]
    if events:
        out += _table(["when", "action", "trigger", "change", "reason"],
                      [[_ago(e.get("at"), now) if e.get("at") else "-", e.get("action"), e.get("trigger"),
                        f"{_where(e.get('from'))} -> {_where(e.get('to'))}" if e.get("from") else _where(e.get("to")),
                        (e.get("reason") or "")[:70]] for e in reversed(events)])
    else:
        out.append("  (none yet)")
    return "\n".join(out)


def _quality(doc: dict[str, Any], groups: list[dict[str, Any]], split: dict[str, dict[str, int]]) -> list[str]:
    """Per group and request class: the placement's measured quality against the floor, and where that class's
    requests went - which placement serves which class, and why."""
    q = doc.get("quality") or {}
    floors = q.get("floors") or {}
    below = ((doc.get("routing") or {}).get("steering") or {}).get("below_floor") or {}
    if not floors and not any(g.get("quality") for g in groups):
        return []
    head = ", ".join(f"{c} >= {f.get('value'):.3f} ({f.get('source')})" for c, f in sorted(floors.items()))
    out = ["", f"QUALITY  floors: {head or 'none'}" + (f"; chat judged by {q['reference']}" if q.get("reference")
                                                       else "")]
    rows = []
    for g in groups:
        gq = g.get("quality") or {}
        for cls, c in sorted((gq.get("classes") or {}).items()):
            value = "-" if c.get("value") is None else f"{c['value']:.3f}"
            floor = "-" if c.get("floor") is None else f"{c['floor']:.3f}"
            rows.append([g["name"], cls, value, floor, "yes" if c.get("meets") else "NO",
                         (split.get(g["name"]) or {}).get(cls, 0), f"{100 * (c.get('traffic_share') or 0):.0f}%"])
        if gq and not gq.get("chat_capable", True):
            rows.append([g["name"], "(chats)", "-", "-", "NO: not chat-capable", "-", "-"])
    if rows:
        out += _table(["group", "class", "quality", "floor", "meets", "requests", "traffic"], rows)
    if below:
        out.append("  below floor (no placement met it; served by the best quality): "
                   + ", ".join(f"{k} {v}" for k, v in sorted(below.items())))
    return out


# ---------------------------------------------------------------------------------------------------- run
def run(a: argparse.Namespace) -> int:
    key = a.api_key if a.api_key is not None else (os.environ.get("HELIOS_API_KEY") or None)
    if a.watch is not None and a.watch <= 0:
        raise HeliosError(f"--watch must be > 0 seconds (got {a.watch:g})")
    doc = fetch(a.url, key, a.timeout)  # the first fetch decides: unreachable or 401 is exit 2
    if a.watch is None:
        print(json.dumps(doc, indent=2) if a.json else render(doc, a.url))
        return 0
    try:
        while True:
            text = json.dumps(doc, indent=2) if a.json else render(doc, a.url)
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"\x1b[H\x1b[2J{text}\n\nupdated {stamp}, every {a.watch:g} s; Ctrl-C to stop\n")
            sys.stdout.flush()
            time.sleep(a.watch)
            while True:
                try:
                    doc = fetch(a.url, key, a.timeout)
                    break
                except HeliosError as e:
                    if "401" in str(e):
                        raise
                    sys.stdout.write(f"\x1b[H\x1b[2J{e}\nretrying every {a.watch:g} s; Ctrl-C to stop\n")
                    sys.stdout.flush()
                    time.sleep(a.watch)
    except KeyboardInterrupt:
        print()
        return 0
