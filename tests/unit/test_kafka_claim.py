"""The Kafka engine's claim script (``kafka_groups.lua``), against the session's real Redis.

Replicas lease never-leased offsets by moving a cursor per partition and priority level; a
claim may carry several segments of one partition (the consumes of several consumers leased
together, each its own segment). These tests call the script as two replicas would, with a
group and topic of their own, and look at what Redis holds afterwards.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis as redis_client

from mqfast.sinks.kafka_groups import _load_scripts, pack_id


def claim(r: Any, group: str, topic: str, segments: list[tuple[int, int, int, str]]) -> list[int]:
    """Claim never-leased ``(partition, first, last, consumer)`` segments; the codes."""
    args: list[Any] = [group, topic, 1_000, 0, len(segments)]
    for p, a, b, consumer in segments:
        ids = b"".join(
            pack_id(f"01a24000-0000-7000-8000-{p:04d}{off:08d}") for off in range(a, b + 1)
        )
        args += ["f", p, a, b, 0, -1, 0, "", ids, consumer, 61_000]
    codes, _positions = r.eval(_load_scripts()["claim"], 0, *args)
    return [int(c) for c in codes]


def test_a_refused_segment_refuses_the_later_ones_of_its_partition(redis: Any) -> None:
    r = redis_client.Redis.from_url(redis.url)
    group, topic = f"g{uuid.uuid4().hex[:8]}", f"t{uuid.uuid4().hex[:8]}"
    r.hset(f"mq:{{{group}}}:pos:{topic}", mapping={"0": 0, "1": 0})
    # Replica B leases offsets 0..1 of partition 0 first.
    assert claim(r, group, topic, [(0, 0, 1, "b")]) == [1]
    # Replica A, from an older cursor, leases 0..4 for one consumer, 5..9 for another and
    # partition 1 for a third: the first is refused, and so must the second be (taking it
    # would move the cursor past 2..4, which nobody leased); partition 1 is untouched by it.
    assert claim(r, group, topic, [(0, 0, 4, "a1"), (0, 5, 9, "a2"), (1, 0, 3, "a3")]) == [0, 0, 1]
    cur = r.hgetall(f"mq:{{{group}}}:cur:{topic}")
    assert cur == {b"0:0": b"2", b"1:0": b"4"}
    # What is left of partition 0 is leased by the next claim, from the cursor.
    assert claim(r, group, topic, [(0, 2, 4, "a1"), (0, 5, 9, "a2")]) == [1, 1]
    runs = sorted(r.hkeys(f"mq:{{{group}}}:run:{topic}"))
    assert runs == [b"0:0", b"0:2", b"0:5", b"1:0"]
