"""A stateful test of the consumer-group rules on the embedded engine's storage.

Hypothesis drives produce / consume / ack / nack / extend / time / restart against the real
``EmbeddedGroups`` store and ``EmbeddedSink`` (SQLite in a temporary directory, a fake clock
passed as ``now``), and checks every answer against a small in-memory model:

- a message is leased to one consumer at a time, never after its expiry, and each delivery
  raises its delivery count by exactly one;
- a failed delivery (negative acknowledgement or expired lease) comes back no earlier than its
  backoff, and goes to ``<topic>.dlq`` exactly when its delivery count reached the limit (an
  expired message may go there too, with reason ``expired``), never before;
- an acknowledged message is never delivered again, and a second ack says
  ``already_acknowledged``; the group's committed position never passes an incomplete message;
- a run (what one consume leased: consecutive offsets of a partition, or a few) may be settled
  a part at a time, in any order and in one batch: acknowledgements, nacks and extensions of
  some of its messages, the rest left to expire, each message keeping exactly its own state;
- restarts (close and reopen on the same files) lose nothing;
- at the end, after draining, every message is acknowledged or dead-lettered.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvloop
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mqfast import errors
from mqfast.groups import (
    DLQ_HEADER_PREFIX,
    LeaseOutcome,
    Policy,
    PriorityPicker,
    SettleItem,
    SettleResult,
)
from mqfast.messages import TopicConfig
from mqfast.sinks import Delivery
from mqfast.sinks.embedded import EmbeddedSink, write_lock
from mqfast.sinks.embedded_groups import EmbeddedGroups

T = TypeVar("T")

TOPIC = "orders"
DLQ = TOPIC + ".dlq"
GROUP = "g"
PARTITIONS = 2
CONSUMERS = ("c0", "c1", "c2")
POLICY = Policy(
    visibility_ms=1000,
    delivery_limit=3,
    backoff_base_ms=100,
    backoff_max_ms=400,
    jitter=0.2,
    done_grace_ms=10**12,  # keep completed rows: a late second ack is still recognised
)
START_MS = 1_800_000_000_000
RUNS_KEPT = 4  # the last consumes whose messages a rule may settle as a run


def backoff_window(count: int) -> tuple[int, int]:
    base = min(POLICY.backoff_max_ms, POLICY.backoff_base_ms * (1 << max(count - 1, 0)))
    return int(base * (1 - POLICY.jitter)) - 1, int(base * (1 + POLICY.jitter)) + 1


def settle_item(m: Msg, action: str, delay: int | None, visibility: int | None) -> SettleItem:
    return SettleItem(
        message_id=m.mid,
        action=action,
        error="bad" if action == "nack" else None,
        delay_ms=delay if action == "nack" else None,
        visibility_ms=visibility if action == "extend" else None,
    )


@dataclass(eq=False)
class D:
    """The attributes of ``sinks.Delivery``."""

    topic: str
    partition: int
    value: bytes
    priority: int
    timestamp_ms: int
    expires_ms: int
    message_id: str
    key: bytes | None = None
    headers: bytes | None = None
    offset: int = -1
    error: errors.MqfastError | None = None


@dataclass
class Msg:
    """The model of one message in the group."""

    mid: str
    partition: int
    offset: int
    priority: int
    expires: int  # 0: never
    count: int = 0
    state: str = "new"  # new | leased | retry | acked | dlq
    holder: str | None = None
    deadline: int = 0  # lease deadline while leased
    due_lo: int = 0  # retry: not before
    due_hi: int = 0  # retry: surely due from
    dlq_reason: str | None = None
    acks: int = 0

    def expired(self, now: int) -> bool:
        return self.expires != 0 and self.expires <= now

    @property
    def resolved(self) -> bool:
        return self.state in ("acked", "dlq")


@dataclass
class World:
    """The engine under test: sink + group store on one loop, reopened on restart."""

    path: Path
    loop: asyncio.AbstractEventLoop
    sink: EmbeddedSink | None = None
    store: EmbeddedGroups | None = None
    picker: PriorityPicker = field(default_factory=PriorityPicker)
    _done: asyncio.Future[list[Delivery]] | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))

    def open(self) -> None:
        self.sink = EmbeddedSink(str(self.path), retention_interval_s=0)
        self.sink.bind(self.loop, self._on_done)
        self.run(self.sink.start())
        self.store = EmbeddedGroups(self.sink.open_connection, write_lock(self.sink.path), POLICY)
        self.run(self.store.start())
        self.picker = PriorityPicker()  # in memory: a restarted gateway starts afresh

    def close(self) -> None:
        if self.store is not None:
            self.run(self.store.close())
            self.store = None
        if self.sink is not None:
            self.run(self.sink.close(10))
            self.sink = None

    def _on_done(self, batch: list[Delivery]) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(batch)

    def produce(self, d: D) -> D:
        assert self.sink is not None
        self._done = self.loop.create_future()
        self.sink.submit([d])  # type: ignore[list-item]
        self.run(self._wait_done())
        return d

    async def _wait_done(self) -> None:
        assert self._done is not None
        await self._done

    def lease(self, consumer: str, n: int, now: int) -> LeaseOutcome:
        assert self.store is not None
        return self.run(
            self.store.lease(
                GROUP, TOPIC, consumer, n, POLICY.visibility_ms, now, self.picker, None
            )
        )

    def settle(self, consumer: str | None, items: list[SettleItem], now: int) -> list[SettleResult]:
        assert self.store is not None
        return self.run(self.store.settle(GROUP, TOPIC, consumer, items, now))

    def dead_letters(self) -> list[tuple[str, dict[str, str]]]:
        assert self.sink is not None
        try:
            rows = self.run(self.sink.read(DLQ, 0, 0, 100_000))
        except errors.UnknownTopic:
            return []
        return [(m.headers[DLQ_HEADER_PREFIX + "message-id"], m.headers) for m in rows]

    def committed(self) -> dict[int, int]:
        conn = sqlite3.connect(f"file:{self.path / 'mqfast.db'}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute(
                "SELECT partition, committed FROM group_partitions WHERE group_id = ?"
                " AND topic = ?",
                (GROUP, TOPIC),
            ).fetchall()
        finally:
            conn.close()
        return {int(p): int(c) for p, c in rows}


class GroupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = START_MS
        self.msgs: dict[str, Msg] = {}
        self.order: list[str] = []
        self.dlq_seen: set[str] = set()
        self.runs: list[tuple[str, list[str]]] = []  # (consumer, ids) of the last consumes
        self.world = World(
            Path(tempfile.mkdtemp(prefix="mqfast-stateful-")), uvloop.new_event_loop()
        )
        self.world.open()
        cfg = TopicConfig(
            name=TOPIC,
            partitions=PARTITIONS,
            replication=1,
            retention=0,
            max_size=0,
            dead_letter_expired=True,
        )
        assert self.world.sink is not None
        self.world.run(self.world.sink.create_topic(cfg))

    # ---- model helpers ---------------------------------------------------------------------

    def _fail(self, m: Msg, now: int) -> None:
        """A failed delivery at ``now`` (the store's ``_fail``) with the default backoff."""
        m.holder = None
        if m.count >= POLICY.delivery_limit:
            m.state, m.dlq_reason = "dlq", "failed"
        else:
            lo, hi = backoff_window(m.count)
            m.state, m.due_lo, m.due_hi = "retry", now + lo, now + hi

    def _reconcile_dlq(self) -> int:
        """Check the dead-letter topic against the model; returns how many expired arrived."""
        entries = self.world.dead_letters()
        ids = [mid for mid, _ in entries]
        assert len(ids) == len(set(ids)), "a message was dead-lettered twice"
        fresh_expired = 0
        for mid, headers in entries:
            m = self.msgs[mid]
            reason = headers[DLQ_HEADER_PREFIX + "reason"]
            if mid in self.dlq_seen:
                continue
            self.dlq_seen.add(mid)
            if reason == "expired":
                assert m.expired(self.now), f"{mid} dead-lettered as expired before its expiry"
                assert m.state in ("new", "retry"), (mid, m.state)
                m.state, m.dlq_reason = "dlq", "expired"
                fresh_expired += 1
            else:
                assert reason == "failed", headers
                assert m.state == "dlq" and m.dlq_reason == "failed", (
                    f"{mid} in the DLQ before the delivery limit (model {m})"
                )
                assert headers[DLQ_HEADER_PREFIX + "delivery-count"] == str(POLICY.delivery_limit)
            assert headers[DLQ_HEADER_PREFIX + "group"] == GROUP
            assert headers[DLQ_HEADER_PREFIX + "topic"] == TOPIC
            assert headers[DLQ_HEADER_PREFIX + "offset"] == str(m.offset)
        for m in self.msgs.values():
            if m.state == "dlq":
                assert m.mid in self.dlq_seen, f"{m.mid} should be in the DLQ: {m}"
        return fresh_expired

    def _pick(self, i: int) -> Msg:
        return self.msgs[self.order[i % len(self.order)]]

    # ---- rules -----------------------------------------------------------------------------

    @rule(
        partition=st.integers(0, PARTITIONS - 1),
        priority=st.integers(0, 9),
        ttl=st.sampled_from([0, 0, 0, 300, 1500, 4000]),
    )
    def produce(self, partition: int, priority: int, ttl: int) -> None:
        self._produce(partition, priority, ttl)

    def _produce(self, partition: int, priority: int, ttl: int) -> None:
        mid = f"m{len(self.order):05d}"
        d = D(
            topic=TOPIC,
            partition=partition,
            value=mid.encode(),
            priority=priority,
            timestamp_ms=self.now,
            expires_ms=self.now + ttl if ttl else 0,
            message_id=mid,
        )
        self.world.produce(d)
        assert d.error is None, d.error
        self.msgs[mid] = Msg(mid, partition, d.offset, priority, d.expires_ms)
        self.order.append(mid)

    @rule(consumer=st.sampled_from(CONSUMERS), n=st.integers(1, 4))
    def consume(self, consumer: str, n: int) -> None:
        self._consume(consumer, n)

    def _consume(self, consumer: str, n: int) -> list[str]:
        now = self.now
        # leases that ran out are reclaimed by this call: failed deliveries
        for m in self.msgs.values():
            if m.state == "leased" and m.deadline <= now:
                self._fail(m, now)
        live = [m for m in self.msgs.values() if not m.expired(now)]
        surely = sum(
            1 for m in live if m.state == "new" or (m.state == "retry" and m.due_hi <= now)
        )
        maybe = sum(1 for m in live if m.state == "new" or (m.state == "retry" and m.due_lo <= now))
        out = self.world.lease(consumer, n, now)
        got = out.messages
        ids = [lm.message_id for lm in got]
        assert len(ids) == len(set(ids))
        for lm in got:
            m = self.msgs[lm.message_id]
            assert m.state in ("new", "retry"), f"delivered while {m.state}: {m}"
            if m.state == "retry":
                assert now >= m.due_lo, f"redelivered before its backoff: {m} at {now}"
            assert not m.expired(now), f"delivered after its expiry: {m} at {now}"
            assert lm.delivery_count == m.count + 1, (lm.delivery_count, m)
            assert lm.lease_deadline == now + POLICY.visibility_ms
            assert (lm.partition, lm.offset, lm.priority) == (m.partition, m.offset, m.priority)
            m.count += 1
            m.state, m.holder, m.deadline = "leased", consumer, lm.lease_deadline
        if len(ids) > 1:
            self.runs = [*self.runs[-(RUNS_KEPT - 1) :], (consumer, ids)]
        expired_now = self._reconcile_dlq()
        assert out.expired >= expired_now
        if expired_now == 0 and out.expired == 0:
            # nothing was skipped: the store delivers all it can, up to n
            assert min(n, surely) <= len(got) <= min(n, maybe), (n, surely, maybe, len(got))
        return ids

    def _leased(self) -> list[Msg]:
        return [self.msgs[mid] for mid in self.order if self.msgs[mid].state == "leased"]

    @precondition(lambda self: any(m.state == "leased" for m in self.msgs.values()))
    @rule(i=st.integers(0, 10**6), own=st.sampled_from([True, True, True, False]))
    def ack(self, i: int, own: bool) -> None:
        leased = self._leased()
        self._settle(leased[i % len(leased)], "ack", own)

    @precondition(lambda self: any(m.state == "leased" for m in self.msgs.values()))
    @rule(
        i=st.integers(0, 10**6),
        own=st.sampled_from([True, True, True, False]),
        delay=st.sampled_from([None, None, None, 0, 700]),
    )
    def nack(self, i: int, own: bool, delay: int | None) -> None:
        leased = self._leased()
        self._settle(leased[i % len(leased)], "nack", own, delay)

    @precondition(lambda self: any(m.state == "leased" for m in self.msgs.values()))
    @rule(i=st.integers(0, 10**6), vis=st.sampled_from([200, 2500]))
    def extend(self, i: int, vis: int) -> None:
        leased = self._leased()
        self._settle(leased[i % len(leased)], "extend", True, visibility=vis)

    @precondition(lambda self: self.order)
    @rule(i=st.integers(0, 10**6), action=st.sampled_from(["ack", "nack", "extend"]))
    def settle_any(self, i: int, action: str) -> None:
        """Any message in any state: unknown, complete, retrying, expired or foreign leases."""
        self._settle(self._pick(i), action, own=i % 2 == 0)

    def _settle(
        self,
        m: Msg,
        action: str,
        own: bool,
        delay: int | None = None,
        visibility: int | None = None,
    ) -> None:
        consumer = m.holder if own else "stranger"
        self._settle_batch(consumer or "stranger", [(m, settle_item(m, action, delay, visibility))])

    def _settle_batch(self, consumer: str, batch: list[tuple[Msg, SettleItem]]) -> None:
        """One settle call of several items; the store applies them in order, as the model."""
        results = self.world.settle(consumer, [item for _, item in batch], self.now)
        assert len(results) == len(batch)
        for (m, item), r in zip(batch, results, strict=True):
            assert r.message_id == m.mid, (r, m)
            self._check_settled(m, item, consumer, r)
        self._reconcile_dlq()

    def _check_settled(self, m: Msg, item: SettleItem, consumer: str, r: SettleResult) -> None:
        now = self.now
        action, delay, visibility = item.action, item.delay_ms, item.visibility_ms
        if m.state == "new":
            assert isinstance(r.error, errors.NotFound), (m, r)
        elif m.state == "acked":
            if action == "ack":
                assert r.error is None and r.status == "already_acknowledged", (m, r)
            else:
                assert isinstance(r.error, errors.Conflict), (m, r)
        elif m.state == "dlq":
            assert r.status != "acknowledged", (m, r)
            if action != "ack":
                assert isinstance(r.error, errors.Conflict), (m, r)
        elif m.state == "retry":
            assert isinstance(r.error, errors.Conflict), (m, r)
        elif m.deadline <= now:
            # leased, but the lease ran out: refused, and it is a failed delivery now
            assert isinstance(r.error, errors.Conflict), (m, r)
            self._fail(m, now)
        elif consumer != m.holder:
            assert isinstance(r.error, errors.Conflict), (m, r)
        elif action == "ack":
            assert r.error is None and r.status == "acknowledged", (m, r)
            assert r.delivery_count == m.count
            m.state, m.holder = "acked", None
            m.acks += 1
        elif action == "extend":
            assert r.error is None and r.status == "extended", (m, r)
            assert r.lease_deadline == now + (visibility or POLICY.visibility_ms)
            m.deadline = now + (visibility or POLICY.visibility_ms)
        else:
            assert r.error is None, (m, r)
            if m.count >= POLICY.delivery_limit:
                assert r.status == "dead_lettered", (m, r)
                m.state, m.holder, m.dlq_reason = "dlq", None, "failed"
            else:
                assert r.status == "requeued", (m, r)
                assert r.redeliver_at is not None
                if delay is not None:
                    assert r.redeliver_at == now + delay
                    lo = hi = delay
                else:
                    lo, hi = backoff_window(m.count)
                    assert now + lo <= r.redeliver_at <= now + hi, (m, r, lo, hi)
                m.state, m.holder = "retry", None
                m.due_lo, m.due_hi = now + lo, now + hi

    # ---- runs: the consecutive messages one consume leased, settled a part at a time -------

    @rule(
        partition=st.integers(0, PARTITIONS - 1),
        k=st.integers(2, 6),
        priority=st.sampled_from([0, 0, 4]),
        ttl=st.sampled_from([0, 0, 0, 1500]),
    )
    def produce_run(self, partition: int, k: int, priority: int, ttl: int) -> None:
        for _ in range(k):
            self._produce(partition, priority, ttl)

    @rule(consumer=st.sampled_from(CONSUMERS), n=st.integers(2, 12))
    def consume_run(self, consumer: str, n: int) -> None:
        self._consume(consumer, n)

    @rule(consumer=st.sampled_from(CONSUMERS), n=st.integers(2, 12), data=st.data())
    def consume_run_and_settle_part(self, consumer: str, n: int, data: st.DataObject) -> None:
        ids = self._consume(consumer, n)
        if ids:
            self._settle_part(data, consumer, ids)

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def settle_part_of_run(self, data: st.DataObject) -> None:
        """A part of an earlier run, whatever became of its messages since."""
        consumer, ids = data.draw(st.sampled_from(self.runs[::-1]), label="run")
        self._settle_part(data, consumer, ids)

    def _settle_part(self, data: st.DataObject, consumer: str, ids: list[str]) -> None:
        """Some messages of a run, in any order, each acknowledged, nacked or extended."""
        order = data.draw(st.permutations(ids), label="order")
        k = data.draw(st.integers(1, len(ids)), label="how many")
        how = st.tuples(
            st.sampled_from(["ack", "ack", "ack", "nack", "extend"]),
            st.sampled_from([None, None, 0, 700]),
            st.sampled_from([200, 2500]),
        )
        actions = data.draw(st.lists(how, min_size=k, max_size=k), label="actions")
        if data.draw(st.sampled_from([True, True, True, False]), label="own"):
            who = consumer
        else:
            who = "stranger"
        batch = [
            (self.msgs[mid], settle_item(self.msgs[mid], action, delay, vis))
            for mid, (action, delay, vis) in zip(order, actions, strict=False)
        ]
        self._settle_batch(who, batch)

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def expire_part_of_run(self, data: st.DataObject) -> None:
        """Extend some messages of a run, let the rest of its lease run out, consume again."""
        consumer, ids = data.draw(st.sampled_from(self.runs[::-1]), label="run")
        keep = data.draw(
            st.lists(st.sampled_from(ids), min_size=1, max_size=len(ids) - 1, unique=True),
            label="extended",
        )
        batch = [
            (self.msgs[mid], settle_item(self.msgs[mid], "extend", None, 2500)) for mid in keep
        ]
        self._settle_batch(consumer, batch)
        self.now += POLICY.visibility_ms + 1  # every lease not extended meanwhile has run out
        self._consume(data.draw(st.sampled_from(CONSUMERS), label="next consumer"), 12)

    @rule(ms=st.sampled_from([1, 60, 90, 150, 250, 500, 1000, 1200, 3000]))
    def advance(self, ms: int) -> None:
        self.now += ms

    @rule()
    def restart(self) -> None:
        self.world.close()
        self.world.open()

    # ---- invariants ------------------------------------------------------------------------

    @invariant()
    def committed_never_passes_an_incomplete_message(self) -> None:
        committed = self.world.committed()
        for p, c in committed.items():
            pending = [m.offset for m in self.msgs.values() if m.partition == p and not m.resolved]
            if pending:
                assert c <= min(pending), (p, c, sorted(pending)[:5])

    @invariant()
    def never_acknowledged_twice(self) -> None:
        assert all(m.acks <= 1 for m in self.msgs.values())

    # ---- the end: drain, then everything is acknowledged or dead-lettered ------------------

    def teardown(self) -> None:
        try:
            if self.world.sink is not None:
                self._drain()
        finally:
            self.world.close()
            self.world.loop.close()
            shutil.rmtree(self.world.path, ignore_errors=True)

    def _drain(self) -> None:
        for _ in range(60):
            if all(m.resolved for m in self.msgs.values()):
                break
            self.now += 2000  # past any lease and any backoff
            for mid in self._consume("drain", 100):
                self._settle(self.msgs[mid], "ack", True)
        left = [m for m in self.msgs.values() if not m.resolved]
        assert not left, f"{len(left)} messages neither acknowledged nor dead-lettered: {left[:3]}"
        assert self.world.lease("drain", 100, self.now + 10_000).messages == []
        for m in self.msgs.values():
            assert m.count <= POLICY.delivery_limit, m
            if m.state == "acked":
                # a second ack, after everything, is still harmless
                [r] = self.world.settle(None, [SettleItem(m.mid, "ack")], self.now)
                assert r.error is None and r.status == "already_acknowledged", (m, r)
        committed = self.world.committed()
        for p in range(PARTITIONS):
            produced = sum(1 for m in self.msgs.values() if m.partition == p)
            if produced:
                assert committed.get(p) == produced, (p, committed, produced)


GroupMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGroupStateMachine = GroupMachine.TestCase
