"""Consumer groups on the embedded engine: leases, retries, dead letters, committed positions.

Every operation is atomic on the engine's database (tables in ``embedded.MIGRATIONS``), run on
a dedicated thread with its own connection: one ``BEGIN IMMEDIATE`` transaction, shared by the
operations queued meanwhile (several consumers at once), each in its own savepoint, and
answered only once that transaction is committed (``_work``). Because the state
lives in the database, not in memory, several worker processes sharing the file see one
consistent group, and a ``kill -9`` loses nothing: leases that were out simply expire and the
messages are delivered again.

State is kept per run of offsets (table ``runs``), as Kafka's share groups keep their in-flight
batches: a lease of consecutive offsets of a partition is one row, acknowledging all of it is one
write, and a run is split only where its messages diverge (a nack, a partial acknowledgement, an
extension of some, an expiry). Complete runs stay below the committed position until ``prune``,
so that a second acknowledgement is still recognised.

A message id is found without an index per message: ids leased by this process are remembered
(``_where``, a hint checked against the message row), and any other id is looked up among the
runs whose id bounds hold it, then confirmed in those runs' messages.

Where a lease expires: ``_reclaim`` (at the start of every lease transaction, and before an
acknowledgement of an expired lease is refused).
"""

from __future__ import annotations

import asyncio
import functools
import queue
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable
from itertools import islice
from operator import itemgetter
from typing import Any, Final, TypeVar

import msgspec

from mqfast import errors
from mqfast._core import (
    lease_rows,
    message_id_at,
    offset_ranges,
    partition_for_key,
    settle_acks,
    settle_hints,
    settle_places,
)
from mqfast.crypto import (
    ENC_ID_HEADER,
    ENC_TOPIC_HEADER,
    DecryptError,
    Encryptor,
    bound_to,
    open_message,
)
from mqfast.crypto import HEADER as ENC_HEADER
from mqfast.groups import (
    DLQ_HEADER_PREFIX,
    PRIORITY_LEVELS,
    Authorize,
    LeaseOutcome,
    LocalRateLimits,
    Policy,
    PriorityPicker,
    RateLimits,
    SettleItem,
    SettleResult,
    Unacked,
    dlq_headers,
    dlq_name,
)
from mqfast.sinks.embedded import immediate

_T = TypeVar("_T")

LEASED: Final = 1
RETRY: Final = 2
DONE: Final = 3
# Why a run waits for a retry (``runs.why``): the answers to a late settle differ.
NACKED: Final = 1
EXPIRED: Final = 2
RELEASED: Final = 3

_headers_decoder = msgspec.json.Decoder(dict[str, str])
_headers_encoder = msgspec.json.Encoder()

_RUN_COLUMNS: Final = (
    "topic, partition, first_offset, last_offset, state, consumer_id, due_ms, leased_ms,"
    " delivery_count, priority, last_error, why, done_ms, id_lo, id_hi"
)
_WRITE_RUN: Final = (
    "INSERT OR REPLACE INTO runs (group_id, topic, partition, first_offset, last_offset, state,"
    " consumer_id, due_ms, leased_ms, delivery_count, priority, last_error, why, done_ms, id_lo,"
    " id_hi) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_MESSAGE_IDS: Final = (
    "SELECT offset, message_id FROM messages WHERE topic = ? AND partition = ?"
    " AND offset BETWEEN ? AND ?"
)
_MESSAGE_ROWS: Final = (
    "SELECT * FROM (SELECT partition, offset, message_id, key, value, headers, timestamp_ms,"
    " expires_ms FROM messages WHERE topic = ? AND partition = ? AND offset BETWEEN ? AND ?)"
)
# A lease covers at most this many offsets (``ConsumeRequest.max_messages``), so the run
# holding an offset starts at most this far below it.
MAX_RUN: Final = 1000
_RUNS_OVER: Final = (
    f"SELECT * FROM (SELECT {_RUN_COLUMNS} FROM runs WHERE group_id = ? AND topic = ?"
    " AND partition = ? AND first_offset BETWEEN ? AND ? AND last_offset >= ?)"
)
# Probing a partition's priority levels is one term of a compound SELECT per (partition, level);
# SQLite allows 500 terms in one statement.
_PROBE_TERMS: Final = 250
# Reading a few offsets that were not asked for is cheaper than another query.
_RANGE_GAP: Final = 64
# How many times one lease looks past messages it found expired before it answers.
_SKIP_ROUNDS: Final = 10
_BY_OFFSET: Final = itemgetter(1, 0)  # candidates (partition, offset, expires) by offset
# Ids leased by this process, remembered to find them again without a search.
_WHERE_MAX: Final = 200_000

# Transactional calls queued together that share one transaction at most (``_work``): more
# would hold the database's write lock, and so produce, for longer.
_COALESCE: Final = 8
# A queued call: its future, that future's loop, the function, its arguments, transactional?
_Job = tuple[
    "asyncio.Future[Any]", asyncio.AbstractEventLoop, Callable[..., Any], tuple[Any, ...], bool
]


def _resolve(done: list[tuple[_Job, Any, BaseException | None]]) -> None:
    for job, result, error in done:
        fut = job[0]
        if fut.cancelled():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


# state, consumer, due_ms, leased_ms, delivery_count, last_error, why, done_ms: what all
# offsets of one run share (besides the priority)
_Attrs = tuple[int, str | None, int, int, int, str | None, int, int]
_GONE: Final[_Attrs] = (0, None, 0, 0, 0, None, 0, 0)  # removed by retention: no row


class _Run:
    """One row of ``runs``, with the changes a transaction makes to some of its offsets."""

    __slots__ = (
        "attrs", "changes", "first", "id_hi", "id_lo", "last", "partition", "priority", "topic",
    )  # fmt: skip

    def __init__(self, row: tuple[Any, ...]) -> None:
        (self.topic, self.partition, self.first, self.last, state, consumer, due, leased, count,
         self.priority, error, why, done, self.id_lo, self.id_hi) = row  # fmt: skip
        self.attrs: _Attrs = (state, consumer, due, leased, count, error, why, done)
        self.changes: dict[int, _Attrs] = {}

    def at(self, offset: int) -> _Attrs:
        return self.changes.get(offset, self.attrs)

    def __len__(self) -> int:
        return int(self.last - self.first + 1)


def _rows(
    group: str,
    topic: str,
    partition: int,
    priority: int,
    offsets: Iterable[tuple[int, _Attrs]],
    id_lo: str,
    id_hi: str,
) -> list[tuple[Any, ...]]:
    """``runs`` rows for ``offsets`` (ascending): one per stretch of consecutive offsets with
    the same attributes. Every row keeps the id bounds given (a superset is still right)."""
    out: list[tuple[Any, ...]] = []
    first = last = 0
    cur: _Attrs | None = None
    for off, a in offsets:
        if cur is not None and off == last + 1 and (a is cur or a == cur) and off - first < MAX_RUN:
            last = off
            continue
        if cur is not None and cur is not _GONE:
            out.append((group, topic, partition, first, last, *cur[:5], priority, *cur[5:],
                        id_lo, id_hi))  # fmt: skip
        first = last = off
        cur = a
    if cur is not None and cur is not _GONE:
        out.append((group, topic, partition, first, last, *cur[:5], priority, *cur[5:],
                    id_lo, id_hi))  # fmt: skip
    return out


_PROBE: Final = (
    "SELECT * FROM (SELECT partition, offset, priority, expires_ms FROM messages"
    " INDEXED BY messages_priority"  # the planner would otherwise walk other levels
    " WHERE topic = ? AND partition = ? AND priority = ? AND offset >= ?"
    " ORDER BY offset LIMIT ?)"
)


@functools.lru_cache(maxsize=256)
def _union(term: str, n: int) -> str:
    return " UNION ALL ".join([term] * n)


def _query_terms(
    conn: sqlite3.Connection, term: str, params: list[tuple[Any, ...]]
) -> list[tuple[Any, ...]]:
    """The rows of ``term`` for each parameter tuple: one compound statement per
    ``_PROBE_TERMS`` of them, instead of a query each."""
    rows: list[tuple[Any, ...]] = []
    for i in range(0, len(params), _PROBE_TERMS):
        chunk = params[i : i + _PROBE_TERMS]
        rows += conn.execute(_union(term, len(chunk)), [x for t in chunk for x in t]).fetchall()
    return rows


class EmbeddedGroups:
    """``groups.GroupStore`` on the embedded engine's SQLite database."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        lock: threading.Lock,
        policy: Policy,
        encryptor: Encryptor | None = None,
    ) -> None:
        self._connect = connect
        self._lock = lock
        self.policy = policy
        self.encryptor = encryptor  # decrypts messages of encrypted topics as they are leased
        self.rate_limits: RateLimits = LocalRateLimits()
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        # message id -> (topic, partition, offset) of what this process leased; only a hint
        # (a topic deleted and created again reuses offsets), always checked against the row
        self._where: dict[str, tuple[str, int, int]] = {}

    async def start(self) -> None:
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._work, name="mqfast-embedded-groups", daemon=True
        )
        self._thread.start()
        await self._run(self._open)

    async def close(self) -> None:
        if self._thread is not None:
            await self._run(self._close)
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _open(self) -> None:
        self._conn = self._connect()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[..., _T], *args: Any, txn: bool = False) -> _T:
        """``fn(*args)`` on the store's thread; with ``txn``, ``fn(conn, *args)`` in a write
        transaction (see ``_work``)."""
        if self._thread is None:
            raise errors.Unavailable("embedded engine: consumer groups not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()
        self._jobs.put((fut, loop, fn, args, txn))
        try:
            return await fut
        except sqlite3.Error as e:
            raise errors.Unavailable(f"embedded engine: {e}") from e

    def _call(self, fn: Callable[..., _T], *args: Any) -> Awaitable[_T]:
        return self._run(fn, *args, txn=True)

    def _work(self) -> None:
        """The store's thread: runs the calls queued, in order. Transactional calls queued
        together (several consumers at once) share one transaction, each in a savepoint of
        its own: one commit instead of several, and every answer only after that commit,
        so a 2xx still means durable. Their results go back with one wake-up of the loop."""
        get, get_nowait = self._jobs.get, self._jobs.get_nowait
        stop = False
        while not stop:
            job = get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < _COALESCE:
                try:
                    job = get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            done: list[tuple[_Job, Any, BaseException | None]] = []
            together: list[_Job] = []
            for job in jobs:
                if job[0].cancelled():  # its caller is gone: do not lease for nobody
                    continue
                if job[4]:
                    together.append(job)
                    continue
                if together:
                    self._commit(together, done)
                    together = []
                try:
                    done.append((job, job[2](*job[3]), None))
                except BaseException as e:
                    done.append((job, None, e))
            if together:
                self._commit(together, done)
            if done:
                try:
                    done[0][0][1].call_soon_threadsafe(_resolve, done)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

    def _commit(self, jobs: list[_Job], done: list[tuple[_Job, Any, BaseException | None]]) -> None:
        conn = self._conn
        if conn is None:
            e = errors.Unavailable("embedded engine: consumer groups not started")
            done += [(job, None, e) for job in jobs]
            return
        out: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            with immediate(conn, self._lock):
                if len(jobs) == 1:
                    job = jobs[0]
                    out.append((job, job[2](conn, *job[3]), None))
                else:
                    for job in jobs:
                        conn.execute("SAVEPOINT call")
                        try:
                            result = job[2](conn, *job[3])
                        except Exception as e:  # this call's changes go, the others' stay
                            conn.execute("ROLLBACK TO call")
                            conn.execute("RELEASE call")
                            out.append((job, None, e))
                            continue
                        conn.execute("RELEASE call")
                        out.append((job, result, None))
        except BaseException as e:  # the transaction failed as a whole: none of it was kept
            done += [(job, None, e) for job in jobs]
            return
        done += out

    # ---- public API (GroupStore) ----------------------------------------------------------

    async def lease(
        self,
        group: str,
        topic: str,
        consumer: str,
        max_messages: int,
        visibility_ms: int,
        now: int,
        picker: PriorityPicker,
        max_leased: int | None,
    ) -> LeaseOutcome:
        return await self._call(
            self._lease,
            group,
            topic,
            consumer,
            max_messages,
            visibility_ms,
            now,
            picker,
            max_leased,
        )

    async def settle(
        self,
        group: str,
        topic: str | None,
        consumer: str | None,
        items: list[SettleItem],
        now: int,
        authorize: Authorize | None = None,
    ) -> list[SettleResult]:
        return await self._call(self._settle, group, topic, consumer, items, now, authorize)

    async def release_consumer(self, consumer: str, now: int) -> int:
        return await self._call(self._release, consumer, now)

    async def redrive(self, topic: str, max_messages: int, now: int) -> int:
        return await self._call(self._redrive, topic, max_messages, now)

    async def redrive_message(self, topic: str, message_id: str, now: int) -> bool:
        return await self._call(self._redrive_message, topic, message_id, now)

    async def redriven(self, topic: str, first: int, last: int) -> set[int]:
        return set()  # a dead letter redriven is deleted from the DLQ at once

    async def prune(self, now: int) -> int:
        return await self._call(self._prune, now)

    async def unacked(self, now: int, limit: int) -> list[Unacked]:
        return await self._call(self._unacked, now, limit)

    def _unacked(self, conn: sqlite3.Connection, now: int, limit: int) -> list[Unacked]:
        out = []
        pairs = conn.execute(
            "SELECT DISTINCT group_id, topic FROM group_partitions LIMIT ?", (limit,)
        ).fetchall()
        for group, topic in pairs:
            # runs_due (state < 3): only the runs of deliveries in flight are read; an
            # expired lease counts each of its offsets.
            oldest, expired = conn.execute(
                "SELECT MIN(leased_ms), SUM(CASE WHEN state = ? AND due_ms <= ?"
                " THEN last_offset - first_offset + 1 ELSE 0 END) FROM runs"
                " WHERE group_id = ? AND topic = ? AND state < 3",
                (LEASED, now, group, topic),
            ).fetchone()
            if oldest is not None:
                out.append(Unacked(group, topic, int(oldest), int(expired or 0)))
        return out

    # ---- runs -----------------------------------------------------------------------------

    @staticmethod
    def _write(conn: sqlite3.Connection, group: str, runs: Iterable[_Run]) -> None:
        """Store the changes of ``runs``: each becomes the stretches its offsets now form."""
        rows: list[tuple[Any, ...]] = []
        for run in runs:
            changes = run.changes
            if not changes:
                continue
            if len(changes) == len(run):  # all of it settled alike: the common case
                values = iter(changes.values())
                a = next(values)
                if a is not _GONE and all(v is a for v in values):
                    rows.append((group, run.topic, run.partition, run.first, run.last, *a[:5],
                                 run.priority, *a[5:], run.id_lo, run.id_hi))  # fmt: skip
                    run.changes = {}
                    continue
            at = run.at
            split = _rows(
                group,
                run.topic,
                run.partition,
                run.priority,
                ((off, at(off)) for off in range(run.first, run.last + 1)),
                run.id_lo,
                run.id_hi,
            )
            if not split or split[0][3] != run.first:
                conn.execute(
                    "DELETE FROM runs WHERE group_id = ? AND topic = ? AND partition = ?"
                    " AND first_offset = ?",
                    (group, run.topic, run.partition, run.first),
                )
            rows.extend(split)
            run.changes = {}
        if rows:
            conn.executemany(_WRITE_RUN, rows)

    # ---- lease ----------------------------------------------------------------------------

    def _lease(
        self,
        conn: sqlite3.Connection,
        group: str,
        topic: str,
        consumer: str,
        max_messages: int,
        visibility_ms: int,
        now: int,
        picker: PriorityPicker,
        max_leased: int | None,
    ) -> LeaseOutcome:
        row = conn.execute(
            "SELECT partitions, dead_letter_expired, encrypted FROM topics WHERE name = ?",
            (topic,),
        ).fetchone()
        if row is None:
            raise errors.UnknownTopic(f"unknown topic {topic!r}", field="topic")
        partitions, dlq_expired, encrypted = int(row[0]), bool(row[1]), bool(row[2])
        if encrypted and self.encryptor is None:
            raise errors.Unavailable(
                f"topic {topic!r} is encrypted and no master key is configured "
                "(MESSAGE_QUEUE_MASTER_KEYS or MESSAGE_QUEUE_MASTER_KEY_FILE)"
            )
        out = LeaseOutcome([])
        committed = self._positions(conn, group, topic, partitions)
        touched: set[int] = set()
        out.reclaimed, dead = self._reclaim(conn, group, topic, now, touched)
        out.dead_lettered += dead

        if max_leased is not None:
            held = conn.execute(
                "SELECT COALESCE(SUM(last_offset - first_offset + 1), 0) FROM runs"
                " WHERE consumer_id = ? AND state = 1 AND due_ms > ?",  # LEASED
                (consumer, now),
            ).fetchone()[0]
            max_messages = min(max_messages, max_leased - int(held))

        # A lease that found only expired (or undecryptable) messages tries again from past
        # them, so that a long-poll does not answer empty while messages are ready.
        for _ in range(_SKIP_ROUNDS if max_messages > 0 else 0):
            skipped = out.expired + out.dead_lettered
            self._pick(
                conn, group, topic, consumer, partitions, committed, max_messages,
                visibility_ms, now, picker, dlq_expired, encrypted, out, touched,
            )  # fmt: skip
            if out.messages or out.expired + out.dead_lettered == skipped:
                break
        for p in touched:
            self._advance(conn, group, topic, p)
        if not out.messages:  # the wait before trying again: until something falls due
            due = conn.execute(
                "SELECT MIN(due_ms) FROM runs WHERE group_id = ? AND topic = ? AND state < 3",
                (group, topic),
            ).fetchone()[0]
            out.next_due_ms = int(due) if due is not None else 0
        return out

    def _positions(
        self, conn: sqlite3.Connection, group: str, topic: str, partitions: int
    ) -> list[int]:
        """The group's committed offset per partition, created at the log start if new.

        Retention may have deleted messages the group never completed: the position then
        moves up to the first message still stored (those messages are gone for everyone).
        """
        rows = dict(
            conn.execute(
                "SELECT partition, committed FROM group_partitions"
                " WHERE group_id = ? AND topic = ?",
                (group, topic),
            ).fetchall()
        )
        lows = dict(
            conn.execute(
                "SELECT p.partition, COALESCE((SELECT m.offset FROM messages m"
                " WHERE m.topic = p.topic AND m.partition = p.partition ORDER BY m.offset"
                " LIMIT 1), p.next_offset) FROM partitions p WHERE p.topic = ?",
                (topic,),
            ).fetchall()
        )
        out = []
        for p in range(partitions):
            low = int(lows.get(p, 0))
            current = rows.get(p)
            if current is None or current < low:
                conn.execute(
                    "INSERT OR REPLACE INTO group_partitions (group_id, topic, partition,"
                    " committed) VALUES (?, ?, ?, ?)",
                    (group, topic, p, low),
                )
                if current is not None:
                    key = (group, topic, p)
                    conn.execute(
                        "DELETE FROM runs WHERE group_id = ? AND topic = ? AND partition = ?"
                        " AND last_offset < ?",
                        (*key, low),
                    )
                    # a run reaching past the removed messages keeps the rest
                    conn.execute(
                        "UPDATE runs SET first_offset = ? WHERE group_id = ? AND topic = ?"
                        " AND partition = ? AND first_offset < ?",
                        (low, *key, low),
                    )
                current = low
            out.append(int(current))
        return out

    def _reclaim(
        self, conn: sqlite3.Connection, group: str, topic: str, now: int, touched: set[int]
    ) -> tuple[int, int]:
        """Expired leases are failed deliveries: schedule a retry or dead-letter them."""
        # The state is written into the statement, not bound: measured, with ``state = ?``
        # this search cost 40-400 us instead of 5 us although its plan names runs_due.
        runs = [
            _Run(row)
            for row in conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE group_id = ? AND topic = ?"
                f" AND state = {LEASED} AND due_ms <= ? AND state < 3",  # runs_due's condition
                (group, topic, now),
            )
        ]
        failed = dead = 0
        for run in runs:
            failed += len(run)
            count = run.attrs[4]
            if count >= self.policy.delivery_limit:
                for off in range(run.first, run.last + 1):
                    self._dead_letter(
                        conn, group, topic, run.partition, off, count, "lease expired",
                        "failed", now,
                    )  # fmt: skip
                dead += len(run)
                touched.add(run.partition)
                attrs: _Attrs = (DONE, None, now, run.attrs[3], count, "lease expired", 0, now)
            else:
                due = now + self.policy.backoff_ms(count)
                attrs = (RETRY, None, due, run.attrs[3], count, "lease expired", EXPIRED, 0)
            conn.execute(
                "UPDATE runs SET state = ?, consumer_id = ?, due_ms = ?, leased_ms = ?,"
                " delivery_count = ?, last_error = ?, why = ?, done_ms = ? WHERE group_id = ?"
                " AND topic = ? AND partition = ? AND first_offset = ?",
                (*attrs, group, topic, run.partition, run.first),
            )
        return failed, dead

    def _fail(
        self,
        conn: sqlite3.Connection,
        group: str,
        run: _Run,
        offset: int,
        error: str,
        why: int,
        due: int | None,
        now: int,
    ) -> bool:
        """One failed delivery of ``offset`` (a change of ``run``); True when it went to the
        dead-letter topic. ``due``: when to deliver again (None: after the backoff)."""
        a = run.at(offset)
        count = a[4]
        if count >= self.policy.delivery_limit:
            self._dead_letter(
                conn, group, run.topic, run.partition, offset, count, error, "failed", now
            )
            run.changes[offset] = (DONE, None, now, a[3], count, error, 0, now)
            return True
        if due is None:
            due = now + self.policy.backoff_ms(count)
        run.changes[offset] = (RETRY, None, due, a[3], count, error, why, 0)
        return False

    def _pick(
        self,
        conn: sqlite3.Connection,
        group: str,
        topic: str,
        consumer: str,
        partitions: int,
        committed: list[int],
        want: int,
        visibility_ms: int,
        now: int,
        picker: PriorityPicker,
        dlq_expired: bool,
        encrypted: bool,
        out: LeaseOutcome,
        touched: set[int],
    ) -> None:
        # Candidates per level, (partition, offset, expires_ms, retry run or None): retries
        # that are due (oldest due first), then never-leased messages from each partition's
        # cursor of that level. Only offsets first; the messages are read once picked.
        retries: list[list[tuple[int, int, int, _Run | None]]] = [
            [] for _ in range(PRIORITY_LEVELS)
        ]
        retry_runs: list[_Run] = []
        budget = want * 4
        for row in conn.execute(  # the state written in, as in _reclaim
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE group_id = ? AND topic = ? AND state = {RETRY}"
            " AND due_ms <= ? AND state < 3 ORDER BY due_ms LIMIT ?",  # runs_due's condition
            (group, topic, now, want),
        ).fetchall():
            if budget <= 0:
                break
            retry = _Run(row)
            retry_runs.append(retry)
            last = min(retry.last, retry.first + budget - 1)
            stored = dict(
                conn.execute(
                    "SELECT offset, expires_ms FROM messages WHERE topic = ? AND partition = ?"
                    " AND offset BETWEEN ? AND ?",
                    (topic, retry.partition, retry.first, last),
                ).fetchall()
            )
            queue = retries[retry.priority]
            for off in range(retry.first, last + 1):
                exp = stored.get(off)
                if exp is None:  # deleted by retention since it was leased
                    retry.changes[off] = _GONE
                else:
                    queue.append((retry.partition, off, exp, retry))
            budget -= last - retry.first + 1
        fresh = self._fresh(conn, group, topic, partitions, committed, want)
        ready = [len(retries[i]) + len(fresh[i]) for i in range(PRIORITY_LEVELS)]
        ri = [0] * PRIORITY_LEVELS
        fi = [0] * PRIORITY_LEVELS
        deadline = now + visibility_ms
        moved: dict[tuple[int, int], int] = {}
        # picked, in delivery order: (partition, offset, count so far, priority, run or None)
        picked: list[tuple[int, int, int, int, _Run | None]] = []
        expired_new: list[tuple[int, int, int]] = []  # partition, offset, priority
        levels = [i for i, n in enumerate(ready) if n]
        # with one level ready the picker's weights would not change: no need to ask it
        only = levels[0] if len(levels) == 1 else -1

        def expire(p: int, off: int, count: int, level: int, run: _Run | None) -> None:
            out.expired += 1
            if run is not None:
                run.changes[off] = (DONE, None, now, now, count, "expired", 0, now)
            else:
                expired_new.append((p, off, level))
            if dlq_expired:
                self._dead_letter(conn, group, topic, p, off, count, "ttl", "expired", now)
                out.dead_lettered += 1
            touched.add(p)

        fast = only >= 0 and not retries[only]
        if fast:  # one level and nothing to retry, the common case: its candidates in order
            for p, off, exp in fresh[only]:
                if len(picked) >= want:
                    break
                moved[(p, only)] = off + 1
                if exp and exp <= now:
                    expire(p, off, 0, only, None)
                else:
                    picked.append((p, off, 0, only, None))
        while not fast and len(picked) < want:
            level = picker.pick(ready) if only < 0 else only if ready[only] > 0 else -1
            if level < 0:
                break
            ready[level] -= 1
            if ri[level] < len(retries[level]):
                p, off, exp, run = retries[level][ri[level]]
                ri[level] += 1
            else:
                p, off, exp = fresh[level][fi[level]]
                run = None
                fi[level] += 1
                moved[(p, level)] = off + 1
            count = run.attrs[4] if run is not None else 0
            if exp and exp <= now:
                expire(p, off, count, level, run)
            else:
                picked.append((p, off, count, level, run))
        new_rows: list[tuple[Any, ...]] = []
        for p, off, level in expired_new:
            # kept, with its id, so that settling it later says why it is gone
            mid = conn.execute(
                "SELECT message_id FROM messages WHERE topic = ? AND partition = ? AND offset = ?",
                (topic, p, off),
            ).fetchone()[0]
            done: _Attrs = (DONE, None, now, now, 0, "expired", 0, now)
            new_rows += _rows(group, topic, p, level, [(off, done)], mid, mid)
        if picked:
            self._deliver(
                conn, group, topic, consumer, picked, deadline, now, encrypted, out, touched,
                new_rows,
            )  # fmt: skip
        self._write(conn, group, retry_runs)
        if new_rows:
            conn.executemany(_WRITE_RUN, new_rows)
        if moved:
            conn.executemany(
                "INSERT OR REPLACE INTO group_cursors (group_id, topic, partition, priority,"
                " next_offset) VALUES (?, ?, ?, ?, ?)",
                [(group, topic, p, pri, nxt) for (p, pri), nxt in moved.items()],
            )

    def _fresh(
        self,
        conn: sqlite3.Connection,
        group: str,
        topic: str,
        partitions: int,
        committed: list[int],
        want: int,
    ) -> list[list[tuple[int, int, int]]]:
        """Never-leased messages per level, ``(partition, offset, expires_ms)``: a share of
        ``want`` from each partition (more where others have less), interleaved by offset."""
        cursors: dict[tuple[int, int], int] = {
            (p, pri): nxt
            for p, pri, nxt in conn.execute(
                "SELECT partition, priority, next_offset FROM group_cursors"
                " WHERE group_id = ? AND topic = ?",
                (group, topic),
            )
        }
        starts = {
            (p, pri): max(cursors.get((p, pri), 0), committed[p])
            for pri in range(PRIORITY_LEVELS)
            for p in range(partitions)
        }
        share = -(-want // partitions)
        found: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        self._probe(conn, topic, starts, list(starts), share, found)
        if share < want:
            # a level short of ``want`` takes more from the partitions that had more
            per_level = [0] * PRIORITY_LEVELS
            for (_, pri), rows in found.items():
                per_level[pri] += len(rows)
            again = [
                k for k, rows in found.items() if len(rows) == share and per_level[k[1]] < want
            ]
            if again:
                self._probe(conn, topic, starts, again, want, found)
        fresh: list[list[tuple[int, int, int]]] = [[] for _ in range(PRIORITY_LEVELS)]
        for (_, pri), rows in found.items():
            fresh[pri].extend(rows)
        if partitions > 1:  # interleave partitions by offset so none starves another
            for rows in fresh:
                if rows:
                    rows.sort(key=_BY_OFFSET)
        return fresh

    @staticmethod
    def _probe(
        conn: sqlite3.Connection,
        topic: str,
        starts: dict[tuple[int, int], int],
        keys: list[tuple[int, int]],
        limit: int,
        found: dict[tuple[int, int], list[tuple[int, int, int]]],
    ) -> None:
        for k in keys:
            found[k] = []
        for p, off, pri, exp in _query_terms(
            conn, _PROBE, [(topic, p, pri, starts[(p, pri)], limit) for p, pri in keys]
        ):
            found[(p, pri)].append((p, off, exp))
        for k in keys:
            if not found[k]:
                del found[k]

    def _deliver(
        self,
        conn: sqlite3.Connection,
        group: str,
        topic: str,
        consumer: str,
        picked: list[tuple[int, int, int, int, _Run | None]],
        deadline: int,
        now: int,
        encrypted: bool,
        out: LeaseOutcome,
        touched: set[int],
        new_rows: list[tuple[Any, ...]],
    ) -> None:
        """Read the picked messages, answer them and record their leases as runs."""
        by_partition: dict[int, dict[int, tuple[int, int, _Run | None]]] = {}
        for p, off, count, pri, run in picked:
            by_partition.setdefault(p, {})[off] = (count, pri, run)
        where = self._where
        if len(where) > _WHERE_MAX:  # bounded: forget the oldest half
            for k in list(islice(where, _WHERE_MAX // 2)):
                del where[k]
        messages = out.messages
        lease: _Attrs = (LEASED, consumer, deadline, now, 1, None, 0, 0)
        ranges = [
            (topic, p, lo, hi)
            for p, chosen in by_partition.items()
            for lo, hi in offset_ranges(sorted(chosen), _RANGE_GAP)
        ]
        # per partition and priority level: the never-leased offsets leased now, with their ids
        fresh: dict[tuple[int, int], list[tuple[int, str]]] = {}
        retried: set[int] = set()  # the levels of the retries leased now
        failed: list[tuple[int, int, int, int, _Run | None, str, str]] = []
        opener = None
        if encrypted:
            encryptor = self.encryptor

            def opener(key: bytes | None, mid: str, value: bytes, h: dict[str, str]) -> bytes:
                return open_message(encryptor, topic, key, mid, value, h)

        seen = lease_rows(
            _query_terms(conn, _MESSAGE_ROWS, ranges), by_partition, topic, consumer, deadline,
            now, where, messages, fresh, retried, opener, DecryptError, failed,
        )  # fmt: skip
        for p, off, count, pri, run, mid, reason in failed:
            # Never delivered: dead-lettered as stored (ciphertext and header), so an
            # operator holding the right key can still recover it.
            done: _Attrs = (DONE, None, now, now, count, reason, 0, now)
            if run is not None:
                run.changes[off] = done
            else:
                new_rows += _rows(group, topic, p, pri, [(off, done)], mid, mid)
            self._dead_letter(conn, group, topic, p, off, count, reason, reason, now)
            out.dead_lettered += 1
            touched.add(p)
        if seen < len(picked):  # some were deleted by retention since they were leased
            stored = {(m.partition, m.offset) for m in messages}
            for p, off, _, _, run in picked:
                if run is not None and (p, off) not in stored and off not in run.changes:
                    run.changes[off] = _GONE
        for (p, pri), offs in fresh.items():
            ids = [mid for _, mid in offs]
            new_rows += _rows(
                group, topic, p, pri, [(off, lease) for off, _ in offs], min(ids), max(ids)
            )
        # within one answer, higher priority first (each level already oldest first)
        if len(retried.union(pri for _, pri in fresh)) > 1:
            messages.sort(key=lambda m: -m.priority)

    # ---- dead letters ---------------------------------------------------------------------

    def _dead_letter(
        self,
        conn: sqlite3.Connection,
        group: str,
        topic: str,
        partition: int,
        offset: int,
        count: int,
        error: str,
        reason: str,
        now: int,
    ) -> None:
        msg = conn.execute(
            "SELECT message_id, key, value, headers, priority FROM messages"
            " WHERE topic = ? AND partition = ? AND offset = ?",
            (topic, partition, offset),
        ).fetchone()
        if msg is None:
            return  # removed by retention meanwhile: nothing left to keep
        mid, key, value, headers, priority = msg
        h = _headers_decoder.decode(headers) if headers else {}
        h.update(dlq_headers(topic, partition, offset, mid, group, count, error, reason, now))
        dlq = dlq_name(topic)
        self._ensure_topic(conn, dlq, topic, now)
        self._append(conn, dlq, 0, key, value, _headers_encoder.encode(h), priority, now)

    @staticmethod
    def _ensure_topic(conn: sqlite3.Connection, name: str, like: str, now: int) -> None:
        if conn.execute("SELECT 1 FROM topics WHERE name = ?", (name,)).fetchone():
            return
        if len(name) > 249:
            raise errors.BadRequest(f"dead-letter topic name {name!r} is too long")
        # A dead-letter topic keeps what its origin keeps, in one partition.
        # It is encrypted when its origin is: copies keep their ciphertext and mqfast-enc header,
        # and reading them decrypts with the origin's topic and message id.
        conn.execute(
            "INSERT INTO topics (name, partitions, replication, retention, max_size, created_at,"
            " dead_letter_expired, encrypted) SELECT ?, 1, replication, retention, max_size, ?,"
            " 0, encrypted FROM topics WHERE name = ?",
            (name, now, like),
        )
        conn.execute("INSERT INTO partitions (topic, partition) VALUES (?, 0)", (name,))

    @staticmethod
    def _append(
        conn: sqlite3.Connection,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: bytes,
        priority: int,
        now: int,
    ) -> None:
        nxt = conn.execute(
            "SELECT next_offset FROM partitions WHERE topic = ? AND partition = ?",
            (topic, partition),
        ).fetchone()[0]
        size = len(value) + len(headers) + (len(key) if key is not None else 0)
        conn.execute(
            "INSERT INTO messages (topic, partition, offset, message_id, key, value, headers,"
            " priority, timestamp_ms, expires_ms, size) VALUES (?,?,?,?,?,?,?,?,?,0,?)",
            (topic, partition, nxt, message_id_at(now), key, value, headers, priority, now, size),
        )
        conn.execute(
            "UPDATE partitions SET next_offset = ?, messages = messages + 1, bytes = bytes + ?"
            " WHERE topic = ? AND partition = ?",
            (nxt + 1, size, topic, partition),
        )

    def _redrive(self, conn: sqlite3.Connection, topic: str, max_messages: int, now: int) -> int:
        parts = self._partitions_of(conn, topic)
        rows = conn.execute(
            "SELECT partition, offset, key, value, headers, priority, size FROM messages"
            " WHERE topic = ? ORDER BY partition, offset LIMIT ?",
            (dlq_name(topic), max_messages),
        ).fetchall()
        for row in rows:
            self._move_back(conn, topic, parts, row, now)
        return len(rows)

    def _redrive_message(
        self, conn: sqlite3.Connection, topic: str, message_id: str, now: int
    ) -> bool:
        # One transaction: the copy is appended and the dead letter deleted together, so a
        # second call finds nothing (never twice) and a failure leaves it where it was.
        parts = self._partitions_of(conn, topic)
        row = conn.execute(
            "SELECT partition, offset, key, value, headers, priority, size FROM messages"
            " WHERE topic = ? AND message_id = ?",
            (dlq_name(topic), message_id),
        ).fetchone()
        if row is None:
            return False
        self._move_back(conn, topic, parts, row, now)
        return True

    @staticmethod
    def _partitions_of(conn: sqlite3.Connection, topic: str) -> int:
        origin = conn.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchone()
        if origin is None:
            raise errors.UnknownTopic(f"unknown topic {topic!r}")
        return int(origin[0])

    def _move_back(
        self, conn: sqlite3.Connection, topic: str, parts: int, row: tuple[Any, ...], now: int
    ) -> None:
        """Append the dead letter ``row`` to ``topic`` (of ``parts`` partitions) as a new
        message and delete it from the DLQ."""
        p, off, key, value, headers, priority, size = row
        dlq = dlq_name(topic)
        h = _headers_decoder.decode(headers) if headers else {}
        if ENC_HEADER in h:
            # Keep what the ciphertext is bound to: the redriven copy gets a new id.
            h[ENC_TOPIC_HEADER], h[ENC_ID_HEADER] = bound_to(dlq, "", h)
        h = {k: v for k, v in h.items() if not k.startswith(DLQ_HEADER_PREFIX)}
        h["x-mqfast-redriven-from"] = dlq
        target = partition_for_key(key, parts) if key is not None else (off % parts)
        self._append(conn, topic, target, key, value, _headers_encoder.encode(h), priority, now)
        conn.execute(
            "DELETE FROM messages WHERE topic = ? AND partition = ? AND offset = ?", (dlq, p, off)
        )
        conn.execute(
            "UPDATE partitions SET messages = messages - 1, bytes = bytes - ?"
            " WHERE topic = ? AND partition = ?",
            (size, dlq, p),
        )

    # ---- settle ---------------------------------------------------------------------------

    def _search(
        self, conn: sqlite3.Connection, group: str, topic: str | None, ids: list[str]
    ) -> dict[str, tuple[str, int, int]]:
        """Where the messages ``ids`` are, among the runs of ``group`` whose id bounds hold
        them (in ``topic``), confirmed in those runs' messages."""
        found: dict[str, tuple[str, int, int]] = {}
        wanted = set(ids)
        seen: set[tuple[str, int, int]] = set()
        for t, p, first, last in conn.execute(
            "SELECT topic, partition, first_offset, last_offset FROM runs INDEXED BY runs_ids"
            " WHERE group_id = ? AND id_hi >= ? AND id_lo <= ?",
            (group, min(ids), max(ids)),
        ).fetchall():
            if (topic is not None and t != topic) or (t, p, first) in seen:
                continue
            seen.add((t, p, first))
            for off, mid in conn.execute(_MESSAGE_IDS, (t, p, first, last)):
                if mid in wanted:
                    found[mid] = (t, p, off)
                    wanted.discard(mid)
            if not wanted:
                break
        return found

    def _load_runs(
        self,
        conn: sqlite3.Connection,
        group: str,
        places: Iterable[tuple[str, int, int]],
        runs: dict[tuple[str, int], list[_Run]],
    ) -> None:
        """Add to ``runs`` (per partition, ascending) those holding the offsets ``places``."""
        spans: dict[tuple[str, int], list[int]] = {}
        for t, p, off in places:
            span = spans.get((t, p))
            if span is None:
                spans[(t, p)] = [off, off]
            elif off < span[0]:
                span[0] = off
            elif off > span[1]:
                span[1] = off
        found = _query_terms(
            conn,
            _RUNS_OVER,
            [(group, t, p, lo - MAX_RUN + 1, hi, lo) for (t, p), (lo, hi) in spans.items()],
        )
        for row in found:
            have = runs.setdefault((row[0], row[1]), [])
            if all(r.first != row[2] for r in have):
                have.append(_Run(row))
        for have in runs.values():
            have.sort(key=lambda r: r.first)

    @staticmethod
    def _run_at(runs: dict[tuple[str, int], list[_Run]], t: str, p: int, off: int) -> _Run | None:
        for r in runs.get((t, p), ()):
            if r.first <= off <= r.last:
                return r
        return None

    def _settle(
        self,
        conn: sqlite3.Connection,
        group: str,
        topic: str | None,
        consumer: str | None,
        items: list[SettleItem],
        now: int,
        authorize: Authorize | None,
    ) -> list[SettleResult]:
        # Where each message is: this process's hint, taken when the run found there has the
        # id within its bounds (a topic deleted and made again reuses offsets, not ids);
        # otherwise a search among the group's runs.
        hints = settle_hints(items, self._where, topic)
        runs: dict[tuple[str, int], list[_Run]] = {}
        self._load_runs(conn, group, hints.values(), runs)
        place: dict[str, tuple[_Run, int]] = {}
        misses: list[str] = []
        settle_places(items, hints, runs, place, misses)
        if misses:
            found = self._search(conn, group, topic, misses)
            self._load_runs(conn, group, found.values(), runs)
            for mid, (t, p, off) in found.items():
                run = self._run_at(runs, t, p, off)
                if run is not None:
                    place[mid] = (run, off)
        results: list[SettleResult] = []
        shared: dict[Any, Any] = {}
        i = 0
        while True:
            # the common case (an allowed acknowledgement of a live lease) in the core, the
            # others here, in the order given
            i = settle_acks(items, i, place, consumer, now, authorize, shared, results,
                            SettleResult)  # fmt: skip
            if i == len(items):
                break
            item = items[i]
            i += 1
            res = SettleResult(message_id=item.message_id, status="")
            results.append(res)
            at = place.get(item.message_id)
            if at is None:
                where_ = f" in topic {topic!r}" if topic is not None else ""
                res.error = errors.NotFound(
                    f"message {item.message_id!r}{where_} has no delivery to group {group!r}"
                    " (never delivered to it, or completed long ago)",
                    field="message_id",
                )
                continue
            run, off = at
            if authorize is not None:
                res.error = authorize(run.topic)
                if res.error is not None:
                    continue
            try:
                self._settle_one(conn, group, consumer, item, run, off, now, res, shared)
            except errors.MqfastError as e:
                res.error = e
        # a position moves only when the run it points at is now complete
        heads = {
            (r.topic, r.partition, r.first)
            for rs in runs.values()
            for r in rs
            if r.changes and r.at(r.first)[0] == DONE
        }
        self._write(conn, group, (r for rs in runs.values() for r in rs))
        for t in {t for t, _, _ in heads}:
            committed = conn.execute(
                "SELECT partition, committed FROM group_partitions WHERE group_id = ?"
                " AND topic = ?",
                (group, t),
            ).fetchall()
            for p, c in committed:
                if (t, p, c) in heads:
                    self._advance(conn, group, t, p, c)
        return results

    def _settle_one(
        self,
        conn: sqlite3.Connection,
        group: str,
        consumer: str | None,
        item: SettleItem,
        run: _Run,
        off: int,
        now: int,
        res: SettleResult,
        shared: dict[Any, Any],
    ) -> None:
        """One item; ``shared`` holds what the items of one request share (the attributes
        of an acknowledged run, a backoff), so that a run settled together stays one row."""
        state, holder, due, leased_ms, count, outcome, why, _ = a = run.at(off)
        t = run.topic
        res.topic = t
        res.delivery_count = count
        mid = item.message_id
        if state == DONE:
            if item.action == "ack" and outcome is None:
                res.status = "already_acknowledged"
                return
            if outcome is not None:  # dead-lettered or expired, not acknowledged
                raise errors.Conflict(
                    f"message {mid!r} is no longer deliverable in group {group!r} ({outcome})",
                    field="message_id",
                )
            raise errors.Conflict(
                f"message {mid!r} is already acknowledged in group {group!r}", field="message_id"
            )
        if state == LEASED and due <= now:
            # The lease ran out before this arrived: it is a failed delivery either way.
            dead = self._fail(conn, group, run, off, "lease expired", EXPIRED, None, now)
            raise errors.Conflict(
                f"the lease of message {mid!r} expired; "
                + (
                    f"it reached the delivery limit and went to {dlq_name(t)!r}"
                    if dead
                    else "it will be delivered again"
                ),
                field="message_id",
            )
        if state == RETRY:
            if why == NACKED:
                verb = {"ack": "acknowledge", "nack": "acknowledge negatively"}.get(
                    item.action, item.action
                )
                raise errors.Conflict(
                    f"message {mid!r} was negatively acknowledged and waits for redelivery at"
                    f" {due}; it has no lease to {verb}",
                    field="message_id",
                )
            raise errors.Conflict(
                f"the lease of message {mid!r} expired; it will be delivered again",
                field="message_id",
            )
        if consumer is not None and holder != consumer:
            raise errors.Conflict(
                f"message {mid!r} is leased to another consumer of group {group!r}",
                field="consumer_id",
            )
        if item.action == "extend":
            vis = item.visibility_ms or self.policy.visibility_ms
            run.changes[off] = (LEASED, holder, now + vis, leased_ms, count, outcome, why, 0)
            res.status = "extended"
            res.lease_deadline = now + vis
            return
        if item.action == "ack":
            # keyed by identity (the offsets of an untouched run share one attributes tuple),
            # holding the key tuple so that its id is not reused within the request
            seen = shared.get(id(a))
            if seen is None:
                seen = shared[id(a)] = (a, (DONE, None, now, leased_ms, count, None, 0, now))
            done = seen[1]
            run.changes[off] = done
            res.status = "acknowledged"
            res.processing_ms = float(max(0, now - leased_ms))
            return
        error = item.error or "negative acknowledgement"
        if count < self.policy.delivery_limit:
            # one backoff for the messages of a run nacked together: the run stays whole
            key = (run.first, count, item.delay_ms)
            redeliver = shared.get(key)
            if redeliver is None:
                delay = self.policy.backoff_ms(count) if item.delay_ms is None else item.delay_ms
                redeliver = shared[key] = now + delay
            self._fail(conn, group, run, off, error, NACKED, redeliver, now)
            res.status = "requeued"
            res.redeliver_at = redeliver
        else:
            self._fail(conn, group, run, off, error, NACKED, None, now)
            res.status = "dead_lettered"

    def _advance(
        self,
        conn: sqlite3.Connection,
        group: str,
        topic: str,
        partition: int,
        committed: int | None = None,
    ) -> None:
        """Move the committed position (read here unless given) past complete runs."""
        if committed is None:
            row = conn.execute(
                "SELECT committed FROM group_partitions WHERE group_id = ? AND topic = ?"
                " AND partition = ?",
                (group, topic, partition),
            ).fetchone()
            if row is None:
                return
            committed = int(row[0])
        start = c = committed
        for first, last, state in conn.execute(
            "SELECT first_offset, last_offset, state FROM runs WHERE group_id = ? AND topic = ?"
            " AND partition = ? AND first_offset >= ? ORDER BY first_offset",
            (group, topic, partition, c),
        ):
            if first != c or state != DONE:
                break
            c = last + 1
        if c != start:
            conn.execute(
                "UPDATE group_partitions SET committed = ? WHERE group_id = ? AND topic = ?"
                " AND partition = ?",
                (c, group, topic, partition),
            )

    def _prune(self, conn: sqlite3.Connection, now: int) -> int:
        # Complete runs below a group's position are kept for the grace period only (to
        # answer a second ack); pruning scans them, so it runs now and then, not per ack.
        n = 0
        for group, topic, partition, committed in conn.execute(
            "SELECT group_id, topic, partition, committed FROM group_partitions"
        ).fetchall():
            n += sum(
                size
                for (size,) in conn.execute(
                    "DELETE FROM runs WHERE group_id = ? AND topic = ? AND partition = ?"
                    " AND last_offset < ? AND done_ms < ? RETURNING last_offset - first_offset + 1",
                    (group, topic, partition, committed, now - self.policy.done_grace_ms),
                ).fetchall()
            )
        return n

    # ---- consumers ---------------------------------------------------------------

    def _release(self, conn: sqlite3.Connection, consumer: str, now: int) -> int:
        n = conn.execute(
            "SELECT COALESCE(SUM(last_offset - first_offset + 1), 0) FROM runs"
            " WHERE consumer_id = ? AND state = 1",  # LEASED, as runs_consumer has it
            (consumer,),
        ).fetchone()[0]
        conn.execute(
            "UPDATE runs SET state = ?, due_ms = ?, consumer_id = NULL,"
            " last_error = 'consumer inactive', why = ? WHERE consumer_id = ? AND state = 1",
            (RETRY, now, RELEASED, consumer),
        )
        return int(n)
