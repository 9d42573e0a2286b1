"""``helios-ray fleet show|set|unpin``: see and move the replica groups of a running server.

    helios-ray fleet show                                   # groups: model@depth, version, pin, replicas
    helios-ray fleet set gemma3-270m --depth 14             # move group "default" live and pin it there
    helios-ray fleet set smollm2-135m --no-pin              # move it; the policy may move it again
    helios-ray fleet unpin                                  # hand the group back to the policy

A thin client of ``POST /v1/helios/placements`` and ``GET /v1/helios/status`` (same URL, key and error rules as
``helios-ray status``); ``set`` and ``unpin`` send the operators' admin key (``--admin-key`` or
``$HELIOS_ADMIN_KEY``), which the placements endpoint requires whenever the server has one (docs/security.md).  An application without ``groups`` in its config has one group, ``default``; a fleet
(``deployments/helios-fleet.yaml``) names its groups, and ``show`` prints each with the router's share of the
requests it steered there.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from helios_ray.serve.status_cli import add_connection_options, call_api, fetch


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="fleet", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="the groups and their placements")
    move = sub.add_parser("set", help="move a group live to MODEL at --depth, pinned unless --no-pin")
    move.add_argument("model", help="a candidate model name")
    move.add_argument("--depth", type=int, default=None, help="layers to load (default: the full depth)")
    move.add_argument("--no-pin", action="store_true", help="let the policy move it again later")
    unpin = sub.add_parser("unpin", help="hand a group back to the policy")
    for q in (show, move, unpin):
        add_connection_options(q)
        q.add_argument("--group", default="default", help="the replica group (default: default)")
    for q in (move, unpin):
        q.add_argument("--admin-key", default=None,
                       help="the operators' key the placements endpoint takes (default: $HELIOS_ADMIN_KEY)")


def _groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    split = ((doc.get("routing") or {}).get("steering") or {}).get("split") or {}
    total = sum(sum(k.values()) for k in split.values()) or 0
    out = []
    for g in doc.get("groups") or []:
        p = g["placement"]
        routed = sum((split.get(g["name"]) or {}).values())
        out.append({"group": g["name"], "model": p["model"], "depth": p["depth"], "version": p["version"],
                    "pinned": bool(g.get("pinned")), "replicas": len(g.get("replicas") or []),
                    "routed": routed, "routed_share": round(routed / total, 3) if total else None,
                    "routed_by_kind": split.get(g["name"]) or {}})
    return out


def run(a: argparse.Namespace) -> int:
    import os

    key = a.api_key or os.environ.get("HELIOS_API_KEY") or None
    admin = (getattr(a, "admin_key", None) or os.environ.get("HELIOS_ADMIN_KEY") or None) if a.fleet != "show" else None
    if a.fleet == "set":
        out = call_api(a.url, "/v1/helios/placements", admin, a.timeout,
                       body={"group": a.group, "model": a.model, "depth": a.depth, "pin": not a.no_pin})
    elif a.fleet == "unpin":
        out = call_api(a.url, "/v1/helios/placements/unpin", admin, a.timeout, body={"group": a.group})
    else:
        out = {"groups": _groups(fetch(a.url, key, a.timeout))}
    if a.json:
        print(json.dumps(out, indent=2))
    elif "groups" in out:
        for g in out["groups"]:
            share = "" if g["routed_share"] is None else (
                f", {g['routed_share']:.0%} of steered requests: "
                + ", ".join(f"{k} {v}" for k, v in sorted(g["routed_by_kind"].items())))
            print(f"{g['group']}: {g['model']}@{g['depth']} (version {g['version']}, "
                  f"{'pinned' if g['pinned'] else 'policy'}, {g['replicas']} replica(s){share})")
    else:
        p = out["placement"]
        print(f"{out['group']}: {p['model']}@{p['depth']} (version {p['version']})")
    return 0
