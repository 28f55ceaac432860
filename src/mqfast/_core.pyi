"""Type stubs of the compiled core (``_core.pyx``): every name Python code may use."""

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from mqfast.auth import Principal
from mqfast.config import Settings
from mqfast.messages import IdemKey, LeasedMessage
from mqfast.sinks import Sink

LATENCY_BUCKETS: tuple[float, ...]
"""Upper bounds (seconds) of the latency histogram buckets; +Inf is implied."""

STATUS_CODES: tuple[int, ...]
PRODUCE_TEMPLATE: str
BATCH_TEMPLATE: str

class _Stream(Protocol):
    """An answer that stays open (``mqfast.stream.EventStream``): the core writes the head,
    then calls ``start`` with the connection and tells it of the transport's flow control."""

    def start(self, conn: HttpProtocol) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def connection_lost(self) -> None: ...
    def shutdown(self) -> None: ...

_Answer = tuple[int, bytes, bytes | None] | _Stream

class _App(Protocol):
    def handle(
        self, template: str, method: str, params: list[bytes], query: bytes, body: bytes
    ) -> _Answer | Awaitable[_Answer]: ...
    async def resolve_topics(self, names: list[str], principal: Principal | None = None) -> None:
        """Make unknown topics known (found, or auto-created when ``principal`` may)."""

def debug_counters() -> dict[str, int]:
    """Pooled objects alive now; zero when every request has been answered and released."""

def reseed_ids() -> None:
    """Draw a new random part for message ids; each worker process calls it after fork."""

def message_id_at(ms: int) -> str:
    """A new time-ordered message id (UUIDv7) for unix time ``ms``."""

def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition a key maps to (Kafka's murmur2 partitioner)."""

def decode_json(decoder: Any, body: bytes | bytearray | None) -> Any:
    """Decode a request body with ``decoder``; every failure is a 400 naming the field."""

def parse_request_head(head: bytes, max_header: int) -> tuple[bytes, bytes]:
    """Check a side listener's request head (up to its blank line) by the main listener's
    rules: ``(method, target)``, or an ``MqfastError`` (400, 431, 501, 505)."""

# done when a consume's client goes; set in the long-poll's context by the core
POLL_END: contextvars.ContextVar[asyncio.Future[None] | None]

def topic_name_error(name: str) -> str | None:
    """None when ``name`` is a valid topic name (Kafka's rules), else the reason."""

def offset_ranges(offsets: list[int], gap: int) -> list[tuple[int, int]]:
    """Ascending ``offsets`` as ``(first, last)`` ranges, joining gaps of at most ``gap``."""

def lease_rows(
    rows: list[tuple[Any, ...]],
    by_partition: dict[int, dict[int, tuple[int, int, Any]]],
    topic: str,
    consumer: str,
    deadline: int,
    now: int,
    where: dict[str, tuple[str, int, int]],
    messages: list[LeasedMessage],
    fresh: dict[tuple[int, int], list[tuple[int, str]]],
    retried: set[int],
    opener: Callable[[bytes | None, str, bytes, dict[str, str]], bytes] | None,
    open_error: type[BaseException],
    failed: list[tuple[int, int, int, int, Any, str, str]],
) -> int:
    """Answer the message rows read for an embedded lease (``EmbeddedGroups._deliver``);
    returns how many picked offsets had a row. See ``_runs.pyx``."""

def settle_hints(
    items: list[Any], where: dict[str, tuple[str, int, int]], topic: str | None
) -> dict[str, tuple[str, int, int]]:
    """Where this process leased the messages of ``items`` (those in ``topic``, if named)."""

def settle_places(
    items: list[Any],
    hints: dict[str, tuple[str, int, int]],
    runs: dict[tuple[str, int], list[Any]],
    place: dict[str, tuple[Any, int]],
    misses: list[str],
) -> None:
    """``place[id] = (run, offset)`` where a hint lands in a run holding the id; the other
    ids to ``misses``."""

def settle_acks(
    items: list[Any],
    start: int,
    place: dict[str, tuple[Any, int]],
    consumer: str | None,
    now: int,
    authorize: Callable[[str], Any] | None,
    shared: dict[Any, Any],
    results: list[Any],
    make_result: Callable[..., Any],
) -> int:
    """Settle ``items[start:]`` while each is an allowed acknowledgement of a live lease;
    returns the index of the first item left to the caller (``len(items)``: none)."""

class Router:
    """Maps a request path to a route id; built once from the route table."""

    produce_route: int
    batch_route: int
    def __init__(self, routes: list[tuple[str, tuple[str, ...]]]) -> None: ...
    def template(self, route: int) -> str: ...
    def allowed(self, route: int) -> tuple[str, ...]: ...
    def lookup(self, path: bytes) -> tuple[int, list[bytes]]:
        """(route id or -1, path parameters)."""

class TopicState:
    """What the hot path knows of a topic: its partition count and counters."""

    name: str
    partitions: int
    produced: int
    failed: int
    bytes_in: int
    def __init__(self, name: str, partitions: int) -> None: ...

class Delivery:
    """One message on its way to the engine; the engine sets ``offset`` or ``error``."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes
    headers: bytes | None
    priority: int
    timestamp_ms: int
    expires_ms: int
    message_id: str
    offset: int
    error: Exception | None
    idem: IdemKey | None
    replayed: bool

class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Server) -> None: ...
    def stream_send(self, data: bytes) -> None:
        """Send ``data`` (whole Server-Sent Events) on the connection's open stream."""
    def stream_end(self) -> None:
        """End the open stream cleanly (the last chunk) and close the connection."""

class Server:
    """Everything the connections of one worker share."""

    sink: Sink
    router: Router
    shutting_down: bool
    inflight: int
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sink: Sink,
        app: _App,
        routes: list[tuple[str, tuple[str, ...]]],
        settings: Settings,
        max_inflight: int = ...,
    ) -> None: ...
    def protocol(self) -> HttpProtocol:
        """Protocol factory for ``loop.create_server``."""
    def start(self) -> None:
        """Start the once-a-second sweeper (timeouts, the cached Date header)."""
    def set_topic(self, name: str, partitions: int) -> None:
        """Make ``name`` known to the hot path."""
    def drop_topic(self, name: str) -> None:
        """Forget ``name``: the next produce to it goes through the slow path again."""
    def set_auth(self, auth: Any, public_templates: Iterable[str]) -> None:
        """Require a verified token on every route but ``public_templates``."""
    def set_quotas(self, quotas: Any) -> None:
        """Per-subject produce quotas, checked locally on the hot path."""
    def forget_principals(self) -> None:
        """Drop every cached verification (keys rotated, grants changed)."""
    def forget_subject(self, subject: str) -> None:
        """Drop the cached verifications of ``subject`` (its stored grants changed)."""
    def set_stored_hook(self, hook: Callable[[list[Any]], None] | None) -> None:
        """Call ``hook(batch)`` after each engine batch (wakes long-polling consumers)."""
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters, read by the metrics collector at scrape time."""
    def begin_shutdown(self) -> None:
        """Stop taking new work: idle connections close now, busy ones after their answers."""
    def busy(self) -> int:
        """In-flight deliveries plus open connections."""
    def stop(self) -> None:
        """Cancel the sweeper and abort every connection."""
