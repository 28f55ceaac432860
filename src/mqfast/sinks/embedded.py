"""The embedded engine: a single-node message log on SQLite (stdlib ``sqlite3``, WAL mode).

One database file, ``<data_dir>/mqfast.db``. Produce goes through ONE writer thread per process
that does group commit: it blocks for the first queued batch, drains every batch already queued
(up to ``MAX_ROWS_PER_TXN`` rows) and writes them in one ``BEGIN IMMEDIATE`` transaction. Offsets
are read from ``partitions.next_offset`` inside that transaction, never from memory, because
several processes (``--workers N``) may share the file; SQLite's write lock serialises them.

Admin calls, reads and retention run on a dedicated single-thread executor with its own
connection. Every write transaction (writer, admin, retention) starts with ``BEGIN IMMEDIATE`` so
that lock contention shows up as a wait bounded by ``busy_timeout`` rather than as a deadlock when
a reader tries to upgrade. Retention deletes in bounded chunks so it never holds the write lock
for long.

Invariants other code touching these tables must keep:

- ``partitions.messages`` / ``partitions.bytes`` are maintained explicitly by whoever inserts or
  deletes ``messages`` rows (no triggers: they would cost a row update per produced message).
- Deletion is always of a prefix of a partition's offsets (retention) or of a whole topic, so
  ``low_offset`` is ``MIN(offset)`` and offsets are never reused (``next_offset`` only grows).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import msgspec

from mqfast.crypto import (
    ENC_ID_HEADER,
    ENC_TOPIC_HEADER,
    DecryptError,
    Encryptor,
    Keyring,
    open_message,
)
from mqfast.crypto import HEADER as ENC_HEADER
from mqfast.errors import (
    BadRequest,
    ConfigError,
    IdempotencyKeyReused,
    MqfastError,
    ShuttingDown,
    TopicExists,
    Unavailable,
)
from mqfast.errors import UnknownTopic as UnknownTopicError
from mqfast.messages import GroupLag, PartitionStats, StoredMessage, TopicConfig, TopicInfo
from mqfast.sinks import Delivery, DoneCallback

log = logging.getLogger("mqfast.embedded")

_T = TypeVar("_T")

DB_FILENAME: Final = "mqfast.db"
# Group-commit cap: large enough to amortise the commit, small enough that one transaction
# (and the latency of every request in it) stays in the low milliseconds.
MAX_ROWS_PER_TXN: Final = 5_000
# Retention chunks: bounded by rows and by bytes, since freeing the overflow pages of large
# messages is what makes a delete slow.
RETENTION_CHUNK_ROWS: Final = 5_000
RETENTION_CHUNK_BYTES: Final = 64 * 1024 * 1024
SCHEMA_COMPONENT: Final = "embedded"
# How often the WAL is copied back into the database file. Each checkpoint ends in an fsync
# that stalls the filesystem for a moment, and the stall grows with the work: measured at a
# fixed 5,000 req/s, p99 was 0.8-1.1 ms at 0.1 s, ~1 ms at 0.5 s and 18-34 ms at 5 s.
CHECKPOINT_INTERVAL_S: Final = 0.1
# Past this many WAL pages (4 KiB each: 1 GiB) the checkpointer forces a RESTART checkpoint.
# Normally SQLite starts the WAL over by itself once a checkpoint has caught up; under a burst
# that never pauses it cannot, and this bounds the file. (Measured: a smaller limit, or
# journal_size_limit, makes steady 5,000 commits/s stall for tens of ms at a time.)
WAL_RESTART_FRAMES: Final = 262_144

# Each entry is one schema version (index + 1). Append only; never edit an applied migration.
# A component-keyed version table (not PRAGMA user_version) lets other stores (metadata,
# consumer groups) keep their own migrations in the same file.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE topics (
            name TEXT PRIMARY KEY,
            partitions INTEGER NOT NULL,
            replication INTEGER NOT NULL,
            retention INTEGER NOT NULL,   -- nanoseconds, 0 keeps forever
            max_size INTEGER NOT NULL,    -- bytes for the whole topic, 0 unlimited
            created_at INTEGER NOT NULL   -- unix ms
        )""",
        """CREATE TABLE partitions (
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            next_offset INTEGER NOT NULL DEFAULT 0,
            messages INTEGER NOT NULL DEFAULT 0,
            bytes INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (topic, partition)
        ) WITHOUT ROWID""",
        # WITHOUT ROWID: the log is append-only by primary key, so one B-tree (no rowid table
        # plus a separate PK index) is one insert per row instead of two.
        """CREATE TABLE messages (
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            offset INTEGER NOT NULL,
            message_id TEXT NOT NULL,
            key BLOB,
            value BLOB NOT NULL,
            headers BLOB,                 -- JSON object bytes, NULL when none
            priority INTEGER NOT NULL DEFAULT 0,
            timestamp_ms INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL DEFAULT 0,
            size INTEGER NOT NULL,        -- len(key) + len(value) + len(headers)
            PRIMARY KEY (topic, partition, offset)
        ) WITHOUT ROWID""",
    ),
    (
        "ALTER TABLE topics ADD COLUMN dead_letter_expired INTEGER NOT NULL DEFAULT 0",
        # Consumer groups (sinks/embedded_groups.py). A group's progress per partition is
        # ``committed``: every message below it is complete. ``group_cursors`` is, per priority
        # level, the next message never leased yet: levels are leased in offset order, so what
        # lies below a cursor has a lease row or is complete.
        "CREATE INDEX messages_priority ON messages (topic, partition, priority, offset)",
        """CREATE TABLE group_partitions (
            group_id TEXT NOT NULL,
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            committed INTEGER NOT NULL,
            PRIMARY KEY (group_id, topic, partition)
        ) WITHOUT ROWID""",
        """CREATE TABLE group_cursors (
            group_id TEXT NOT NULL,
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            priority INTEGER NOT NULL,
            next_offset INTEGER NOT NULL,
            PRIMARY KEY (group_id, topic, partition, priority)
        ) WITHOUT ROWID""",
        # One row per message a group has touched above its committed position: leased (1),
        # waiting for a retry (2) or complete (3; kept a while so a second ack is answered).
        # ``due_ms`` is the lease deadline (1) or the retry time (2).
        """CREATE TABLE leases (
            group_id TEXT NOT NULL,
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            offset INTEGER NOT NULL,
            message_id TEXT NOT NULL,
            priority INTEGER NOT NULL,
            state INTEGER NOT NULL,
            consumer_id TEXT,
            due_ms INTEGER NOT NULL,
            leased_ms INTEGER NOT NULL DEFAULT 0,
            delivery_count INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            done_ms INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (group_id, topic, partition, offset)
        ) WITHOUT ROWID""",
        "CREATE INDEX leases_message ON leases (group_id, message_id)",
        "CREATE INDEX leases_due ON leases (group_id, topic, state, due_ms)",
        "CREATE INDEX leases_consumer ON leases (consumer_id, state)",
    ),
    (
        # Encryption at rest (crypto.py): the topic flag, and the wrapped data keys by id. The
        # header naming a message's keys lives in its ``headers`` JSON (``mqfast-enc``), so
        # dead-letter copies carry it along with the ciphertext.
        "ALTER TABLE topics ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE data_keys (
            id TEXT PRIMARY KEY,
            master_key_id TEXT NOT NULL,
            wrapped BLOB NOT NULL,
            created_ms INTEGER NOT NULL
        )""",
    ),
    (
        # Group state per run of offsets instead of per message (KIP-932's in-flight batches):
        # one row covers consecutive offsets ``first_offset..last_offset`` of a partition that
        # share one state, holder, deadline, delivery count and priority. A lease of a batch is
        # one row and its acknowledgement one update; only what diverges (a nack, a partial ack,
        # an expiry) splits a run. Rows refer to offsets, never to message rows, so a message
        # table of record batches keeps them as they are. ``why`` tells a retry's cause (1 a
        # negative acknowledgement, 2 an expired lease, 3 a released consumer). ``id_lo`` and
        # ``id_hi`` bound the run's message ids, to find an id's run without an index per message.
        """CREATE TABLE runs (
            group_id TEXT NOT NULL,
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            first_offset INTEGER NOT NULL,
            last_offset INTEGER NOT NULL,
            state INTEGER NOT NULL,
            consumer_id TEXT,
            due_ms INTEGER NOT NULL,
            leased_ms INTEGER NOT NULL,
            delivery_count INTEGER NOT NULL,
            priority INTEGER NOT NULL,
            last_error TEXT,
            why INTEGER NOT NULL DEFAULT 0,
            done_ms INTEGER NOT NULL DEFAULT 0,
            id_lo TEXT NOT NULL,
            id_hi TEXT NOT NULL,
            PRIMARY KEY (group_id, topic, partition, first_offset)
        ) WITHOUT ROWID""",
        "INSERT INTO runs SELECT group_id, topic, partition, offset, offset, state, consumer_id,"
        " due_ms, leased_ms, delivery_count, priority, last_error,"
        " CASE WHEN state = 2 THEN CASE last_error WHEN 'lease expired' THEN 2"
        " WHEN 'consumer inactive' THEN 3 ELSE 1 END ELSE 0 END, done_ms, message_id, message_id"
        " FROM leases",
        "DROP TABLE leases",
        # Complete runs are most rows and never looked up by deadline or holder: the indexes
        # that serve those lookups leave them out (queries repeat the condition to use them).
        "CREATE INDEX runs_due ON runs (group_id, topic, state, due_ms) WHERE state < 3",
        "CREATE INDEX runs_consumer ON runs (consumer_id) WHERE state = 1",
        "CREATE INDEX runs_ids ON runs (group_id, id_hi)",
        # A consume probes each priority level of each partition: with the expiry in the
        # index, that reads the index alone.
        "DROP INDEX messages_priority",
        "CREATE INDEX messages_priority ON messages (topic, partition, priority, offset,"
        " expires_ms)",
    ),
    (
        # Idempotent produce: one row per key (per topic and subject, ``scope``), written in
        # the transaction of its message, so neither is ever stored without the other. The key
        # of a batch's header is one row for the batch (the first message's topic), ``results``
        # every message's partition, offset (-1: not stored), id and timestamp (msgpack). A row
        # older than the window is no longer a key: the next produce with it replaces it, and
        # the retention pass deletes it.
        """CREATE TABLE idempotency_keys (
            topic TEXT NOT NULL,
            scope TEXT NOT NULL,
            fingerprint BLOB NOT NULL,
            partition INTEGER NOT NULL,
            offset INTEGER NOT NULL,
            message_id TEXT NOT NULL,
            timestamp_ms INTEGER NOT NULL,
            stored_ms INTEGER NOT NULL,
            results BLOB,                 -- a batch's header key: every message's result
            PRIMARY KEY (topic, scope)
        ) WITHOUT ROWID""",
        "CREATE INDEX idempotency_keys_stored ON idempotency_keys (stored_ms)",
    ),
)

_INSERT_MESSAGE: Final = (
    "INSERT INTO messages (topic, partition, offset, message_id, key, value, headers, priority,"
    " timestamp_ms, expires_ms, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# With the topic's encryption flag: the transaction checks what _seal assumed before it wrote.
_SELECT_NEXT: Final = (
    "SELECT p.next_offset, t.encrypted FROM partitions p JOIN topics t ON t.name = p.topic"
    " WHERE p.topic = ? AND p.partition = ?"
)
_UPDATE_PARTITION: Final = (
    "UPDATE partitions SET next_offset = ?, messages = messages + ?, bytes = bytes + ?"
    " WHERE topic = ? AND partition = ?"
)
_SELECT_KEYS: Final = (
    "SELECT scope, fingerprint, partition, offset, message_id, timestamp_ms, stored_ms, results"
    " FROM idempotency_keys WHERE topic = ? AND scope IN (%s)"
)
# Keys looked up per statement (SQLite allows 32,766 parameters).
KEY_LOOKUP_CHUNK: Final = 500
_INSERT_KEY: Final = (
    "INSERT OR REPLACE INTO idempotency_keys (topic, scope, fingerprint, partition, offset,"
    " message_id, timestamp_ms, stored_ms, results) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_TOPIC_COLUMNS: Final = (
    "name, partitions, replication, retention, max_size, created_at, dead_letter_expired, encrypted"
)

_STOP: Final = object()


class _Keyed:
    """A queued batch with idempotency keys among its deliveries (``submit_keyed``)."""

    __slots__ = ("batch",)

    def __init__(self, batch: list[Delivery]) -> None:
        self.batch = batch


def reused_key(d: Delivery) -> IdempotencyKeyReused:
    """The error of a delivery whose key was used with another message (both engines)."""
    assert d.idem is not None
    return IdempotencyKeyReused(
        f"this idempotency key was used for another message to topic {d.topic!r} within the "
        "idempotency window (MESSAGE_QUEUE_IDEMPOTENCY_WINDOW); send the original message "
        "again or use a new key",
        field=d.idem.field,
    )


def copy_result(d: Delivery, first: Delivery) -> None:
    """Answer ``d`` (a retry) as ``first`` was answered."""
    if first.error is not None:
        d.error = first.error
    elif (
        d.idem is not None
        and first.idem is not None
        and (d.idem.fingerprint != first.idem.fingerprint)
    ):
        d.error = reused_key(d)
    else:
        d.partition = first.partition
        d.offset = first.offset
        d.message_id = first.message_id
        d.timestamp_ms = first.timestamp_ms
        d.replayed = True


def _not_stored(d: Delivery) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        "this message was not stored by the first request with this idempotency key (it "
        "failed then); send it again with a new key",
        field=d.idem.field if d.idem is not None else None,
    )


def _replay(group: list[Delivery], row: Any) -> None:
    """Answer a retry from its key's row (None: the key is another message's)."""
    if row is None:
        for d in group:
            d.error = reused_key(d)
        return
    if row[6] is None:
        parts, offs, ids, stamps = [row[1]], [row[2]], [row[3]], [row[4]]
    else:
        parts, offs, ids, stamps = _results_decoder.decode(row[6])
    if len(parts) != len(group):
        for d in group:
            d.error = reused_key(d)
        return
    for d, part, off, mid, ts in zip(group, parts, offs, ids, stamps, strict=True):
        if off < 0:
            d.error = _not_stored(d)
            continue
        d.partition, d.offset, d.message_id, d.timestamp_ms = part, off, mid, ts
        d.replayed = True


def _follow(group: list[Delivery], first: list[Delivery]) -> None:
    """Answer ``group`` as ``first`` (the same key earlier in the transaction) was."""
    if len(group) != len(first):
        for d in group:
            d.error = reused_key(d)
        return
    for d, f in zip(group, first, strict=True):
        copy_result(d, f)


def _key_row(group: list[Delivery], offsets: dict[int, int], now: int) -> tuple[Any, ...] | None:
    """The row that records ``group``'s key, or None when nothing of it was written."""
    d = group[0]
    k = d.idem
    assert k is not None
    if k.count == 1 and len(group) == 1:
        off = offsets.get(id(d))
        if off is None:
            return None
        return (d.topic, k.scope, k.fingerprint, d.partition, off, d.message_id, d.timestamp_ms,
                now, None)  # fmt: skip
    offs = [offsets.get(id(m), -1) for m in group]
    if max(offs) < 0:
        return None
    results = _results_encoder.encode(
        ([m.partition for m in group], offs, [m.message_id for m in group],
         [m.timestamp_ms for m in group])
    )  # fmt: skip
    return (d.topic, k.scope, k.fingerprint, d.partition, offs[0], d.message_id, d.timestamp_ms,
            now, results)  # fmt: skip


# A batch key's results: (partitions, offsets (-1: not stored), message ids, timestamps).
_results_encoder = msgspec.msgpack.Encoder()
_results_decoder = msgspec.msgpack.Decoder(tuple[list[int], list[int], list[str], list[int]])


class _TopicChanged(Exception):
    """A topic's encryption setting is not the one a write was prepared with."""

    def __init__(self, topic: str) -> None:
        super().__init__(topic)
        self.topic = topic


# topic, partition, offset, message_id, key, value, headers, priority, timestamp, expires, size
_Row = tuple[str, int, int, str, bytes | None, bytes, bytes | None, int, int, int, int]
_headers_decoder = msgspec.json.Decoder(dict[str, str])
_headers_encoder = msgspec.json.Encoder()
# id(delivery) -> (ciphertext, headers with the mqfast-enc header) for encrypted topics
_Sealed = dict[int, tuple[bytes, bytes]]
_NO_SEALED: Final[_Sealed] = {}


def seal_headers(headers: bytes | None, header_value: str) -> bytes:
    """``headers`` (a JSON object or None) with ``mqfast-enc`` set to ``header_value``."""
    h = _headers_decoder.decode(headers) if headers else {}
    h.pop(ENC_TOPIC_HEADER, None)
    h.pop(ENC_ID_HEADER, None)
    h[ENC_HEADER] = header_value
    return _headers_encoder.encode(h)


def _rows(
    written: list[Delivery], offsets: list[int], sizes: list[int], sealed: _Sealed
) -> Iterator[_Row]:
    for d, off, size in zip(written, offsets, sizes, strict=True):
        s = sealed.get(id(d)) if sealed else None
        yield (
            d.topic,
            d.partition,
            off,
            d.message_id,
            d.key,
            d.value if s is None else s[0],
            d.headers if s is None else s[1],
            d.priority,
            d.timestamp_ms,
            d.expires_ms,
            size,
        )


_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def write_lock(path: str) -> threading.Lock:
    """The lock every write transaction of this process on the database at ``path`` takes.

    When SQLite's write lock is taken, its busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms and
    on: a consume transaction meeting a produce commit would stall for milliseconds. Threads
    of one process queue on this lock instead and are woken the moment it is free; only other
    processes (``--workers N``) still meet the busy handler.
    """
    key = os.path.abspath(path)
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(key)
        if lock is None:
            lock = _WRITE_LOCKS[key] = threading.Lock()
        return lock


@contextmanager
def immediate(conn: sqlite3.Connection, lock: threading.Lock) -> Iterator[sqlite3.Connection]:
    """One write transaction: this process's lock of the database, then ``BEGIN IMMEDIATE``."""
    with lock:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O)
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the connection may be unusable; the next BEGIN will tell
            raise


def apply_migrations(
    conn: sqlite3.Connection, component: str, migrations: tuple[tuple[str, ...], ...], path: str
) -> None:
    """Bring ``component``'s tables to the last of ``migrations``, inside the caller's
    transaction. Each store in the file keeps its own version row in ``schema_version``."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
    )
    row = conn.execute(
        "SELECT version FROM schema_version WHERE component = ?", (component,)
    ).fetchone()
    current = int(row[0]) if row else 0
    if current > len(migrations):
        raise ConfigError(
            f"{path}: {component} schema version {current} is newer than this mqfast supports"
            f" ({len(migrations)}); upgrade mqfast or use another data directory"
        )
    for version in range(current + 1, len(migrations) + 1):
        for stmt in migrations[version - 1]:
            conn.execute(stmt)
        conn.execute(
            "INSERT OR REPLACE INTO schema_version (component, version) VALUES (?, ?)",
            (component, version),
        )
        log.info("%s schema migrated to version %d", component, version)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _topic_from_row(row: tuple[Any, ...]) -> TopicConfig:
    return TopicConfig(
        name=row[0],
        partitions=row[1],
        replication=row[2],
        retention=row[3],
        max_size=row[4],
        created_at=row[5],
        dead_letter_expired=bool(row[6]),
        encrypted=bool(row[7]),
    )


class SqliteKeyStore:
    """``crypto.WrappedKeyStore`` in the engine's database (table ``data_keys``).

    Each call opens its own short-lived connection, so any thread may call it; ``put`` is one
    write transaction under the process's write lock (callers must not hold it), committed
    before the first message under that data key is written.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], lock: threading.Lock) -> None:
        self._connect = connect
        self._lock = lock

    def put(self, data_key_id: str, master_key_id: str, wrapped: bytes) -> None:
        """Store (or replace) the wrapped data key ``data_key_id``."""
        conn = self._connect()
        try:
            with immediate(conn, self._lock):
                conn.execute(
                    "INSERT OR REPLACE INTO data_keys (id, master_key_id, wrapped, created_ms)"
                    " VALUES (?, ?, ?, ?)",
                    (data_key_id, master_key_id, bytes(wrapped), _now_ms()),
                )
        finally:
            conn.close()

    def get(self, data_key_id: str) -> tuple[str, bytes] | None:
        """``(master key id, wrapped key)`` of ``data_key_id``, or ``None`` if unknown."""
        conn = self._connect()
        try:
            row = conn.execute(
                "SELECT master_key_id, wrapped FROM data_keys WHERE id = ?", (data_key_id,)
            ).fetchone()
        finally:
            conn.close()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def items(self) -> list[tuple[str, str, bytes]]:
        """Every stored ``(data key id, master key id, wrapped key)``."""
        conn = self._connect()
        try:
            rows = conn.execute("SELECT id, master_key_id, wrapped FROM data_keys").fetchall()
        finally:
            conn.close()
        return [(str(i), str(m), bytes(w)) for i, m, w in rows]


class EmbeddedSink:
    """The ``embedded`` storage engine (see the module docstring)."""

    name = "embedded"

    def __init__(
        self,
        data_dir: str,
        *,
        fsync: bool = False,
        retention_interval_s: float = 30.0,
        busy_timeout_s: float = 5.0,
        keyring: Keyring | None = None,
        idempotency_window_ms: int = 24 * 3600 * 1000,
    ) -> None:
        self.data_dir = data_dir
        self.idempotency_window_ms = idempotency_window_ms
        self.path = os.path.join(data_dir, DB_FILENAME)
        self.fsync = fsync
        self.retention_interval_s = retention_interval_s
        self.busy_timeout_s = busy_timeout_s
        self._write_lock = write_lock(self.path)
        # Encryption at rest: None when no master key is configured (encrypted topics then
        # cannot be created, produced to or read).
        self.encryptor: Encryptor | None = (
            None
            if keyring is None
            else Encryptor(keyring, SqliteKeyStore(self._connect, self._write_lock))
        )
        # topic -> encrypted, as _seal last read it (writer thread; checked by each write)
        self._encrypted_topics: dict[str, bool] = {}

        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_done: DoneCallback | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._admin: concurrent.futures.ThreadPoolExecutor | None = None
        self._admin_conn: sqlite3.Connection | None = None  # used only on the admin thread
        self._retention_task: asyncio.Task[None] | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self._retention_lock = asyncio.Lock()

        self._closed = False  # set on the loop thread by close(); submit() then refuses
        self._abort = False  # set when close() times out: the writer fails what is left
        self._writer_dead: str | None = None  # why the writer thread stopped unexpectedly
        self._last_error: str | None = None  # last failed transaction, cleared by a success
        self._failed_txns = 0  # failures since the last success, for one log line per episode

    @property
    def can_encrypt(self) -> bool:
        """True when a master key is configured: encrypted topics can be created."""
        return self.encryptor is not None

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop, on_done: DoneCallback) -> None:
        """Set the loop and the completion callback; called once, before ``start``."""
        self._loop = loop
        self._on_done = on_done

    async def start(self) -> None:
        """Open (and migrate) the database, start the writer thread and the retention task."""
        loop = self._loop_or_running()
        self._admin = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mqfast-embedded-admin"
        )
        try:
            await self._run(self._admin_open)
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._writer = threading.Thread(
                target=self._writer_main,
                args=(ready,),
                name="mqfast-embedded-writer",
                daemon=True,
            )
            self._writer.start()
            await asyncio.wrap_future(ready, loop=loop)
        except BaseException:
            # Leave nothing running behind a failed start; close() then has nothing to do.
            admin, self._admin = self._admin, None
            if admin is not None:
                admin.submit(self._admin_close)
                admin.shutdown(wait=False)
            if self._writer is not None:
                self._writer.join()
                self._writer = None
            raise

        mode = (
            "FULL (fsync per commit, survives power loss)"
            if self.fsync
            else "NORMAL (survives a process crash, not power loss)"
        )
        log.info(
            "embedded engine at %s, WAL, synchronous=%s",
            self.path,
            mode,
            extra={"engine": self.name, "path": self.path, "fsync": self.fsync},
        )
        if self.retention_interval_s > 0:
            self._retention_task = loop.create_task(
                self._retention_loop(), name="mqfast-embedded-retention"
            )
        self._checkpointer = threading.Thread(
            target=self._checkpoint_main, name="mqfast-embedded-checkpoint", daemon=True
        )
        self._checkpointer.start()

    async def close(self, timeout: float) -> None:
        """Stop accepting, write what is queued (within ``timeout``), then release everything.

        Batches still queued when ``timeout`` runs out are completed with ``ShuttingDown``; a
        transaction already running is allowed to finish (bounded by ``busy_timeout``).
        """
        if self._closed:
            return
        self._closed = True
        loop = self._loop_or_running()
        deadline = loop.time() + max(timeout, 0.0)

        if self._retention_task is not None:
            self._retention_task.cancel()
            try:
                await self._retention_task
            except asyncio.CancelledError:
                pass
            self._retention_task = None

        writer = self._writer
        if writer is not None:
            self._queue.put(_STOP)
            await self._join(writer, deadline - loop.time())
            if writer.is_alive():
                log.warning(
                    "embedded writer did not drain within %.1fs; failing what is left", timeout
                )
                self._abort = True
                await self._join(writer, self.busy_timeout_s + 1.0)
        # Whatever nobody else took (writer dead or never started) is completed here.
        self._fail_queued(ShuttingDown("server is shutting down"))
        if self._checkpointer is not None:
            self._checkpoint_stop.set()
            await self._join(self._checkpointer, self.busy_timeout_s + 1.0)
            self._checkpointer = None

        if self._admin is not None:
            try:
                await self._run(self._admin_close)
            finally:
                self._admin.shutdown(wait=True)
                self._admin = None
        # Let completions scheduled by the writer run before the caller tears the loop down.
        await asyncio.sleep(0)

    # -- hot path --------------------------------------------------------------------------

    def submit(self, batch: list[Delivery]) -> None:
        """Queue ``batch`` for the writer thread; never blocks."""
        if self._closed:
            self._fail_now(batch, ShuttingDown("server is shutting down"))
            return
        if self._writer_dead is not None:
            self._fail_now(batch, Unavailable(f"embedded engine: {self._writer_dead}"))
            return
        self._queue.put(batch)
        # The writer may have died between the check and the put; whoever takes a batch off
        # the queue owns it, so draining here cannot double-complete it.
        if self._writer_dead is not None:
            self._fail_queued(Unavailable(f"embedded engine: {self._writer_dead}"))

    def submit_keyed(self, batch: list[Delivery]) -> None:
        """``submit`` for a batch with idempotency keys: the writer checks and stores each key
        in the transaction of its message."""
        if self._closed or self._writer_dead is not None:
            self.submit(batch)  # fails it
            return
        self._queue.put(_Keyed(batch))
        if self._writer_dead is not None:
            self._fail_queued(Unavailable(f"embedded engine: {self._writer_dead}"))

    def health(self) -> dict[str, object]:
        """Engine state for ``/health``; cheap (no SQLite access)."""
        h: dict[str, object] = {
            "status": "up",
            "engine": self.name,
            "path": self.path,
            "fsync": self.fsync,
            "queued": self._queue.qsize(),
        }
        if self._writer_dead is not None:
            h["status"] = "down"
            h["detail"] = f"writer thread stopped: {self._writer_dead}"
        elif self._writer is None or self._closed:
            h["status"] = "down"
            h["detail"] = "closed" if self._closed else "not started"
        elif self._last_error is not None:
            h["status"] = "down"
            h["detail"] = f"last write failed: {self._last_error}"
        return h

    # -- admin -----------------------------------------------------------------------------

    async def create_topic(self, config: TopicConfig) -> tuple[TopicConfig, bool]:
        """Create ``config`` (and its partitions); idempotent for identical settings.

        Returns ``(stored, created_now)``; raises ``TopicExists`` naming the differing settings
        when the topic exists with other settings.
        """
        if config.encrypted and self.encryptor is None:
            raise BadRequest(
                "encrypted topics need MESSAGE_QUEUE_MASTER_KEYS or MESSAGE_QUEUE_MASTER_KEY_FILE",
                field="encrypted",
            )
        return await self._run(self._create_topic_sync, config)

    async def get_topic(self, name: str) -> TopicConfig | None:
        """The stored config of ``name`` or None."""
        return await self._run(self._get_topic_sync, name)

    async def list_topics(self) -> list[TopicConfig]:
        """Every topic, sorted by name."""
        return await self._run(self._list_topics_sync)

    async def delete_topic(self, name: str) -> None:
        """Delete the topic, its partitions and messages in one transaction."""
        await self._run(self._delete_topic_sync, name)

    async def describe_topic(self, name: str) -> TopicInfo:
        """Settings plus per-partition counts; ``consumer_groups`` is empty for now."""
        return await self._run(self._describe_topic_sync, name)

    async def read(
        self, topic: str, partition: int, offset: int, limit: int
    ) -> list[StoredMessage]:
        """Up to ``limit`` stored messages of one partition from ``offset`` on, in order.

        Raises ``UnknownTopic`` when the topic does not exist.
        """
        return await self._run(self._read_sync, topic, partition, offset, limit)

    async def enforce_retention(self) -> int:
        """Apply every topic's age and size limits now; return the number of rows deleted.

        Deletes in chunks of at most ``RETENTION_CHUNK_ROWS`` rows, each its own transaction
        and executor call, so produce waits at most one chunk for the write lock.
        """
        # One pass at a time per process: two overlapping size passes would each remove the
        # same excess. (Passes of other workers are safe: each chunk re-reads the excess.)
        async with self._retention_lock:
            return await self._enforce_retention()

    async def _enforce_retention(self) -> int:
        topics = await self.list_topics()
        deleted = 0
        for t in topics:
            if t.retention > 0:
                cutoff = _now_ms() - t.retention // 1_000_000
                for p in range(t.partitions):
                    while True:
                        n, more = await self._run(self._delete_older_chunk, t.name, p, cutoff)
                        deleted += n
                        if not more:
                            break
            if t.max_size > 0:
                deleted += await self._enforce_size(t)
        while await self._run(self._prune_keys_chunk, _now_ms() - self.idempotency_window_ms):
            pass
        return deleted

    def _prune_keys_chunk(self, cutoff_ms: int) -> bool:
        """Delete up to ``RETENTION_CHUNK_ROWS`` keys older than the window; True if more."""
        conn = self._conn()
        with immediate(conn, self._write_lock):
            cur = conn.execute(
                "DELETE FROM idempotency_keys WHERE (topic, scope) IN (SELECT topic, scope"
                " FROM idempotency_keys WHERE stored_ms < ? LIMIT ?)",
                (cutoff_ms, RETENTION_CHUNK_ROWS),
            )
            return cur.rowcount >= RETENTION_CHUNK_ROWS

    async def _enforce_size(self, t: TopicConfig) -> int:
        stats = await self._run(self._partition_bytes, t.name)
        total = sum(stats.values())
        if total <= t.max_size:
            return 0
        excess = total - t.max_size
        deleted = 0
        # Each partition gives up its share of the excess, so partitions keep their proportions.
        for p, b in stats.items():
            need = -(-excess * b // total)  # ceil
            while need > 0:
                n, freed = await self._run(self._delete_oldest_chunk, t.name, p, need, t.max_size)
                deleted += n
                need -= freed
                if n == 0:
                    break
        return deleted

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retention_interval_s)
            try:
                t0 = time.monotonic()
                n = await self.enforce_retention()
                if n:
                    log.info(
                        "retention deleted %d messages in %.3fs",
                        n,
                        time.monotonic() - t0,
                        extra={"deleted": n},
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention pass failed")

    def _checkpoint_main(self) -> None:
        # WAL checkpoints copy pages into the database file and fsync it. Left to SQLite they
        # run inside whichever COMMIT crosses 1000 pages, i.e. in the produce writer, stalling
        # every request of that group commit for the length of an fsync. Here they run on
        # their own thread; PASSIVE never blocks writers, so produce goes on meanwhile. (Not at
        # a lower CPU priority: measured, a niced checkpointer falls behind at 5,000 commits/s
        # and the WAL then never starts over.)
        try:
            conn = self._connect()
        except Exception:
            log.exception("embedded checkpointer could not open the database")
            return
        failing = False
        seen = -1
        try:
            while not self._checkpoint_stop.wait(CHECKPOINT_INTERVAL_S):
                try:
                    # data_version moves when another connection commits: idle, nothing to do
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                    if version == seen:
                        continue
                    seen = version
                    _, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames > WAL_RESTART_FRAMES and done == frames:
                        # A writer that commits without pause rarely begins right after a
                        # complete checkpoint, which is when SQLite starts the WAL over, so the
                        # file keeps growing. Everything is copied already: holding this
                        # process's writers for a RESTART checkpoint now costs only the frames
                        # committed since, and the next commit starts the WAL from the top.
                        with self._write_lock:
                            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                    failing = False
                except sqlite3.Error:
                    if not failing:
                        log.exception("embedded WAL checkpoint failed; will retry")
                    failing = True
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.exception("final WAL checkpoint failed")
        finally:
            conn.close()

    # -- connections -----------------------------------------------------------------------

    def open_connection(self) -> sqlite3.Connection:
        """A new connection to the engine's database (for stores sharing the file)."""
        return self._connect()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the sqlite3 module issues no implicit BEGIN; every write
        # transaction here is an explicit BEGIN IMMEDIATE.
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_s,
            isolation_level=None,
            check_same_thread=True,
            cached_statements=64,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        mode = self._wal(conn)
        if str(mode).lower() != "wal":
            conn.close()
            raise Unavailable(f"embedded engine: cannot enable WAL on {self.path} (got {mode})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
        # Checkpoints belong to the checkpointer thread, never to a committing connection.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    def _wal(self, conn: sqlite3.Connection) -> str:
        """Switch ``conn``'s database to WAL; returns the journal mode it is in. Workers opening
        a new database together race for that switch, and SQLite answers the loser "database
        is locked" at once, without its busy handler: retried for up to ``busy_timeout``."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    conn.close()
                    raise
            time.sleep(0.01)

    def _admin_open(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        conn = self._connect()
        try:
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._admin_conn = conn

    def _admin_close(self) -> None:
        if self._admin_conn is not None:
            self._admin_conn.close()
            self._admin_conn = None

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Under the write lock so that workers starting together apply each migration once.
        with immediate(conn, self._write_lock):
            apply_migrations(conn, SCHEMA_COMPONENT, MIGRATIONS, self.path)

    def _conn(self) -> sqlite3.Connection:
        if self._admin_conn is None:
            raise Unavailable("embedded engine: not started or closed")
        return self._admin_conn

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._admin is None:
            raise Unavailable("embedded engine: not started or closed")
        loop = self._loop_or_running()
        try:
            return await loop.run_in_executor(self._admin, fn, *args)
        except sqlite3.Error as e:
            raise Unavailable(f"embedded engine: {e}") from e

    def _loop_or_running(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @staticmethod
    async def _join(thread: threading.Thread, timeout: float) -> None:
        if timeout > 0:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)

    # -- writer thread ---------------------------------------------------------------------

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._connect()
        except BaseException as e:
            self._writer_dead = f"cannot open {self.path}: {e}"
            ready.set_exception(e)
            return
        ready.set_result(None)
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        try:
            stop = False
            while not stop:
                item = get()
                if item is _STOP:
                    break
                keyed = type(item) is _Keyed
                if keyed:
                    item = item.batch  # type: ignore[attr-defined]
                batches: list[list[Delivery]] = [item]  # type: ignore[list-item]
                rows = len(item)  # type: ignore[arg-type]
                while rows < MAX_ROWS_PER_TXN:
                    try:
                        item = get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    if type(item) is _Keyed:
                        item = item.batch
                        keyed = True
                    batches.append(item)  # type: ignore[arg-type]
                    rows += len(item)  # type: ignore[arg-type]
                if self._abort:
                    self._complete_failed(batches, ShuttingDown("server is shutting down"))
                else:
                    self._write(conn, batches, keyed=keyed)
        except BaseException as e:
            # Only a bug gets here (_write catches everything); fail fast and loudly rather
            # than leave requests waiting forever.
            self._writer_dead = f"{type(e).__name__}: {e}"
            log.exception("embedded writer thread died")
            self._fail_queued(Unavailable(f"embedded engine: {self._writer_dead}"))
        finally:
            conn.close()

    def _write(
        self,
        conn: sqlite3.Connection,
        batches: list[list[Delivery]],
        again: bool = False,
        keyed: bool = False,
    ) -> None:
        """Write ``batches`` in one transaction, then complete them on the loop.

        ``keyed``: some deliveries carry an idempotency key; those whose key is known within
        the window are answered from its row instead of written (see ``_keys``).
        """
        written: list[Delivery] = []
        offsets: list[int] = []
        sizes: list[int] = []
        missing: list[Delivery] = []
        # (topic, partition) -> [first offset of this txn, next offset, bytes written]
        parts: dict[tuple[str, int], list[int]] = {}
        absent: set[tuple[str, int]] = set()
        try:
            # Encrypt before the transaction: making a data key writes it to the key store,
            # which takes the write lock itself.
            sealed, refused = self._seal(conn, batches)
        except Exception as e:
            self._note_failure(e, sum(len(b) for b in batches))
            self._complete_failed(batches, Unavailable(f"embedded engine: {e}"))
            return
        skip: dict[int, Delivery] = refused
        fresh: list[list[Delivery]] = []
        replays: list[tuple[list[Delivery], Any]] = []
        followers: list[tuple[list[Delivery], list[Delivery]]] = []
        now = 0
        try:
            with immediate(conn, self._write_lock):
                execute = conn.execute
                if keyed:
                    now = _now_ms()
                    skip = dict(refused)
                    self._keys(conn, batches, skip, fresh, replays, followers, now)
                for batch in batches:
                    for d in batch:
                        if skip and id(d) in skip:
                            continue
                        tp = (d.topic, d.partition)
                        st = parts.get(tp)
                        if st is None:
                            row = None if tp in absent else execute(_SELECT_NEXT, tp).fetchone()
                            if row is None:
                                absent.add(tp)
                                missing.append(d)
                                self._encrypted_topics.pop(d.topic, None)
                                continue
                            if bool(row[1]) != self._encrypted_topics.get(d.topic, False):
                                raise _TopicChanged(d.topic)
                            st = parts[tp] = [row[0], row[0], 0]
                        off = st[1]
                        st[1] = off + 1
                        k = d.key
                        sd = sealed.get(id(d)) if sealed else None
                        if sd is None:
                            v = d.value
                            h = d.headers
                        else:
                            v, h = sd
                        size = len(v) + (len(k) if k is not None else 0)
                        if h is not None:
                            size += len(h)
                        st[2] += size
                        written.append(d)
                        offsets.append(off)
                        sizes.append(size)
                if written:
                    # Rows are made one at a time as SQLite binds them: a list of thousands of
                    # row tuples alive at once would wake the garbage collector every commit.
                    conn.executemany(_INSERT_MESSAGE, _rows(written, offsets, sizes, sealed))
                    conn.executemany(
                        _UPDATE_PARTITION,
                        [
                            (s[1], s[1] - s[0], s[2], tp[0], tp[1])
                            for tp, s in parts.items()
                            if s[1] != s[0]
                        ],
                    )
                    if keyed:
                        at = {id(d): off for d, off in zip(written, offsets, strict=True)}
                        rows = [_key_row(g, at, now) for g in fresh]
                        conn.executemany(_INSERT_KEY, [r for r in rows if r is not None])
        except _TopicChanged as e:
            # Recreated by another worker with the other encryption setting since _seal read
            # it: nothing was written; seal again with the flag as it is now.
            self._encrypted_topics.pop(e.topic, None)
            if not again:
                self._write(conn, batches, again=True, keyed=keyed)
                return
            self._complete_failed(batches, Unavailable(f"topic {e.topic!r} changed; retry"))
            return
        except Exception as e:
            self._note_failure(e, sum(len(b) for b in batches))
            self._complete_failed(batches, Unavailable(f"embedded engine: {e}"))
            return

        # Offsets become visible only now that they are committed.
        for d, off in zip(written, offsets, strict=True):
            d.offset = off
        for d in refused.values():
            d.error = Unavailable(f"topic {d.topic!r} is encrypted and no master key is configured")
        for d in missing:
            d.error = UnknownTopicError(
                f"topic {d.topic!r} (partition {d.partition}) does not exist"
            )
        for g, row in replays:
            _replay(g, row)
        for g, first in followers:
            _follow(g, first)
        if self._last_error is not None:
            log.info(
                "embedded writes recovered after %d failed transactions",
                self._failed_txns,
                extra={"failed_transactions": self._failed_txns},
            )
            self._last_error = None
            self._failed_txns = 0
        self._complete(batches)

    def _keys(
        self,
        conn: sqlite3.Connection,
        batches: list[list[Delivery]],
        skip: dict[int, Delivery],
        fresh: list[list[Delivery]],
        replays: list[tuple[list[Delivery], Any]],
        followers: list[tuple[list[Delivery], list[Delivery]]],
        now: int,
    ) -> None:
        """Look up the keys of ``batches`` inside the write transaction.

        The deliveries of one key (one, or a batch's under its header key) are a group. A group
        whose key has a row within the window is not written (``skip``): it goes to ``replays``
        with that row (None when the fingerprints differ: a reused key). A key twice in this
        transaction: the later group follows the first (``followers``). Others are ``fresh``:
        written, then their key rows. Transactions are serialised by the write lock, so a retry
        that arrives while its first attempt is being written waits for it here.
        """
        groups: dict[int, list[Delivery]] = {}
        for batch in batches:
            for d in batch:
                k = d.idem
                if k is not None:
                    g = groups.get(id(k))
                    if g is None:
                        g = groups[id(k)] = []
                    g.append(d)
        horizon = now - self.idempotency_window_ms
        known = self._known_keys(conn, groups.values())
        first: dict[tuple[str, str], list[Delivery]] = {}
        for g in groups.values():
            k = g[0].idem
            assert k is not None
            tk = (g[0].topic, k.scope)
            f = first.get(tk)
            if f is None:
                row = known.get(tk)
                if row is None or row[5] < horizon:
                    first[tk] = g
                    fresh.append(g)
                    continue
                replays.append((g, row if row[0] == k.fingerprint else None))
            else:
                followers.append((g, f))
            for d in g:
                skip[id(d)] = d

    @staticmethod
    def _known_keys(
        conn: sqlite3.Connection, groups: Iterable[list[Delivery]]
    ) -> dict[tuple[str, str], Any]:
        """The rows of these groups' keys, one query per topic and KEY_LOOKUP_CHUNK keys (a
        query per key would cost a statement per message)."""
        by_topic: dict[str, list[str]] = {}
        for g in groups:
            k = g[0].idem
            assert k is not None
            by_topic.setdefault(g[0].topic, []).append(k.scope)
        out: dict[tuple[str, str], Any] = {}
        for topic, scopes in by_topic.items():
            for i in range(0, len(scopes), KEY_LOOKUP_CHUNK):
                chunk = scopes[i : i + KEY_LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(_SELECT_KEYS % marks, (topic, *chunk)):
                    out[(topic, row[0])] = row[1:]
        return out

    def _seal(
        self, conn: sqlite3.Connection, batches: list[list[Delivery]]
    ) -> tuple[_Sealed, dict[int, Delivery]]:
        """Encrypt the deliveries to encrypted topics (writer thread, outside a transaction).

        Returns ``id(delivery) -> (ciphertext, headers)`` and the deliveries refused because
        their topic is encrypted and no master key is configured. The flags are cached; the
        transaction checks them (another worker may have recreated a topic with another one).
        """
        known = self._encrypted_topics
        sealed: _Sealed = _NO_SEALED
        refused: dict[int, Delivery] = {}
        enc = self.encryptor
        for batch in batches:
            for d in batch:
                flag = known.get(d.topic)
                if flag is None:
                    row = conn.execute(
                        "SELECT encrypted FROM topics WHERE name = ?", (d.topic,)
                    ).fetchone()
                    if row is None:
                        continue  # unknown topic: the transaction reports it
                    flag = known[d.topic] = bool(row[0])
                if not flag:
                    continue
                if enc is None:
                    refused[id(d)] = d
                    continue
                ct, hv = enc.encrypt(d.topic, d.key, d.message_id, d.value)
                if sealed is _NO_SEALED:
                    sealed = {}
                sealed[id(d)] = (ct, seal_headers(d.headers, hv))
        return sealed, refused

    def _note_failure(self, e: BaseException, n: int) -> None:
        self._failed_txns += 1
        reason = f"{type(e).__name__}: {e}"
        # One line per failure episode (or change of reason), not per transaction or message.
        if reason != self._last_error:
            log.error(
                "embedded write transaction failed (%d messages): %s",
                n,
                reason,
                extra={"messages": n, "error": reason},
            )
        self._last_error = reason

    def _complete_failed(self, batches: list[list[Delivery]], err: MqfastError) -> None:
        for batch in batches:
            for d in batch:
                d.error = err
        self._complete(batches)

    def _complete(self, batches: list[list[Delivery]]) -> None:
        # One wake-up of the loop per transaction, not per batch.
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._deliver, batches)
        except RuntimeError:
            log.error("event loop closed; %d completed batches dropped", len(batches))

    def _deliver(self, batches: list[list[Delivery]]) -> None:
        on_done = self._on_done
        if on_done is None:
            return
        for batch in batches:
            try:
                on_done(batch)
            except Exception:
                log.exception("on_done callback failed")

    def _fail_queued(self, err: MqfastError) -> None:
        """Complete every batch still queued with ``err`` (callable from any thread)."""
        failed: list[list[Delivery]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if type(item) is _Keyed:
                item = item.batch
            if item is not _STOP:
                failed.append(item)  # type: ignore[arg-type]
        if failed:
            self._complete_failed(failed, err)

    def _fail_now(self, batch: list[Delivery], err: MqfastError) -> None:
        self._complete_failed([batch], err)

    # -- admin (admin thread) --------------------------------------------------------------

    def _create_topic_sync(self, config: TopicConfig) -> tuple[TopicConfig, bool]:
        conn = self._conn()
        with immediate(conn, self._write_lock):
            row = conn.execute(
                f"SELECT {_TOPIC_COLUMNS} FROM topics WHERE name = ?", (config.name,)
            ).fetchone()
            if row is None:
                created = self._insert_topic(conn, config)
        if row is not None:
            existing = _topic_from_row(row)
            if existing.same_settings(config):
                return existing, False
            raise TopicExists(_conflict_message(existing, config), field="name")
        stored = TopicConfig(
            name=config.name,
            partitions=config.partitions,
            replication=config.replication,
            retention=config.retention,
            max_size=config.max_size,
            created_at=created,
            dead_letter_expired=config.dead_letter_expired,
            encrypted=config.encrypted,
        )
        return stored, True

    @staticmethod
    def _insert_topic(conn: sqlite3.Connection, config: TopicConfig) -> int:
        created = config.created_at or _now_ms()
        conn.execute(
            f"INSERT INTO topics ({_TOPIC_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                config.name,
                config.partitions,
                config.replication,
                config.retention,
                config.max_size,
                created,
                int(config.dead_letter_expired),
                int(config.encrypted),
            ),
        )
        conn.executemany(
            "INSERT INTO partitions (topic, partition) VALUES (?, ?)",
            [(config.name, p) for p in range(config.partitions)],
        )
        return created

    def _get_topic_sync(self, name: str) -> TopicConfig | None:
        row = (
            self._conn()
            .execute(f"SELECT {_TOPIC_COLUMNS} FROM topics WHERE name = ?", (name,))
            .fetchone()
        )
        return None if row is None else _topic_from_row(row)

    def _list_topics_sync(self) -> list[TopicConfig]:
        rows = self._conn().execute(f"SELECT {_TOPIC_COLUMNS} FROM topics ORDER BY name")
        return [_topic_from_row(r) for r in rows]

    def _delete_topic_sync(self, name: str) -> None:
        self._encrypted_topics.pop(name, None)
        conn = self._conn()
        with immediate(conn, self._write_lock):
            cur = conn.execute("DELETE FROM topics WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise UnknownTopicError(f"topic {name!r} does not exist")
            conn.execute("DELETE FROM partitions WHERE topic = ?", (name,))
            conn.execute("DELETE FROM messages WHERE topic = ?", (name,))
            for table in ("group_partitions", "group_cursors", "runs", "idempotency_keys"):
                conn.execute(f"DELETE FROM {table} WHERE topic = ?", (name,))

    def _describe_topic_sync(self, name: str) -> TopicInfo:
        conn = self._conn()
        # One read transaction so settings and counts are one consistent snapshot.
        conn.execute("BEGIN")
        try:
            row = conn.execute(
                f"SELECT {_TOPIC_COLUMNS} FROM topics WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise UnknownTopicError(f"topic {name!r} does not exist")
            t = _topic_from_row(row)
            stats = [
                PartitionStats(
                    partition=p,
                    messages=n,
                    bytes=b,
                    low_offset=nxt if low is None else low,
                    high_offset=nxt,
                )
                for p, nxt, n, b, low in conn.execute(
                    "SELECT p.partition, p.next_offset, p.messages, p.bytes,"
                    " (SELECT MIN(m.offset) FROM messages m"
                    "  WHERE m.topic = p.topic AND m.partition = p.partition)"
                    " FROM partitions p WHERE p.topic = ? ORDER BY p.partition",
                    (name,),
                )
            ]
            # Lag: messages of the topic a group has not completed yet.
            lags = [
                GroupLag(group_id=g, lag=max(0, int(lag)))
                for g, lag in conn.execute(
                    "SELECT g.group_id, SUM(p.next_offset - g.committed)"
                    " FROM group_partitions g JOIN partitions p"
                    " ON p.topic = g.topic AND p.partition = g.partition"
                    " WHERE g.topic = ? GROUP BY g.group_id ORDER BY g.group_id",
                    (name,),
                )
            ]
        finally:
            conn.execute("COMMIT")
        return TopicInfo(
            name=t.name,
            partitions=t.partitions,
            replication=t.replication,
            retention=t.retention,
            max_size=t.max_size,
            created_at=t.created_at,
            dead_letter_expired=t.dead_letter_expired,
            messages=sum(s.messages for s in stats),
            bytes=sum(s.bytes for s in stats),
            partition_stats=stats,
            consumer_groups=lags,
            encrypted=t.encrypted,
        )

    def _read_sync(
        self, topic: str, partition: int, offset: int, limit: int
    ) -> list[StoredMessage]:
        conn = self._conn()
        rows = conn.execute(
            "SELECT message_id, offset, key, value, headers, priority, timestamp_ms, expires_ms"
            " FROM messages WHERE topic = ? AND partition = ? AND offset >= ?"
            " ORDER BY offset LIMIT ?",
            (topic, partition, offset, max(limit, 0)),
        ).fetchall()
        cfg = self._get_topic_sync(topic)
        if cfg is None and not rows:
            raise UnknownTopicError(f"topic {topic!r} does not exist")
        encrypted = cfg is not None and cfg.encrypted
        out = []
        for mid, off, k, v, h, prio, ts, exp in rows:
            headers = {} if h is None else _headers_decoder.decode(h)
            if encrypted:
                try:
                    v = open_message(self.encryptor, topic, k, mid, v, headers)
                except DecryptError as e:
                    # Never returned: consuming dead-letters it (see embedded_groups).
                    log.warning(
                        "message not returned: %s",
                        e,
                        extra={"topic": topic, "partition": partition, "offset": off,
                               "reason": e.reason, "detail": e.detail},
                    )  # fmt: skip
                    continue
            out.append(
                StoredMessage(
                    message_id=mid,
                    topic=topic,
                    partition=partition,
                    offset=off,
                    key=None if k is None else k.decode("utf-8", "replace"),
                    content=v.decode("utf-8", "replace"),
                    headers=headers,
                    priority=prio,
                    timestamp=ts,
                    expires_at=exp,
                )
            )
        return out

    # -- retention (admin thread) ----------------------------------------------------------

    def _partition_bytes(self, topic: str) -> dict[int, int]:
        rows = self._conn().execute(
            "SELECT partition, bytes FROM partitions WHERE topic = ? ORDER BY partition", (topic,)
        )
        return {p: b for p, b in rows}

    def _delete_older_chunk(self, topic: str, partition: int, cutoff_ms: int) -> tuple[int, bool]:
        """Delete the partition's oldest messages stamped before ``cutoff_ms``, one chunk.

        Only a prefix of offsets is deleted, stopping at the first message that is young
        enough: timestamps are the gateway's clock at produce time and so follow offsets
        (up to a few ms of skew between workers), and scanning from the front keeps the cost
        proportional to what is deleted instead of to the partition. Returns
        ``(rows deleted, whether another chunk may be due)``.
        """

        def take(ts: int, _size: int) -> bool:
            return ts < cutoff_ms

        return self._delete_prefix_chunk(topic, partition, lambda _conn: take)

    def _delete_oldest_chunk(
        self, topic: str, partition: int, need: int, max_size: int
    ) -> tuple[int, int]:
        """Delete the partition's oldest messages until ``need`` bytes are freed, one chunk.

        ``need`` is capped by the topic's excess over ``max_size`` as read inside the
        transaction, so concurrent passes (other workers) never delete below the limit.
        Returns ``(rows deleted, bytes freed)``.
        """
        freed = 0
        limit = need

        def make_take(conn: sqlite3.Connection) -> Callable[[int, int], bool]:
            nonlocal limit
            total = conn.execute(
                "SELECT COALESCE(SUM(bytes), 0) FROM partitions WHERE topic = ?", (topic,)
            ).fetchone()[0]
            limit = min(need, total - max_size)
            return take

        def take(_ts: int, size: int) -> bool:
            nonlocal freed
            if freed >= limit:
                return False
            freed += size
            return True

        n, _ = self._delete_prefix_chunk(topic, partition, make_take)
        return n, (freed if n else 0)

    def _delete_prefix_chunk(
        self,
        topic: str,
        partition: int,
        make_take: Callable[[sqlite3.Connection], Callable[[int, int], bool]],
    ) -> tuple[int, bool]:
        conn = self._conn()
        with immediate(conn, self._write_lock):
            take = make_take(conn)
            rows = conn.execute(
                "SELECT offset, timestamp_ms, size FROM messages"
                " WHERE topic = ? AND partition = ? ORDER BY offset LIMIT ?",
                (topic, partition, RETENTION_CHUNK_ROWS),
            ).fetchall()
            last = -1
            count = 0
            nbytes = 0
            stopped = False
            for off, ts, size in rows:
                if nbytes >= RETENTION_CHUNK_BYTES or not take(ts, size):
                    stopped = True
                    break
                last = off
                count += 1
                nbytes += size
            if count:
                conn.execute(
                    "DELETE FROM messages WHERE topic = ? AND partition = ? AND offset <= ?",
                    (topic, partition, last),
                )
                conn.execute(
                    "UPDATE partitions SET messages = messages - ?, bytes = bytes - ?"
                    " WHERE topic = ? AND partition = ?",
                    (count, nbytes, topic, partition),
                )
        more = count > 0 and (
            nbytes >= RETENTION_CHUNK_BYTES or (not stopped and len(rows) == RETENTION_CHUNK_ROWS)
        )
        return count, more


def _conflict_message(existing: TopicConfig, asked: TopicConfig) -> str:
    diffs: Iterable[str] = (
        f"{f}={getattr(existing, f)} (asked {getattr(asked, f)})"
        for f in (
            "partitions",
            "replication",
            "retention",
            "max_size",
            "dead_letter_expired",
            "encrypted",
        )
        if getattr(existing, f) != getattr(asked, f)
    )
    return f"topic {existing.name!r} already exists with other settings: {', '.join(diffs)}"
