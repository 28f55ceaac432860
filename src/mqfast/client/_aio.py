"""The asyncio client: one pooled aiohttp session, a batching producer, a leasing consumer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import aiohttp
import msgspec

from mqfast.client._types import (
    AckItem,
    AckResult,
    ApiError,
    BatchAnswer,
    BatchItem,
    BatchRequest,
    ClientError,
    ConnectionFailed,
    ConsumeAnswer,
    Duration,
    ItemError,
    Message,
    OutgoingMessage,
    ProduceResult,
    api_error,
    duration,
)

log = logging.getLogger("mqfast.client")

DEFAULT_URL = "http://127.0.0.1:8087"
# Statuses that say "not now" rather than "no": overload, a restarting engine, a proxy between.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_MAX_BATCH = 1000  # the server's default MESSAGE_QUEUE_MAX_BATCH

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


def url_from_env(url: str | None) -> str:
    """``url``, else ``MQFAST_URL``, else the gateway's default address."""
    return (url or os.environ.get("MQFAST_URL") or DEFAULT_URL).rstrip("/")


def token_from_env(token: str | None) -> str | None:
    """``token``, else ``MQFAST_TOKEN`` (no token when neither is set)."""
    return token if token is not None else os.environ.get("MQFAST_TOKEN") or None


@dataclass(frozen=True)
class Retry:
    """How failed requests are retried: connection errors, 429, 502, 503 and 504.

    The wait is the answer's ``Retry-After`` when it has one, else an exponential backoff from
    ``backoff`` to ``backoff_max`` seconds with full jitter; at most ``attempts`` tries in all
    and never past ``deadline`` seconds from the first.
    """

    attempts: int = 6
    backoff: float = 0.1
    backoff_max: float = 5.0
    deadline: float = 60.0

    def delay(self, attempt: int, error: ClientError) -> float:
        if isinstance(error, ApiError) and error.retry_after is not None:
            return error.retry_after
        return random.uniform(0, min(self.backoff_max, self.backoff * 2**attempt))


DEFAULT_RETRY = Retry()
NO_RETRY = Retry(attempts=1)


def retryable(error: ClientError) -> bool:
    return isinstance(error, ConnectionFailed) or (
        isinstance(error, ApiError) and error.status in _RETRY_STATUSES
    )


class Closing:
    """``async with`` closes it."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AsyncClient(Closing):
    """The mqfast API over one pooled HTTP/1.1 session (keep-alive connections, reused).

    ``url`` defaults to ``MQFAST_URL`` (else ``http://127.0.0.1:8087``), ``token`` to
    ``MQFAST_TOKEN``. Durations are seconds or strings such as ``"30s"``. Every error is a
    :class:`ClientError`: :class:`ApiError` carries the server's status, code, message and field.
    Use it as ``async with AsyncClient() as client: ...`` or call :meth:`close`.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        retry: Retry = DEFAULT_RETRY,
        timeout: float = 30.0,
        connections: int = 64,
    ) -> None:
        self.url = url_from_env(url)
        self.retry = retry
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json"}
        token = token_from_env(token)
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        # Whether the server takes a per-message ``idempotency_key`` in a batch: unknown (None)
        # until a batch shows it; a server without it rejects the field (400 naming it).
        self.item_keys: bool | None = None

    async def close(self) -> None:
        """Close the pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _pool(self) -> aiohttp.ClientSession:
        if self._session is None:  # created here: a session belongs to the running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
            )
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """One API request (retried per ``retry``); the body of its 2xx answer."""
        policy = retry or self.retry
        started = time.monotonic()
        attempt = 0
        limit = aiohttp.ClientTimeout(total=timeout or self.timeout)
        while True:
            try:
                async with self._pool().request(
                    method, self.url + path, data=body, headers=headers, timeout=limit
                ) as r:
                    data = await r.read()
                    if r.status < 300:
                        return data
                    answer = api_error(r.status, data, r.headers.get("Retry-After"))
                    answer.outcome_unknown = r.headers.get("X-Mqfast-Outcome") == "unknown"
                    error: ClientError = answer
            except (aiohttp.ClientError, TimeoutError) as e:
                error = ConnectionFailed(f"{method} {path}: {type(e).__name__}: {e}".rstrip(": "))
                error.__cause__ = e
            attempt += 1
            if attempt >= policy.attempts or not retryable(error):
                raise error
            wait = policy.delay(attempt - 1, error)
            if time.monotonic() + wait - started > policy.deadline:
                raise error
            await asyncio.sleep(wait)

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        raw = await self.call(method, path, None if body is None else msgspec.json.encode(body))
        return msgspec.json.decode(raw)

    # Topics and dead letters: the server's JSON answers as they are.

    async def create_topic(
        self,
        name: str,
        *,
        partitions: int | None = None,
        retention: Duration | None = None,
        max_size: int | None = None,
        dead_letter_expired: bool | None = None,
        encrypted: bool | None = None,
    ) -> dict[str, Any]:
        """Create a topic (200 with the stored one if it exists with the same settings)."""
        body: dict[str, Any] = {"name": name}
        for k, v in (
            ("partitions", partitions),
            ("retention", duration(retention)),
            ("max_size", max_size),
            ("dead_letter_expired", dead_letter_expired),
            ("encrypted", encrypted),
        ):
            if v is not None:
                body[k] = v
        result: dict[str, Any] = await self._json("POST", "/api/v1/topics", body)
        return result

    async def get_topic(self, name: str) -> dict[str, Any]:
        """A topic's settings, partition counts and bytes, and its consumer groups' lag."""
        result: dict[str, Any] = await self._json("GET", f"/api/v1/topics/{_path(name)}")
        return result

    async def list_topics(self) -> list[dict[str, Any]]:
        """Every topic (those the token has some permission on), sorted by name."""
        result: list[dict[str, Any]] = (await self._json("GET", "/api/v1/topics"))["topics"]
        return result

    async def delete_topic(self, name: str) -> dict[str, Any]:
        """Delete a topic with its messages and group state."""
        result: dict[str, Any] = await self._json("DELETE", f"/api/v1/topics/{_path(name)}")
        return result

    async def redrive(self, topic: str, max_messages: int | None = None) -> dict[str, Any]:
        """Move the dead letters of ``topic`` (``<topic>.dlq``) back to it; ``{"moved": n}``."""
        body = None if max_messages is None else {"max_messages": max_messages}
        result: dict[str, Any] = await self._json(
            "POST", f"/api/v1/topics/{_path(topic)}/redrive", body
        )
        return result

    # Messages.

    async def produce_batch(
        self,
        messages: Sequence[OutgoingMessage],
        topic: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> list[ProduceResult | ItemError]:
        """Produce up to 1,000 messages in one request; one result per message, in order.

        The request carries one ``Idempotency-Key`` (``idempotency_key`` or a new one), the
        same on every retry, and each message an ``idempotency_key`` (its own or derived from
        the batch's) when the server takes one.
        """
        key = idempotency_key or uuid.uuid4().hex
        headers = {"Idempotency-Key": key}
        while True:
            keys = self.item_keys is not False
            if keys:
                for i, m in enumerate(messages):
                    if m.idempotency_key is None:
                        m.idempotency_key = f"{key}-{i}"
                out = messages
            elif any(m.idempotency_key is not None for m in messages):
                out = [_without_key(m) for m in messages]
            else:
                out = messages
            body = msgspec.json.encode(BatchRequest(list(out), topic))
            try:
                raw = await self.call("POST", "/api/v1/messages/batch", body, headers=headers)
            except ApiError as e:
                if keys and e.status == 400 and (e.field or "").endswith(".idempotency_key"):
                    self.item_keys = False  # an older server: retries may store a message twice
                    continue
                raise
            if keys:
                self.item_keys = True
            try:  # every message stored: the common answer, decoded straight into results
                stored: list[ProduceResult | ItemError] = []
                stored.extend(msgspec.json.decode(raw, type=_Stored).results)
                return stored
            except msgspec.ValidationError:
                answer = msgspec.json.decode(raw, type=BatchAnswer)
                return [_produced(item) for item in answer.results]

    async def produce(
        self,
        content: str,
        topic: str,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        priority: int | None = None,
        ttl: Duration | None = None,
    ) -> ProduceResult:
        """Produce one message and wait until it is durable (retried with one idempotency key)."""
        body = OutgoingMessage(content, topic, key, headers, priority, duration(ttl))
        raw = await self.call(
            "POST",
            "/api/v1/messages",
            msgspec.json.encode(body),
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        return msgspec.json.decode(raw, type=ProduceResult)

    async def consume(
        self,
        topic: str,
        group: str,
        consumer_id: str,
        *,
        max_messages: int = 100,
        timeout: float = 0.0,
        visibility_timeout: Duration | None = None,
    ) -> list[Message]:
        """Lease up to ``max_messages``, waiting up to ``timeout`` seconds for the first."""
        body: dict[str, Any] = {
            "topic": topic,
            "group_id": group,
            "consumer_id": consumer_id,
            "max_messages": max_messages,
        }
        if timeout:
            body["timeout"] = duration(timeout)
        if visibility_timeout is not None:
            body["visibility_timeout"] = duration(visibility_timeout)
        raw = await self.call(
            "POST",
            "/api/v1/messages/consume",
            msgspec.json.encode(body),
            timeout=self.timeout + timeout,
        )
        return msgspec.json.decode(raw, type=ConsumeAnswer).messages

    async def settle(
        self,
        group: str,
        acks: Sequence[AckItem],
        *,
        topic: str | None = None,
        consumer_id: str | None = None,
    ) -> list[AckResult | ItemError]:
        """Acknowledge (or, ``success=False``, fail) leased messages; one result per item."""
        results: list[AckResult | ItemError] = []
        for start in range(0, len(acks), _MAX_BATCH):
            body: dict[str, Any] = {"group_id": group, "acks": acks[start : start + _MAX_BATCH]}
            if topic is not None:
                body["topic"] = topic
            if consumer_id is not None:
                body["consumer_id"] = consumer_id
            raw = await self.call(
                "POST", "/api/v1/messages/acknowledge/batch", msgspec.json.encode(body)
            )
            results.extend(_settled(i) for i in msgspec.json.decode(raw, type=BatchAnswer).results)
        return results

    async def extend(
        self,
        message_id: str,
        group: str,
        visibility_timeout: Duration,
        *,
        consumer_id: str | None = None,
    ) -> AckResult:
        """Set a held lease's deadline to now + ``visibility_timeout``."""
        body: dict[str, Any] = {
            "message_id": message_id,
            "group_id": group,
            "visibility_timeout": duration(visibility_timeout),
        }
        if consumer_id is not None:
            body["consumer_id"] = consumer_id
        raw = await self.call("POST", "/api/v1/messages/extend", msgspec.json.encode(body))
        return msgspec.json.decode(raw, type=AckResult)

    def producer(self, topic: str | None = None, **options: Any) -> AsyncProducer:
        """A batching producer (see :class:`AsyncProducer` for the options)."""
        return AsyncProducer(self, topic, **options)

    def consumer(self, topic: str, group: str, **options: Any) -> AsyncConsumer:
        """A consumer of ``topic`` in ``group`` (see :class:`AsyncConsumer` for the options)."""
        return AsyncConsumer(self, topic, group, **options)


def _path(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


class _Stored(msgspec.Struct):
    results: list[ProduceResult]


def _without_key(m: OutgoingMessage) -> OutgoingMessage:
    return msgspec.structs.replace(m, idempotency_key=None)


def _produced(item: BatchItem) -> ProduceResult | ItemError:
    err = item.item_error()
    if err is not None:
        return err
    assert item.topic is not None and item.partition is not None
    assert item.offset is not None and item.timestamp is not None
    return ProduceResult(item.message_id, item.topic, item.partition, item.offset, item.timestamp)


def _settled(item: BatchItem) -> AckResult | ItemError:
    err = item.item_error()
    if err is not None:
        return err
    assert item.status is not None and item.topic is not None and item.delivery_count is not None
    return AckResult(
        item.message_id,
        item.status,
        item.topic,
        item.delivery_count,
        item.redeliver_at,
        item.lease_deadline,
    )


class ResultFuture(Protocol[T_contra]):
    """What the producer settles: an asyncio or a ``concurrent.futures`` future."""

    def done(self) -> bool: ...
    def set_result(self, result: T_contra, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


def _settle(fut: ResultFuture[T], value: T | BaseException) -> None:
    if fut.done():  # cancelled by its owner
        return
    try:
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)
    except asyncio.InvalidStateError:  # cancelled meanwhile from another thread
        pass


@dataclass(slots=True)
class _Pending:
    message: OutgoingMessage
    size: int
    at: float
    future: ResultFuture[ProduceResult]


class AsyncProducer(Closing):
    """Batches messages into ``POST /api/v1/messages/batch`` and reports each one's result.

    :meth:`send` queues a message and returns a future of its :class:`ProduceResult` (or
    :class:`ItemError` / :class:`ClientError` as its exception). A batch leaves when it has
    ``batch_size`` messages or ``batch_bytes`` of content, or ``linger`` seconds after its first
    message was queued; at most ``max_in_flight`` batches are outstanding. With the default 1,
    messages are stored in the order sent (retries included); with more, batches travel on
    separate connections and may be stored in any order. Each batch is retried per the client's
    :class:`Retry` with the same ``Idempotency-Key``. :meth:`send` waits while ``max_pending``
    messages are queued or in flight. :meth:`close` (or leaving ``async with``) sends what is
    queued and waits for every result.
    """

    def __init__(
        self,
        client: AsyncClient,
        topic: str | None = None,
        *,
        batch_size: int = 1000,
        batch_bytes: int = 1 << 20,
        linger: float = 0.005,
        max_in_flight: int = 1,
        max_pending: int = 100_000,
    ) -> None:
        if not 1 <= batch_size <= _MAX_BATCH:
            raise ValueError(f"batch_size must be 1-{_MAX_BATCH}, got {batch_size}")
        self.client = client
        self.topic = topic
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.max_pending = max_pending
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        self._unsettled = 0  # queued + in flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._ready = asyncio.Event()  # a first message, a full batch, flush or close
        self._space = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flushing = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    async def send(
        self,
        content: str,
        *,
        topic: str | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        priority: int | None = None,
        ttl: Duration | None = None,
        idempotency_key: str | None = None,
    ) -> asyncio.Future[ProduceResult]:
        """Queue one message; the future resolves when it is stored (or refused)."""
        if self._unsettled >= self.max_pending:
            await self.wait_space()
        if self._loop is None:
            self.start()
        assert self._loop is not None
        fut: asyncio.Future[ProduceResult] = self._loop.create_future()
        self.enqueue(
            OutgoingMessage(content, topic, key, headers, priority, duration(ttl), idempotency_key),
            fut,
        )
        return fut

    async def send_and_wait(self, content: str, **fields: Any) -> ProduceResult:
        """Queue one message and wait for its result."""
        return await (await self.send(content, **fields))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def unsettled(self) -> int:
        """Messages queued or in flight, their results not yet in."""
        return self._unsettled

    async def wait_space(self) -> None:
        """Wait while ``max_pending`` messages are unsettled."""
        while self._unsettled >= self.max_pending:
            self._space.clear()
            await self._space.wait()

    def enqueue(
        self,
        message: OutgoingMessage,
        future: ResultFuture[ProduceResult],
        sent_at: float | None = None,
    ) -> None:
        """Queue ``message`` (on the producer's loop); ``future`` gets its result.

        ``sent_at`` (``time.monotonic()``, default now) is when the linger of its batch began.
        """
        if self._closed:
            raise ClientError("the producer is closed")
        if message.topic is None and self.topic is None:
            raise ValueError("no topic: give one to the producer or to send()")
        if self._loop is None:
            self.start()
        size = len(message.content) + len(message.key or "") + 64
        at = time.monotonic() if sent_at is None else sent_at
        self._queue.append(_Pending(message, size, at, future))
        before = self._queued_bytes
        self._queued_bytes += size
        self._unsettled += 1
        n = len(self._queue)
        # Only what the flusher waits for: a first message (the linger starts) or a full batch.
        if n == 1 or n == self.batch_size or before < self.batch_bytes <= self._queued_bytes:
            self._ready.set()

    def start(self) -> None:
        """Start the batching task on the running loop (the first :meth:`send` does it)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run())

    async def flush(self) -> None:
        """Send what is queued now (no linger) and wait until every result is in."""
        if self._task is None:
            return
        self._flushing += 1
        try:
            self._ready.set()
            while self._unsettled:
                self._idle.clear()
                await self._idle.wait()
        finally:
            self._flushing -= 1

    async def close(self) -> None:
        """Send what is queued, wait for every result, and stop."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        if self._task is not None:
            self._ready.set()
            await self._task

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            if (
                not self._flushing
                and not self._closed
                and len(self._queue) < self.batch_size
                and self._queued_bytes < self.batch_bytes
            ):
                wait = self._queue[0].at + self.linger - time.monotonic()
                if wait > 0:
                    self._ready.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ready.wait(), wait)
                    continue
            await self._slots.acquire()
            batch = self._take()
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and len(batch) < self.batch_size:
            p = self._queue[0]
            if batch and size + p.size > self.batch_bytes:
                break
            batch.append(self._queue.popleft())
            size += p.size
        self._queued_bytes -= size
        return batch

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            while batch:
                try:
                    messages = [p.message for p in batch]
                    results = await self.client.produce_batch(messages, self.topic)
                except ApiError as e:
                    # The server checks a batch whole and names the first bad message; only
                    # that one is refused here, the others go again without it.
                    bad = _culprit(e, len(batch))
                    if bad is None or len(batch) == 1:
                        raise
                    _settle(batch.pop(bad).future, e)
                    self._settled(1)
                    continue
                for p, result in zip(batch, results, strict=True):
                    _settle(p.future, result)
                break
        except ClientError as e:
            for p in batch:
                _settle(p.future, e)
        finally:
            self._slots.release()
            self._settled(len(batch))

    def _settled(self, n: int) -> None:
        self._unsettled -= n
        self._space.set()
        if not self._unsettled:
            self._idle.set()


_CULPRIT = re.compile(r"messages\[(\d+)\]")


def _culprit(error: ApiError, n: int) -> int | None:
    """The index of the message a 400/413 of a batch names, if it names one."""
    m = _CULPRIT.match(error.field or "") if error.status in (400, 413) else None
    return int(m.group(1)) if m and int(m.group(1)) < n else None


def default_consumer_id() -> str:
    """``host-pid-random``: unique per consumer object, recognisable in the server's lists."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class AsyncConsumer(Closing):
    """Long-polls ``topic`` for ``group``; yields :class:`Message` objects one by one.

    ``async for message in consumer`` fetches up to ``batch_size`` messages at a time (waiting
    up to ``poll_timeout`` seconds; an empty poll just polls again). :meth:`ack` and
    :meth:`nack` queue a settlement; queued ones are sent in one batch acknowledge before the
    next fetch, by :meth:`commit`, and by :meth:`close`. While a message is held (fetched and
    not settled) its lease is extended in the background before it runs out (``auto_extend``).
    :meth:`close` (or leaving ``async with``) sends the queued settlements and releases every
    message still held for immediate redelivery (a failed delivery, like an expired lease), so
    nothing waits for a lease to run out. Settlements the server refuses (e.g. a lease that
    expired) go to ``on_error``, by default a warning on the ``mqfast.client`` logger.
    """

    def __init__(
        self,
        client: AsyncClient,
        topic: str,
        group: str,
        *,
        consumer_id: str | None = None,
        batch_size: int = 100,
        poll_timeout: float = 30.0,
        visibility_timeout: float | None = None,
        auto_extend: bool = True,
        on_error: Callable[[ItemError], None] | None = None,
    ) -> None:
        self.client = client
        self.topic = topic
        self.group = group
        self.consumer_id = consumer_id or default_consumer_id()
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.visibility_timeout = visibility_timeout
        self.auto_extend = auto_extend
        self.on_error = on_error or _warn
        self._buffer: deque[Message] = deque()
        # Leased and not settled, by id: what auto-extend keeps alive and close() releases.
        # Written from the sync Consumer's thread too: single dict operations only.
        self._held: dict[str, Message] = {}
        self._settlements: deque[AckItem] = deque()
        self._lease_s = visibility_timeout  # learnt from the first answer when not given
        self._extender: asyncio.Task[None] | None = None
        self._poll: asyncio.Task[list[Message]] | None = None
        # Set while no poll runs: close() waits for one that is sending settlements.
        self._poll_idle = asyncio.Event()
        self._poll_idle.set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            self._buffer.extend(await self.poll())
        return self._buffer.popleft()

    async def poll(
        self, max_messages: int | None = None, timeout: float | None = None
    ) -> list[Message]:
        """Send queued settlements, then lease up to ``max_messages`` (a list, maybe empty)."""
        if self._closed:
            raise ClientError("the consumer is closed")
        self._poll_idle.clear()
        try:
            return await self._poll_once(max_messages, timeout)
        finally:
            self._poll_idle.set()

    async def _poll_once(self, max_messages: int | None, timeout: float | None) -> list[Message]:
        await self.commit()
        if self._closed:
            return []  # closed by another task while the settlements were sent
        wait = self.poll_timeout if timeout is None else timeout
        asked = time.time()
        self._poll = asyncio.get_running_loop().create_task(
            self.client.consume(
                self.topic,
                self.group,
                self.consumer_id,
                max_messages=max_messages or self.batch_size,
                timeout=wait,
                visibility_timeout=self.visibility_timeout,
            )
        )
        try:
            messages = await self._poll
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                return []  # close() stopped this poll: the iteration ends
            raise
        finally:
            self._poll = None
        for m in messages:
            self._held[m.message_id] = m
        if messages and self._lease_s is None:
            self._lease_s = max(0.001, messages[0].lease_deadline / 1000 - asked)
        if messages and self.auto_extend and self._extender is None:
            self._extender = asyncio.get_running_loop().create_task(self._extend_leases())
        return messages

    def ack(self, message: Message) -> None:
        """Queue a positive acknowledgement: the message is complete for the group."""
        self._held.pop(message.message_id, None)
        self._settlements.append(AckItem(message.message_id))

    def nack(
        self, message: Message, error: str | None = None, requeue_delay: Duration | None = None
    ) -> None:
        """Queue a failed delivery: redelivered after a backoff (or ``requeue_delay``)."""
        self._held.pop(message.message_id, None)
        self._settlements.append(AckItem(message.message_id, False, error, duration(requeue_delay)))

    async def commit(self) -> list[AckResult | ItemError]:
        """Send the queued settlements now; their results (refusals also go to ``on_error``)."""
        items: list[AckItem] = []
        while self._settlements:
            items.append(self._settlements.popleft())
        if not items:
            return []
        try:
            results = await self.client.settle(
                self.group, items, topic=self.topic, consumer_id=self.consumer_id
            )
        except BaseException:
            self._settlements.extendleft(reversed(items))  # kept for the next attempt
            raise
        for r in results:
            if isinstance(r, ItemError):
                self.on_error(r)
        return results

    async def close(self) -> None:
        """Stop: send queued settlements, release held messages, stop extending leases."""
        if self._closed:
            return
        self._closed = True
        if self._poll is not None:
            # A long-poll stopped mid-flight: what it leased meanwhile waits for its lease to
            # run out.
            self._poll.cancel()
        await self._poll_idle.wait()  # a poll sending settlements finishes first
        if self._extender is not None:
            self._extender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._extender
        self._buffer.clear()
        for mid in list(self._held):
            if self._held.pop(mid, None) is not None:
                self._settlements.append(AckItem(mid, False, "released by consumer close", 0))
        await self.commit()

    async def _extend_leases(self) -> None:
        """Extend each held lease when a third of it is left, to a whole lease from now."""
        while True:
            assert self._lease_s is not None
            lease = self._lease_s
            await asyncio.sleep(min(1.0, lease / 6))
            soon = (time.time() + lease / 3) * 1000
            due = [m for m in list(self._held.values()) if m.lease_deadline <= soon]
            # No batch extend in the API: one request each, all at once on the pool.
            await asyncio.gather(*(self._extend(m, lease) for m in due))

    async def _extend(self, m: Message, lease: float) -> None:
        if m.message_id not in self._held:
            return  # settled meanwhile
        try:
            r = await self.client.extend(
                m.message_id, self.group, lease, consumer_id=self.consumer_id
            )
        except ApiError as e:
            if e.status in (404, 409):  # settled meanwhile, or the lease was lost
                self._held.pop(m.message_id, None)
            else:
                log.warning("lease extension failed", extra={"error": str(e)})
            return
        except ClientError as e:
            log.warning("lease extension failed", extra={"error": str(e)})
            return
        if r.lease_deadline is not None:
            m.lease_deadline = r.lease_deadline


def _warn(error: ItemError) -> None:
    log.warning("settlement refused", extra={"error": str(error)})
