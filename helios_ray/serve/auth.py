"""Who may call what: the users' key, the operators' admin key, and the rule for a server reachable off this host.

One place decides it, for HTTP and gRPC alike (the router calls :meth:`Access.check` with the presented key and
the caller's address, and :func:`exposure_problem` before it serves anything):

* **Users' endpoints** (completions, chat, models, status) take the users' key (``api_key_env``) - or the admin
  key, since an operator may do whatever a user may.  Without a users' key configured, they answer callers on
  this host only, unless the config says ``allow_unauthenticated: true``.
* **Operators' endpoints** (``/v1/helios/placements`` and ``/unpin``: they move or pin the whole fleet) take only
  the admin key (``admin_key_env``); a users' key gets 403, so a leaked users' key cannot move the fleet.  With no
  admin key configured they answer only on a server with no keys at all and without ``allow_unauthenticated``,
  and only to callers on this host (a developer's laptop) - never off it, and never where the operator opened the
  server (a forwarder on the host would make remote callers look local).
* **Off the loopback without a key, refuse to start.**  An HTTP proxy bound to anything but a loopback address
  with no users' key is a public, free LLM (and, before the admin key, a public fleet controller); the router
  refuses to start unless ``allow_unauthenticated: true`` says the operator means it.  Serve's gRPC proxy always
  binds every interface (``[::]:port``, Ray 2.60, whatever ``http_options.host`` says), which is why the caller's
  address is checked on each request as well, not only the bind address at start.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import unquote

from helios_ray.serve.protocol import APIError

#: Hosts that name this machine only.  ``localhost`` resolves to loopback on every sane system.
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address, a name or a gRPC peer string such as ``ipv4:127.0.0.1:5000``) is this host."""
    if not host:
        return False
    h = unquote(host.strip())
    for prefix in ("ipv4:", "ipv6:", "unix:"):
        if h.startswith(prefix):
            if prefix == "unix:":
                return True  # a Unix socket is local by construction
            h = h[len(prefix):]
            if h.startswith("["):
                if "]" not in h:
                    return False  # unparseable: not local
                h = h[1:h.index("]")]
            else:
                h = h.rsplit(":", 1)[0]
            break
    h = h.strip("[]").split("%", 1)[0]
    if h.lower() in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _same(presented: str | None, key: str | None) -> bool:
    """Constant-time comparison of digests (comparing the keys themselves would leak the key's length)."""
    if presented is None or key is None:
        return False
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), hashlib.sha256(key.encode()).digest())


def _host_only(host: str) -> str:
    """``127.0.0.1:8000`` / ``[::1]:8000`` / ``localhost`` -> the host part of a Host header."""
    h = host.strip()
    if h.startswith("["):
        return h[1:h.index("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


@dataclass(frozen=True)
class Access:
    """The keys a router holds (read from its environment) and whether the operator allowed open access."""

    user_key: str | None = None
    admin_key: str | None = None
    allow_unauthenticated: bool = False

    @classmethod
    def from_env(cls, api_key_env: str | None, admin_key_env: str | None, allow_unauthenticated: bool,
                 env: dict[str, str] | None = None) -> "Access":
        env = os.environ if env is None else env
        # stripped: a Secret made with --from-file ends in a newline, which no client sends
        user = ((env.get(api_key_env) or "").strip() or None) if api_key_env else None
        admin = ((env.get(admin_key_env) or "").strip() or None) if admin_key_env else None
        return cls(user, admin, allow_unauthenticated)

    def summary(self) -> dict[str, object]:
        """What the status and the live page show: which keys are required (never the keys)."""
        return {"user_key_required": self.user_key is not None, "admin_key_configured": self.admin_key is not None,
                "allow_unauthenticated": self.allow_unauthenticated,
                "open_to_other_hosts": self.user_key is None and self.allow_unauthenticated}

    def check(self, presented: str | None, peer: str | None, admin: bool = False, host: str | None = None,
              origin: str | None = None) -> None:
        """Raise the 401/403 :class:`APIError` a caller with this key at this address gets, or return.

        ``host`` / ``origin``: the HTTP request's Host and Origin headers.  Where access is granted only because
        the caller is on this host (no key configured), a browser on this host must not be a way in: a page from
        elsewhere can POST to 127.0.0.1 (its Origin is then not a loopback one), and a DNS-rebinding page reaches
        it under its own name (the Host header is then not a loopback one)."""
        if _same(presented, self.admin_key):
            return
        local = is_loopback(peer) and (host is None or is_loopback(_host_only(host))) and (
            origin is None or _loopback_origin(origin))
        if admin:
            if self.admin_key is not None:
                if _same(presented, self.user_key):
                    raise APIError(403, "this is an operator endpoint: it takes the admin key, not a user API key",
                                   "permission_error", code="admin_key_required")
                raise APIError(401, "invalid or missing admin key", "invalid_request_error",
                               code="invalid_admin_key")
            if self.user_key is not None or self.allow_unauthenticated:
                raise APIError(403, "operator endpoints are disabled: the server has no admin key configured "
                                    "(set the environment variable named by admin_key_env, HELIOS_ADMIN_KEY by "
                                    "default)", "permission_error", code="admin_key_not_configured")
            if not local:
                raise APIError(403, "operator endpoints without an admin key answer only on this host: configure "
                                    "an admin key (HELIOS_ADMIN_KEY) to call them from elsewhere",
                               "permission_error", code="admin_key_not_configured")
            return
        if self.user_key is not None:
            if not _same(presented, self.user_key):
                raise APIError(401, "invalid or missing API key", "invalid_request_error", code="invalid_api_key")
            return
        if not local and not self.allow_unauthenticated:
            raise APIError(403, "this server has no API key configured and answers only on its own host: set one "
                                "(HELIOS_API_KEY) or `allow_unauthenticated: true` in its config",
                           "permission_error", code="unauthenticated_remote")


def _loopback_origin(origin: str) -> bool:
    """An Origin header (``http://127.0.0.1:8000``) naming this host; ``null`` and anything else do not."""
    from urllib.parse import urlsplit

    try:
        return is_loopback(urlsplit(origin).hostname)
    except ValueError:
        return False


def exposure_problem(http_host: str | None, access: Access) -> str | None:
    """Why a server must not start as configured (one line), or None.

    Refused: an HTTP proxy bound off the loopback with no users' key (unless ``allow_unauthenticated``), and an
    admin key equal to the users' key (it would make every user an operator)."""
    if access.admin_key is not None and access.admin_key == access.user_key:
        return "the admin key equals the users' API key: give operators their own key (HELIOS_ADMIN_KEY)"
    if http_host is not None and not is_loopback(http_host) and access.user_key is None \
            and not access.allow_unauthenticated:
        return (f"refusing to serve on {http_host} without an API key: set one (the env var named by api_key_env, "
                f"HELIOS_API_KEY by default), bind 127.0.0.1, or set `allow_unauthenticated: true` in the "
                f"application's args")
    return None
