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
# A message id to settle: an empty one is a 400 naming the field, not an unknown message.
MessageId = Annotated[str, msgspec.Meta(min_length=1)]
# An idempotency key (the Idempotency-Key header or a batch message's ``idempotency_key``):
# visible ASCII, short enough to keep per message for the whole window.
IDEMPOTENCY_KEY_MAX = 255
IdempotencyKey = Annotated[
    str, msgspec.Meta(min_length=1, max_length=IDEMPOTENCY_KEY_MAX, pattern=r"^[!-~]+$")
]
# Topics one registered consumer may list (each is checked and stored with it).
MAX_CONSUMER_TOPICS = 100


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
    idempotency_key: IdempotencyKey | None = None


class BatchProduceRequest(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """``POST /api/v1/messages/batch``."""

    messages: list[BatchMessage]
    topic: str | None = None


class IdemKey(msgspec.Struct, frozen=True, gc=False):
    """What an engine needs to make one produce idempotent (``Delivery.idem``).

    ``scope`` is the subject (empty without authentication), a NUL, then the client's key:
    keys are kept per topic and subject, so one tenant never sees another's result.
    ``fingerprint`` digests what the message is made of; ``field`` names where the key came
    from, for the error of a key reused with another message. ``count`` > 1: the key of a
    batch's header, shared by that many deliveries (in order, in one engine batch) that are
    stored or answered together, ``fingerprint`` digesting them all.
    """

    scope: str
    fingerprint: bytes
    field: str
    count: int = 1


class CreateTopicRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/v1/topics``. ``max_size`` is the topic's total bytes (0: unlimited)."""

    name: str
    partitions: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    replication: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    retention: Duration = None
    max_size: int | str | None = None
    dead_letter_expired: bool = False
    encrypted: bool = False  # encryption at rest (needs a master key configured)


class TopicConfig(msgspec.Struct, frozen=True, gc=False):
    """A topic's settings as stored by the engine and returned by the API."""

    name: str
    partitions: int
    replication: int
    retention: int  # nanoseconds; 0 keeps messages forever
    max_size: int  # bytes for the whole topic; 0 is unlimited
    created_at: int = 0  # unix milliseconds
    dead_letter_expired: bool = False  # expired messages go to <topic>.dlq (else just counted)
    encrypted: bool = False  # message content encrypted at rest (crypto.Encryptor)

    def same_settings(self, other: TopicConfig) -> bool:
        """True when ``other`` asks for exactly these settings (creation is then idempotent)."""
        return (
            self.partitions == other.partitions
            and self.replication == other.replication
            and self.retention == other.retention
            and self.max_size == other.max_size
            and self.dead_letter_expired == other.dead_letter_expired
            and self.encrypted == other.encrypted
        )


class PartitionStats(msgspec.Struct, gc=False):
    partition: int
    messages: int
    bytes: int
    low_offset: int  # first offset still stored
    high_offset: int  # next offset to be written


class GroupLag(msgspec.Struct, gc=False, omit_defaults=True):
    group_id: str
    lag: int
    # Age of the group's oldest delivery not acknowledged, as of the last metric sample;
    # absent when it has none (or before the first sample).
    oldest_unacked_age_s: float | None = None


class TopicInfo(msgspec.Struct, gc=False):
    """``GET /api/v1/topics/{name}``: settings, per-partition counts and consumer groups."""

    name: str
    partitions: int
    replication: int
    retention: int
    max_size: int
    created_at: int
    dead_letter_expired: bool
    messages: int
    bytes: int
    partition_stats: list[PartitionStats]
    consumer_groups: list[GroupLag]
    encrypted: bool = False


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


# ---- consume / acknowledge ------------------------------------------------------------------


class ConsumeRequest(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """``POST /api/v1/messages/consume``: long-poll up to ``timeout`` for up to ``max_messages``."""

    topic: str
    group_id: str
    consumer_id: str
    max_messages: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    timeout: Duration = None
    visibility_timeout: Duration = None


class LeasedMessage(msgspec.Struct, gc=False):
    """A message leased to one consumer of a group until ``lease_deadline`` (unix ms)."""

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
    expires_at: int = 0


class ConsumeResponse(msgspec.Struct, gc=False):
    messages: list[LeasedMessage]
    count: int


class AcknowledgeRequest(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """``POST /api/v1/messages/acknowledge``; ``success: false`` schedules a redelivery."""

    message_id: MessageId
    group_id: str
    success: bool = True
    topic: str | None = None
    consumer_id: str | None = None
    error: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    requeue_delay: Duration = None


class AckItem(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    message_id: MessageId
    success: bool = True
    error: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    requeue_delay: Duration = None


class BatchAcknowledgeRequest(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """``POST /api/v1/messages/acknowledge/batch``."""

    group_id: str
    acks: list[AckItem]
    topic: str | None = None
    consumer_id: str | None = None


class Settled(msgspec.Struct, gc=False, omit_defaults=True):
    """One settled message in an acknowledge or extend answer (an absent time: not applicable).

    Made positionally, once per message of a batch: cheaper than a dict and encoded in one pass.
    """

    message_id: str
    status: str
    topic: str
    delivery_count: int
    redeliver_at: int | None = None
    lease_deadline: int | None = None


class RedriveRequest(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """``POST /api/v1/topics/{name}/redrive`` (the body is optional): the oldest
    ``max_messages`` dead letters, or the one ``message_id`` (its id in the DLQ)."""

    max_messages: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100_000
    message_id: MessageId | None = None


class DeadLetterOrigin(msgspec.Struct, gc=False):
    """Where a dead letter was first stored, and who gave up on it."""

    topic: str | None
    partition: int | None
    offset: int | None
    message_id: str | None
    group_id: str | None
    delivery_count: int | None


class DeadLetter(msgspec.Struct, gc=False):
    """One message of ``GET /api/v1/topics/{name}/dlq``: as stored in the DLQ, with the
    reason, the last error and the origin read from its ``x-mqfast-dlq-*`` headers."""

    message_id: str
    offset: int
    key: str | None
    content: str
    headers: dict[str, str]
    priority: int
    timestamp: int
    reason: str | None
    error: str | None
    dead_lettered_at: int | None
    origin: DeadLetterOrigin


class ExtendRequest(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """``POST /api/v1/messages/extend``: push the lease deadline to now + ``visibility_timeout``."""

    message_id: MessageId
    group_id: str
    visibility_timeout: Duration
    topic: str | None = None
    consumer_id: str | None = None


# ---- consumers and metric history ------------------------------------------------------------


class RegisterConsumerRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/v1/consumers``."""

    consumer_id: str
    group_id: str
    topics: Annotated[list[str], msgspec.Meta(max_length=MAX_CONSUMER_TOPICS)]
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    rate_limit: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] | None = None


class ConsumerInfo(msgspec.Struct):
    """A registered consumer as stored and returned."""

    consumer_id: str
    group_id: str
    topics: list[str]
    max_concurrency: int | None
    rate_limit: float | None
    registered_at: int  # unix ms
    last_seen: int  # unix ms; any consume or heartbeat
    active: bool = True


class CreateGrantRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/v1/grants``: the shape of a grant of the token's grants claim, and whom it
    is for. Checked further by ``grants.check_request`` (actions, glob, group ids)."""

    subject: str
    topics: str
    actions: list[str]
    groups: list[str] | None = None


class StoredGrant(msgspec.Struct):
    """A grant kept in the metadata store, as stored and returned. ``actions`` are in the order
    of ``auth.ACTIONS`` and ``groups`` sorted, so that one grant has one form."""

    id: int
    subject: str
    topics: str
    actions: list[str]
    groups: list[str] | None
    created_at: int  # unix ms
    created_by: str  # the subject that created it ("" without authentication)


class MetricPoint(msgspec.Struct):
    """One interval of one topic in ``GET /api/v1/metrics``."""

    time: str  # RFC 3339, interval start
    topic: str
    interval_s: float
    produced: int = 0
    consumed: int = 0
    expired: int = 0
    failed: int = 0
    retried: int = 0
    queue_size: int = 0
    dead_letter_size: int = 0
    processing_avg_ms: float = 0.0
    processing_p95_ms: float = 0.0
    processing_p99_ms: float = 0.0
    active_consumers: int = 0
    total_consumers: int = 0
    error_rate: float = 0.0
    retry_rate: float = 0.0
