"""EmbeddedGroups' storage: group state per run of offsets, on a real SQLite file (no mocks)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

from mqfast import errors
from mqfast.groups import Policy, PriorityPicker, SettleItem, SettleResult
from mqfast.messages import LeasedMessage
from mqfast.sinks.embedded import MIGRATIONS, SCHEMA_COMPONENT, apply_migrations, write_lock
from mqfast.sinks.embedded_groups import EmbeddedGroups
from tests.unit.test_embedded import D, Harness, cfg, with_sink

NOW = 1_800_000_000_000
GROUP = "g"


def runs(h: Harness) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(h.sink.path)
    try:
        return conn.execute(
            "SELECT partition, first_offset, last_offset, state FROM runs WHERE group_id = ?"
            " ORDER BY partition, first_offset",
            (GROUP,),
        ).fetchall()
    finally:
        conn.close()


def committed(h: Harness) -> dict[int, int]:
    conn = sqlite3.connect(h.sink.path)
    try:
        rows = conn.execute(
            "SELECT partition, committed FROM group_partitions WHERE group_id = ?", (GROUP,)
        ).fetchall()
    finally:
        conn.close()
    return dict(rows)


async def store(h: Harness) -> EmbeddedGroups:
    s = EmbeddedGroups(h.sink.open_connection, write_lock(h.sink.path), Policy())
    await s.start()
    return s


async def fill(h: Harness, n: int, partitions: int = 1) -> list[D]:
    await h.sink.create_topic(cfg("t", partitions=partitions))
    batch = [D("t", partition=i % partitions, message_id=f"id-{i:05d}") for i in range(n)]
    return await h.produce(batch)


async def lease(s: EmbeddedGroups, n: int, now: int = NOW) -> list[LeasedMessage]:
    out = await s.lease(GROUP, "t", "c1", n, 30_000, now, PriorityPicker(), None)
    return out.messages


async def settle(
    s: EmbeddedGroups, ids: list[str], action: str = "ack", now: int = NOW
) -> list[SettleResult]:
    return await s.settle(GROUP, None, "c1", [SettleItem(i, action) for i in ids], now)


def test_a_leased_batch_is_one_run_and_acknowledging_it_completes_the_run(
    tmp_path: Path,
) -> None:
    async def body(h: Harness) -> None:
        await fill(h, 100, partitions=2)
        s = await store(h)
        got = await lease(s, 100)
        assert len(got) == 100
        assert runs(h) == [(0, 0, 49, 1), (1, 0, 49, 1)]
        res = await settle(s, [m.message_id for m in got])
        assert {r.status for r in res} == {"acknowledged"}
        assert runs(h) == [(0, 0, 49, 3), (1, 0, 49, 3)]
        assert committed(h) == {0: 50, 1: 50}
        await s.close()

    with_sink(tmp_path, body)


def test_what_diverges_splits_a_run_and_the_position_waits_for_it(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await fill(h, 10)
        s = await store(h)
        got = await lease(s, 10)
        ids = [m.message_id for m in got]
        await settle(s, ids[:3] + ids[5:])  # 3 and 4 stay leased
        assert runs(h) == [(0, 0, 2, 3), (0, 3, 4, 1), (0, 5, 9, 3)]
        assert committed(h) == {0: 3}
        [nacked] = await settle(s, [ids[3]], "nack")
        assert nacked.status == "requeued"
        assert runs(h) == [(0, 0, 2, 3), (0, 3, 3, 2), (0, 4, 4, 1), (0, 5, 9, 3)]
        await settle(s, [ids[4]])
        assert committed(h) == {0: 3}
        [again] = await lease(s, 10, now=NOW + 3_600_000)
        assert (again.offset, again.delivery_count) == (3, 2)
        await settle(s, [again.message_id], now=NOW + 3_600_000)
        assert committed(h) == {0: 10}
        await s.close()

    with_sink(tmp_path, body)


def test_ids_are_found_by_a_store_that_did_not_lease_them(tmp_path: Path) -> None:
    # another worker process, or this one after a restart: no hint of where the ids are
    async def body(h: Harness) -> None:
        await fill(h, 30, partitions=3)
        leaser = await store(h)
        got = await lease(leaser, 20)
        other = await store(h)
        ids = [m.message_id for m in got]
        res = await settle(other, ids[:10])
        assert [r.status for r in res] == ["acknowledged"] * 10
        res = await settle(other, ids)
        assert [r.status for r in res] == ["already_acknowledged"] * 10 + ["acknowledged"] * 10
        never = await settle(other, ["id-00029", "no-such-id"])
        assert [type(r.error).__name__ for r in never] == ["NotFound", "NotFound"]
        await leaser.close()
        await other.close()

    with_sink(tmp_path, body)


def test_a_recreated_topic_does_not_take_an_old_id_for_the_new_message(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await fill(h, 1)
        s = await store(h)
        [old] = await lease(s, 1)
        await h.sink.delete_topic("t")
        await h.sink.create_topic(cfg("t"))
        await h.produce([D("t", message_id="new-00000")])
        [new] = await lease(s, 1)
        assert (new.offset, new.message_id) == (old.offset, "new-00000")
        [r] = await settle(s, [old.message_id])
        assert type(r.error).__name__ == "NotFound", r
        [r] = await settle(s, [new.message_id])
        assert r.status == "acknowledged", r
        await s.close()

    with_sink(tmp_path, body)


def test_a_lease_looks_past_a_backlog_of_expired_messages(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t"))
        gone = [D("t", message_id=f"old-{i:03d}", expires_ms=NOW - 1) for i in range(35)]
        await h.produce([*gone, D("t", message_id="live")])
        s = await store(h)
        out = await s.lease(GROUP, "t", "c1", 10, 30_000, NOW, PriorityPicker(), None)
        assert [m.message_id for m in out.messages] == ["live"]
        assert out.expired == 35
        await s.close()

    with_sink(tmp_path, body)


def test_leases_of_a_database_from_before_runs_survive_the_upgrade(tmp_path: Path) -> None:
    # schema version 3: one ``leases`` row per message
    conn = sqlite3.connect(tmp_path / "mqfast.db", isolation_level=None)
    apply_migrations(conn, SCHEMA_COMPONENT, MIGRATIONS[:3], str(tmp_path))
    conn.execute(
        "INSERT INTO topics (name, partitions, replication, retention, max_size, created_at)"
        " VALUES ('t', 1, 1, 0, 0, 0)"
    )
    conn.execute("INSERT INTO partitions (topic, partition, next_offset) VALUES ('t', 0, 3)")
    for off in range(3):
        conn.execute(
            "INSERT INTO messages (topic, partition, offset, message_id, value, timestamp_ms,"
            " size) VALUES ('t', 0, ?, ?, x'00', ?, 1)",
            (off, f"id-{off}", NOW),
        )
    conn.execute("INSERT INTO group_partitions VALUES (?, 't', 0, 1)", (GROUP,))
    conn.execute("INSERT INTO group_cursors VALUES (?, 't', 0, 0, 3)", (GROUP,))
    leases = [  # offset, state, consumer, due_ms, last_error
        (0, 3, None, NOW, None),
        (1, 1, "c1", NOW + 30_000, None),
        (2, 2, None, NOW + 60_000, "bad"),
    ]
    for off, state, holder, due, error in leases:
        conn.execute(
            "INSERT INTO leases (group_id, topic, partition, offset, message_id, priority,"
            " state, consumer_id, due_ms, leased_ms, delivery_count, last_error, done_ms)"
            " VALUES (?, 't', 0, ?, ?, 0, ?, ?, ?, ?, 1, ?, ?)",
            (GROUP, off, f"id-{off}", state, holder, due, NOW, error, NOW if state == 3 else 0),
        )
    conn.close()

    async def body(h: Harness) -> None:
        assert runs(h) == [(0, 0, 0, 3), (0, 1, 1, 1), (0, 2, 2, 2)]
        s = await store(h)
        res = await settle(s, ["id-0", "id-1", "id-2"], now=NOW + 1)
        assert res[0].status == "already_acknowledged"
        assert res[1].status == "acknowledged"
        assert res[2].error is not None and "negatively acknowledged" in res[2].error.message
        assert committed(h) == {0: 2}
        await s.close()

    with_sink(tmp_path, body)


def test_prune_forgets_complete_runs_after_the_grace_period(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await fill(h, 12)
        s = await store(h)
        got = await lease(s, 12)
        ids = [m.message_id for m in got]
        await settle(s, ids[:10])
        grace = Policy().done_grace_ms
        assert await s.prune(NOW + grace) == 0  # not older than the grace period yet
        assert await s.prune(NOW + grace + 1) == 10  # the two still leased are kept
        assert runs(h) == [(0, 10, 11, 1)]
        [r] = await settle(s, [ids[0]], now=NOW + grace + 1)
        assert type(r.error).__name__ == "NotFound", r
        [r] = await settle(s, [ids[11]], now=NOW + 1)
        assert r.status == "acknowledged", r
        await s.close()

    with_sink(tmp_path, body)


def test_calls_queued_together_share_a_transaction_and_one_failing_keeps_the_others(
    tmp_path: Path,
) -> None:
    async def body(h: Harness) -> None:
        await fill(h, 10)
        s = await store(h)
        got = await lease(s, 10)
        ids = [m.message_id for m in got]
        # Hold the store's thread so that the three calls are queued behind it, together.
        gate = threading.Event()
        held = asyncio.ensure_future(s._run(gate.wait, 5))
        await asyncio.sleep(0.05)
        calls = asyncio.gather(
            settle(s, ids[:5]),
            s.lease(GROUP, "nope", "c1", 1, 30_000, NOW, PriorityPicker(), None),
            settle(s, ids[5:]),
            return_exceptions=True,
        )
        await asyncio.sleep(0.05)
        gate.set()
        first, failed, second = await calls
        assert await held
        assert isinstance(failed, errors.UnknownTopic)
        assert isinstance(first, list) and isinstance(second, list)
        assert {r.status for r in first + second} == {"acknowledged"}
        assert runs(h) == [(0, 0, 4, 3), (0, 5, 9, 3)]
        assert committed(h) == {0: 10}
        await s.close()

    with_sink(tmp_path, body)
