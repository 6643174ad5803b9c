"""Typed errors of the engine. Each message says what to do about it."""

from __future__ import annotations


class TandemError(Exception):
    """Base class of every error tandem raises on purpose."""


class ModelNotFoundError(TandemError):
    """The model path does not exist or holds no loadable weights."""


class UnsupportedModelError(TandemError):
    """The model exists but its architecture or format is not supported."""


class InvalidRequestError(TandemError, ValueError):
    """A request cannot be served as given (empty prompt, too long, bad token ids)."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range. `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid sampling parameter {field!r}: {reason}")
        self.field = field
        self.reason = reason


class KVImportError(TandemError):
    """Imported KV blocks do not match this engine or failed their checksum."""


class MigrationError(TandemError):
    """A request cannot be migrated now (it is not decoding here, or it changed)."""
