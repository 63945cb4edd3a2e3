"""Typed errors of the LMI contract. Each carries the HTTP status the server answers with.

The route turns any ``LmiError`` into ``{"code": status, "type": kind, "message": ...}``; errors
are classified by type, never by matching strings in messages.
"""

from __future__ import annotations


class LmiError(Exception):
    """Base of every error a client can see. ``status`` is the HTTP status code."""

    status: int = 500
    kind: str = "InternalServerError"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": self.message}


class BadRequestError(LmiError):
    """Malformed body, missing or ill-typed field, value out of range, prompt too long."""

    status = 400
    kind = "BadRequest"


class PayloadTooLargeError(LmiError):
    """Request body larger than the configured limit."""

    status = 413
    kind = "PayloadTooLarge"


class ServiceUnavailableError(LmiError):
    """Queue full, model not loaded yet, engine dead or shutting down."""

    status = 503
    kind = "ServiceUnavailable"


class ModelError(LmiError):
    """Failure inside the model while serving this one request."""

    status = 424
    kind = "ModelError"


class DeviceOutOfMemoryError(LmiError):
    """The device ran out of memory while serving this request."""

    status = 507
    kind = "OutOfMemory"


class InternalError(LmiError):
    """A server bug met while serving this one request; the other requests carry on."""

    status = 500
    kind = "InternalServerError"


class RequestTimeoutError(LmiError):
    """No result within ``option.predict_timeout``."""

    status = 504
    kind = "RequestTimeout"


class ConfigError(ValueError):
    """Invalid serving configuration: ``serve`` refuses to start and prints this message."""
