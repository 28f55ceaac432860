"""Handlers of the routes that are not hot: consume, acknowledge, topics, consumers, metrics,
health, the OpenAPI document.

The compiled core routes every request; produce is answered there. Everything else arrives here
as ``App.handle(template, method, params, query, body)`` and returns ``(status, body, extra
headers)`` or a coroutine of it. Errors are raised as ``errors.MqfastError`` subclasses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec

from mqfast import __version__, errors
from mqfast._core import Server, decode_json, topic_name_error
from mqfast.access import (
    AUDITED,
    AuditLog,
    authorize,
    may_see_consumer,
    may_see_topic,
    require_see_consumer,
    require_see_topic,
    settle_authorizer,
    target_of,
)
from mqfast.auth import Authenticator, Forbidden, Principal
from mqfast.config import Settings, parse_duration
from mqfast.grants import GrantCache, check_request
from mqfast.groups import (
    DLQ_HEADER_PREFIX,
    Groups,
    SettleItem,
    SettleResult,
    Unacked,
    check_id,
    check_topic,
    dlq_name,
    now_ms,
)
from mqfast.messages import (
    AcknowledgeRequest,
    BatchAcknowledgeRequest,
    ConsumeRequest,
    CreateGrantRequest,
    CreateTopicRequest,
    DeadLetter,
    DeadLetterOrigin,
    ExtendRequest,
    RedriveRequest,
    RegisterConsumerRequest,
    Settled,
    StoredGrant,
    StoredMessage,
    TopicConfig,
    TopicInfo,
)
from mqfast.meta import MetaStore
from mqfast.meta.history import format_rfc3339, parse_audit_query, parse_metrics_query
from mqfast.sinks import Sink
from mqfast.stream import EventStream, Streams, heartbeat_s

Response = tuple[int, bytes, bytes | None]
# What a handler answers: a response, or a stream the core keeps open (``mqfast.stream``).
Answer = Response | EventStream
Handler = Callable[[list[str], bytes, bytes], Response | Coroutine[Any, Any, Response]]
# A handler whose answer depends on who asks (what the caller may see or settle), and from where.
ScopedHandler = Callable[
    [list[str], bytes, bytes, Principal | None, str], Answer | Coroutine[Any, Any, Answer]
]

log = logging.getLogger("mqfast.api")

# The route table: the core matches these; labels in /metrics are these templates.
ROUTES: list[tuple[str, tuple[str, ...]]] = [
    ("/api/v1/messages", ("POST",)),
    ("/api/v1/messages/batch", ("POST",)),
    ("/api/v1/messages/consume", ("POST",)),
    ("/api/v1/messages/acknowledge", ("POST",)),
    ("/api/v1/messages/acknowledge/batch", ("POST",)),
    ("/api/v1/messages/extend", ("POST",)),
    ("/api/v1/messages/stream", ("GET",)),
    ("/api/v1/topics", ("GET", "POST")),
    ("/api/v1/topics/{name}", ("GET", "DELETE")),
    ("/api/v1/topics/{name}/redrive", ("POST",)),
    ("/api/v1/topics/{name}/dlq", ("GET",)),
    ("/api/v1/consumers", ("GET", "POST")),
    ("/api/v1/consumers/{consumer_id}", ("GET", "DELETE")),
    ("/api/v1/consumers/{consumer_id}/heartbeat", ("POST",)),
    ("/api/v1/metrics", ("GET",)),
    ("/api/v1/audit", ("GET",)),
    ("/api/v1/grants", ("GET", "POST")),
    ("/api/v1/grants/{grant_id}", ("DELETE",)),
    ("/health", ("GET",)),
    ("/health/live", ("GET",)),
    ("/health/ready", ("GET",)),
    ("/openapi.json", ("GET",)),
    ("/console", ("GET",)),
    ("/console/{file}", ("GET",)),
]

_json = msgspec.json.Encoder()
_create_topic = msgspec.json.Decoder(CreateTopicRequest)
_consume = msgspec.json.Decoder(ConsumeRequest)
_ack = msgspec.json.Decoder(AcknowledgeRequest)
_ack_batch = msgspec.json.Decoder(BatchAcknowledgeRequest)
_extend = msgspec.json.Decoder(ExtendRequest)
_register = msgspec.json.Decoder(RegisterConsumerRequest)
_redrive = msgspec.json.Decoder(RedriveRequest)
_create_grant = msgspec.json.Decoder(CreateGrantRequest)
# /health names at most this many groups behind (the largest lags), and counts the rest;
# the group store reports deliveries in flight of at most HEALTH_PAIRS groups and topics.
HEALTH_LISTED = 100
HEALTH_PAIRS = 10_000
# A stream holds at most this many unacknowledged leases (as a consume answers at most 1,000).
MAX_INFLIGHT = 1000
STREAM_HEARTBEAT_S = 15.0
_STREAM_QUERY = frozenset(
    ("topic", "group_id", "consumer_id", "max_inflight", "visibility_timeout", "heartbeat")
)
# A metrics query answers at most this many points; a wider one is asked to narrow down.
MAX_METRIC_POINTS = 50_000
# How a point of several intervals is made of them (also in the OpenAPI document).
_AGGREGATION = {
    "counters": "sum",
    "sizes_and_consumers": "max",
    "processing_avg_ms": "mean weighted by consumed",
    "percentiles": "max of the intervals' percentiles: an upper bound, not the step's percentile",
    "rates": "recomputed from the sums",
}


# The console's files and their types. Its page runs only its own script and style and
# talks only to this origin, and may not be framed by another site.
CONSOLE_FILES = {
    "index.html": b"text/html; charset=utf-8",
    "console.js": b"text/javascript; charset=utf-8",
    "console.css": b"text/css; charset=utf-8",
}
CONSOLE_HEADERS = (
    b"content-type: %s\r\n"
    b"content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'; "
    b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"referrer-policy: no-referrer\r\n"
    b"cache-control: no-cache\r\n"
)


def _ok(obj: object, status: int = 200) -> Response:
    return status, _json.encode(obj), None


def _check_topic_name(name: str, field: str = "name") -> None:
    reason = topic_name_error(name)
    if reason is not None:
        raise errors.BadRequest(f"{reason} (got {name!r})", field=field)


def _query_args(query: bytes, allowed: frozenset[str]) -> dict[str, str]:
    """The query's parameters (the last of a repeated one); any other is a 400 naming it."""
    q = parse_qs(query.decode("latin-1"), keep_blank_values=True)
    unknown = sorted(set(q) - allowed)
    if unknown:
        raise errors.InvalidQuery(f"unknown query parameter {unknown[0]!r}", field=unknown[0])
    return {k: v[-1] for k, v in q.items()}


def _size(value: int | str | None, field: str) -> int:
    """Bytes from an integer or a string of digits (the contract sends "1073741824")."""
    if value is None:
        return 0
    if isinstance(value, str):
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise errors.BadRequest(
                f"{field}: expected a number of bytes, got {value!r}", field=field
            )
        value = int(value.strip())
    if value < 0:
        raise errors.BadRequest(f"{field}: must not be negative", field=field)
    if value > 1 << 50:
        raise errors.BadRequest(f"{field}: {value} bytes is beyond any disk", field=field)
    return value


def _query_param(query: bytes, name: str) -> str | None:
    """The value of ``name``, the one query parameter of a list route (the last one given), or
    None; any other parameter is a 400 naming it."""
    return _query_args(query, frozenset((name,))).get(name)


def _page_query(query: bytes) -> tuple[int, int]:
    """``offset`` (default 0) and ``limit`` (1 to 1000, default 100) of a DLQ page."""
    q = _query_args(query, frozenset(("offset", "limit")))
    out = []
    for field, default, lo, hi in (("offset", 0, 0, 1 << 62), ("limit", 100, 1, 1000)):
        raw = q.get(field, str(default)).strip()
        if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
            raise errors.InvalidQuery(
                f"{field}: expected an integer from {lo} to {hi}, got {raw!r}", field=field
            )
        out.append(int(raw))
    return out[0], out[1]


def _int_header(headers: dict[str, str], name: str) -> int | None:
    value = headers.get(DLQ_HEADER_PREFIX + name, "")
    return int(value) if value.isascii() and value.isdigit() else None


def _dead_letter(m: StoredMessage) -> DeadLetter:
    h = m.headers
    p = DLQ_HEADER_PREFIX
    return DeadLetter(
        message_id=m.message_id,
        offset=m.offset,
        key=m.key,
        content=m.content,
        headers=h,
        priority=m.priority,
        timestamp=m.timestamp,
        reason=h.get(p + "reason"),
        error=h.get(p + "error"),
        dead_lettered_at=_int_header(h, "time"),
        origin=DeadLetterOrigin(
            topic=h.get(p + "topic"),
            partition=_int_header(h, "partition"),
            offset=_int_header(h, "offset"),
            message_id=h.get(p + "message-id"),
            group_id=h.get(p + "group"),
            delivery_count=_int_header(h, "delivery-count"),
        ),
    )


class App:
    """The slow-path handlers, bound to one worker's core ``Server`` and engine."""

    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        groups: Groups | None = None,
        meta: MetaStore | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.groups = groups
        self.meta = meta
        self.streams = Streams(groups, meta) if groups is not None else None
        self.core: Server | None = None
        self.started = time.monotonic()
        self.ready = False
        self.auth: Authenticator | None = None  # set when authentication is on
        self.grants: GrantCache | None = None  # likewise: stored grants count only then
        self.audit = AuditLog(meta)
        # Cluster dependencies besides the engine (name -> cheap health check), e.g. postgres.
        self.dependencies: dict[str, Callable[[], dict[str, object]]] = {}
        self._handlers: dict[tuple[str, str], Handler] = {
            ("/api/v1/topics", "POST"): self.create_topic,
            ("/api/v1/topics/{name}", "GET"): self.get_topic,
            ("/api/v1/topics/{name}", "DELETE"): self.delete_topic,
            ("/api/v1/topics/{name}/redrive", "POST"): self.redrive,
            ("/api/v1/topics/{name}/dlq", "GET"): self.dead_letters,
            ("/api/v1/messages/consume", "POST"): self.consume,
            ("/api/v1/consumers", "POST"): self.register_consumer,
            ("/api/v1/consumers/{consumer_id}", "DELETE"): self.delete_consumer,
            ("/api/v1/audit", "GET"): self.audit_log,
            ("/health", "GET"): self.health,
            ("/health/live", "GET"): self.live,
            ("/health/ready", "GET"): self.ready_check,
            ("/openapi.json", "GET"): self.openapi,
            ("/console", "GET"): self.console,
            ("/console/{file}", "GET"): self.console,
        }
        self._scoped: dict[tuple[str, str], ScopedHandler] = {
            ("/api/v1/topics", "GET"): self.list_topics,
            ("/api/v1/messages/acknowledge", "POST"): self.acknowledge,
            ("/api/v1/messages/acknowledge/batch", "POST"): self.acknowledge_batch,
            ("/api/v1/messages/extend", "POST"): self.extend,
            ("/api/v1/messages/stream", "GET"): self.stream,
            ("/api/v1/consumers", "GET"): self.list_consumers,
            ("/api/v1/consumers/{consumer_id}", "GET"): self.get_consumer,
            ("/api/v1/consumers/{consumer_id}/heartbeat", "POST"): self.heartbeat,
            ("/api/v1/metrics", "GET"): self.metric_history,
            ("/api/v1/grants", "GET"): self.list_grants,
            ("/api/v1/grants", "POST"): self.create_grant,
            ("/api/v1/grants/{grant_id}", "DELETE"): self.delete_grant,
        }
        self._openapi: bytes | None = None
        self._console_files: dict[str, bytes] = {}
        self._group_health: dict[str, object] = {"status": "unknown", "checked_at": None}
        # The sampler's last look, for the metrics scrape: (group, topic, lag, oldest unacked
        # lease in ms or None) per pair, and the dead-letter size per origin topic.
        self._group_levels: list[tuple[str, str, int, int | None]] = []
        # (group, topic) -> when its oldest delivery not acknowledged was leased (unix ms)
        self._oldest_unacked: dict[tuple[str, str], int] = {}
        self._dead_letters: dict[str, int] = {}

    def attach(self, core: Server) -> None:
        """Give the app the core it refreshes (topic cache)."""
        self.core = core

    def handle(
        self,
        template: str,
        method: str,
        params: list[bytes],
        query: bytes,
        body: bytes,
        principal: Principal | None = None,
        peer: str = "",
    ) -> Answer | Awaitable[Answer]:
        """Entry point from the core for every route it does not answer itself."""
        handler = self._handlers.get((template, method))
        scoped = self._scoped.get((template, method))
        if handler is None and scoped is None:
            # the router checked the method; a missing handler is our bug
            raise errors.MqfastError(f"no handler for {method} {template}")
        args = [unquote(p.decode("latin-1")) for p in params]
        if principal is not None:
            authorize(template, method, args, body, principal)
        if scoped is not None:
            return scoped(args, query, body, principal, peer)
        assert handler is not None
        if (method, template) in AUDITED:
            return self._audited(handler, template, method, args, query, body, principal, peer)
        return handler(args, query, body)

    # ---- security -------------------------------------------------------------------------

    async def authenticate(self, header: bytes | None, peer: str = "") -> Principal:
        """The slow path of the core's token cache: verify the bearer token of a request."""
        assert self.auth is not None
        try:
            token = self.auth.token_from_header(header)
            return await self.auth.verify(token)
        except errors.MqfastError as e:
            self.audit.record(
                actor="", action="authenticate", target="", outcome="denied", peer=peer,
                detail={"status": e.status, "reason": e.message},
            )  # fmt: skip
            raise

    def forbidden(
        self, exc: errors.MqfastError, principal: Principal, template: str, peer: str
    ) -> None:
        """The core refused a request with 403: one audit entry."""
        target = exc.target if isinstance(exc, Forbidden) else ""
        self.audit.record(
            actor=principal.subject, action=template, target=target, outcome="denied", peer=peer,
            detail={"status": exc.status, "reason": exc.message},
        )  # fmt: skip

    async def _audited(
        self,
        handler: Handler,
        template: str,
        method: str,
        args: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        action = f"{method} {template}"
        target = args[0] if args else target_of(body)
        actor = principal.subject if principal is not None else ""
        try:
            result = handler(args, query, body)
            if not isinstance(result, tuple):
                result = await result
        except errors.MqfastError as e:
            if e.status != 403:  # refusals are recorded by forbidden()
                self.audit.record(
                    actor=actor, action=action, target=target, outcome="failed",
                    peer=peer, detail={"status": e.status, "reason": e.message},
                )  # fmt: skip
            raise
        self.audit.record(
            actor=actor, action=action, target=target, outcome="ok", peer=peer,
            detail={"status": result[0]},
        )  # fmt: skip
        return result

    # ---- topics ---------------------------------------------------------------------------

    async def resolve_topics(self, names: list[str], principal: Principal | None = None) -> None:
        """Make unknown topics known to the hot path: found in the engine, or auto-created
        (with authentication on, only for a ``principal`` that may create them: ``admin``)."""
        assert self.core is not None
        for name in names:
            _check_topic_name(name, "topic")
        found = [await self.sink.get_topic(name) for name in names]
        missing = [name for name, cfg in zip(names, found, strict=True) if cfg is None]
        if missing and not self.settings.auto_create_topics:
            raise errors.UnknownTopic(
                f"unknown topic {missing[0]!r} (automatic creation is off: "
                "MESSAGE_QUEUE_AUTO_CREATE_TOPICS=false); "
                "create it with POST /api/v1/topics",
                field="topic",
            )
        for name in missing:
            if principal is not None and not principal.allows("admin", name):
                raise Forbidden(
                    f"topic {name!r} does not exist and subject {principal.subject!r} may not "
                    "create it by producing to it (creating a topic needs 'admin' on a pattern "
                    "matching it)",
                    field="topic",
                    target=name,
                )
        for name, cfg in zip(names, found, strict=True):
            if cfg is None:
                cfg, created = await self.sink.create_topic(self._default_topic(name))
                if created:
                    log.info("topic created automatically", extra={"topic": name})
            self.core.set_topic(cfg.name, cfg.partitions)

    def _default_topic(self, name: str) -> TopicConfig:
        s = self.settings
        return TopicConfig(
            name=name,
            partitions=s.default_partitions,
            replication=1,
            retention=s.default_retention_ns,
            max_size=0,
            created_at=int(time.time() * 1000),
        )

    async def create_topic(self, params: list[str], query: bytes, body: bytes) -> Response:
        req: CreateTopicRequest = decode_json(_create_topic, body)
        _check_topic_name(req.name)
        try:
            retention = (
                self.settings.default_retention_ns
                if req.retention is None
                else parse_duration(req.retention, "retention")
            )
        except ValueError as e:
            raise errors.BadRequest(str(e), field="retention") from None
        cfg = TopicConfig(
            name=req.name,
            partitions=req.partitions or self.settings.default_partitions,
            replication=req.replication,
            retention=retention,
            max_size=_size(req.max_size, "max_size"),
            created_at=int(time.time() * 1000),
            dead_letter_expired=req.dead_letter_expired,
            encrypted=req.encrypted,
        )
        if cfg.encrypted and not getattr(self.sink, "can_encrypt", False):
            raise errors.BadRequest(
                "encrypted topics need MESSAGE_QUEUE_MASTER_KEYS or MESSAGE_QUEUE_MASTER_KEY_FILE",
                field="encrypted",
            )
        if self.settings.engine == "embedded" and cfg.replication != 1:
            raise errors.BadRequest(
                "replication must be 1 on the embedded engine (one node, one copy); "
                "use the Kafka engine for replicated topics",
                field="replication",
            )
        stored, created = await self.sink.create_topic(cfg)
        assert self.core is not None
        self.core.set_topic(stored.name, stored.partitions)
        if created:
            log.info("topic created", extra={"topic": stored.name, "partitions": stored.partitions})
        return _ok(stored, 201 if created else 200)

    async def list_topics(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        topics = await self.sink.list_topics()
        return _ok({"topics": [t for t in topics if may_see_topic(principal, t.name)]})

    async def get_topic(self, params: list[str], query: bytes, body: bytes) -> Response:
        _check_topic_name(params[0])
        info = await self.sink.describe_topic(params[0])
        now = now_ms()
        for g in info.consumer_groups:
            leased = self._oldest_unacked.get((g.group_id, info.name))
            if leased is not None:
                g.oldest_unacked_age_s = max(0, now - leased) / 1000
        return _ok(info)

    async def delete_topic(self, params: list[str], query: bytes, body: bytes) -> Response:
        name = params[0]
        _check_topic_name(name)
        assert self.core is not None
        self.core.drop_topic(name)
        await self.sink.delete_topic(name)
        self.core.drop_topic(name)
        log.info("topic deleted", extra={"topic": name})
        return _ok({"name": name, "deleted": True})

    async def redrive(self, params: list[str], query: bytes, body: bytes) -> Response:
        """Move the messages of ``<name>.dlq`` back to ``<name>`` (all, ``max_messages``, or
        the one ``message_id``)."""
        name = params[0]
        _check_topic_name(name)
        req = decode_json(_redrive, body) if body.strip() else RedriveRequest()
        store = self._groups().store
        if req.message_id is not None:
            if not await store.redrive_message(name, req.message_id, now_ms()):
                raise errors.NotFound(
                    f"{dlq_name(name)!r} holds no message {req.message_id!r} "
                    "(never dead-lettered here, or redriven already)",
                    field="message_id",
                )
            moved = 1
        else:
            moved = await store.redrive(name, req.max_messages, now_ms())
        if moved:
            self._groups().notify([name])
            log.info("dead letters redriven", extra={"topic": name, "moved": moved})
        out: dict[str, object] = {"topic": name, "moved": moved}
        if req.message_id is not None:
            out["message_id"] = req.message_id
        return _ok(out)

    async def dead_letters(self, params: list[str], query: bytes, body: bytes) -> Response:
        """A page of ``<name>.dlq`` from ``offset`` on: read, nothing leased or changed."""
        name = params[0]
        _check_topic_name(name)
        offset, limit = _page_query(query)
        if await self.sink.get_topic(name) is None:
            raise errors.UnknownTopic(f"unknown topic {name!r}", field="name")
        dlq = dlq_name(name)
        read = await self.sink.read(dlq, 0, offset, limit) if await self.sink.get_topic(dlq) else []
        skip = await self._groups().store.redriven(name, offset, read[-1].offset) if read else set()
        return _ok(
            {
                "topic": name,
                "dead_letter_topic": dlq,
                "offset": offset,
                # where the next page starts; null at the end of what is stored now
                "next_offset": read[-1].offset + 1 if len(read) == limit else None,
                "messages": [_dead_letter(m) for m in read if m.offset not in skip],
            }
        )

    # ---- consume and acknowledge ----------------------------------------------------------

    def _groups(self) -> Groups:
        if self.groups is None:
            raise errors.Unavailable("consumer groups are not available on this engine")
        return self.groups

    def _meta(self) -> MetaStore:
        if self.meta is None:
            raise errors.Unavailable("the metadata store is not available")
        return self.meta

    async def consume(self, params: list[str], query: bytes, body: bytes) -> Response:
        req: ConsumeRequest = decode_json(_consume, body)
        groups = self._groups()
        if self.meta is not None:
            check_id(req.consumer_id, "consumer_id")
            info = await groups.registered(req.consumer_id)
            if info is None or info.group_id == req.group_id:
                # Any consume is a heartbeat, but only of a consumer of the group consuming:
                # another group's consume (refused below) must not keep it alive.
                self.meta.touch(req.consumer_id, now_ms())
        msgs = await groups.consume(
            req.topic,
            req.group_id,
            req.consumer_id,
            req.max_messages,
            req.timeout,
            req.visibility_timeout,
        )
        return _ok({"messages": msgs, "count": len(msgs)})

    async def stream(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> EventStream:
        """``GET /api/v1/messages/stream``: consume as Server-Sent Events (``mqfast.stream``)."""
        arg = _query_args(query, _STREAM_QUERY)
        for name in ("topic", "group_id", "consumer_id"):
            if name not in arg:
                raise errors.InvalidQuery(f"query parameter {name} is required", field=name)
        topic, group, consumer = arg["topic"], arg["group_id"], arg["consumer_id"]
        check_topic(topic)
        check_id(group, "group_id")
        check_id(consumer, "consumer_id")
        if principal is not None:
            principal.require("consume", topic, group)
        text = arg.get("max_inflight", "10").strip()
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_INFLIGHT):
            raise errors.InvalidQuery(
                f"max_inflight must be an integer from 1 to {MAX_INFLIGHT}, got {text!r}",
                field="max_inflight",
            )
        groups = self._groups()
        assert self.streams is not None
        vis_ms = groups.visibility_ms(arg.get("visibility_timeout"), "visibility_timeout")
        beat_s = heartbeat_s(arg.get("heartbeat"), STREAM_HEARTBEAT_S)
        if await self.sink.get_topic(topic) is None:
            raise errors.UnknownTopic(f"unknown topic {topic!r}", field="topic")
        info = await groups.consumer_settings(topic, group, consumer)
        if info is not None:
            # A registered consumer is touched at each heartbeat: often enough to stay active.
            beat_s = min(beat_s, max(0.5, self.settings.consumer_timeout_ns / 4e9))
        if self.meta is not None:
            self.meta.touch(consumer, now_ms())
        if self.core is not None and self.core.shutting_down:
            raise errors.ShuttingDown("the server is shutting down")
        return EventStream(self.streams, topic, group, consumer, int(text), vis_ms, beat_s, info)

    @staticmethod
    def _result(r: SettleResult) -> Settled:
        return Settled(
            r.message_id, r.status, r.topic, r.delivery_count, r.redeliver_at, r.lease_deadline
        )

    async def acknowledge(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        req: AcknowledgeRequest = decode_json(_ack, body)
        groups = self._groups()
        item = SettleItem(
            message_id=req.message_id,
            action="ack" if req.success else "nack",
            error=req.error,
            delay_ms=groups.nack_delay_ms(req.requeue_delay, "requeue_delay"),
        )
        [r] = await groups.settle(
            req.group_id,
            req.topic,
            req.consumer_id,
            [item],
            authorize=settle_authorizer(principal, req.group_id),
        )
        if r.error is not None:
            raise r.error
        return _ok(self._result(r))

    async def acknowledge_batch(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        req: BatchAcknowledgeRequest = decode_json(_ack_batch, body)
        groups = self._groups()
        if not req.acks:
            raise errors.BadRequest("acks must not be empty", field="acks")
        if len(req.acks) > self.settings.max_batch_messages:
            raise errors.BadRequest(
                f"batch has {len(req.acks)} acknowledgements; at most "
                f"{self.settings.max_batch_messages} are allowed",
                field="acks",
            )
        # Made positionally, and the delay (with its field name) only where one is given:
        # this runs once per message of the batch.
        items = [
            SettleItem(
                a.message_id,
                "ack" if a.success else "nack",
                a.error,
                None
                if a.requeue_delay is None
                else groups.nack_delay_ms(a.requeue_delay, f"acks[{i}].requeue_delay"),
            )
            for i, a in enumerate(req.acks)
        ]
        results = await groups.settle(
            req.group_id,
            req.topic,
            req.consumer_id,
            items,
            authorize=settle_authorizer(principal, req.group_id),
        )
        out: list[Settled | dict[str, object]] = []
        refused: list[Forbidden] = []
        failed = 0
        result = self._result
        for r in results:
            e = r.error
            if e is None:
                out.append(result(r))
                continue
            failed += 1
            if isinstance(e, Forbidden):
                refused.append(e)
            out.append(
                {"message_id": r.message_id, "error": {"code": str(e.code), "message": e.message}}
            )
        if refused and principal is not None:
            # Answered 200, but a refusal all the same: the audit log records every one.
            self.audit.record(
                actor=principal.subject, action="/api/v1/messages/acknowledge/batch",
                target=refused[0].target, outcome="denied", peer=peer,
                detail={"status": 403, "refused": len(refused), "reason": refused[0].message},
            )  # fmt: skip
        return _ok({"results": out, "succeeded": len(results) - failed, "failed": failed})

    async def extend(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        req: ExtendRequest = decode_json(_extend, body)
        groups = self._groups()
        item = SettleItem(
            message_id=req.message_id,
            action="extend",
            visibility_ms=groups.visibility_ms(req.visibility_timeout, "visibility_timeout"),
        )
        [r] = await groups.settle(
            req.group_id,
            req.topic,
            req.consumer_id,
            [item],
            authorize=settle_authorizer(principal, req.group_id),
        )
        if r.error is not None:
            raise r.error
        return _ok(self._result(r))

    # ---- consumers --------------------------------------------------------------------------

    async def register_consumer(self, params: list[str], query: bytes, body: bytes) -> Response:
        req: RegisterConsumerRequest = decode_json(_register, body)
        check_id(req.consumer_id, "consumer_id")
        check_id(req.group_id, "group_id")
        if not req.topics:
            raise errors.BadRequest("topics must not be empty", field="topics")
        for i, t in enumerate(req.topics):
            _check_topic_name(t, f"topics[{i}]")
        info, created = await self._meta().register(req, now_ms())
        if self.groups is not None:
            self.groups.forget_consumer(req.consumer_id)  # new limits apply at once
        if created:
            log.info(
                "consumer registered",
                extra={"consumer_id": req.consumer_id, "group_id": req.group_id},
            )
        return _ok(info, 201 if created else 200)

    async def list_consumers(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        consumers = await self._meta().list_consumers(_query_param(query, "group_id"))
        return _ok({"consumers": [c for c in consumers if may_see_consumer(principal, c)]})

    async def get_consumer(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        info = await self._meta().get_consumer(params[0])
        if info is None:
            raise errors.NotFound(f"no consumer {params[0]!r} is registered", field="consumer_id")
        require_see_consumer(principal, info)
        return _ok(info)

    async def delete_consumer(self, params: list[str], query: bytes, body: bytes) -> Response:
        if not await self._meta().delete_consumer(params[0]):
            raise errors.NotFound(f"no consumer {params[0]!r} is registered", field="consumer_id")
        released = 0
        if self.groups is not None:
            self.groups.forget_consumer(params[0])
            released = await self.groups.store.release_consumer(params[0], now_ms())
        log.info("consumer deleted", extra={"consumer_id": params[0], "released": released})
        return _ok({"consumer_id": params[0], "deleted": True, "released": released})

    async def heartbeat(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        meta = self._meta()
        info = await meta.get_consumer(params[0])
        if info is None:
            raise errors.NotFound(f"no consumer {params[0]!r} is registered", field="consumer_id")
        require_see_consumer(principal, info)
        now = now_ms()
        meta.touch(params[0], now)
        return _ok({"consumer_id": params[0], "active": True, "last_seen": now})

    async def metric_history(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        interval_ms = max(1, round(self.settings.metrics_interval_s * 1000))
        q = parse_metrics_query(query, now_ms(), interval_ms)
        if q.topic is not None:
            require_see_topic(principal, q.topic)
        points = await self._meta().query_points(q.start_ms, q.end_ms, q.topic, q.step_ms)
        if q.topic is None and principal is not None:
            points = [p for p in points if may_see_topic(principal, p.topic)]
        if len(points) > MAX_METRIC_POINTS:
            raise errors.InvalidQuery(
                f"the range holds {len(points)} points, more than {MAX_METRIC_POINTS}; "
                "ask for a larger step, narrow start_time/end_time or filter by topic",
                field="step",
            )
        return _ok(
            {
                "start_time": format_rfc3339(q.start_ms),
                "end_time": format_rfc3339(q.end_ms),
                "topic": q.topic,
                "interval_s": self.settings.metrics_interval_s,
                "step_s": q.step_ms / 1000,
                "aggregation": _AGGREGATION,
                "points": points,
            }
        )

    async def audit_log(self, params: list[str], query: bytes, body: bytes) -> Response:
        """The audit log of a time range (admins only, see ``access.authorize``)."""
        start, end, limit = parse_audit_query(query, now_ms())
        store = self.meta
        if store is None:
            raise errors.Unavailable("no metadata store: no audit log")
        entries = await store.query_audit(start, end, limit)
        return _ok(
            {
                "start_time": format_rfc3339(start),
                "end_time": format_rfc3339(end),
                "entries": [{**e, "time": format_rfc3339(int(e["time_ms"]))} for e in entries],
            }
        )

    # ---- grants kept in the metadata store (mqfast.grants) -----------------------------------

    async def create_grant(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        """Store a grant for a subject: 201, or 200 with the one stored when it exists already."""

        async def create() -> tuple[Response, str, StoredGrant]:
            req: CreateGrantRequest = decode_json(_create_grant, body)
            grant = check_request(req)
            actor = "" if principal is None else principal.subject
            stored, created = await self._meta().create_grant(req.subject, grant, actor, now_ms())
            if created:
                await self._grants_changed(stored.subject)
                log.info("grant created", extra={"subject": stored.subject, "id": stored.id})
            return _ok(stored, 201 if created else 200), stored.subject, stored

        return await self._audited_grant(
            "POST /api/v1/grants", target_of(body), principal, peer, create
        )

    async def list_grants(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        return _ok({"grants": await self._meta().list_grants(_query_param(query, "subject"))})

    async def delete_grant(
        self,
        params: list[str],
        query: bytes,
        body: bytes,
        principal: Principal | None,
        peer: str,
    ) -> Response:
        raw = params[0]

        async def delete() -> tuple[Response, str, StoredGrant]:
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
                raise errors.BadRequest(
                    f"grant_id must be the id of a grant, a positive integer (got {raw[:32]!r})",
                    field="grant_id",
                )
            stored = await self._meta().delete_grant(int(raw))
            if stored is None:
                raise errors.NotFound(f"no grant {raw!r} is stored", field="grant_id")
            await self._grants_changed(stored.subject)
            log.info("grant deleted", extra={"subject": stored.subject, "id": stored.id})
            answer = {"id": stored.id, "subject": stored.subject, "deleted": True}
            return _ok(answer), stored.subject, stored

        return await self._audited_grant(
            "DELETE /api/v1/grants/{grant_id}", raw, principal, peer, delete
        )

    async def _grants_changed(self, subject: str) -> None:
        # This process applies its own change before it answers; the others follow the
        # store's notification within about a second.
        if self.grants is None:
            return
        try:
            await self.grants.reload(subject)
        except errors.Unavailable:
            self.grants.changed(subject)  # committed all the same: applied once readable

    async def _audited_grant(
        self,
        action: str,
        target: str,
        principal: Principal | None,
        peer: str,
        change: Callable[[], Awaitable[tuple[Response, str, StoredGrant]]],
    ) -> Response:
        """``change()`` with one audit entry: the grant and its subject on success, the reason
        otherwise (refusals, 403, are recorded by ``forbidden``)."""
        actor = "" if principal is None else principal.subject
        try:
            result, subject, stored = await change()
        except errors.MqfastError as e:
            self.audit.record(
                actor=actor, action=action, target=target[:256], outcome="failed", peer=peer,
                detail={"status": e.status, "reason": e.message},
            )  # fmt: skip
            raise
        self.audit.record(
            actor=actor, action=action, target=subject[:256], outcome="ok", peer=peer,
            detail={"status": result[0], "grant": msgspec.to_builtins(stored)},
        )  # fmt: skip
        return result

    # ---- health ---------------------------------------------------------------------------

    def _engine_check(self) -> dict[str, object]:
        try:
            return self.sink.health()
        except Exception as e:  # a health probe must answer, whatever the engine does
            return {"status": "down", "engine": self.sink.name, "detail": str(e)}

    def health(self, params: list[str], query: bytes, body: bytes) -> Response:
        """``ok``; ``degraded`` (200) when PostgreSQL or Redis is down but produce works;
        ``down`` (503) when the engine cannot store messages or the server is stopping."""
        status, checks, degraded = self._health_state()
        out: dict[str, object] = {
            "status": status,
            "version": __version__,
            "engine": self.sink.name,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "checks": checks,
        }
        if status == "degraded":
            out["degraded"] = degraded
        # A group behind is the consumers' trouble, not the gateway's: reported, never 503.
        out["consumer_groups"] = self._group_health
        return _ok(out, 503 if status == "down" else 200)

    def _health_state(self) -> tuple[str, dict[str, Any], list[str]]:
        """The overall status, every check's answer, and the dependencies that are not up."""
        engine = self._engine_check()
        up = engine.get("status") == "up"
        checks: dict[str, Any] = {"engine": engine}
        degraded = []
        if self.settings.engine == "embedded":
            # The embedded engine keeps metadata and shared state itself: nothing else to reach.
            for dep in ("postgres", "redis", "kafka"):
                checks[dep] = {"status": "not_used"}
        for name, check in self.dependencies.items():
            try:
                result = check()
            except Exception as e:  # a health probe must answer, whatever a client does
                result = {"status": "down", "detail": str(e)}
            checks[name] = result
            if result.get("status") != "up":
                degraded.append(name)
        if not up or (self.core and self.core.shutting_down):
            status = "down"
        else:
            status = "degraded" if degraded else "ok"
        return status, checks, degraded

    def metric_levels(self) -> dict[str, Any]:
        """Gauges for the metrics scrape: the health status and checks, read now (the checks are
        the cheap ones /health runs), and the groups' lags, oldest unacknowledged age and
        dead-letter sizes of the sampler's last look (the scrape never waits for the engine)."""
        status, checks, _ = self._health_state()
        now = now_ms()
        return {
            "status": status,
            "checks": {
                name: c.get("status") == "up"
                for name, c in checks.items()
                if c.get("status") != "not_used"
            },
            "groups": [
                (group, topic, lag, None if oldest is None else max(0, now - oldest) / 1000)
                for group, topic, lag, oldest in self._group_levels
            ],
            "dead_letters": self._dead_letters,
        }

    def note_group_health(
        self, infos: dict[str, TopicInfo], unacked: list[Unacked] | None, now: int
    ) -> None:
        """Summarise for ``/health`` the groups' lags of ``infos`` and their deliveries not
        acknowledged (``None``: the group store could not say). Called by the metric sampler
        every interval, so that a probe never waits for the engine."""
        max_lag = self.settings.health_max_lag
        max_age_ms = self.settings.health_max_unacked_age_ns // 1_000_000
        pairs: dict[tuple[str, str], dict[str, Any]] = {}
        for name, info in infos.items():
            for g in info.consumer_groups:
                pairs[(g.group_id, name)] = {"group_id": g.group_id, "topic": name, "lag": g.lag}
        oldest: dict[tuple[str, str], int] = {}
        expired_total = 0
        for u in unacked or ():
            oldest[(u.group, u.topic)] = u.oldest_ms
            entry = pairs.setdefault(
                (u.group, u.topic), {"group_id": u.group, "topic": u.topic, "lag": 0}
            )
            entry["oldest_unacked_age_s"] = max(0, now - u.oldest_ms) / 1000
            entry["expired_leases"] = u.expired_leases
            expired_total += u.expired_leases
        behind = []
        for entry in pairs.values():
            reasons = []
            if entry["lag"] > max_lag:
                reasons.append("lag")
            if entry.get("oldest_unacked_age_s", 0) * 1000 > max_age_ms:
                reasons.append("unacked_age")
            if entry.get("expired_leases", 0):
                reasons.append("expired_leases")
            if reasons:
                behind.append({**entry, "reasons": reasons})
        behind.sort(key=lambda e: (-e["lag"], e["group_id"], e["topic"]))
        self._group_levels = [
            (e["group_id"], e["topic"], e["lag"], oldest.get(key)) for key, e in pairs.items()
        ]
        self._oldest_unacked = oldest
        self._dead_letters = {
            name: infos[dlq_name(name)].messages for name in infos if dlq_name(name) in infos
        }
        self._group_health = {
            "status": "behind" if behind else "ok",
            "checked_at": format_rfc3339(now),
            "groups": len(pairs),
            "max_lag": max_lag,
            "max_unacked_age_s": max_age_ms / 1000,
            "expired_leases": expired_total if unacked is not None else None,
            "behind_total": len(behind),
            "behind": behind[:HEALTH_LISTED],
        }

    def live(self, params: list[str], query: bytes, body: bytes) -> Response:
        return _ok({"status": "ok"})

    def ready_check(self, params: list[str], query: bytes, body: bytes) -> Response:
        engine = self._engine_check()
        shutting = bool(self.core and self.core.shutting_down)
        ok = self.ready and engine.get("status") == "up" and not shutting
        reason = "ok" if ok else ("shutting down" if shutting else "engine not ready")
        return _ok({"status": "ready" if ok else "not_ready", "reason": reason}, 200 if ok else 503)

    def console(self, params: list[str], query: bytes, body: bytes) -> Response:
        """The web console's files (``/console`` is its page), when it is on."""
        if not self.settings.console_enabled:
            raise errors.NotFound(
                "the web console is off: it is served on a loopback listener or with "
                "authentication on, or with MESSAGE_QUEUE_CONSOLE=on"
            )
        name = params[0] if params else "index.html"
        ctype = CONSOLE_FILES.get(name)
        if ctype is None:
            raise errors.NotFound(f"no such console file: {name!r}")
        data = self._console_files.get(name)
        if data is None:
            data = resources.files("mqfast").joinpath("console", name).read_bytes()
            self._console_files[name] = data
        return 200, data, CONSOLE_HEADERS % ctype

    def openapi(self, params: list[str], query: bytes, body: bytes) -> Response:
        if self._openapi is None:
            self._openapi = resources.files("mqfast").joinpath("openapi.json").read_bytes()
        return 200, self._openapi, None
