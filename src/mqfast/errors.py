"""The one error hierarchy: each class maps to one HTTP status and one machine-readable code.

Every error a client can see is rendered as
``{"error": {"code": ..., "message": ..., "field": ...}}`` (``field`` only when one request field is
at fault). Engine errors (librdkafka, SQLite) are
translated into these in exactly one place per engine.
"""

from __future__ import annotations

import enum
import re
from typing import Final

import msgspec


@enum.unique
class ErrorCode(enum.StrEnum):
    """Machine-readable error codes, stable across releases."""

    MALFORMED_HTTP = "malformed_http"
    MALFORMED_JSON = "malformed_json"
    INVALID_FIELD = "invalid_field"
    INVALID_QUERY = "invalid_query"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    UNKNOWN_TOPIC = "unknown_topic"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOPIC_EXISTS = "topic_exists"
    CONFLICT = "conflict"
    IDEMPOTENCY_KEY_IN_FLIGHT = "idempotency_key_in_flight"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    NOT_IMPLEMENTED = "not_implemented"
    HTTP_VERSION_NOT_SUPPORTED = "http_version_not_supported"
    REQUEST_TIMEOUT = "request_timeout"
    RATE_LIMITED = "rate_limited"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class MqfastError(Exception):
    """Root of every error mqfast raises on purpose."""

    status: int = 500
    code: ErrorCode = ErrorCode.INTERNAL
    # Header lines sent with the error, each ending in CRLF (WWW-Authenticate, Retry-After).
    extra_headers: bytes | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_body(self) -> bytes:
        """The JSON error body sent to the client."""
        err: dict[str, str] = {"code": str(self.code), "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return msgspec.json.encode({"error": err})


class ConfigError(MqfastError):
    """Invalid configuration; stops start-up. Never sent to a client."""


class BadRequest(MqfastError):
    status = 400
    code = ErrorCode.INVALID_FIELD


class MalformedJson(BadRequest):
    code = ErrorCode.MALFORMED_JSON


class MalformedHttp(BadRequest):
    code = ErrorCode.MALFORMED_HTTP


class InvalidQuery(BadRequest):
    code = ErrorCode.INVALID_QUERY


class NotFound(MqfastError):
    status = 404
    code = ErrorCode.NOT_FOUND


class UnknownTopic(NotFound):
    code = ErrorCode.UNKNOWN_TOPIC


class MethodNotAllowed(MqfastError):
    status = 405
    code = ErrorCode.METHOD_NOT_ALLOWED


class Conflict(MqfastError):
    status = 409
    code = ErrorCode.CONFLICT


class TopicExists(Conflict):
    code = ErrorCode.TOPIC_EXISTS


class IdempotencyKeyReused(MqfastError):
    """An idempotency key sent again within the window with another message."""

    status = 422
    code = ErrorCode.IDEMPOTENCY_KEY_REUSED


class PayloadTooLarge(MqfastError):
    status = 413
    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(MqfastError):
    """A body that is not JSON (Content-Type) or is content-coded (Content-Encoding)."""

    status = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class RequestTimeout(MqfastError):
    """The client did not send its request in time (slow or stalled: slowloris)."""

    status = 408
    code = ErrorCode.REQUEST_TIMEOUT


# A client told to come back says when; 1 s unless the error knows better.
RETRY_AFTER_1S: Final = b"retry-after: 1\r\n"


class RateLimited(MqfastError):
    status = 429
    code = ErrorCode.RATE_LIMITED
    extra_headers = RETRY_AFTER_1S


class IdempotencyKeyInFlight(Conflict):
    """A retry of an idempotent produce whose first attempt is still undecided."""

    code = ErrorCode.IDEMPOTENCY_KEY_IN_FLIGHT
    extra_headers = RETRY_AFTER_1S


class HeadersTooLarge(MqfastError):
    status = 431
    code = ErrorCode.HEADERS_TOO_LARGE


class TransferCodingNotImplemented(MqfastError):
    """A Transfer-Encoding other than chunked: the body's framing cannot be read."""

    status = 501
    code = ErrorCode.NOT_IMPLEMENTED


class VersionNotSupported(MqfastError):
    status = 505
    code = ErrorCode.HTTP_VERSION_NOT_SUPPORTED


class Unavailable(MqfastError):
    """A dependency (the storage engine) cannot take the request now; the client may retry."""

    status = 503
    code = ErrorCode.ENGINE_UNAVAILABLE
    extra_headers = RETRY_AFTER_1S


class ShuttingDown(Unavailable):
    code = ErrorCode.SHUTTING_DOWN


_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_QUOTED = re.compile(r"field `([^`]+)`")


def from_decode_error(exc: msgspec.DecodeError, prefix: str = "") -> BadRequest:
    """Translate a msgspec decode/validation error into a 400 naming the field at fault."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return MalformedJson(f"request body is not valid JSON: {text}")
    m = _AT_PATH.search(text)
    path = m.group(1) if m else ""
    message = text[: m.start()] if m else text
    q = _QUOTED.search(message)
    if q is not None:  # "Object missing required field `content`" names the field itself
        path = f"{path}.{q.group(1)}" if path else q.group(1)
    field = f"{prefix}{path}" if path else (prefix.rstrip(".") or None)
    where = f" (field `{field}`)" if field else ""
    return BadRequest(f"{message}{where}", field=field)
