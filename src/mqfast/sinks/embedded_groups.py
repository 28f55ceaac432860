"""Consumer groups on the embedded engine: leases, retries, dead letters, committed positions.

Every operation is one ``BEGIN IMMEDIATE`` transaction on the engine's database (tables in
``embedded.MIGRATIONS``), run on a dedicated thread with its own connection. Because the state
lives in the database, not in memory, several worker processes sharing the file see one
consistent group, and a ``kill -9`` loses nothing: leases that were out simply expire and the
messages are delivered again.

Where a lease expires: ``_reclaim`` (at the start of every lease transaction, and before an
acknowledgement of an expired lease is refused).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

import msgspec

from mqfast import errors
from mqfast._core import message_id_at, partition_for_key
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
from mqfast.messages import LeasedMessage
from mqfast.sinks.embedded import immediate

_T = TypeVar("_T")

LEASED: Final = 1
RETRY: Final = 2
DONE: Final = 3

_headers_decoder = msgspec.json.Decoder(dict[str, str])
_headers_encoder = msgspec.json.Encoder()

_UPSERT_LEASE: Final = (
    "INSERT INTO leases (group_id, topic, partition, offset, message_id, priority, state,"
    " consumer_id, due_ms, leased_ms, delivery_count) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (group_id, topic, partition, offset) DO UPDATE SET"
    " state = excluded.state, consumer_id = excluded.consumer_id,"
    " due_ms = excluded.due_ms, leased_ms = excluded.leased_ms,"
    " delivery_count = excluded.delivery_count"
)
# partition, offset, delivery count so far, message_id, key, value, headers, priority,
# timestamp_ms, expires_ms (message columns None when retention removed the message)
_Candidate = tuple[Any, ...]


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
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mqfast-embedded-groups"
        )
        await self._run(self._open)

    async def close(self) -> None:
        if self._pool is not None:
            await self._run(self._close)
            self._pool.shutdown(wait=True)
            self._pool = None

    def _open(self) -> None:
        self._conn = self._connect()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._pool is None:
            raise errors.Unavailable("embedded engine: consumer groups not started")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as e:
            raise errors.Unavailable(f"embedded engine: {e}") from e

    def _txn(self, fn: Callable[..., _T], *args: Any) -> _T:
        conn = self._conn
        if conn is None:
            raise errors.Unavailable("embedded engine: consumer groups not started")
        with immediate(conn, self._lock):
            return fn(conn, *args)

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
        return await self._run(
            self._txn,
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
        return await self._run(
            self._txn, self._settle, group, topic, consumer, items, now, authorize
        )

    async def release_consumer(self, consumer: str, now: int) -> int:
        return await self._run(self._txn, self._release, consumer, now)

    async def redrive(self, topic: str, max_messages: int, now: int) -> int:
        return await self._run(self._txn, self._redrive, topic, max_messages, now)

    async def prune(self, now: int) -> int:
        return await self._run(self._txn, self._prune, now)

    async def unacked(self, now: int, limit: int) -> list[Unacked]:
        return await self._run(self._txn, self._unacked, now, limit)

    def _unacked(self, conn: sqlite3.Connection, now: int, limit: int) -> list[Unacked]:
        out = []
        pairs = conn.execute(
            "SELECT DISTINCT group_id, topic FROM group_partitions LIMIT ?", (limit,)
        ).fetchall()
        for group, topic in pairs:
            # The leases_due index: only the rows of deliveries in flight are read.
            oldest, expired = conn.execute(
                "SELECT MIN(leased_ms), SUM(state = ? AND due_ms <= ?) FROM leases"
                " WHERE group_id = ? AND topic = ? AND state IN (?, ?)",
                (LEASED, now, group, topic, LEASED, RETRY),
            ).fetchone()
            if oldest is not None:
                out.append(Unacked(group, topic, int(oldest), int(expired)))
        return out

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
        out.reclaimed, dead = self._reclaim(conn, group, topic, now)
        out.dead_lettered += dead

        if max_leased is not None:
            held = conn.execute(
                "SELECT COUNT(*) FROM leases WHERE consumer_id = ? AND state = ? AND due_ms > ?",
                (consumer, LEASED, now),
            ).fetchone()[0]
            max_messages = min(max_messages, max_leased - int(held))

        touched: set[int] = set()
        if max_messages > 0:
            self._pick(
                conn, group, topic, consumer, partitions, committed, max_messages,
                visibility_ms, now, picker, dlq_expired, encrypted, out, touched,
            )  # fmt: skip
        for p in touched:
            self._advance(conn, group, topic, p, now)
        due = conn.execute(
            "SELECT MIN(due_ms) FROM leases WHERE group_id = ? AND topic = ? AND state IN (?, ?)",
            (group, topic, LEASED, RETRY),
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
        out = []
        for p in range(partitions):
            low = conn.execute(
                "SELECT COALESCE((SELECT offset FROM messages WHERE topic = ? AND partition = ?"
                " ORDER BY offset LIMIT 1), (SELECT next_offset FROM partitions"
                " WHERE topic = ? AND partition = ?), 0)",
                (topic, p, topic, p),
            ).fetchone()[0]
            current = rows.get(p)
            if current is None or current < low:
                conn.execute(
                    "INSERT OR REPLACE INTO group_partitions (group_id, topic, partition,"
                    " committed) VALUES (?, ?, ?, ?)",
                    (group, topic, p, low),
                )
                if current is not None:
                    conn.execute(
                        "DELETE FROM leases WHERE group_id = ? AND topic = ? AND partition = ?"
                        " AND offset < ?",
                        (group, topic, p, low),
                    )
                current = low
            out.append(int(current))
        return out

    def _reclaim(
        self, conn: sqlite3.Connection, group: str, topic: str, now: int
    ) -> tuple[int, int]:
        """Expired leases are failed deliveries: schedule a retry or dead-letter them."""
        rows = conn.execute(
            "SELECT partition, offset, delivery_count FROM leases"
            " WHERE group_id = ? AND topic = ? AND state = ? AND due_ms <= ?",
            (group, topic, LEASED, now),
        ).fetchall()
        dead = 0
        for p, off, count in rows:
            if self._fail(conn, group, topic, p, off, count, "lease expired", None, now):
                dead += 1
        return len(rows), dead

    def _fail(
        self,
        conn: sqlite3.Connection,
        group: str,
        topic: str,
        partition: int,
        offset: int,
        count: int,
        error: str,
        delay_ms: int | None,
        now: int,
    ) -> bool:
        """One failed delivery; True when it went to the dead-letter topic."""
        if count >= self.policy.delivery_limit:
            self._dead_letter(conn, group, topic, partition, offset, count, error, "failed", now)
            conn.execute(
                "UPDATE leases SET state = ?, done_ms = ?, last_error = ?, consumer_id = NULL"
                " WHERE group_id = ? AND topic = ? AND partition = ? AND offset = ?",
                (DONE, now, error, group, topic, partition, offset),
            )
            self._advance(conn, group, topic, partition, now)
            return True
        delay = self.policy.backoff_ms(count) if delay_ms is None else delay_ms
        conn.execute(
            "UPDATE leases SET state = ?, due_ms = ?, last_error = ?, consumer_id = NULL"
            " WHERE group_id = ? AND topic = ? AND partition = ? AND offset = ?",
            (RETRY, now + delay, error, group, topic, partition, offset),
        )
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
        # Candidates per level: retries that are due (oldest due first), then never-leased
        # messages from each partition's cursor of that level. Rows carry the message itself.
        retries: list[list[_Candidate]] = [[] for _ in range(PRIORITY_LEVELS)]
        for row in conn.execute(
            "SELECT l.partition, l.offset, l.delivery_count, m.message_id, m.key, m.value,"
            " m.headers, l.priority, m.timestamp_ms, m.expires_ms FROM leases l"
            " LEFT JOIN messages m ON m.topic = l.topic AND m.partition = l.partition"
            " AND m.offset = l.offset"
            " WHERE l.group_id = ? AND l.topic = ? AND l.state = ? AND l.due_ms <= ?"
            " ORDER BY l.due_ms LIMIT ?",
            (group, topic, RETRY, now, want * 4),
        ):
            retries[row[7]].append(row)
        cursors: dict[tuple[int, int], int] = {
            (p, pri): nxt
            for p, pri, nxt in conn.execute(
                "SELECT partition, priority, next_offset FROM group_cursors"
                " WHERE group_id = ? AND topic = ?",
                (group, topic),
            )
        }
        fresh: list[list[_Candidate]] = [[] for _ in range(PRIORITY_LEVELS)]
        for pri in range(PRIORITY_LEVELS):
            for p in range(partitions):
                start = max(cursors.get((p, pri), 0), committed[p])
                fresh[pri].extend(
                    conn.execute(
                        "SELECT partition, offset, 0, message_id, key, value, headers, priority,"
                        " timestamp_ms, expires_ms FROM messages INDEXED BY messages_priority"
                        # the planner would otherwise walk the log past every other level
                        " WHERE topic = ? AND partition = ? AND priority = ? AND offset >= ?"
                        " ORDER BY offset LIMIT ?",
                        (topic, p, pri, start, want),
                    )
                )
            if partitions > 1:  # interleave partitions by offset so none starves another
                fresh[pri].sort(key=lambda c: (c[1], c[0]))
        ready = [len(retries[i]) + len(fresh[i]) for i in range(PRIORITY_LEVELS)]
        ri = [0] * PRIORITY_LEVELS
        fi = [0] * PRIORITY_LEVELS
        deadline = now + visibility_ms
        moved: dict[tuple[int, int], int] = {}
        leased: list[tuple[Any, ...]] = []
        while len(out.messages) < want:
            level = picker.pick(ready)
            if level < 0:
                break
            ready[level] -= 1
            if ri[level] < len(retries[level]):
                c = retries[level][ri[level]]
                ri[level] += 1
            else:
                c = fresh[level][fi[level]]
                fi[level] += 1
                moved[(c[0], level)] = c[1] + 1
            p, off, count, mid, key, value, headers, pri, ts, expires = c
            if mid is None:  # deleted by retention since it was leased
                conn.execute(
                    "DELETE FROM leases WHERE group_id = ? AND topic = ? AND partition = ?"
                    " AND offset = ?",
                    (group, topic, p, off),
                )
                continue
            if expires and expires <= now:
                out.expired += 1
                self._upsert(conn, group, topic, p, off, mid, pri, DONE, None, now, now, count)
                conn.execute(
                    "UPDATE leases SET done_ms = ?, last_error = 'expired' WHERE group_id = ?"
                    " AND topic = ? AND partition = ? AND offset = ?",
                    (now, group, topic, p, off),
                )
                if dlq_expired:
                    self._dead_letter(conn, group, topic, p, off, count, "ttl", "expired", now)
                    out.dead_lettered += 1
                touched.add(p)
                continue
            h = _headers_decoder.decode(headers) if headers else {}
            if encrypted:
                try:
                    value = open_message(self.encryptor, topic, key, mid, value, h)
                except DecryptError as e:
                    # Never delivered: dead-lettered as stored (ciphertext and header), so an
                    # operator holding the right key can still recover it.
                    reason = str(e)
                    self._upsert(conn, group, topic, p, off, mid, pri, DONE, None, now, now, count)
                    conn.execute(
                        "UPDATE leases SET done_ms = ?, last_error = ? WHERE group_id = ?"
                        " AND topic = ? AND partition = ? AND offset = ?",
                        (now, reason, group, topic, p, off),
                    )
                    self._dead_letter(conn, group, topic, p, off, count, reason, reason, now)
                    out.dead_lettered += 1
                    touched.add(p)
                    continue
            leased.append(
                (group, topic, p, off, mid, pri, LEASED, consumer, deadline, now, count + 1)
            )
            out.messages.append(
                LeasedMessage(
                    message_id=mid,
                    topic=topic,
                    partition=p,
                    offset=off,
                    key=key.decode("utf-8", "replace") if key is not None else None,
                    content=value.decode("utf-8", "replace"),
                    headers=h,
                    priority=pri,
                    timestamp=ts,
                    delivery_count=count + 1,
                    lease_deadline=deadline,
                    expires_at=expires,
                )
            )
        if leased:
            conn.executemany(_UPSERT_LEASE, leased)
        if moved:
            conn.executemany(
                "INSERT OR REPLACE INTO group_cursors (group_id, topic, partition, priority,"
                " next_offset) VALUES (?, ?, ?, ?, ?)",
                [(group, topic, p, pri, nxt) for (p, pri), nxt in moved.items()],
            )
        # within one answer, higher priority first (each level already oldest first)
        out.messages.sort(key=lambda m: -m.priority)

    @staticmethod
    def _upsert(
        conn: sqlite3.Connection,
        group: str,
        topic: str,
        partition: int,
        offset: int,
        message_id: str,
        priority: int,
        state: int,
        consumer: str | None,
        due: int,
        now: int,
        count: int,
    ) -> None:
        conn.execute(
            _UPSERT_LEASE,
            (group, topic, partition, offset, message_id, priority, state, consumer, due, now,
             count),
        )  # fmt: skip

    def _advance(
        self, conn: sqlite3.Connection, group: str, topic: str, partition: int, now: int
    ) -> None:
        """Move the committed position past complete messages; prune old complete rows."""
        row = conn.execute(
            "SELECT committed FROM group_partitions WHERE group_id = ? AND topic = ?"
            " AND partition = ?",
            (group, topic, partition),
        ).fetchone()
        if row is None:
            return
        start = c = int(row[0])
        for off, state in conn.execute(
            "SELECT offset, state FROM leases WHERE group_id = ? AND topic = ? AND partition = ?"
            " AND offset >= ? ORDER BY offset",
            (group, topic, partition, c),
        ):
            if off != c or state != DONE:
                break
            c += 1
        if c != start:
            conn.execute(
                "UPDATE group_partitions SET committed = ? WHERE group_id = ? AND topic = ?"
                " AND partition = ?",
                (c, group, topic, partition),
            )

    def _prune(self, conn: sqlite3.Connection, now: int) -> int:
        # Complete rows below a group's position are kept for the grace period only (to
        # answer a second ack); pruning scans them, so it runs now and then, not per ack.
        n = 0
        for group, topic, partition, committed in conn.execute(
            "SELECT group_id, topic, partition, committed FROM group_partitions"
        ).fetchall():
            n += conn.execute(
                "DELETE FROM leases WHERE group_id = ? AND topic = ? AND partition = ?"
                " AND offset < ? AND done_ms < ?",
                (group, topic, partition, committed, now - self.policy.done_grace_ms),
            ).rowcount
        return n

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
        origin = conn.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchone()
        if origin is None:
            raise errors.UnknownTopic(f"unknown topic {topic!r}")
        dlq = dlq_name(topic)
        rows = conn.execute(
            "SELECT partition, offset, key, value, headers, priority, size FROM messages"
            " WHERE topic = ? ORDER BY partition, offset LIMIT ?",
            (dlq, max_messages),
        ).fetchall()
        n = 0
        for p, off, key, value, headers, priority, size in rows:
            h = _headers_decoder.decode(headers) if headers else {}
            if ENC_HEADER in h:
                # Keep what the ciphertext is bound to: the redriven copy gets a new id.
                h[ENC_TOPIC_HEADER], h[ENC_ID_HEADER] = bound_to(dlq, "", h)
            h = {k: v for k, v in h.items() if not k.startswith(DLQ_HEADER_PREFIX)}
            h["x-mqfast-redriven-from"] = dlq
            parts = int(origin[0])
            target = partition_for_key(key, parts) if key is not None else (off % parts)
            self._append(conn, topic, target, key, value, _headers_encoder.encode(h), priority, now)
            conn.execute(
                "DELETE FROM messages WHERE topic = ? AND partition = ? AND offset = ?",
                (dlq, p, off),
            )
            conn.execute(
                "UPDATE partitions SET messages = messages - 1, bytes = bytes - ?"
                " WHERE topic = ? AND partition = ?",
                (size, dlq, p),
            )
            n += 1
        return n

    # ---- settle ---------------------------------------------------------------------------

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
        results = []
        touched: set[tuple[str, int]] = set()
        for item in items:
            res = SettleResult(message_id=item.message_id, status="")
            try:
                self._settle_one(conn, group, topic, consumer, item, now, res, touched, authorize)
            except errors.MqfastError as e:
                res.error = e
            results.append(res)
        for t, p in touched:
            self._advance(conn, group, t, p, now)
        return results

    def _settle_one(
        self,
        conn: sqlite3.Connection,
        group: str,
        topic: str | None,
        consumer: str | None,
        item: SettleItem,
        now: int,
        res: SettleResult,
        touched: set[tuple[str, int]],
        authorize: Authorize | None,
    ) -> None:
        row = conn.execute(
            "SELECT topic, partition, offset, state, consumer_id, due_ms, leased_ms,"
            " delivery_count, last_error FROM leases INDEXED BY leases_message"
            # without statistics the planner would scan the group's whole primary key
            " WHERE group_id = ? AND message_id = ?",
            (group, item.message_id),
        ).fetchone()
        if row is None or (topic is not None and row[0] != topic):
            where = f" in topic {topic!r}" if topic is not None else ""
            raise errors.NotFound(
                f"message {item.message_id!r}{where} has no delivery to group {group!r}"
                " (never delivered to it, or completed long ago)",
                field="message_id",
            )
        t, p, off, state, holder, due, leased_ms, count, outcome = row
        if authorize is not None:
            res.error = authorize(t)
            if res.error is not None:
                return  # untouched, and the topic is not told
        res.topic = t
        res.delivery_count = count
        if state == DONE:
            if item.action == "ack" and outcome is None:
                res.status = "already_acknowledged"
                return
            if outcome is not None:  # dead-lettered or expired, not acknowledged
                raise errors.Conflict(
                    f"message {item.message_id!r} is no longer deliverable in group {group!r}"
                    f" ({outcome})",
                    field="message_id",
                )
            raise errors.Conflict(
                f"message {item.message_id!r} is already acknowledged in group {group!r}",
                field="message_id",
            )
        if state == LEASED and due <= now:
            # The lease ran out before this arrived: it is a failed delivery either way.
            dead = self._fail(conn, group, t, p, off, count, "lease expired", None, now)
            touched.add((t, p))
            raise errors.Conflict(
                f"the lease of message {item.message_id!r} expired; "
                + (
                    f"it reached the delivery limit and went to {dlq_name(t)!r}"
                    if dead
                    else "it will be delivered again"
                ),
                field="message_id",
            )
        if state == RETRY:
            raise errors.Conflict(
                f"the lease of message {item.message_id!r} expired; it will be delivered again",
                field="message_id",
            )
        if consumer is not None and holder != consumer:
            raise errors.Conflict(
                f"message {item.message_id!r} is leased to another consumer of group {group!r}",
                field="consumer_id",
            )
        if item.action == "extend":
            vis = item.visibility_ms or self.policy.visibility_ms
            conn.execute(
                "UPDATE leases SET due_ms = ? WHERE group_id = ? AND topic = ? AND partition = ?"
                " AND offset = ?",
                (now + vis, group, t, p, off),
            )
            res.status = "extended"
            res.lease_deadline = now + vis
            return
        if item.action == "ack":
            conn.execute(
                "UPDATE leases SET state = ?, done_ms = ?, consumer_id = NULL, last_error = NULL"
                " WHERE group_id = ? AND topic = ? AND partition = ? AND offset = ?",
                (DONE, now, group, t, p, off),
            )
            res.status = "acknowledged"
            res.processing_ms = float(max(0, now - leased_ms))
            touched.add((t, p))
            return
        error = item.error or "negative acknowledgement"
        if self._fail(conn, group, t, p, off, count, error, item.delay_ms, now):
            res.status = "dead_lettered"
        else:
            res.status = "requeued"
            res.redeliver_at = conn.execute(
                "SELECT due_ms FROM leases WHERE group_id = ? AND topic = ? AND partition = ?"
                " AND offset = ?",
                (group, t, p, off),
            ).fetchone()[0]
        touched.add((t, p))

    # ---- consumers ---------------------------------------------------------------

    def _release(self, conn: sqlite3.Connection, consumer: str, now: int) -> int:
        cur = conn.execute(
            "UPDATE leases SET state = ?, due_ms = ?, consumer_id = NULL,"
            " last_error = 'consumer inactive' WHERE consumer_id = ? AND state = ?",
            (RETRY, now, consumer, LEASED),
        )
        return cur.rowcount
