"""Typed errors of the router. Each message says what to do about it.

The front doors map them to status codes: InvalidRequestError to HTTP 400 and
INVALID_ARGUMENT, ModelNotFoundError to 404 and NOT_FOUND, NoInstanceError to 503
and UNAVAILABLE, GenerationError to 500 and INTERNAL.
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


class NoInstanceError(RouterError):
    """No healthy instance can take the request right now."""


class GenerationError(RouterError):
    """The request failed on the workers (or on the way to them) after it was accepted."""


class RouterStartError(RouterError):
    """The router could not reach its workers, or they do not serve one model."""
