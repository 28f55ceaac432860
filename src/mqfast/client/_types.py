"""What the client sends and receives: msgspec structs shaped like the API's JSON, and errors."""

from __future__ import annotations

from typing import Any

import msgspec

# Durations the client takes: seconds (int or float) or a string the server parses ("30s",
# "1h30m", "250ms"). The API's integers are nanoseconds; seconds are converted before sending.
Duration = float | str


def duration(value: Duration | None) -> int | str | None:
    """The wire form of a duration: integer nanoseconds, or the string as given."""
    if value is None or isinstance(value, str):
        return value
    if value < 0:
        raise ValueError(f"a duration must not be negative, got {value!r}")
    return round(value * 1e9)


class OutgoingMessage(msgspec.Struct, omit_defaults=True):
    """One message to produce; ``topic`` defaults to the producer's or the batch's."""

    content: str
    topic: str | None = None
    key: str | None = None
    headers: dict[str, str] | None = None
    priority: int | None = None
    ttl: int | str | None = None
    # Lets a server that supports it store a message once however often a retry sends it.
    idempotency_key: str | None = None


class ProduceResult(msgspec.Struct, frozen=True):
    """A message stored durably: its id, topic, partition, offset and time (unix ms)."""

    message_id: str
    topic: str
    partition: int
    offset: int
    timestamp: int


class Message(msgspec.Struct):
    """A message leased to this consumer until ``lease_deadline`` (unix ms)."""

    message_id: str
    topic: str
    partition: int
    offset: int
    key: str | None
    content: str
    headers: dict[str, str]
    priority: int
    timestamp: int
    delivery_count: int
    lease_deadline: int
    expires_at: int


class AckResult(msgspec.Struct, frozen=True):
    """An acknowledgement, negative acknowledgement or extension the server applied."""

    message_id: str
    status: str
    topic: str
    delivery_count: int
    redeliver_at: int | None = None
    lease_deadline: int | None = None


class ClientError(Exception):
    """Root of every error the client raises."""


class ApiError(ClientError):
    """The server answered with an error: its HTTP status and the body's code, message, field."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        where = f" (field {field})" if field and field not in message else ""
        super().__init__(f"{status} {code}: {message}{where}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after
        # A 503 marked ``X-Mqfast-Outcome: unknown``: the request may have been applied.
        self.outcome_unknown = False


class ConnectionFailed(ClientError):
    """No answer (refused, reset, timed out): whether the request was applied is unknown."""


class ItemError(ClientError):
    """One message of a batch (produce or acknowledge) that the server refused."""

    def __init__(self, code: str, message: str, message_id: str, topic: str | None) -> None:
        super().__init__(f"{code}: {message} (message {message_id})")
        self.code = code
        self.message = message
        self.message_id = message_id
        self.topic = topic


class _ErrorBody(msgspec.Struct):
    code: str
    message: str
    field: str | None = None


class _ErrorAnswer(msgspec.Struct):
    error: _ErrorBody


class BatchItem(msgspec.Struct):
    """An item of a batch answer: a stored message, an applied ack, or an ``error``."""

    message_id: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    timestamp: int | None = None
    status: str | None = None
    delivery_count: int | None = None
    redeliver_at: int | None = None
    lease_deadline: int | None = None
    error: _ErrorBody | None = None

    def item_error(self) -> ItemError | None:
        e = self.error
        return None if e is None else ItemError(e.code, e.message, self.message_id, self.topic)


class BatchAnswer(msgspec.Struct):
    results: list[BatchItem]
    succeeded: int
    failed: int


class ConsumeAnswer(msgspec.Struct):
    messages: list[Message]
    count: int


class BatchRequest(msgspec.Struct, omit_defaults=True):
    messages: list[OutgoingMessage]
    topic: str | None = None


class AckItem(msgspec.Struct, omit_defaults=True):
    message_id: str
    success: bool = True
    error: str | None = None
    requeue_delay: int | str | None = None


def api_error(status: int, body: bytes, retry_after: str | None) -> ApiError:
    """The error of an answer that is not 2xx, from its JSON body (or its text when not JSON)."""
    after: float | None = None
    if retry_after is not None:
        try:
            after = max(0.0, float(retry_after))
        except ValueError:
            after = None  # an HTTP date: the client's own backoff applies
    try:
        e = msgspec.json.decode(body, type=_ErrorAnswer).error
    except msgspec.DecodeError:
        text = body.decode("utf-8", "replace").strip() or "no error body"
        return ApiError(status, "http_error", text[:500], None, after)
    return ApiError(status, e.code, e.message, e.field, after)


def jsonable(value: Any) -> Any:
    """A struct (or list of them) as plain JSON types, for printing."""
    return msgspec.to_builtins(value)
