"""Typed errors of the router. Each message says what to do about it.

The front doors map them to status codes: InvalidRequestError to HTTP 400 and
INVALID_ARGUMENT, ModelNotFoundError to 404 and NOT_FOUND, NoInstanceError and
NotReadyError to 503 and UNAVAILABLE, OverloadedError to 429 (with Retry-After) and
RESOURCE_EXHAUSTED, AuthenticationError to 401 and UNAUTHENTICATED, GenerationError
to 500 and INTERNAL.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base class of every error the router raises on purpose."""


class InvalidRequestError(RouterError, ValueError):
    """A request cannot be served as given. `param` names the offending field, if one does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(RouterError):
    """The request names a model this router does not serve."""


class UnknownRequestError(RouterError):
    """No request with that id is in flight on this router."""


class NoInstanceError(RouterError):
    """No healthy instance can take the request right now."""


class OverloadedError(RouterError):
    """The router's queue is full: retry after `retry_after_s` seconds (HTTP 429,
    RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(RouterError):
    """The router is starting or draining and takes no new requests (HTTP 503, UNAVAILABLE)."""


class AuthenticationError(RouterError):
    """No API key, or a wrong one (HTTP 401, UNAUTHENTICATED)."""


class GenerationError(RouterError):
    """The request failed on the workers (or on the way to them) after it was accepted."""


class RouterStartError(RouterError):
    """The router could not reach its workers, or they do not serve one model."""
