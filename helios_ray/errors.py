"""Errors a user can act on.

Everything raised as a :class:`HeliosError` is the user's input or environment being wrong (unknown model,
depth out of range, missing package).  The CLI prints these as one line and exits non-zero, the HTTP layer
maps them to 4xx bodies; any other exception is a bug and keeps its traceback.
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
