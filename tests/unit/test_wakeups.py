"""Long-poll wake-ups (groups.Groups): a new message wakes one waiting consumer per group, not
every one, and is never left waiting while a consumer of its group waits.

A real embedded store under the Groups coordinator; the store's lease is wrapped to count the
leases each wake-up costs (each was a transaction of its own).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mqfast.config import Settings
from mqfast.groups import Groups, Policy
from mqfast.messages import LeasedMessage
from mqfast.sinks.embedded import write_lock
from mqfast.sinks.embedded_groups import EmbeddedGroups
from tests.unit.test_embedded import D, Harness, cfg, with_sink


class Counting(EmbeddedGroups):
    """The embedded store, counting leases and those that found nothing."""

    leases = 0
    empty = 0

    async def lease(self, *args: Any, **kw: Any) -> Any:
        out = await super().lease(*args, **kw)
        self.leases += 1
        self.empty += not out.messages
        return out


async def coordinator(h: Harness, tmp_path: Path) -> tuple[Groups, Counting]:
    settings = Settings.from_env({"MESSAGE_QUEUE_DATA_DIR": str(tmp_path)})
    policy = Policy.from_settings(settings)
    store = Counting(h.sink.open_connection, write_lock(h.sink.path), policy)
    await store.start()
    groups = Groups(settings, store)
    return groups, store


async def produce(h: Harness, groups: Groups, n: int) -> None:
    batch = [D("t", message_id=f"id-{i:05d}-{asyncio.get_running_loop().time()}") for i in range(n)]
    await h.produce(batch)
    groups.on_stored(batch)  # as the core's stored hook does


def consume(groups: Groups, group: str, consumer: str, n: int) -> asyncio.Task[Any]:
    return asyncio.ensure_future(groups.consume("t", group, consumer, n, "20s", "30s"))


async def settled(tasks: list[asyncio.Task[Any]]) -> None:
    """Let the long-polls reach their wait (a few loop turns and store round trips)."""
    for _ in range(50):
        await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)


def test_one_message_wakes_one_of_the_waiting_consumers_of_a_group(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t"))
        groups, store = await coordinator(h, tmp_path)
        waiting = [consume(groups, "g", f"c{i}", 10) for i in range(4)]
        await settled(waiting)
        before = store.leases
        await produce(h, groups, 1)
        done, pending = await asyncio.wait(waiting, timeout=5, return_when="FIRST_COMPLETED")
        [got] = [t.result() for t in done]
        assert len(got) == 1
        for _ in range(20):
            await asyncio.sleep(0.01)
        # one lease for the woken consumer; the three others go on waiting without a lease
        assert store.leases - before == 1
        assert len(pending) == 3 and not any(t.done() for t in pending)
        groups.shutdown()
        assert [await t for t in pending] == [[], [], []]
        await store.close()

    with_sink(tmp_path, body)


def test_a_full_batch_wakes_the_next_consumer_until_the_messages_are_taken(
    tmp_path: Path,
) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t"))
        groups, store = await coordinator(h, tmp_path)
        waiting = [consume(groups, "g", f"c{i}", 2) for i in range(4)]
        await settled(waiting)
        await produce(h, groups, 7)  # 2 + 2 + 2 + 1: every consumer gets some, in turn
        got: list[list[LeasedMessage]] = list(await asyncio.wait_for(asyncio.gather(*waiting), 5))
        assert sorted(len(m) for m in got) == [1, 2, 2, 2]
        assert len({m.message_id for ms in got for m in ms}) == 7
        await store.close()

    with_sink(tmp_path, body)


def test_every_group_is_woken_for_a_message(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t"))
        groups, store = await coordinator(h, tmp_path)
        waiting = [consume(groups, g, f"{g}-c{i}", 10) for g in ("a", "b") for i in range(2)]
        await settled(waiting)
        await produce(h, groups, 1)
        done, pending = await asyncio.wait(waiting, timeout=3)
        assert len(done) == 2  # one consumer of each group, each given the message
        assert len({t.result()[0].message_id for t in done}) == 1
        groups.shutdown()
        await asyncio.gather(*pending)
        await store.close()

    with_sink(tmp_path, body)


def test_a_woken_consumer_that_goes_away_does_not_strand_the_message(tmp_path: Path) -> None:
    # Cancelled in the same turn of the loop as its wake-up: on Python 3.11 wait_for still
    # returns and that consume leases the message; where the cancellation wins instead, the
    # wake-up passes to the next consumer waiting. Either way one of them has it now, not
    # after a long-poll timeout.
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t"))
        groups, store = await coordinator(h, tmp_path)
        first = consume(groups, "g", "c1", 10)
        await settled([first])
        second = consume(groups, "g", "c2", 10)
        await settled([first, second])
        await produce(h, groups, 1)
        first.cancel()
        done, _ = await asyncio.wait([first, second], timeout=3, return_when="FIRST_COMPLETED")
        results = [t.result() for t in done if not t.cancelled()]
        assert [len(r) for r in results] == [1]
        groups.shutdown()
        await asyncio.gather(first, second, return_exceptions=True)
        await store.close()

    with_sink(tmp_path, body)
