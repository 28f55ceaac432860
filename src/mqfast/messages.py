"""Request and response types of the HTTP API, and one decoder per route.

Request types are ``msgspec.Struct`` with ``gc=False`` (they hold no reference cycles) and
``forbid_unknown_fields``: a misspelt field such as ``"priorty"`` is a 400 naming it, not a
silently ignored setting. Validation that msgspec can express (ranges) lives on the types, so
the error names the field; rules it cannot (topic names, durations) are checked by the caller.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Priority = Annotated[int, msgspec.Meta(ge=0, le=9)]
# Durations: integer nanoseconds, a string of digits (nanoseconds) or a Go-style "30s"/"24h".
Duration = int | str | None
Headers = dict[str, str] | None


class ProduceRequest(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """``POST /api/v1/messages``."""

    topic: str
    content: str
    key: str | None = None
    headers: Headers = None
    priority: Priority = 0
    ttl: Duration = None


class BatchMessage(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """One message of ``POST /api/v1/messages/batch``; ``topic`` defaults to the batch's."""

    content: str
    topic: str | None = None
    key: str | None = None
    headers: Headers = None
    priority: Priority = 0
    ttl: Duration = None


class BatchProduceRequest(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """``POST /api/v1/messages/batch``."""

    messages: list[BatchMessage]
    topic: str | None = None


class CreateTopicRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/v1/topics``. ``max_size`` is the topic's total bytes (0: unlimited)."""

    name: str
    partitions: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    replication: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    retention: Duration = None
    max_size: int | str | None = None


class TopicConfig(msgspec.Struct, frozen=True, gc=False):
    """A topic's settings as stored by the engine and returned by the API."""

    name: str
    partitions: int
    replication: int
    retention: int  # nanoseconds; 0 keeps messages forever
    max_size: int  # bytes for the whole topic; 0 is unlimited
    created_at: int = 0  # unix milliseconds

    def same_settings(self, other: TopicConfig) -> bool:
        """True when ``other`` asks for exactly these settings (creation is then idempotent)."""
        return (
            self.partitions == other.partitions
            and self.replication == other.replication
            and self.retention == other.retention
            and self.max_size == other.max_size
        )


class PartitionStats(msgspec.Struct, gc=False):
    partition: int
    messages: int
    bytes: int
    low_offset: int  # first offset still stored
    high_offset: int  # next offset to be written


class GroupLag(msgspec.Struct, gc=False):
    group_id: str
    lag: int


class TopicInfo(msgspec.Struct, gc=False):
    """``GET /api/v1/topics/{name}``: settings, per-partition counts and consumer groups."""

    name: str
    partitions: int
    replication: int
    retention: int
    max_size: int
    created_at: int
    messages: int
    bytes: int
    partition_stats: list[PartitionStats]
    consumer_groups: list[GroupLag]


class StoredMessage(msgspec.Struct, gc=False):
    """A message as an engine reads it back."""

    message_id: str
    topic: str
    partition: int
    offset: int
    key: str | None
    content: str
    headers: dict[str, str]
    priority: int
    timestamp: int  # unix milliseconds
    expires_at: int  # unix milliseconds; 0 never


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    field: str | None = None


produce_decoder = msgspec.json.Decoder(ProduceRequest)
batch_decoder = msgspec.json.Decoder(BatchProduceRequest)
create_topic_decoder = msgspec.json.Decoder(CreateTopicRequest)
headers_encoder = msgspec.json.Encoder()
