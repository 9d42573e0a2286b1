"""Errors and the loopback-only guard for targets.

This workplace forbids traffic to non-loopback addresses, so every client refuses a target whose host is not
a loopback literal (``127.0.0.0/8``, ``::1``) or ``localhost`` unless ``allow_remote=True``.  Host names other
than ``localhost`` are refused without resolving them (no DNS query leaves the machine).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class LoadgenError(ValueError):
    """A user-facing problem (bad argument, refused target, unreadable data): one line, no traceback."""


class RemoteTargetError(LoadgenError):
    """The target is not a loopback address and ``allow_remote`` was not given."""


def is_loopback_host(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h in _LOCAL_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def parse_http_url(url: str) -> tuple[str, str]:
    """``(base_url, host)`` of an ``http(s)://host[:port][/prefix]`` URL (the trailing slash dropped)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadgenError(f"invalid URL {url!r}: expected http://HOST:PORT")
    try:
        parts.port
    except ValueError:
        raise LoadgenError(f"invalid port in URL {url!r}") from None
    return url.strip().rstrip("/"), parts.hostname


def parse_grpc_target(target: str) -> tuple[str, str]:
    """``(target, host)`` of a gRPC ``host:port`` / ``[v6]:port`` / ``ipv4:host:port`` / ``unix:path`` target."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return t, "localhost"
    for prefix in ("ipv4:", "ipv6:", "dns:///"):
        if t.startswith(prefix):
            t = t[len(prefix):]
    if t.startswith("["):
        host, sep, port = t[1:].partition("]:")
    else:
        host, sep, port = t.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LoadgenError(f"invalid gRPC target {target!r}: expected HOST:PORT")
    return target.strip(), host


def check_target(host: str, what: str, allow_remote: bool) -> None:
    if not allow_remote and not is_loopback_host(host):
        raise RemoteTargetError(f"refusing non-loopback {what} {host!r}: only 127.0.0.1/::1/localhost are allowed "
                                "(pass --allow-remote / allow_remote=True to override)")
