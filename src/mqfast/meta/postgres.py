"""The cluster metadata store: consumers, metric history, topics and audit log in PostgreSQL.

Consumers and metric history keep the semantics of ``meta.sqlite.SqliteMeta`` exactly; what
differs is how they are made safe with many replicas on one database:

- Migrations are versioned per component in ``mqfast_schema_version`` and applied in one
  transaction that first takes ``pg_advisory_xact_lock``: replicas starting together queue on
  the lock, and the ones after the first find nothing left to do.
- ``touch`` is kept in memory (one entry per consumer) and written at most once per
  ``flush_interval_s`` in one statement; rows are locked in id order first, because two
  replicas flushing overlapping consumers in different orders would otherwise deadlock.
- Sweeps rely on ``UPDATE ... WHERE active`` re-checking a row that a concurrent sweep has just
  changed, so each id is returned by one sweep only.

The topic registry (the Kafka engine has no place for ``dead_letter_expired`` or
``created_at``) is cached in every process so that readers never wait on the database: writes
``NOTIFY mqfast_topics`` with the topic name, one dedicated connection ``LISTEN``s and reloads
that entry, and the whole registry is reloaded every ``topics_refresh_s`` and after every
reconnection in case a notification was missed.

When PostgreSQL cannot be reached, every async method raises ``errors.Unavailable`` within
``op_timeout_s``; touches keep accumulating and are written once it is back; the cached topics
stay readable; the listener reconnects with backoff. Up/down transitions are logged once each,
never per failed call. ``health()`` reports the last known state without a round trip.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from mqfast.auth import Grant
from mqfast.errors import ConfigError, Conflict, MqfastError, Unavailable
from mqfast.grants import MAX_STORED_GRANTS, actions_of, groups_of
from mqfast.groups import now_ms
from mqfast.messages import (
    ConsumerInfo,
    MetricPoint,
    RegisterConsumerRequest,
    StoredGrant,
    TopicConfig,
)
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

__all__ = [
    "GRANTS_CHANNEL",
    "SCHEMA_COMPONENT",
    "TOPICS_CHANNEL",
    "PostgresMeta",
    "describe_dsn",
    "migrate",
]

log = logging.getLogger("mqfast.meta")

_T = TypeVar("_T")

SCHEMA_COMPONENT: Final = "meta"
TOPICS_CHANNEL: Final = "mqfast_topics"
GRANTS_CHANNEL: Final = "mqfast_grants"  # payload: the subject whose grants changed
# One key for every component's migrations in the database ("mqfast" in ASCII): migrations of
# different components may touch the same tables, so they never run side by side.
MIGRATION_LOCK_KEY: Final = 0x6D7166617374
# Consumer ids come from clients: during a long outage the pending touches must not grow without
# bound. Past this many distinct ids, touches of new ids are dropped (the consumer may then be
# swept and comes back active with its next touch after the outage).
MAX_PENDING_TOUCHES: Final = 100_000
# Deadlocks and serialization failures are retried this many times before giving up.
TX_ATTEMPTS: Final = 3
# Reconnecting the listener and probing a database that is down back off up to this.
RETRY_BACKOFF_MAX_S: Final = 5.0

# Each entry is one schema version (index + 1). Append only; never edit an applied migration.
# Text keys are COLLATE "C" so that ORDER BY is code-point order, as in SQLite and Python.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE mqfast_consumers (
            consumer_id TEXT COLLATE "C" PRIMARY KEY,
            group_id TEXT COLLATE "C" NOT NULL,
            topics TEXT[] NOT NULL,
            max_concurrency INTEGER,            -- NULL: no cap
            rate_limit DOUBLE PRECISION,        -- deliveries per second, NULL: no cap
            registered_at BIGINT NOT NULL,      -- unix ms
            last_seen BIGINT NOT NULL,          -- unix ms
            active BOOLEAN NOT NULL DEFAULT TRUE
        )""",
        "CREATE INDEX mqfast_consumers_group ON mqfast_consumers (group_id, consumer_id)",
        "CREATE INDEX mqfast_consumers_sweep ON mqfast_consumers (last_seen) WHERE active",
        # The key leads with the interval start: range queries and pruning are prefix scans.
        """CREATE TABLE mqfast_metric_points (
            ts_ms BIGINT NOT NULL,              -- interval start, unix ms
            topic TEXT COLLATE "C" NOT NULL,
            worker TEXT COLLATE "C" NOT NULL,
            interval_s DOUBLE PRECISION NOT NULL,
            produced BIGINT NOT NULL,
            consumed BIGINT NOT NULL,
            expired BIGINT NOT NULL,
            failed BIGINT NOT NULL,
            retried BIGINT NOT NULL,
            queue_size BIGINT NOT NULL,
            dead_letter_size BIGINT NOT NULL,
            processing_avg_ms DOUBLE PRECISION NOT NULL,
            processing_p95_ms DOUBLE PRECISION NOT NULL,
            processing_p99_ms DOUBLE PRECISION NOT NULL,
            active_consumers BIGINT NOT NULL,
            total_consumers BIGINT NOT NULL,
            error_rate DOUBLE PRECISION NOT NULL,
            retry_rate DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (ts_ms, topic, worker)
        )""",
        """CREATE TABLE mqfast_topics (
            name TEXT COLLATE "C" PRIMARY KEY,
            partitions INTEGER NOT NULL,
            replication INTEGER NOT NULL,
            retention BIGINT NOT NULL,          -- nanoseconds; 0 keeps messages forever
            max_size BIGINT NOT NULL,           -- bytes; 0 is unlimited
            created_at BIGINT NOT NULL,         -- unix ms
            dead_letter_expired BOOLEAN NOT NULL,
            updated_at BIGINT NOT NULL          -- unix ms, for operators reading the table
        )""",
        """CREATE TABLE mqfast_audit (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            time_ms BIGINT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            outcome TEXT NOT NULL,
            remote_addr TEXT NOT NULL,
            detail JSONB NOT NULL
        )""",
        "CREATE INDEX mqfast_audit_time ON mqfast_audit (time_ms, id)",
    ),
    (
        # Encryption at rest (crypto.py): the topic flag, and the wrapped data keys by id.
        "ALTER TABLE mqfast_topics ADD COLUMN encrypted BOOLEAN NOT NULL DEFAULT FALSE",
        """CREATE TABLE mqfast_data_keys (
            id TEXT COLLATE "C" PRIMARY KEY,
            master_key_id TEXT NOT NULL,
            wrapped BYTEA NOT NULL,             -- AES-256-GCM under the master key
            created_at BIGINT NOT NULL,         -- unix ms
            updated_at BIGINT NOT NULL          -- unix ms (a rewrap replaces the row)
        )""",
    ),
    (
        # Grants kept in the store (mqfast.grants); an identity never hands a deleted id out
        # again, so deleting it twice is a 404, not someone else's grant.
        """CREATE TABLE mqfast_grants (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            subject TEXT COLLATE "C" NOT NULL,
            topics TEXT COLLATE "C" NOT NULL,   -- fnmatch glob
            actions TEXT[] NOT NULL,            -- in auth.ACTIONS order
            groups TEXT[],                      -- sorted; NULL: any group
            created_at BIGINT NOT NULL,         -- unix ms
            created_by TEXT NOT NULL
        )""",
        # groups is never an empty array, so '{}' stands for NULL without a collision
        "CREATE UNIQUE INDEX mqfast_grants_key ON mqfast_grants"
        " (subject, topics, actions, (COALESCE(groups, '{}'::text[])))",
    ),
)

# xmax is 0 only on a row version this statement inserted, so it tells an insert from an update.
_REGISTER: Final = f"""
INSERT INTO mqfast_consumers AS c ({CONSUMER_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6, $6, TRUE)
ON CONFLICT (consumer_id) DO UPDATE SET
    group_id = excluded.group_id,
    topics = excluded.topics,
    max_concurrency = excluded.max_concurrency,
    rate_limit = excluded.rate_limit,
    last_seen = GREATEST(c.last_seen, excluded.last_seen),
    active = TRUE
RETURNING registered_at, last_seen, xmax = 0 AS created
"""
_LOCK_TOUCHED: Final = """
SELECT 1 FROM mqfast_consumers WHERE consumer_id = ANY($1::text[])
ORDER BY consumer_id FOR UPDATE
"""
_TOUCH: Final = """
UPDATE mqfast_consumers AS c SET last_seen = GREATEST(c.last_seen, t.ms), active = TRUE
FROM unnest($1::text[], $2::bigint[]) AS t (id, ms)
WHERE c.consumer_id = t.id
"""
_SWEEP: Final = """
UPDATE mqfast_consumers SET active = FALSE WHERE active AND last_seen < $1 RETURNING consumer_id
"""
_COUNTS: Final = """
SELECT COUNT(*) FILTER (WHERE active OR consumer_id = ANY($1::text[])), COUNT(*)
FROM mqfast_consumers
"""
# Recording a (time, topic, worker) again merges: SET expressions see the row's old values.
_UPSERT_POINT: Final = """
INSERT INTO mqfast_metric_points AS p (
    ts_ms, topic, worker, interval_s, produced, consumed, expired, failed, retried,
    queue_size, dead_letter_size, processing_avg_ms, processing_p95_ms, processing_p99_ms,
    active_consumers, total_consumers, error_rate, retry_rate
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
ON CONFLICT (ts_ms, topic, worker) DO UPDATE SET
    interval_s = GREATEST(p.interval_s, excluded.interval_s),
    produced = p.produced + excluded.produced,
    consumed = p.consumed + excluded.consumed,
    expired = p.expired + excluded.expired,
    failed = p.failed + excluded.failed,
    retried = p.retried + excluded.retried,
    queue_size = excluded.queue_size,
    dead_letter_size = excluded.dead_letter_size,
    processing_avg_ms = CASE WHEN p.consumed + excluded.consumed > 0
        THEN (p.processing_avg_ms * p.consumed + excluded.processing_avg_ms * excluded.consumed)
             / (p.consumed + excluded.consumed)
        ELSE GREATEST(p.processing_avg_ms, excluded.processing_avg_ms) END,
    processing_p95_ms = GREATEST(p.processing_p95_ms, excluded.processing_p95_ms),
    processing_p99_ms = GREATEST(p.processing_p99_ms, excluded.processing_p99_ms),
    active_consumers = excluded.active_consumers,
    total_consumers = excluded.total_consumers,
    error_rate = CASE WHEN p.consumed + excluded.consumed > 0
        THEN (p.failed + excluded.failed)::float8 / (p.consumed + excluded.consumed) ELSE 0 END,
    retry_rate = CASE WHEN p.consumed + excluded.consumed > 0
        THEN (p.retried + excluded.retried)::float8 / (p.consumed + excluded.consumed) ELSE 0 END
"""
# SUM of BIGINT is NUMERIC in PostgreSQL; the casts keep the results Python ints.
# $1 is the step in ms: the points of every worker and interval in one step become one.
_QUERY_POINTS: Final = """
SELECT ts_ms - ts_ms % $1::bigint AS step_ms, topic,
    GREATEST(MAX(interval_s), $1::bigint::float8 / 1000),
    SUM(produced)::bigint, SUM(consumed)::bigint, SUM(expired)::bigint, SUM(failed)::bigint,
    SUM(retried)::bigint, MAX(queue_size), MAX(dead_letter_size),
    SUM(processing_avg_ms * consumed), AVG(NULLIF(processing_avg_ms, 0)),
    MAX(processing_p95_ms), MAX(processing_p99_ms),
    MAX(active_consumers), MAX(total_consumers)
FROM mqfast_metric_points
WHERE ts_ms >= $2 AND ts_ms < $3 {topic_filter}
GROUP BY step_ms, topic
ORDER BY step_ms, topic
"""
_PRUNE_CHUNK: Final = """
DELETE FROM mqfast_metric_points WHERE (ts_ms, topic, worker) IN (
    SELECT ts_ms, topic, worker FROM mqfast_metric_points WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2
)
"""
_TOPIC_COLUMNS: Final = (
    "name, partitions, replication, retention, max_size, created_at, dead_letter_expired, encrypted"
)
_SAVE_TOPIC: Final = f"""
INSERT INTO mqfast_topics ({_TOPIC_COLUMNS}, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (name) DO UPDATE SET
    partitions = excluded.partitions,
    replication = excluded.replication,
    retention = excluded.retention,
    max_size = excluded.max_size,
    created_at = excluded.created_at,
    dead_letter_expired = excluded.dead_letter_expired,
    encrypted = excluded.encrypted,
    updated_at = excluded.updated_at
"""
_PUT_DATA_KEY: Final = """
INSERT INTO mqfast_data_keys (id, master_key_id, wrapped, created_at, updated_at)
VALUES ($1, $2, $3, $4, $4)
ON CONFLICT (id) DO UPDATE SET
    master_key_id = excluded.master_key_id,
    wrapped = excluded.wrapped,
    updated_at = excluded.updated_at
"""
_INSERT_AUDIT: Final = """
INSERT INTO mqfast_audit (time_ms, actor, action, target, outcome, remote_addr, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
"""
_GRANT_COLUMNS: Final = "id, subject, topics, actions, groups, created_at, created_by"
_INSERT_GRANT: Final = f"""
INSERT INTO mqfast_grants (subject, topics, actions, groups, created_at, created_by)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (subject, topics, actions, (COALESCE(groups, '{{}}'::text[]))) DO NOTHING
RETURNING {_GRANT_COLUMNS}
"""
_FIND_GRANT: Final = f"""
SELECT {_GRANT_COLUMNS} FROM mqfast_grants
WHERE subject = $1 AND topics = $2 AND actions = $3
    AND COALESCE(groups, '{{}}'::text[]) = COALESCE($4::text[], '{{}}'::text[])
"""
_QUERY_AUDIT: Final = """
SELECT time_ms, actor, action, target, outcome, remote_addr, detail::text
FROM mqfast_audit WHERE time_ms >= $1 AND time_ms < $2 ORDER BY time_ms, id LIMIT $3
"""

# Errors that say the database (or the way to it) is gone, as opposed to a failed statement.
_DOWN_ERRORS: Final[tuple[type[BaseException], ...]] = (
    OSError,  # refused, reset, unreachable, and TimeoutError
    asyncpg.PostgresConnectionError,  # class 08, and a connection lost mid-statement
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, crashed
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.InternalClientError,  # protocol confusion: the connection is done
)


class _PoolFloorFilter(logging.Filter):
    """Drops asyncpg's warning for each failed attempt to keep ``pool_min`` connections open: it
    carries a traceback and repeats for as long as the database is down, which the store
    already logs once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to restore the pool connection floor")


def _quiet_pool_floor_warnings() -> None:
    pool_log = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, _PoolFloorFilter) for f in pool_log.filters):
        pool_log.addFilter(_PoolFloorFilter())


def _error_text(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def describe_dsn(dsn: str) -> tuple[str, str]:
    """``(user, "host:port/database")`` of a PostgreSQL URI, for logs: never the password.

    Values missing from the URI are taken as libpq (and asyncpg) take them: query parameters,
    then ``PGUSER``/``PGHOST``/``PGPORT``/``PGDATABASE``, then the defaults. Never raises.
    """
    try:
        parts = urllib.parse.urlsplit(dsn)
        query = dict(urllib.parse.parse_qsl(parts.query))
        userinfo, at, hosts = parts.netloc.rpartition("@")
        if not at:
            userinfo, hosts = "", parts.netloc
        user = (
            urllib.parse.unquote(userinfo.partition(":")[0])
            or query.get("user")
            or os.environ.get("PGUSER")
            or "postgres"
        )
        port = query.get("port") or os.environ.get("PGPORT") or "5432"
        named = [
            h if _has_port(h) else f"{h}:{port}"
            for h in [urllib.parse.unquote(h) for h in hosts.split(",") if h]
            or [query.get("host") or os.environ.get("PGHOST") or "localhost"]
        ]
        database = (
            urllib.parse.unquote(parts.path.lstrip("/"))
            or query.get("dbname")
            or query.get("database")
            or os.environ.get("PGDATABASE")
            or user
        )
        return user, f"{','.join(named)}/{database}"
    except Exception:
        return "?", "(unparseable DSN)"


def _has_port(host: str) -> bool:
    if host.startswith("["):  # [IPv6]:port
        return "]:" in host
    return ":" in host


async def migrate(
    conn: Any, component: str, migrations: tuple[tuple[str, ...], ...], where: str
) -> int:
    """Bring ``component``'s tables to the last of ``migrations`` inside the caller's transaction.

    Takes the database-wide migration lock first, so that concurrent starts apply each version
    exactly once. Returns the version now in force; raises ``ConfigError`` when the database has
    a newer version than ``migrations`` knows.
    """
    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS mqfast_schema_version"
        " (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
    )
    row = await conn.fetchval(
        "SELECT version FROM mqfast_schema_version WHERE component = $1", component
    )
    current = int(row) if row is not None else 0
    if current > len(migrations):
        raise ConfigError(
            f"{where}: {component} schema version {current} is newer than this mqfast supports"
            f" ({len(migrations)}); upgrade mqfast or use another database"
        )
    for version in range(current + 1, len(migrations) + 1):
        for stmt in migrations[version - 1]:
            await conn.execute(stmt)
        await conn.execute(
            "INSERT INTO mqfast_schema_version (component, version) VALUES ($1, $2)"
            " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
            component,
            version,
        )
        log.info("%s schema migrated to version %d", component, version, extra={"where": where})
    return len(migrations)


def _consumer_from_row(row: Any) -> ConsumerInfo:
    return consumer_from_row(row, list(row[2]))


def _grant_from_row(row: Any) -> StoredGrant:
    return StoredGrant(
        id=int(row[0]),
        subject=row[1],
        topics=row[2],
        actions=list(row[3]),
        groups=None if row[4] is None else list(row[4]),
        created_at=int(row[5]),
        created_by=row[6],
    )


def _topic_from_row(row: Any) -> TopicConfig:
    return TopicConfig(
        name=row[0],
        partitions=int(row[1]),
        replication=int(row[2]),
        retention=int(row[3]),
        max_size=int(row[4]),
        created_at=int(row[5]),
        dead_letter_expired=bool(row[6]),
        encrypted=bool(row[7]),
    )


class PostgresMeta:
    """``MetaStore`` on PostgreSQL, plus the topic registry and the audit log.

    See the module docstring. ``on_topics_changed`` (when set) is called on the event loop with
    a topic's name after a change of that topic arrives from any process (this one included),
    and for every entry that differs after a full reload.
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_min: int = 1,
        pool_max: int = 8,
        history_retention_s: float = 7 * 86400,
        connect_timeout_s: float = 5.0,
        op_timeout_s: float = 5.0,
        flush_interval_s: float = 1.0,
        prune_interval_s: float = 600.0,
        topics_refresh_s: float = 30.0,
    ) -> None:
        if pool_max < 1 or not 0 <= pool_min <= pool_max:
            raise ValueError(f"pool sizes must satisfy 0 <= {pool_min=} <= {pool_max=} >= 1")
        self.dsn = dsn
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.history_retention_s = history_retention_s
        self.connect_timeout_s = connect_timeout_s
        self.op_timeout_s = op_timeout_s
        self.flush_interval_s = flush_interval_s
        self.prune_interval_s = prune_interval_s
        self.topics_refresh_s = topics_refresh_s
        self.user, self.target = describe_dsn(dsn)
        self.on_topics_changed: Callable[[str], None] | None = None
        # Called with the subject of a grant change notified by any process (this one included),
        # and with None after the listener reconnected (notifications may have been missed).
        self.on_grants_changed: Callable[[str | None], None] | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: Any = None
        self._closed = False

        # Last known reachability, for health() and for logging transitions only.
        self._up = False
        self._since_ms = now_ms()
        self._last_error = "not started"

        # An outage is logged once by _set_down: a failed flush then says nothing more.
        self.touches = TouchBuffer(
            flush_interval_s,
            self.flush,
            max_pending=MAX_PENDING_TOUCHES,
            quiet=lambda e: isinstance(e.__cause__, _DOWN_ERRORS),
        )
        self._next_prune = 0.0  # time.monotonic() when record_points next prunes

        self._topics: dict[str, TopicConfig] = {}
        self._dirty_topics: set[str] = set()  # names notified and not reloaded yet
        self._full_reload_due = False
        self._topics_wake = asyncio.Event()
        self._topics_task: asyncio.Task[None] | None = None
        self._topics_failures = 0
        self._listener: Any = None  # the LISTEN connection, outside the pool
        # Wakes _watch: the listener connection closed, or the database just went down.
        self._watch_wake = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        # Timed-out calls still cleaning up (see _bounded); held so that they are not collected.
        self._stragglers: set[asyncio.Future[Any]] = set()

    @property
    def _where(self) -> str:
        return f"PostgreSQL {self.user}@{self.target}"

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, apply migrations, start listening for topic changes and load the topics.

        Raises ``Unavailable`` (unreachable, no answer in ``connect_timeout_s``) or
        ``ConfigError`` (credentials, missing database, a newer schema), naming the server.
        """
        if self._closed:
            raise Unavailable("metadata store: closed")
        if self._pool is not None:
            return
        self._loop = asyncio.get_running_loop()
        _quiet_pool_floor_warnings()
        pool = asyncpg.create_pool(
            self.dsn,
            min_size=self.pool_min,
            max_size=self.pool_max,
            timeout=self.connect_timeout_s,
            command_timeout=self.op_timeout_s,
        )
        try:
            version, listener, rows = await self._bounded(
                self._open(pool), self.connect_timeout_s + self.op_timeout_s
            )
        except BaseException as e:
            if not pool.is_closing():  # a failed initialisation closes the pool itself
                pool.terminate()
            if isinstance(e, Exception):
                err = self._start_error(e)
                self._last_error = err.message
                raise err from e
            raise
        self._pool = pool
        self._listener = listener
        self._topics = {t.name: t for t in map(_topic_from_row, rows)}
        self._up = True
        self._since_ms = now_ms()
        self._last_error = ""
        self._watch_task = self._loop.create_task(self._watch(), name="mqfast-meta-watch")
        self._topics_task = self._loop.create_task(
            self._refresh_topics(), name="mqfast-meta-topics"
        )
        log.info(
            "metadata store: %s (pool %d-%d, %s schema version %d, %d topics)",
            self._where,
            self.pool_min,
            self.pool_max,
            SCHEMA_COMPONENT,
            version,
            len(self._topics),
            extra={"target": self.target},
        )
        self.touches.start(self._loop)

    async def _open(self, pool: Any) -> tuple[int, Any, list[Any]]:
        await pool
        async with pool.acquire() as conn, conn.transaction():
            version = await migrate(conn, SCHEMA_COMPONENT, MIGRATIONS, self._where)
        # Listen before loading, so that no change falls between the two.
        listener = await self._open_listener()
        try:
            rows = await pool.fetch(f"SELECT {_TOPIC_COLUMNS} FROM mqfast_topics")
        except BaseException:
            listener.terminate()
            raise
        return version, listener, list(rows)

    async def close(self) -> None:
        """Write pending touches, stop the background tasks and close every connection.

        Idempotent; bounded by about ``2 * op_timeout_s`` even when the database is gone.
        """
        if self._closed:
            return
        self._closed = True
        await self.touches.stop()
        for task in (self._topics_task, self._watch_task):
            await cancel_and_wait(task)
        self._topics_task = self._watch_task = None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()  # LISTEN state dies with it; nothing to say to the server
        pool = self._pool
        if pool is None:
            return
        try:
            await self.flush()
        except Exception as e:
            log.warning(
                "metadata store: %d consumer touches not written on close: %s",
                len(self.touches.pending),
                e,
            )
        self._pool = None
        self._up = False
        self._last_error = "closed"
        try:
            await asyncio.wait_for(pool.close(), self.op_timeout_s)
        except BaseException as e:
            pool.terminate()
            if not isinstance(e, Exception):
                raise
            log.warning("metadata store: closing the pool failed (%s); connections dropped", e)
        finally:
            if self._stragglers:  # their connections are gone now: they end at once
                await asyncio.wait(self._stragglers, timeout=self.op_timeout_s)

    def health(self) -> dict[str, object]:
        """The last known state, without a round trip: ``{"status": "up" | "down", ...}``."""
        out: dict[str, object] = {
            "status": "up" if self._up and not self._closed else "down",
            "backend": "postgresql",
            "target": self.target,
            "since_ms": self._since_ms,
            "listener": "up" if self._listener is not None else "down",
            "pending_touches": len(self.touches.unwritten()),
            "cached_topics": len(self._topics),
        }
        if not self._up or self._closed:
            out["error"] = self._last_error
        return out

    # -- consumers -------------------------------------------------------------------------

    async def register(
        self, req: RegisterConsumerRequest, now_ms: int
    ) -> tuple[ConsumerInfo, bool]:
        """Register ``req.consumer_id`` or update its settings; returns ``(info, created)``.

        Re-registering keeps ``registered_at``, replaces group, topics and limits, and makes the
        consumer active again with ``last_seen`` at least ``now_ms``.
        """
        rate = None if req.rate_limit is None else float(req.rate_limit)
        row = await self._call(
            lambda c: c.fetchrow(
                _REGISTER,
                req.consumer_id,
                req.group_id,
                list(req.topics),
                req.max_concurrency,
                rate,
                now_ms,
            ),
            write=True,
        )
        return consumer_from_request(req, int(row[0]), int(row[1])), bool(row[2])

    async def get_consumer(self, consumer_id: str) -> ConsumerInfo | None:
        """The registered consumer or None (``last_seen`` includes unflushed touches)."""
        row = await self._call(
            lambda c: c.fetchrow(
                f"SELECT {CONSUMER_COLUMNS} FROM mqfast_consumers WHERE consumer_id = $1",
                consumer_id,
            )
        )
        return self.touches.overlay(_consumer_from_row(row)) if row is not None else None

    async def list_consumers(self, group_id: str | None = None) -> list[ConsumerInfo]:
        """Every registered consumer (of ``group_id`` when given), sorted by id."""
        if group_id is None:
            rows = await self._call(
                lambda c: c.fetch(
                    f"SELECT {CONSUMER_COLUMNS} FROM mqfast_consumers ORDER BY consumer_id"
                )
            )
        else:
            rows = await self._call(
                lambda c: c.fetch(
                    f"SELECT {CONSUMER_COLUMNS} FROM mqfast_consumers WHERE group_id = $1"
                    " ORDER BY consumer_id",
                    group_id,
                )
            )
        return [self.touches.overlay(_consumer_from_row(r)) for r in rows]

    async def delete_consumer(self, consumer_id: str) -> bool:
        """Unregister ``consumer_id``; False when it was not registered."""
        self.touches.discard(consumer_id)
        status = await self._call(
            lambda c: c.execute("DELETE FROM mqfast_consumers WHERE consumer_id = $1", consumer_id),
            write=True,
        )
        return bool(_rowcount(status))

    def touch(self, consumer_id: str, now_ms: int) -> None:
        """Record activity at ``now_ms``; written in the background (see the module docstring)."""
        self.touches.add(consumer_id, now_ms)

    async def flush(self) -> None:
        """Write the pending touches now (the background flush does this within a second)."""
        if not self.touches.pending:
            return

        async def write(touches: dict[str, int]) -> None:
            await self._call(lambda conn: self._write_touches(conn, touches), write=True)

        await self.touches.write(write)

    async def sweep_inactive(self, now_ms: int, timeout_ms: int) -> list[str]:
        """Mark active consumers last seen before ``now_ms - timeout_ms`` inactive.

        Pending touches are written in the same transaction first. Returns the ids that became
        inactive in this call, sorted; concurrent sweeps never return the same id twice.
        """
        cutoff = now_ms - timeout_ms

        async def sweep(touches: dict[str, int]) -> list[str]:
            async def txn(conn: Any) -> list[str]:
                if touches:
                    await self._write_touches(conn, touches)
                rows = await conn.fetch(_SWEEP, cutoff)
                return sorted(str(r[0]) for r in rows)

            return await self._call(txn, write=True)

        return await self.touches.write(sweep)

    async def consumer_counts(self) -> tuple[int, int]:
        """``(active, total)`` registered consumers, counting unflushed touches as activity."""
        touched = list(self.touches.unwritten())
        row = await self._call(lambda c: c.fetchrow(_COUNTS, touched))
        return int(row[0]), int(row[1])

    # -- metric history --------------------------------------------------------------------

    async def record_points(self, points: list[MetricPoint], worker: str) -> None:
        """Store (or merge into) the points of ``worker``; prunes old history now and then.

        Raises ``ValueError`` when a point's ``time`` is not RFC 3339.
        """
        rows = [point_params(p, worker) for p in points]
        if rows:
            # one statement per row, so that two points of one key in one call merge as well
            await self._call(lambda c: c.executemany(_UPSERT_POINT, rows), write=True)
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
        if topic is None:
            sql = _QUERY_POINTS.format(topic_filter="")
            rows = await self._call(lambda c: c.fetch(sql, step_ms, start_ms, end_ms))
        else:
            sql = _QUERY_POINTS.format(topic_filter="AND topic = $4")
            rows = await self._call(lambda c: c.fetch(sql, step_ms, start_ms, end_ms, topic))
        return [point_from_row(r) for r in rows]

    async def prune(self, now_ms: int | None = None) -> int:
        """Delete history older than ``history_retention_s`` before ``now_ms`` (default: now).

        Returns the number of rows deleted.
        """
        return await prune_history(self._delete_points_chunk, self.history_retention_s, now_ms)

    async def _delete_points_chunk(self, cutoff_ms: int, limit: int) -> int:
        status = await self._call(lambda c: c.execute(_PRUNE_CHUNK, cutoff_ms, limit), write=True)
        return _rowcount(status)

    # -- topic registry --------------------------------------------------------------------

    async def save_topic(self, cfg: TopicConfig) -> None:
        """Create or replace the registry entry of ``cfg.name`` and tell every process."""

        async def save(conn: Any) -> None:
            await conn.execute(
                _SAVE_TOPIC,
                cfg.name,
                cfg.partitions,
                cfg.replication,
                cfg.retention,
                cfg.max_size,
                cfg.created_at,
                cfg.dead_letter_expired,
                cfg.encrypted,
                now_ms(),
            )
            # delivered at commit, and only if the transaction commits
            await conn.execute("SELECT pg_notify($1, $2)", TOPICS_CHANNEL, cfg.name)

        await self._call(save, write=True)
        self._topics[cfg.name] = cfg

    async def remove_topic(self, name: str) -> None:
        """Delete the registry entry of ``name`` (nothing when absent) and tell every process."""

        async def remove(conn: Any) -> None:
            await conn.execute("DELETE FROM mqfast_topics WHERE name = $1", name)
            await conn.execute("SELECT pg_notify($1, $2)", TOPICS_CHANNEL, name)

        await self._call(remove, write=True)
        self._topics.pop(name, None)

    def cached_topics(self) -> dict[str, TopicConfig]:
        """The registry as this process last saw it (a copy); no I/O, works during outages."""
        return dict(self._topics)

    async def load_topics(self) -> dict[str, TopicConfig]:
        """Read the whole registry, refresh the cache with it and return a copy."""
        return await self._load_topics(set())

    async def _load_topics(self, notified: set[str]) -> dict[str, TopicConfig]:
        rows = await self._call(lambda c: c.fetch(f"SELECT {_TOPIC_COLUMNS} FROM mqfast_topics"))
        fresh = {t.name: t for t in map(_topic_from_row, rows)}
        old, self._topics = self._topics, fresh
        for name in sorted(old.keys() | fresh.keys() | notified):
            if name in notified or old.get(name) != fresh.get(name):
                self._notify_changed(name)
        return dict(fresh)

    # -- wrapped data keys (crypto.AsyncWrappedKeyStore) -----------------------------------

    async def put_data_key(self, data_key_id: str, master_key_id: str, wrapped: bytes) -> None:
        """Store (or replace) a wrapped data key; committed when this returns."""
        await self._call(
            lambda c: c.execute(_PUT_DATA_KEY, data_key_id, master_key_id, wrapped, now_ms()),
            write=True,
        )

    async def get_data_key(self, data_key_id: str) -> tuple[str, bytes] | None:
        """``(master key id, wrapped key)`` of ``data_key_id``, or ``None`` if unknown."""
        row = await self._call(
            lambda c: c.fetchrow(
                "SELECT master_key_id, wrapped FROM mqfast_data_keys WHERE id = $1", data_key_id
            )
        )
        return None if row is None else (str(row[0]), bytes(row[1]))

    async def data_keys(self) -> list[tuple[str, str, bytes]]:
        """Every stored ``(data key id, master key id, wrapped key)`` (for ``mqfast rewrap``)."""
        rows = await self._call(
            lambda c: c.fetch("SELECT id, master_key_id, wrapped FROM mqfast_data_keys")
        )
        return [(str(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    # -- grants ----------------------------------------------------------------------------

    async def create_grant(
        self, subject: str, grant: Grant, created_by: str, now_ms: int
    ) -> tuple[StoredGrant, bool]:
        """Store ``grant`` for ``subject`` and tell every process; ``(stored, created)``. The same
        grant again is the one stored (``created`` False); ``Conflict`` past
        ``MAX_STORED_GRANTS`` per subject."""
        actions, groups = actions_of(grant), groups_of(grant)

        async def create(conn: Any) -> tuple[StoredGrant, bool]:
            # Creations for one subject queue here, so that the count below stays true.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "grants:" + subject)
            row = await conn.fetchrow(_FIND_GRANT, subject, grant.topics, actions, groups)
            if row is not None:
                return _grant_from_row(row), False
            count = await conn.fetchval(
                "SELECT COUNT(*) FROM mqfast_grants WHERE subject = $1", subject
            )
            if count >= MAX_STORED_GRANTS:
                raise Conflict(
                    f"subject {subject[:64]!r} has {MAX_STORED_GRANTS} stored grants already;"
                    " delete one first",
                    field="subject",
                )
            row = await conn.fetchrow(
                _INSERT_GRANT, subject, grant.topics, actions, groups, now_ms, created_by
            )
            # delivered at commit, and only if the transaction commits
            await conn.execute("SELECT pg_notify($1, $2)", GRANTS_CHANNEL, subject)
            return _grant_from_row(row), True

        return await self._call(create, write=True)

    async def list_grants(self, subject: str | None = None) -> list[StoredGrant]:
        """The stored grants (of ``subject`` when given), by id."""
        if subject is None:
            rows = await self._call(
                lambda c: c.fetch(f"SELECT {_GRANT_COLUMNS} FROM mqfast_grants ORDER BY id")
            )
        else:
            rows = await self._call(
                lambda c: c.fetch(
                    f"SELECT {_GRANT_COLUMNS} FROM mqfast_grants WHERE subject = $1 ORDER BY id",
                    subject,
                )
            )
        return [_grant_from_row(r) for r in rows]

    async def delete_grant(self, grant_id: int) -> StoredGrant | None:
        """Delete the grant ``grant_id`` and tell every process; the grant it was, or None."""

        async def delete(conn: Any) -> StoredGrant | None:
            row = await conn.fetchrow(
                f"DELETE FROM mqfast_grants WHERE id = $1 RETURNING {_GRANT_COLUMNS}", grant_id
            )
            if row is None:
                return None
            await conn.execute("SELECT pg_notify($1, $2)", GRANTS_CHANNEL, row[1])
            return _grant_from_row(row)

        return await self._call(delete, write=True)

    # -- audit log -------------------------------------------------------------------------

    async def audit(self, entry: dict[str, object]) -> None:
        """Append one audit record (see ``meta.common.audit_row``)."""
        row = audit_row(entry)
        await self._call(lambda c: c.execute(_INSERT_AUDIT, *row), write=True)

    async def query_audit(
        self, start_ms: int, end_ms: int, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Audit records with ``time_ms`` in ``[start_ms, end_ms)``, oldest first, at most
        ``limit``; each a dict with the keys of ``AUDIT_FIELDS``."""
        rows = await self._call(lambda c: c.fetch(_QUERY_AUDIT, start_ms, end_ms, limit))
        return [audit_from_row(r) for r in rows]

    # -- database calls --------------------------------------------------------------------

    async def _call(self, op: Callable[[Any], Awaitable[_T]], *, write: bool = False) -> _T:
        """Run ``op`` on a pooled connection (in a transaction when ``write``), bounded by
        ``op_timeout_s``; database failures become ``Unavailable``."""
        pool = self._pool
        if pool is None:
            raise Unavailable("metadata store: not started or closed")
        try:
            result = await self._bounded(self._attempt(pool, op, write), self.op_timeout_s)
        except _DOWN_ERRORS as e:
            self._set_down(e)
            raise Unavailable(f"metadata store: PostgreSQL unreachable ({_error_text(e)})") from e
        except asyncpg.PostgresError as e:
            raise Unavailable(f"metadata store: {_error_text(e)}") from e
        except asyncpg.InterfaceError as e:
            if isinstance(e, ValueError):  # a bad argument: a bug to see, not an outage
                raise
            raise Unavailable(f"metadata store: {_error_text(e)}") from e
        self._set_up()
        return result

    async def _bounded(self, work: Coroutine[Any, Any, _T], timeout: float) -> _T:
        """``await work``, but raise ``TimeoutError`` after ``timeout`` seconds at the latest.

        On a dead link, asyncpg's cleanup of a cancelled statement (the cancel request, the
        ROLLBACK, the reset before the connection goes back to the pool) waits on the same link
        again, each step up to its own timeout. So ``work`` runs as a task that, when time is
        up, is cancelled and left to clean up in the background while the caller moves on.
        """
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout)
        finally:
            if not task.done():
                task.cancel()
                self._stragglers.add(task)
                task.add_done_callback(self._straggler_done)
        if not done:
            raise TimeoutError
        return task.result()

    def _straggler_done(self, task: asyncio.Future[Any]) -> None:
        self._stragglers.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: it was already reported to the caller as a timeout

    async def _attempt(self, pool: Any, op: Callable[[Any], Awaitable[_T]], write: bool) -> _T:
        for attempt in range(1, TX_ATTEMPTS + 1):
            async with pool.acquire(timeout=self.op_timeout_s) as conn:
                if not write:
                    return await op(conn)
                try:
                    async with conn.transaction():
                        return await op(conn)
                except asyncpg.TransactionRollbackError:
                    # a deadlock victim or serialization failure: nothing was written, go again
                    if attempt == TX_ATTEMPTS:
                        raise
        raise AssertionError("unreachable")

    def _set_down(self, e: BaseException) -> None:
        self._last_error = _error_text(e)
        if not self._up or self._closed:
            return
        self._up = False
        self._since_ms = now_ms()
        self._watch_wake.set()  # start probing now, not at the next ping
        log.warning(
            "metadata store: %s is unreachable (%s); metadata requests fail with 503 until it is"
            " back, consumer touches are kept in memory and written then, topics are served"
            " from the cache",
            self._where,
            self._last_error,
            extra={"target": self.target},
        )

    def _set_up(self) -> None:
        if self._up or self._closed:
            return
        down_s = (now_ms() - self._since_ms) / 1000
        self._up = True
        self._since_ms = now_ms()
        self._last_error = ""
        log.info(
            "metadata store: %s is reachable again after %.1f s; %d pending consumer touches",
            self._where,
            down_s,
            len(self.touches.unwritten()),
            extra={"target": self.target},
        )

    def _start_error(self, e: Exception) -> MqfastError:
        if isinstance(e, MqfastError):
            return e
        where = self._where
        if isinstance(e, asyncpg.InvalidAuthorizationSpecificationError):
            return ConfigError(f"metadata store: {where} refused the login: {_error_text(e)}")
        if isinstance(e, asyncpg.InvalidCatalogNameError):
            return ConfigError(f"metadata store: {where}: {_error_text(e)}")
        if isinstance(e, ValueError):  # asyncpg's ClientConfigurationError among them
            return ConfigError(f"metadata store: invalid PostgreSQL DSN: {e}")
        if isinstance(e, TimeoutError):
            return Unavailable(
                f"metadata store: {where} did not answer within"
                f" {self.connect_timeout_s + self.op_timeout_s:g} s"
            )
        return Unavailable(f"metadata store: cannot use {where}: {_error_text(e)}")

    @staticmethod
    async def _write_touches(conn: Any, touches: dict[str, int]) -> None:
        ids = list(touches)
        await conn.execute(_LOCK_TOUCHED, ids)
        await conn.execute(_TOUCH, ids, list(touches.values()))

    # -- topic cache -----------------------------------------------------------------------

    async def _open_listener(self) -> Any:
        conn = await asyncpg.connect(
            self.dsn, timeout=self.connect_timeout_s, command_timeout=self.op_timeout_s
        )
        try:
            conn.add_termination_listener(self._on_listener_closed)
            await conn.add_listener(TOPICS_CHANNEL, self._on_notification)
            await conn.add_listener(GRANTS_CHANNEL, self._on_grants_notification)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _on_listener_closed(self, conn: Any) -> None:
        if conn is self._listener:
            self._watch_wake.set()

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload:
            self._dirty_topics.add(payload)
        else:  # a bare "NOTIFY mqfast_topics" (by hand, say) reloads everything
            self._full_reload_due = True
        self._topics_wake.set()

    def _on_grants_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        callback = self.on_grants_changed
        if callback is not None:
            callback(payload or None)  # a bare NOTIFY (by hand, say) reloads every subject

    async def _watch(self) -> None:
        """Hold the LISTEN connection (ping it now and then, reconnect with backoff when lost)
        and, while the database is down, probe it, so that the store comes back up by itself
        even when no request arrives (a failing health check may be what keeps them away)."""
        loop = asyncio.get_running_loop()
        listen_failures = probe_failures = 0
        next_ping = loop.time() + self.topics_refresh_s
        while True:
            if self._listener is None:
                try:
                    self._listener = await self._open_listener()
                except Exception as e:
                    listen_failures += 1
                    if isinstance(e, _DOWN_ERRORS):
                        self._set_down(e)
                    elif listen_failures == 1:
                        log.warning(
                            "metadata store: cannot listen for topic changes on %s (%s); retrying",
                            self._where,
                            _error_text(e),
                        )
                else:
                    listen_failures = 0
                    next_ping = loop.time() + self.topics_refresh_s
                    log.info(
                        "metadata store: listening for topic changes on %s again;"
                        " reloading the registry",
                        self._where,
                    )
                    # notifications sent while no one listened are lost: reload everything
                    self._full_reload_due = True
                    self._topics_wake.set()
                    if self.on_grants_changed is not None:
                        self.on_grants_changed(None)
            if not self._up:
                try:
                    await self._call(lambda c: c.execute("SELECT 1"))
                except Unavailable:
                    probe_failures += 1
                else:
                    probe_failures = 0
                    next_ping = loop.time()  # the listener may not have survived the outage
            if self._listener is None or not self._up:
                delay = _backoff(max(listen_failures, probe_failures))
            else:
                delay = max(0.0, next_ping - loop.time())
            try:
                await asyncio.wait_for(self._watch_wake.wait(), delay)
            except TimeoutError:
                pass
            self._watch_wake.clear()
            conn = self._listener
            if conn is None:
                continue
            broken = conn.is_closed()
            if not broken and loop.time() >= next_ping:
                next_ping = loop.time() + self.topics_refresh_s
                # an idle connection never notices a silently dead peer by itself
                try:
                    await conn.execute("SELECT 1", timeout=self.op_timeout_s)
                except Exception:
                    broken = True
            if broken:
                self._listener = None
                conn.terminate()
                log.warning(
                    "metadata store: lost the topic-change listener connection to %s;"
                    " reconnecting (topics are served from the cache meanwhile)",
                    self._where,
                    extra={"target": self.target},
                )

    async def _refresh_topics(self) -> None:
        """Apply notified topic changes one at a time, and reload everything periodically."""
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.topics_refresh_s
        while True:
            try:
                await asyncio.wait_for(self._topics_wake.wait(), max(0.0, next_full - loop.time()))
            except TimeoutError:
                self._full_reload_due = True
            self._topics_wake.clear()
            names, self._dirty_topics = self._dirty_topics, set()
            try:
                if self._full_reload_due:
                    self._full_reload_due = False
                    next_full = loop.time() + self.topics_refresh_s
                    await self._load_topics(notified=names)
                else:
                    # One at a time and in order: a later reload never finishes before an
                    # earlier one, so the cache cannot go back to an older version.
                    for name in sorted(names):
                        await self._reload_topic(name)
            except Unavailable as e:
                # retried as a full reload: the next period or the listener's reconnection
                self._full_reload_due = True
                self._topics_failures += 1
                if self._topics_failures == 1 and not isinstance(e.__cause__, _DOWN_ERRORS):
                    log.warning("metadata store: reloading topics failed, will retry: %s", e)
                continue
            self._topics_failures = 0

    async def _reload_topic(self, name: str) -> None:
        row = await self._call(
            lambda c: c.fetchrow(
                f"SELECT {_TOPIC_COLUMNS} FROM mqfast_topics WHERE name = $1", name
            )
        )
        if row is None:
            self._topics.pop(name, None)
        else:
            self._topics[name] = _topic_from_row(row)
        self._notify_changed(name)

    def _notify_changed(self, name: str) -> None:
        callback = self.on_topics_changed
        if callback is None:
            return
        try:
            callback(name)
        except Exception:
            log.exception("metadata store: on_topics_changed(%r) failed", name)


def _backoff(failures: int) -> float:
    """Seconds before retry number ``failures + 1``: doubling from 0.25 s, jittered, capped."""
    delay = min(RETRY_BACKOFF_MAX_S, 0.25 * 2 ** min(failures, 10))
    return random.uniform(delay / 2, delay)


def _rowcount(status: str) -> int:
    """The row count of a command status such as ``DELETE 3``."""
    return int(status.rpartition(" ")[2] or 0)
