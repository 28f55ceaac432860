"""Handlers of the routes that are not hot: topics, health, the OpenAPI document.

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
from urllib.parse import unquote

import msgspec

from mqfast import __version__, errors
from mqfast._core import Server, topic_name_error
from mqfast.config import Settings, parse_duration
from mqfast.messages import CreateTopicRequest, TopicConfig, create_topic_decoder
from mqfast.sinks import Sink

Response = tuple[int, bytes, bytes | None]
Handler = Callable[[list[str], bytes, bytes], Response | Coroutine[Any, Any, Response]]

log = logging.getLogger("mqfast.api")

# The route table: the core matches these; labels in /metrics are these templates.
ROUTES: list[tuple[str, tuple[str, ...]]] = [
    ("/api/v1/messages", ("POST",)),
    ("/api/v1/messages/batch", ("POST",)),
    ("/api/v1/topics", ("GET", "POST")),
    ("/api/v1/topics/{name}", ("GET", "DELETE")),
    ("/health", ("GET",)),
    ("/health/live", ("GET",)),
    ("/health/ready", ("GET",)),
    ("/openapi.json", ("GET",)),
]

_json = msgspec.json.Encoder()


def _ok(obj: object, status: int = 200) -> Response:
    return status, _json.encode(obj), None


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    if not body:
        raise errors.MalformedJson("request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as e:
        raise errors.from_decode_error(e) from None
    except UnicodeDecodeError:
        raise errors.MalformedJson("request body is not valid UTF-8") from None


def _check_topic_name(name: str, field: str = "name") -> None:
    reason = topic_name_error(name)
    if reason is not None:
        raise errors.BadRequest(f"{reason} (got {name!r})", field=field)


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


class App:
    """The slow-path handlers, bound to one worker's core ``Server`` and engine."""

    def __init__(self, settings: Settings, sink: Sink) -> None:
        self.settings = settings
        self.sink = sink
        self.core: Server | None = None
        self.started = time.monotonic()
        self.ready = False
        self._handlers: dict[tuple[str, str], Handler] = {
            ("/api/v1/topics", "GET"): self.list_topics,
            ("/api/v1/topics", "POST"): self.create_topic,
            ("/api/v1/topics/{name}", "GET"): self.get_topic,
            ("/api/v1/topics/{name}", "DELETE"): self.delete_topic,
            ("/health", "GET"): self.health,
            ("/health/live", "GET"): self.live,
            ("/health/ready", "GET"): self.ready_check,
            ("/openapi.json", "GET"): self.openapi,
        }
        self._openapi: bytes | None = None

    def attach(self, core: Server) -> None:
        """Give the app the core it refreshes (topic cache)."""
        self.core = core

    def handle(
        self, template: str, method: str, params: list[bytes], query: bytes, body: bytes
    ) -> Response | Awaitable[Response]:
        """Entry point from the core for every route it does not answer itself."""
        handler = self._handlers.get((template, method))
        if handler is None:  # the router checked the method; a missing handler is our bug
            raise errors.MqfastError(f"no handler for {method} {template}")
        return handler([unquote(p.decode("latin-1")) for p in params], query, body)

    # ---- topics ---------------------------------------------------------------------------

    async def resolve_topics(self, names: list[str]) -> None:
        """Make unknown topics known to the hot path: found in the engine, or auto-created."""
        assert self.core is not None
        for name in names:
            _check_topic_name(name, "topic")
            cfg = await self.sink.get_topic(name)
            if cfg is None:
                if not self.settings.auto_create_topics:
                    raise errors.UnknownTopic(
                        f"unknown topic {name!r} (automatic creation is off: "
                        "MESSAGE_QUEUE_AUTO_CREATE_TOPICS=false); "
                        "create it with POST /api/v1/topics",
                        field="topic",
                    )
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
        req: CreateTopicRequest = _decode(create_topic_decoder, body)
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

    async def list_topics(self, params: list[str], query: bytes, body: bytes) -> Response:
        return _ok({"topics": await self.sink.list_topics()})

    async def get_topic(self, params: list[str], query: bytes, body: bytes) -> Response:
        _check_topic_name(params[0])
        return _ok(await self.sink.describe_topic(params[0]))

    async def delete_topic(self, params: list[str], query: bytes, body: bytes) -> Response:
        name = params[0]
        _check_topic_name(name)
        assert self.core is not None
        self.core.drop_topic(name)
        await self.sink.delete_topic(name)
        self.core.drop_topic(name)
        log.info("topic deleted", extra={"topic": name})
        return _ok({"name": name, "deleted": True})

    # ---- health ---------------------------------------------------------------------------

    def _engine_check(self) -> dict[str, object]:
        try:
            return self.sink.health()
        except Exception as e:  # a health probe must answer, whatever the engine does
            return {"status": "down", "engine": self.sink.name, "detail": str(e)}

    def health(self, params: list[str], query: bytes, body: bytes) -> Response:
        engine = self._engine_check()
        up = engine.get("status") == "up"
        checks: dict[str, object] = {"engine": engine}
        if self.settings.engine == "embedded":
            # The embedded engine keeps metadata and shared state itself: nothing else to reach.
            for dep in ("postgres", "redis", "kafka"):
                checks[dep] = {"status": "not_used"}
        status = "ok" if up and not (self.core and self.core.shutting_down) else "down"
        return _ok(
            {
                "status": status,
                "version": __version__,
                "engine": self.sink.name,
                "uptime_s": round(time.monotonic() - self.started, 3),
                "checks": checks,
            },
            200 if status == "ok" else 503,
        )

    def live(self, params: list[str], query: bytes, body: bytes) -> Response:
        return _ok({"status": "ok"})

    def ready_check(self, params: list[str], query: bytes, body: bytes) -> Response:
        engine = self._engine_check()
        shutting = bool(self.core and self.core.shutting_down)
        ok = self.ready and engine.get("status") == "up" and not shutting
        reason = "ok" if ok else ("shutting down" if shutting else "engine not ready")
        return _ok({"status": "ready" if ok else "not_ready", "reason": reason}, 200 if ok else 503)

    def openapi(self, params: list[str], query: bytes, body: bytes) -> Response:
        if self._openapi is None:
            self._openapi = resources.files("mqfast").joinpath("openapi.json").read_bytes()
        return 200, self._openapi, None
