"""Metadata stores: registered consumers, per-interval metric history, the audit log and the
grants kept in the store.

One interface, two implementations: ``meta.sqlite.SqliteMeta`` (embedded, in the engine's
database file) and ``meta.postgres.PostgresMeta`` for clusters; what they share besides their SQL
is in ``meta.common`` (consumer rows, pruning) and ``meta.history`` (metric point rows).

Several gateway processes share one store, so every implementation keeps what must be consistent
in the database, never only in memory; the one exception is ``touch``, whose in-memory
``last_seen`` is flushed within about a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mqfast.auth import Grant
from mqfast.messages import ConsumerInfo, MetricPoint, RegisterConsumerRequest, StoredGrant

__all__ = ["MetaStore"]


class MetaStore(Protocol):
    """The metadata store. Every method is called on the event loop's thread.

    Async methods do their I/O off the loop and raise ``errors.Unavailable`` when the database
    cannot be reached or written.
    """

    # Called on the event loop when grants changed in the store, by any process sharing it:
    # with the subject, or None when the store cannot tell whose (see ``mqfast.grants``).
    on_grants_changed: Callable[[str | None], None] | None

    async def start(self) -> None:
        """Open (and migrate) the store and start its background work."""

    async def close(self) -> None:
        """Flush pending ``touch`` updates and release everything; idempotent."""

    # -- consumers -------------------------------------------------------------------------

    async def register(
        self, req: RegisterConsumerRequest, now_ms: int
    ) -> tuple[ConsumerInfo, bool]:
        """Register ``req.consumer_id`` or update its settings; returns ``(info, created)``.

        A new consumer gets ``registered_at = last_seen = now_ms``. Registering an existing id
        again replaces its group, topics and limits, keeps ``registered_at``, sets
        ``last_seen`` to ``now_ms`` and makes it active again.
        """
        ...

    async def get_consumer(self, consumer_id: str) -> ConsumerInfo | None:
        """The registered consumer or None (``last_seen`` includes unflushed touches)."""
        ...

    async def list_consumers(self, group_id: str | None = None) -> list[ConsumerInfo]:
        """Every registered consumer (of ``group_id`` when given), sorted by id."""
        ...

    async def delete_consumer(self, consumer_id: str) -> bool:
        """Unregister ``consumer_id``; False when it was not registered."""
        ...

    def touch(self, consumer_id: str, now_ms: int) -> None:
        """Record activity of ``consumer_id`` at ``now_ms``; sync, cheap, never raises.

        Written to the store in the background (at most about once per second, and on close).
        A touched consumer that was inactive becomes active again; touching an id that is not
        registered changes nothing in the store.
        """

    async def sweep_inactive(self, now_ms: int, timeout_ms: int) -> list[str]:
        """Mark active consumers last seen before ``now_ms - timeout_ms`` inactive.

        Returns the ids that became inactive in this call (sorted); concurrent sweeps from
        several processes each return a given id at most once. Pending touches of this process
        are written first, so a consumer it has just seen is never swept.
        """
        ...

    async def consumer_counts(self) -> tuple[int, int]:
        """``(active, total)`` registered consumers."""
        ...

    # -- metric history --------------------------------------------------------------------

    async def record_points(self, points: list[MetricPoint], worker: str) -> None:
        """Store one interval's points of one process (``worker``).

        ``point.time`` is the interval start (RFC 3339). Recording the same
        ``(time, topic, worker)`` again merges into the stored point: counters add up, gauges
        take the new value, percentiles take the maximum.
        """

    # -- grants ----------------------------------------------------------------------------

    async def create_grant(
        self, subject: str, grant: Grant, created_by: str, now_ms: int
    ) -> tuple[StoredGrant, bool]:
        """Store ``grant`` for ``subject``; returns ``(stored, created)``.

        The same grant (subject, topics, actions and groups) again returns the one stored with
        ``created`` False. Raises ``errors.Conflict`` when the subject has
        ``grants.MAX_STORED_GRANTS`` already. Every process learns of the change through
        ``on_grants_changed`` within about a second.
        """
        ...

    async def list_grants(self, subject: str | None = None) -> list[StoredGrant]:
        """The stored grants (of ``subject`` when given), ordered by id."""
        ...

    async def delete_grant(self, grant_id: int) -> StoredGrant | None:
        """Delete the grant ``grant_id``; the grant deleted, or None when there was none."""
        ...

    # -- audit log -------------------------------------------------------------------------

    async def audit(self, entry: dict[str, object]) -> None:
        """Append one audit record (``meta.common.audit_row`` says which keys)."""
        ...

    async def query_audit(
        self, start_ms: int, end_ms: int, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Audit records with ``time_ms`` in ``[start_ms, end_ms)``, oldest first."""
        ...

    async def query_points(
        self, start_ms: int, end_ms: int, topic: str | None, step_ms: int = 1
    ) -> list[MetricPoint]:
        """Points whose interval starts in ``[start_ms, end_ms)``, ``topic`` only when given.

        The points of every worker and interval in one step (``[k * step_ms, (k + 1) *
        step_ms)``) and topic are aggregated into one labelled with the step's start:
        counters summed, sizes and consumer counts the maximum, ``processing_avg_ms`` weighted
        by ``consumed``, percentiles the maximum (an upper bound of the step's), rates
        recomputed from the sums, ``interval_s`` the step (or the interval, if longer). Ordered
        by time, then topic; ``time`` is RFC 3339 UTC with ``Z``.
        """
        ...
