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
from typing import Any, Final

import msgspec

from mqfast import groups
from mqfast.errors import Unavailable
from mqfast.messages import ConsumerInfo, RegisterConsumerRequest

__all__ = [
    "AUDIT_FIELDS",
    "CONSUMER_COLUMNS",
    "PRUNE_CHUNK_ROWS",
    "audit_from_row",
    "audit_row",
    "cancel_and_wait",
    "consumer_from_request",
    "consumer_from_row",
    "prune_history",
    "prune_quietly",
]

log = logging.getLogger("mqfast.meta")

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
