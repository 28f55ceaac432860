"""What the two metadata stores share besides the ``MetaStore`` protocol; their SQL stays apart.

Both select consumers with ``CONSUMER_COLUMNS``, in that order, so one function turns a row of
either into a ``ConsumerInfo``; only the ``topics`` column is stored differently (a JSON array in
SQLite, ``TEXT[]`` in PostgreSQL), so the caller decodes it. Both prune metric history the same
way, in chunks, each chunk deleted by the store's own statement. The row form of metric points
lives with the rest of the metric history, in ``meta.history``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import msgspec

from mqfast import groups
from mqfast.errors import Unavailable
from mqfast.messages import ConsumerInfo, RegisterConsumerRequest

__all__ = [
    "AUDIT_FIELDS",
    "CONSUMER_COLUMNS",
    "PRUNE_CHUNK_ROWS",
    "TouchBuffer",
    "audit_from_row",
    "audit_row",
    "cancel_and_wait",
    "consumer_from_request",
    "consumer_from_row",
    "prune_history",
    "prune_quietly",
]

log = logging.getLogger("mqfast.meta")
_T = TypeVar("_T")

# Pruning deletes in chunks, each its own transaction, so that a backlog of expired history (a
# process that was down for days) never holds the write lock or bloats one transaction for long.
PRUNE_CHUNK_ROWS: Final = 5_000

CONSUMER_COLUMNS: Final = (
    "consumer_id, group_id, topics, max_concurrency, rate_limit, registered_at, last_seen, active"
)
# The columns of an audit record, in this order in both stores.
AUDIT_FIELDS: Final = ("time_ms", "actor", "action", "target", "outcome", "remote_addr", "detail")
_detail_encoder = msgspec.json.Encoder()
_detail_decoder = msgspec.json.Decoder(dict[str, Any])


def audit_row(entry: dict[str, object]) -> tuple[int, str, str, str, str, str, str]:
    """The row of one audit record, in ``AUDIT_FIELDS`` order, ``detail`` as JSON text.

    Keys (all optional): ``time_ms`` (default now), ``actor``, ``action``, ``target``,
    ``outcome``, ``remote_addr`` (text) and ``detail`` (a JSON-able dict). Raises
    ``ValueError`` for any other key, so that a misspelt field is not silently lost.
    """
    unknown = entry.keys() - set(AUDIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown audit fields: {', '.join(sorted(unknown))}")
    when = entry.get("time_ms")
    if when is None:
        when = groups.now_ms()
    elif not isinstance(when, int):
        raise ValueError("audit time_ms must be an int (unix milliseconds)")
    detail = entry.get("detail")
    if detail is None:
        detail = {}
    elif not isinstance(detail, dict):
        raise ValueError("audit detail must be a dict")
    actor, action, target, outcome, addr = (
        "" if t is None else str(t) for t in (entry.get(k) for k in AUDIT_FIELDS[1:6])
    )
    return when, actor, action, target, outcome, addr, _detail_encoder.encode(detail).decode()


def audit_from_row(row: Any) -> dict[str, Any]:
    """An audit record read back from a row in ``AUDIT_FIELDS`` order."""
    return {
        **dict(zip(AUDIT_FIELDS[:6], row[:6], strict=True)),
        "time_ms": int(row[0]),
        "detail": _detail_decoder.decode(row[6]),
    }


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (when there is one) and wait until it has finished."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def consumer_from_row(row: Any, topics: list[str]) -> ConsumerInfo:
    """A row of ``CONSUMER_COLUMNS``, its ``topics`` column already decoded by the caller."""
    return ConsumerInfo(
        consumer_id=row[0],
        group_id=row[1],
        topics=topics,
        max_concurrency=row[3],
        rate_limit=row[4],
        registered_at=int(row[5]),
        last_seen=int(row[6]),
        active=bool(row[7]),
    )


def consumer_from_request(
    req: RegisterConsumerRequest, registered_at: int, last_seen: int
) -> ConsumerInfo:
    """The active consumer that registering ``req`` leaves in the store."""
    return ConsumerInfo(
        consumer_id=req.consumer_id,
        group_id=req.group_id,
        topics=list(req.topics),
        max_concurrency=req.max_concurrency,
        rate_limit=None if req.rate_limit is None else float(req.rate_limit),
        registered_at=registered_at,
        last_seen=last_seen,
        active=True,
    )


async def prune_history(
    delete_chunk: Callable[[int, int], Awaitable[int]], retention_s: float, now_ms: int | None
) -> int:
    """Delete metric history older than ``retention_s`` before ``now_ms`` (default: now).

    ``delete_chunk(cutoff_ms, limit)`` deletes at most ``limit`` of the oldest points that start
    before ``cutoff_ms``, in a transaction of its own, and returns how many it deleted. Returns
    the number of points deleted.
    """
    cutoff_ms = (groups.now_ms() if now_ms is None else now_ms) - int(retention_s * 1000)
    deleted = 0
    while True:
        n = await delete_chunk(cutoff_ms, PRUNE_CHUNK_ROWS)
        deleted += n
        if n < PRUNE_CHUNK_ROWS:
            break
    if deleted:
        log.info("metric history: pruned %d points", deleted, extra={"deleted": deleted})
    return deleted


async def prune_quietly(prune: Callable[[], Awaitable[int]]) -> None:
    """``await prune()``, logging rather than raising ``Unavailable``: pruning is a side job of
    ``record_points``, whose points are already written."""
    try:
        await prune()
    except Unavailable as e:
        log.warning("metadata store: pruning metric history failed: %s", e)


class TouchBuffer:
    """Consumer touches (consumer id -> latest unix ms) waiting to be written, and the
    background task that has them written at most once per ``interval_s``.

    Loop thread only. ``write(op)`` hands the pending touches to the store's ``op``; until it
    returns they stay visible to ``overlay`` and ``unwritten`` (another connection may read the
    row before the write commits), and a failed write puts them back. ``flush`` is the store's
    method that calls ``write``. At most ``max_pending`` consumers are kept (a long
    outage must not grow memory without bound); touches of further ones are dropped and counted.
    ``quiet(error)`` says a failed flush was already logged by the store (an outage).
    """

    def __init__(
        self,
        interval_s: float,
        flush: Callable[[], Awaitable[None]],
        *,
        max_pending: int = 100_000,
        quiet: Callable[[BaseException], bool] = lambda e: False,
    ) -> None:
        self.interval_s = interval_s
        self._flush = flush
        self.max_pending = max_pending
        self._quiet = quiet
        self.pending: dict[str, int] = {}
        self._writing: list[dict[str, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_flush = 0.0  # loop.time() of the last flush attempt
        self._failures = 0  # consecutive failed flushes, so a streak is logged once
        self._closed = False
        self.dropped = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush in the background from now on (touches made before are kept)."""
        self._loop = loop
        # The first touch waits one interval like every later one (the loop's clock is the
        # machine's uptime, so 0.0 here would make the first flush immediate after an hour).
        self._last_flush = loop.time()
        if self.pending:
            self._schedule()

    async def stop(self) -> None:
        """No more background flushes (pending touches stay for a last ``write``)."""
        self._closed = True
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def add(self, consumer_id: str, now_ms: int) -> None:
        if self._closed:
            return
        pending = self.pending
        seen = pending.get(consumer_id)
        if seen is None:
            if len(pending) >= self.max_pending:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning(
                        "metadata store: %d consumers with unwritten touches; touches of further"
                        " consumers are dropped until they are written",
                        len(pending),
                    )
                return
            pending[consumer_id] = now_ms
        elif now_ms > seen:
            pending[consumer_id] = now_ms
        if self._task is None and self._loop is not None:
            self._schedule()

    def discard(self, consumer_id: str) -> None:
        self.pending.pop(consumer_id, None)

    async def write(self, op: Callable[[dict[str, int]], Awaitable[_T]]) -> _T:
        """Hand the pending touches to ``op``, which writes them (in its transaction); they
        stay visible to reads until it returns, and are pending again if it fails."""
        touches = self._take()
        try:
            result = await op(touches)
        except BaseException:
            self._done(touches, written=False)
            raise
        self._done(touches, written=True)
        return result

    def _take(self) -> dict[str, int]:
        """The pending touches, to write now; visible to reads until ``_done``."""
        touches, self.pending = self.pending, {}
        if touches:
            self._writing.append(touches)
        return touches

    def _done(self, touches: dict[str, int], *, written: bool) -> None:
        self._writing = [t for t in self._writing if t is not touches]
        if not written:
            pending = self.pending
            for cid, ms in touches.items():
                if ms > pending.get(cid, -1):
                    pending[cid] = ms
        elif self.dropped:
            log.info(
                "metadata store: consumer touches written again; %d were dropped meanwhile",
                self.dropped,
            )
            self.dropped = 0

    def overlay(self, info: ConsumerInfo) -> ConsumerInfo:
        """``info`` with the touches not written yet applied."""
        cid = info.consumer_id
        for touches in (self.pending, *self._writing):
            seen = touches.get(cid)
            if seen is not None:
                info.last_seen = max(info.last_seen, seen)
                info.active = True
        return info

    def unwritten(self) -> set[str]:
        """Ids of the consumers with touches not written yet."""
        return self.pending.keys() | {cid for touches in self._writing for cid in touches}

    def _schedule(self) -> None:
        assert self._loop is not None
        self._task = self._loop.create_task(self._later(), name="mqfast-meta-flush")

    async def _later(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(max(0.0, self._last_flush + self.interval_s - loop.time()))
            self._last_flush = loop.time()
            try:
                await self._flush()
            except Exception as e:
                self._failures += 1
                if self._failures == 1 and not self._quiet(e):
                    log.warning(
                        "metadata store: writing consumer last_seen failed, will retry: %s", e
                    )
            else:
                if self._failures:
                    log.info(
                        "metadata store: consumer last_seen written again after %d failures",
                        self._failures,
                    )
                self._failures = 0
        finally:
            if self._task is asyncio.current_task():
                self._task = None
                # Touches that arrived during the write (or a failed write) need another round.
                if self.pending and not self._closed:
                    self._schedule()
