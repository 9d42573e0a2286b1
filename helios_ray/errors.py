"""Errors a user can act on.

Everything raised as a :class:`HeliosError` is something a user can act on: their input or environment being wrong
(unknown model, depth out of range, missing package: 4xx) or a passing server state they can retry
(:class:`ServerBusyError`: 503 with Retry-After).  The CLI prints these as one line and exits non-zero, the HTTP
layer maps them to error bodies with their status; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class HeliosError(Exception):
    """Base class: a clear, user-facing message; no traceback needed."""

    #: HTTP status the serving layer uses for this error.
    http_status: int = 400


class UnknownModelError(HeliosError):
    http_status = 404


class ModelUnavailableError(HeliosError):
    """The model is registered but its files or package are not installed/prepared."""

    http_status = 503


class InvalidRequestError(HeliosError):
    http_status = 400


class UnsupportedModelError(HeliosError):
    http_status = 400


class ServerBusyError(HeliosError):
    """A server state, not the client's fault: the request may be retried after ``retry_after_s``."""

    http_status = 503

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDrainingError(ServerBusyError):
    """The engine stopped admitting for a model swap; the replica waits for the swap and tries again."""
