"""The blocking client: the asyncio client run on a private event loop in a daemon thread.

One implementation of pooling, retries, batching and leases serves both APIs. A call crosses
threads once per request (tens of microseconds); per message, ``Producer.send`` takes a lock
and appends, and ``Consumer`` iterates over fetched batches locally.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import uvloop

from mqfast.client._aio import DEFAULT_RETRY, AsyncClient, AsyncConsumer, AsyncProducer, Retry
from mqfast.client._types import (
    AckItem,
    AckResult,
    ClientError,
    Duration,
    ItemError,
    Message,
    OutgoingMessage,
    ProduceResult,
    duration,
)

T = TypeVar("T")

# How often a blocking call of the sync client lets the main thread see a signal.
_WAKE_S = 0.25


class _LoopThread:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="mqfast-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # The kernel hands a process's signal to any thread that does not block it. Taken by
        # this one, Ctrl-C would wait unseen until the main thread's call came back (a whole
        # long-poll): Python runs handlers on the main thread only, and nothing woke it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.wait(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)`` on the loop, waited for. The coroutine is made on the loop: a
        Ctrl-C between making and scheduling it would leave one never awaited (a warning)."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def finished(task: asyncio.Task[T]) -> None:
            if task.cancelled():
                done.cancel()
            elif (e := task.exception()) is not None:
                done.set_exception(e)
            else:
                done.set_result(task.result())

        def start() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    task = self.loop.create_task(fn(*args, **kw))
                except BaseException as e:
                    done.set_exception(e)
                    return
                task.add_done_callback(finished)

        self.loop.call_soon_threadsafe(start)
        return self.wait(done)

    @staticmethod
    def wait(future: concurrent.futures.Future[T]) -> T:
        # In slices: a signal's Python handler runs on the main thread only, between bytecodes;
        # a wait that never returns to the interpreter could leave Ctrl-C unseen for a whole
        # long-poll (seen: 1 in 50 consumes interrupted under load kept waiting).
        while True:
            try:
                return future.result(_WAKE_S)
            except concurrent.futures.TimeoutError:
                continue

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Closing:
    """``with`` closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Client(Closing):
    """The mqfast API, blocking; the same arguments and methods as :class:`AsyncClient`.

    Use it as ``with Client() as client: ...`` or call :meth:`close`. It may be shared by
    threads.
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
        self.aio = AsyncClient(
            url, token=token, retry=retry, timeout=timeout, connections=connections
        )
        self.url = self.aio.url
        self._thread = _LoopThread()
        self._closed = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of :attr:`aio` on the client's loop and wait for it."""
        return self._thread.run(coro)

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)``, a coroutine function of :attr:`aio`, run on the client's loop
        and waited for."""
        return self._thread.call(fn, *args, **kw)

    def close(self) -> None:
        """Close the pooled connections and stop the client's thread."""
        if not self._closed:
            self._closed = True
            self.call(self.aio.close)
            self._thread.stop()

    def create_topic(self, name: str, **settings: Any) -> dict[str, Any]:
        """See :meth:`AsyncClient.create_topic`."""
        return self.call(self.aio.create_topic, name, **settings)

    def get_topic(self, name: str) -> dict[str, Any]:
        """See :meth:`AsyncClient.get_topic`."""
        return self.call(self.aio.get_topic, name)

    def list_topics(self) -> list[dict[str, Any]]:
        """See :meth:`AsyncClient.list_topics`."""
        return self.call(self.aio.list_topics)

    def delete_topic(self, name: str) -> dict[str, Any]:
        """See :meth:`AsyncClient.delete_topic`."""
        return self.call(self.aio.delete_topic, name)

    def redrive(self, topic: str, max_messages: int | None = None) -> dict[str, Any]:
        """See :meth:`AsyncClient.redrive`."""
        return self.call(self.aio.redrive, topic, max_messages)

    def produce(self, content: str, topic: str, **fields: Any) -> ProduceResult:
        """See :meth:`AsyncClient.produce`."""
        return self.call(self.aio.produce, content, topic, **fields)

    def produce_batch(
        self,
        messages: Sequence[OutgoingMessage],
        topic: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> list[ProduceResult | ItemError]:
        """See :meth:`AsyncClient.produce_batch`."""
        return self.call(self.aio.produce_batch, messages, topic, idempotency_key=idempotency_key)

    def consume(self, topic: str, group: str, consumer_id: str, **options: Any) -> list[Message]:
        """See :meth:`AsyncClient.consume`."""
        return self.call(self.aio.consume, topic, group, consumer_id, **options)

    def settle(
        self, group: str, acks: Sequence[AckItem], **checks: str | None
    ) -> list[AckResult | ItemError]:
        """See :meth:`AsyncClient.settle`."""
        return self.call(self.aio.settle, group, acks, **checks)

    def extend(
        self, message_id: str, group: str, visibility_timeout: Duration, **checks: str | None
    ) -> AckResult:
        """See :meth:`AsyncClient.extend`."""
        return self.call(self.aio.extend, message_id, group, visibility_timeout, **checks)

    def producer(self, topic: str | None = None, **options: Any) -> Producer:
        """A batching producer (options as :class:`AsyncProducer`'s)."""
        return Producer(self, topic, **options)

    def consumer(self, topic: str, group: str, **options: Any) -> Consumer:
        """A consumer of ``topic`` in ``group`` (options as :class:`AsyncConsumer`'s)."""
        return Consumer(self, topic, group, **options)


async def _started(make: Callable[[], AsyncProducer]) -> AsyncProducer:
    producer = make()
    producer.start()
    return producer


class Producer(Closing):
    """:class:`AsyncProducer`, blocking: :meth:`send` returns a ``concurrent.futures.Future``.

    ``send`` blocks only while ``max_pending`` messages are unsettled. May be shared by threads.
    """

    def __init__(self, client: Client, topic: str | None = None, **options: Any) -> None:
        self.client = client
        self.aio = client.run(_started(lambda: AsyncProducer(client.aio, topic, **options)))
        self._loop = client._thread.loop
        self._lock = threading.Lock()
        # Sent here, not yet handed to the loop: handed over once full or after the linger, so
        # this thread and the loop's meet about once per batch, not once per message.
        self._inbox: list[
            tuple[OutgoingMessage, concurrent.futures.Future[ProduceResult], float]
        ] = []
        self._timer: asyncio.TimerHandle | None = None

    def send(
        self,
        content: str,
        *,
        topic: str | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        priority: int | None = None,
        ttl: Duration | None = None,
        idempotency_key: str | None = None,
    ) -> concurrent.futures.Future[ProduceResult]:
        """Queue one message; the future resolves when it is stored (or refused)."""
        if self.aio.closed:
            raise ClientError("the producer is closed")
        if topic is None and self.aio.topic is None:
            raise ValueError("no topic: give one to the producer or to send()")
        if len(self._inbox) + self.aio.unsettled >= self.aio.max_pending:
            self.client.run(self._handed_over(self.aio.wait_space()))
        fut: concurrent.futures.Future[ProduceResult] = concurrent.futures.Future()
        message = OutgoingMessage(content, topic, key, headers, priority, duration(ttl))
        message.idempotency_key = idempotency_key
        now = time.monotonic()
        with self._lock:
            self._inbox.append((message, fut, now))
            n = len(self._inbox)
        if n == 1:
            self._loop.call_soon_threadsafe(self._hand_over_later)
        elif n == self.aio.batch_size:
            self._loop.call_soon_threadsafe(self._hand_over)
        if n % 100 == 0:
            # Let the loop's thread take the GIL now: a caller sending in a tight loop would
            # otherwise hold it for whole switch intervals (5 ms) at each step of a request.
            time.sleep(0)
        return fut

    def _hand_over_later(self) -> None:
        if self._timer is None and self._inbox:
            self._timer = self._loop.call_later(self.aio.linger, self._hand_over)

    def _hand_over(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for message, fut, at in inbox:
            if not fut.cancelled():  # one the caller cancelled is not sent
                self.aio.enqueue(message, fut, at)

    async def _handed_over(self, then: Coroutine[Any, Any, None]) -> None:
        self._hand_over()
        await then

    def flush(self) -> None:
        """Send what is queued now and wait until every result is in."""
        self.client.run(self._handed_over(self.aio.flush()))

    def close(self) -> None:
        """Send what is queued, wait for every result, and stop."""
        self.client.run(self._handed_over(self.aio.close()))


class Consumer(Closing):
    """:class:`AsyncConsumer`, blocking: ``for message in consumer``; leases are extended on
    the client's thread while this one works. Use from one thread."""

    def __init__(self, client: Client, topic: str, group: str, **options: Any) -> None:
        self.client = client
        self.aio = AsyncConsumer(client.aio, topic, group, **options)
        self._buffer: deque[Message] = deque()

    @property
    def consumer_id(self) -> str:
        return self.aio.consumer_id

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Message:
        while not self._buffer:
            if self.aio.closed:
                raise StopIteration
            self._buffer.extend(self.poll())
        return self._buffer.popleft()

    def poll(self, max_messages: int | None = None, timeout: float | None = None) -> list[Message]:
        """See :meth:`AsyncConsumer.poll`."""
        return self.client.call(self.aio.poll, max_messages, timeout)

    def ack(self, message: Message) -> None:
        """See :meth:`AsyncConsumer.ack`."""
        self.aio.ack(message)

    def nack(
        self, message: Message, error: str | None = None, requeue_delay: Duration | None = None
    ) -> None:
        """See :meth:`AsyncConsumer.nack`."""
        self.aio.nack(message, error, requeue_delay)

    def commit(self) -> list[AckResult | ItemError]:
        """See :meth:`AsyncConsumer.commit`."""
        return self.client.call(self.aio.commit)

    def close(self) -> None:
        """See :meth:`AsyncConsumer.close`."""
        self._buffer.clear()
        self.client.call(self.aio.close)
