"""The embedded metadata store: consumers and metric history in the engine's SQLite file.

It shares ``<data_dir>/mqfast.db`` with the embedded engine and keeps its own migrations under
the component ``"meta"`` of ``schema_version``. Like the engine, it does all SQLite work on one
dedicated thread with its own connection, in WAL mode, and starts every write transaction with
``BEGIN IMMEDIATE`` so contention is a wait bounded by ``busy_timeout``, not a failed upgrade.

Several processes (``--workers N``) share the file, so everything lives in the database. The one
thing held in memory is ``touch``: consume requests call it on the event loop at request rate, so
``last_seen`` is kept in a dict and written in one transaction at most once per
``flush_interval_s`` (and before every sweep, and on close). Reads of this process overlay the
unflushed values; other processes see them after the next flush.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, ParamSpec, TypeVar

import msgspec

from mqfast.auth import Grant
from mqfast.errors import Conflict, Unavailable
from mqfast.grants import MAX_STORED_GRANTS, actions_of, groups_of
from mqfast.messages import ConsumerInfo, MetricPoint, RegisterConsumerRequest, StoredGrant
from mqfast.meta.common import (
    CONSUMER_COLUMNS,
    TouchBuffer,
    audit_from_row,
    audit_row,
    cancel_and_wait,
    consumer_from_request,
    consumer_from_row,
    prune_history,
    prune_quietly,
)
from mqfast.meta.history import point_from_row, point_params
from mqfast.sinks.embedded import apply_migrations, immediate, write_lock

__all__ = ["DB_FILENAME", "SCHEMA_COMPONENT", "SqliteMeta"]

log = logging.getLogger("mqfast.meta")

_T = TypeVar("_T")
_A = TypeVar("_A")
_P = ParamSpec("_P")

DB_FILENAME: Final = "mqfast.db"  # the embedded engine's file (sinks.embedded.DB_FILENAME)
SCHEMA_COMPONENT: Final = "meta"

# Each entry is one schema version (index + 1). Append only; never edit an applied migration.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE meta_consumers (
            consumer_id TEXT PRIMARY KEY,
            group_id TEXT NOT NULL,
            topics TEXT NOT NULL,           -- JSON array of topic names
            max_concurrency INTEGER,        -- NULL: no cap
            rate_limit REAL,                -- deliveries per second, NULL: no cap
            registered_at INTEGER NOT NULL, -- unix ms
            last_seen INTEGER NOT NULL,     -- unix ms
            active INTEGER NOT NULL DEFAULT 1
        )""",
        "CREATE INDEX meta_consumers_group ON meta_consumers (group_id, consumer_id)",
        "CREATE INDEX meta_consumers_sweep ON meta_consumers (active, last_seen)",
        # The key leads with the interval start: range queries and pruning are prefix scans.
        """CREATE TABLE meta_metric_points (
            ts_ms INTEGER NOT NULL,         -- interval start, unix ms
            topic TEXT NOT NULL,
            worker TEXT NOT NULL,
            interval_s REAL NOT NULL,
            produced INTEGER NOT NULL,
            consumed INTEGER NOT NULL,
            expired INTEGER NOT NULL,
            failed INTEGER NOT NULL,
            retried INTEGER NOT NULL,
            queue_size INTEGER NOT NULL,
            dead_letter_size INTEGER NOT NULL,
            processing_avg_ms REAL NOT NULL,
            processing_p95_ms REAL NOT NULL,
            processing_p99_ms REAL NOT NULL,
            active_consumers INTEGER NOT NULL,
            total_consumers INTEGER NOT NULL,
            error_rate REAL NOT NULL,
            retry_rate REAL NOT NULL,
            PRIMARY KEY (ts_ms, topic, worker)
        ) WITHOUT ROWID""",
    ),
    (
        # The audit log (access.AuditLog): who did what, when, from where; never content.
        """CREATE TABLE meta_audit (
            id INTEGER PRIMARY KEY,
            time_ms INTEGER NOT NULL,
            actor TEXT, action TEXT, target TEXT, outcome TEXT, remote_addr TEXT,
            detail TEXT NOT NULL            -- JSON object
        )""",
        "CREATE INDEX meta_audit_time ON meta_audit (time_ms)",
    ),
    (
        # Grants kept in the store (mqfast.grants). AUTOINCREMENT: a deleted grant's id is
        # never given to another, so deleting it again is a 404, not someone else's grant.
        """CREATE TABLE meta_grants (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            subject TEXT NOT NULL,
            topics TEXT NOT NULL,           -- fnmatch glob
            actions TEXT NOT NULL,          -- JSON array, in auth.ACTIONS order
            groups TEXT,                    -- JSON array, sorted; NULL: any group
            created_at INTEGER NOT NULL,    -- unix ms
            created_by TEXT NOT NULL
        )""",
        "CREATE UNIQUE INDEX meta_grants_key"
        " ON meta_grants (subject, topics, actions, COALESCE(groups, ''))",
        # Bumped by every change in the change's transaction; every process sharing the file
        # reads it about once a second and reloads the grants when it moved.
        """CREATE TABLE meta_grants_version (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            version INTEGER NOT NULL
        )""",
        "INSERT INTO meta_grants_version (id, version) VALUES (1, 0)",
    ),
)
_GRANT_COLUMNS: Final = "id, subject, topics, actions, groups, created_at, created_by"
_BUMP_GRANTS: Final = "UPDATE meta_grants_version SET version = version + 1 WHERE id = 1"

_TOUCH: Final = (
    "UPDATE meta_consumers SET last_seen = MAX(last_seen, ?), active = 1 WHERE consumer_id = ?"
)
# Recording a (time, topic, worker) again merges: SET expressions see the row's old values.
_UPSERT_POINT: Final = """
INSERT INTO meta_metric_points (
    ts_ms, topic, worker, interval_s, produced, consumed, expired, failed, retried,
    queue_size, dead_letter_size, processing_avg_ms, processing_p95_ms, processing_p99_ms,
    active_consumers, total_consumers, error_rate, retry_rate
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (ts_ms, topic, worker) DO UPDATE SET
    interval_s = MAX(interval_s, excluded.interval_s),
    produced = produced + excluded.produced,
    consumed = consumed + excluded.consumed,
    expired = expired + excluded.expired,
    failed = failed + excluded.failed,
    retried = retried + excluded.retried,
    queue_size = excluded.queue_size,
    dead_letter_size = excluded.dead_letter_size,
    processing_avg_ms = CASE WHEN consumed + excluded.consumed > 0
        THEN (processing_avg_ms * consumed + excluded.processing_avg_ms * excluded.consumed)
             / (consumed + excluded.consumed)
        ELSE MAX(processing_avg_ms, excluded.processing_avg_ms) END,
    processing_p95_ms = MAX(processing_p95_ms, excluded.processing_p95_ms),
    processing_p99_ms = MAX(processing_p99_ms, excluded.processing_p99_ms),
    active_consumers = excluded.active_consumers,
    total_consumers = excluded.total_consumers,
    error_rate = CASE WHEN consumed + excluded.consumed > 0
        THEN CAST(failed + excluded.failed AS REAL) / (consumed + excluded.consumed) ELSE 0 END,
    retry_rate = CASE WHEN consumed + excluded.consumed > 0
        THEN CAST(retried + excluded.retried AS REAL) / (consumed + excluded.consumed) ELSE 0 END
"""
# ?1 is the step in ms: the points of every worker and interval in one step become one.
_QUERY_POINTS: Final = """
SELECT ts_ms - ts_ms % ?1 AS step_ms, topic, MAX(MAX(interval_s), ?1 / 1000.0),
    SUM(produced), SUM(consumed), SUM(expired), SUM(failed), SUM(retried),
    MAX(queue_size), MAX(dead_letter_size),
    SUM(processing_avg_ms * consumed), AVG(NULLIF(processing_avg_ms, 0)),
    MAX(processing_p95_ms), MAX(processing_p99_ms),
    MAX(active_consumers), MAX(total_consumers)
FROM meta_metric_points
WHERE ts_ms >= ?2 AND ts_ms < ?3 {topic_filter}
GROUP BY step_ms, topic
ORDER BY step_ms, topic
"""
_PRUNE_CHUNK: Final = """
DELETE FROM meta_metric_points WHERE (ts_ms, topic, worker) IN (
    SELECT ts_ms, topic, worker FROM meta_metric_points WHERE ts_ms < ? ORDER BY ts_ms LIMIT ?
)
"""

_topics_decoder = msgspec.json.Decoder(list[str])
_topics_encoder = msgspec.json.Encoder()


def _touch_rows(touches: dict[str, int]) -> list[tuple[int, str]]:
    return [(ms, cid) for cid, ms in touches.items()]


def _consumer_from_row(row: tuple[Any, ...]) -> ConsumerInfo:
    return consumer_from_row(row, _topics_decoder.decode(row[2]))


def _grant_from_row(row: tuple[Any, ...]) -> StoredGrant:
    return StoredGrant(
        id=int(row[0]),
        subject=row[1],
        topics=row[2],
        actions=_topics_decoder.decode(row[3]),
        groups=None if row[4] is None else _topics_decoder.decode(row[4]),
        created_at=int(row[5]),
        created_by=row[6],
    )


class SqliteMeta:
    """``MetaStore`` on SQLite, in ``<data_dir>/mqfast.db`` (see the module docstring)."""

    def __init__(
        self,
        data_dir: str,
        *,
        busy_timeout_s: float = 5.0,
        history_retention_s: float = 7 * 86400,
        flush_interval_s: float = 1.0,
        prune_interval_s: float = 600.0,
        grants_poll_s: float = 1.0,
    ) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, DB_FILENAME)
        self.busy_timeout_s = busy_timeout_s
        self.history_retention_s = history_retention_s
        self.flush_interval_s = flush_interval_s
        self.prune_interval_s = prune_interval_s
        self.grants_poll_s = grants_poll_s
        # Called with None when another process (or this one) changed the grants; see
        # mqfast.grants. Read by the poll task, which runs while the store is open.
        self.on_grants_changed: Callable[[str | None], None] | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn_: sqlite3.Connection | None = None  # used only on the executor thread
        self._closed = False

        self.touches = TouchBuffer(flush_interval_s, self.flush)
        self._next_prune = 0.0  # time.monotonic() when record_points next prunes
        self._grants_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database (creating the directory) and apply this store's migrations."""
        if self._closed:
            raise Unavailable("metadata store: closed")
        self._loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mqfast-meta"
        )
        try:
            await self._run(self._open)
        except BaseException:
            executor, self._executor = self._executor, None
            executor.submit(self._close_conn)
            executor.shutdown(wait=False)
            raise
        log.info("metadata store at %s (SQLite, WAL)", self.path, extra={"path": self.path})
        self.touches.start(self._loop)
        # Read before anyone loads the grants: a change after this is seen by the poll.
        version = await self.grants_version()
        self._grants_task = self._loop.create_task(
            self._poll_grants(version), name="mqfast-meta-grants"
        )

    async def close(self) -> None:
        """Write pending touches, close the connection and stop the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.touches.stop()
        task, self._grants_task = self._grants_task, None
        await cancel_and_wait(task)
        if self._executor is None:
            return
        try:
            await self.flush()
        except Exception as e:
            log.warning(
                "metadata store: %d consumer touches not written on close: %s",
                len(self.touches.pending),
                e,
            )
        try:
            await self._run(self._close_conn)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- consumers -------------------------------------------------------------------------

    async def register(
        self, req: RegisterConsumerRequest, now_ms: int
    ) -> tuple[ConsumerInfo, bool]:
        """Register ``req.consumer_id`` or update its settings; returns ``(info, created)``.

        Re-registering keeps ``registered_at``, replaces group, topics and limits, and makes the
        consumer active again with ``last_seen`` at least ``now_ms``.
        """
        return await self._run(self._register_sync, req, now_ms)

    async def get_consumer(self, consumer_id: str) -> ConsumerInfo | None:
        """The registered consumer or None (``last_seen`` includes unflushed touches)."""
        rows = await self._run(
            self._select_sync,
            f"SELECT {CONSUMER_COLUMNS} FROM meta_consumers WHERE consumer_id = ?",
            (consumer_id,),
        )
        return self.touches.overlay(_consumer_from_row(rows[0])) if rows else None

    async def list_consumers(self, group_id: str | None = None) -> list[ConsumerInfo]:
        """Every registered consumer (of ``group_id`` when given), sorted by id."""
        if group_id is None:
            sql = f"SELECT {CONSUMER_COLUMNS} FROM meta_consumers ORDER BY consumer_id"
            params: tuple[Any, ...] = ()
        else:
            sql = (
                f"SELECT {CONSUMER_COLUMNS} FROM meta_consumers WHERE group_id = ?"
                " ORDER BY consumer_id"
            )
            params = (group_id,)
        rows = await self._run(self._select_sync, sql, params)
        return [self.touches.overlay(_consumer_from_row(r)) for r in rows]

    async def delete_consumer(self, consumer_id: str) -> bool:
        """Unregister ``consumer_id``; False when it was not registered."""
        self.touches.discard(consumer_id)
        return await self._run(self._delete_sync, consumer_id)

    def touch(self, consumer_id: str, now_ms: int) -> None:
        """Record activity at ``now_ms``; written in the background (see the module docstring)."""
        self.touches.add(consumer_id, now_ms)

    async def flush(self) -> None:
        """Write the pending touches now (the background flush does this within a second)."""
        if not self.touches.pending:
            return
        await self.touches.write(
            lambda t: self._run(self._write_sync, self._apply_touches, _touch_rows(t))
        )

    async def sweep_inactive(self, now_ms: int, timeout_ms: int) -> list[str]:
        """Mark active consumers last seen before ``now_ms - timeout_ms`` inactive.

        Pending touches are written in the same transaction first. Returns the ids that became
        inactive in this call, sorted; concurrent sweeps never return the same id twice.
        """
        cutoff = now_ms - timeout_ms
        return await self.touches.write(
            lambda t: self._run(self._sweep_sync, _touch_rows(t), cutoff)
        )

    async def consumer_counts(self) -> tuple[int, int]:
        """``(active, total)`` registered consumers, counting unflushed touches as activity."""
        touched = _topics_encoder.encode(list(self.touches.unwritten())).decode()
        rows = await self._run(
            self._select_sync,
            "SELECT COALESCE(SUM(active OR consumer_id IN (SELECT value FROM json_each(?))), 0),"
            " COUNT(*) FROM meta_consumers",
            (touched,),
        )
        return int(rows[0][0]), int(rows[0][1])

    # -- metric history --------------------------------------------------------------------

    async def record_points(self, points: list[MetricPoint], worker: str) -> None:
        """Store (or merge into) the points of ``worker``; prunes old history now and then.

        Raises ``ValueError`` when a point's ``time`` is not RFC 3339.
        """
        rows = [point_params(p, worker) for p in points]
        if rows:
            await self._run(self._write_sync, self._insert_points, rows)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + self.prune_interval_s
            await prune_quietly(self.prune)

    async def query_points(
        self, start_ms: int, end_ms: int, topic: str | None, step_ms: int = 1
    ) -> list[MetricPoint]:
        """Points starting in ``[start_ms, end_ms)``, aggregated over workers and steps
        (``MetaStore``)."""
        if end_ms <= start_ms:
            return []
        params: tuple[Any, ...] = (step_ms, start_ms, end_ms)
        topic_filter = ""
        if topic is not None:
            topic_filter = "AND topic = ?4"
            params += (topic,)
        rows = await self._run(
            self._select_sync, _QUERY_POINTS.format(topic_filter=topic_filter), params
        )
        return [point_from_row(r) for r in rows]

    async def audit(self, entry: dict[str, object]) -> None:
        """Append one audit record (see ``meta.common.audit_row``)."""
        await self._run(self._write_sync, self._insert_audit, audit_row(entry))

    async def query_audit(
        self, start_ms: int, end_ms: int, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Audit records with ``time_ms`` in ``[start_ms, end_ms)``, oldest first."""
        rows = await self._run(
            self._select_sync,
            "SELECT time_ms, actor, action, target, outcome, remote_addr, detail FROM meta_audit"
            " WHERE time_ms >= ? AND time_ms < ? ORDER BY time_ms, id LIMIT ?",
            (start_ms, end_ms, limit),
        )
        return [audit_from_row(r) for r in rows]

    @staticmethod
    def _insert_audit(conn: sqlite3.Connection, row: tuple[Any, ...]) -> None:
        conn.execute(
            "INSERT INTO meta_audit (time_ms, actor, action, target, outcome, remote_addr, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            row,
        )

    async def prune(self, now_ms: int | None = None) -> int:
        """Delete history older than ``history_retention_s`` before ``now_ms`` (default: now).

        Returns the number of rows deleted.
        """
        return await prune_history(self._delete_points_chunk, self.history_retention_s, now_ms)

    async def _delete_points_chunk(self, cutoff_ms: int, limit: int) -> int:
        return await self._run(self._write_sync, self._prune_chunk, (cutoff_ms, limit))

    # -- grants ----------------------------------------------------------------------------

    async def create_grant(
        self, subject: str, grant: Grant, created_by: str, now_ms: int
    ) -> tuple[StoredGrant, bool]:
        """Store ``grant`` for ``subject``; ``(stored, created)``. The same grant again is the
        one stored (``created`` False); ``Conflict`` past ``MAX_STORED_GRANTS`` per subject."""
        return await self._run(self._create_grant_sync, subject, grant, created_by, now_ms)

    async def list_grants(self, subject: str | None = None) -> list[StoredGrant]:
        """The stored grants (of ``subject`` when given), by id."""
        where, params = ("", ()) if subject is None else (" WHERE subject = ?", (subject,))
        rows = await self._run(
            self._select_sync,
            f"SELECT {_GRANT_COLUMNS} FROM meta_grants{where} ORDER BY id",
            params,
        )
        return [_grant_from_row(r) for r in rows]

    async def delete_grant(self, grant_id: int) -> StoredGrant | None:
        """Delete the grant ``grant_id``; the grant it was, or None when there is none."""
        return await self._run(self._write_sync, self._delete_grant, grant_id)

    async def grants_version(self) -> int:
        """The change counter of the grants (moves with every create and delete)."""
        rows = await self._run(
            self._select_sync, "SELECT version FROM meta_grants_version WHERE id = 1", ()
        )
        return int(rows[0][0])

    def _create_grant_sync(
        self, subject: str, grant: Grant, created_by: str, now_ms: int
    ) -> tuple[StoredGrant, bool]:
        actions = _topics_encoder.encode(actions_of(grant)).decode()
        groups = groups_of(grant)
        groups_text = None if groups is None else _topics_encoder.encode(groups).decode()
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_GRANT_COLUMNS} FROM meta_grants WHERE subject = ? AND topics = ?"
                " AND actions = ? AND COALESCE(groups, '') = COALESCE(?, '')",
                (subject, grant.topics, actions, groups_text),
            ).fetchone()
            if row is not None:
                return _grant_from_row(row), False
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM meta_grants WHERE subject = ?", (subject,)
            ).fetchone()
            if count >= MAX_STORED_GRANTS:
                raise Conflict(
                    f"subject {subject[:64]!r} has {MAX_STORED_GRANTS} stored grants already;"
                    " delete one first",
                    field="subject",
                )
            row = conn.execute(
                "INSERT INTO meta_grants (subject, topics, actions, groups, created_at,"
                f" created_by) VALUES (?, ?, ?, ?, ?, ?) RETURNING {_GRANT_COLUMNS}",
                (subject, grant.topics, actions, groups_text, now_ms, created_by),
            ).fetchone()
            conn.execute(_BUMP_GRANTS)
        return _grant_from_row(row), True

    @staticmethod
    def _delete_grant(conn: sqlite3.Connection, grant_id: int) -> StoredGrant | None:
        row = conn.execute(
            f"DELETE FROM meta_grants WHERE id = ? RETURNING {_GRANT_COLUMNS}", (grant_id,)
        ).fetchone()
        if row is None:
            return None
        conn.execute(_BUMP_GRANTS)
        return _grant_from_row(row)

    async def _poll_grants(self, seen: int) -> None:
        """Tell ``on_grants_changed`` when the change counter moved (another process, or this
        one, created or deleted a grant); one small read per ``grants_poll_s``."""
        failures = 0
        while True:
            await asyncio.sleep(self.grants_poll_s)
            try:
                version = await self.grants_version()
            except Unavailable as e:
                failures += 1
                if failures == 1:
                    log.warning("metadata store: reading the grants version failed: %s", e)
                continue
            if failures:
                # Changes may have been missed meanwhile: the counter tells, as always.
                log.info("metadata store: grants version readable again")
                failures = 0
            if version != seen and self.on_grants_changed is not None:
                self.on_grants_changed(None)
            seen = version

    # -- executor thread -------------------------------------------------------------------

    async def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self._executor is None:
            raise Unavailable("metadata store: not started or closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )
        except sqlite3.Error as e:
            raise Unavailable(f"metadata store: {e}") from e

    def _conn(self) -> sqlite3.Connection:
        if self._conn_ is None:
            raise Unavailable("metadata store: not started or closed")
        return self._conn_

    def _open(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        # isolation_level=None: no implicit BEGIN; every write transaction is BEGIN IMMEDIATE.
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_s,
            isolation_level=None,
            check_same_thread=True,
            cached_statements=32,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise Unavailable(f"metadata store: cannot enable WAL on {self.path} (got {mode})")
            # WAL + NORMAL survives a process crash; losing the last commits to a power cut only
            # costs a registration or a metric interval, not messages.
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn_ = conn
            self._write_sync(self._migrate, None)
        except BaseException:
            self._conn_ = None
            conn.close()
            raise

    def _close_conn(self) -> None:
        if self._conn_ is not None:
            self._conn_.close()
            self._conn_ = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # the engine's lock of this database file: see sinks.embedded.write_lock
        with immediate(self._conn(), write_lock(self.path)) as conn:
            yield conn

    def _write_sync(self, fn: Callable[[sqlite3.Connection, _A], _T], arg: _A) -> _T:
        with self._transaction() as conn:
            return fn(conn, arg)

    def _migrate(self, conn: sqlite3.Connection, _: object) -> None:
        apply_migrations(conn, SCHEMA_COMPONENT, MIGRATIONS, self.path)

    def _select_sync(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._conn().execute(sql, params).fetchall()

    def _register_sync(
        self, req: RegisterConsumerRequest, now_ms: int
    ) -> tuple[ConsumerInfo, bool]:
        topics = _topics_encoder.encode(req.topics).decode()
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT registered_at, last_seen FROM meta_consumers WHERE consumer_id = ?",
                (req.consumer_id,),
            ).fetchone()
            if row is None:
                registered_at, last_seen = now_ms, now_ms
                conn.execute(
                    f"INSERT INTO meta_consumers ({CONSUMER_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                    (
                        req.consumer_id,
                        req.group_id,
                        topics,
                        req.max_concurrency,
                        req.rate_limit,
                        registered_at,
                        last_seen,
                    ),
                )
            else:
                registered_at, last_seen = int(row[0]), max(int(row[1]), now_ms)
                conn.execute(
                    "UPDATE meta_consumers SET group_id = ?, topics = ?, max_concurrency = ?,"
                    " rate_limit = ?, last_seen = ?, active = 1 WHERE consumer_id = ?",
                    (
                        req.group_id,
                        topics,
                        req.max_concurrency,
                        req.rate_limit,
                        last_seen,
                        req.consumer_id,
                    ),
                )
        return consumer_from_request(req, registered_at, last_seen), row is None

    def _delete_sync(self, consumer_id: str) -> bool:
        with self._transaction() as conn:
            cur = conn.execute("DELETE FROM meta_consumers WHERE consumer_id = ?", (consumer_id,))
            return cur.rowcount > 0

    @staticmethod
    def _apply_touches(conn: sqlite3.Connection, touches: list[tuple[int, str]]) -> None:
        conn.executemany(_TOUCH, touches)

    def _sweep_sync(self, touches: list[tuple[int, str]], cutoff_ms: int) -> list[str]:
        with self._transaction() as conn:
            if touches:
                conn.executemany(_TOUCH, touches)
            rows = conn.execute(
                "UPDATE meta_consumers SET active = 0 WHERE active = 1 AND last_seen < ?"
                " RETURNING consumer_id",
                (cutoff_ms,),
            ).fetchall()
        return sorted(r[0] for r in rows)

    @staticmethod
    def _insert_points(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        conn.executemany(_UPSERT_POINT, rows)

    @staticmethod
    def _prune_chunk(conn: sqlite3.Connection, cutoff_and_limit: tuple[int, int]) -> int:
        return int(conn.execute(_PRUNE_CHUNK, cutoff_and_limit).rowcount)
