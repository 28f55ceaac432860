"""Topic lifecycle on every engine, as a client sees it right after each call."""

from __future__ import annotations

from tests.conformance.conftest import PRODUCE, TOPICS, Gateway, unique


def test_a_deleted_topic_is_gone_at_once(engine_server: Gateway) -> None:
    # Found by schemathesis' stateful phase on the Kafka engine: Kafka deletes a topic
    # asynchronously, and a GET right after the DELETE found it again (created_at 0).
    gw = engine_server
    for i in range(6):
        name = unique("auto") if i % 2 else gw.topic()
        gw.produce(name)  # an unknown name is created automatically
        gw.ok("GET", TOPICS)
        assert gw.ok("DELETE", f"{TOPICS}/{name}") == {"name": name, "deleted": True}
        r = gw.call("GET", f"{TOPICS}/{name}")
        assert r.status == 404, r.body
        assert name not in [t["name"] for t in gw.ok("GET", TOPICS)["topics"]]
        assert gw.call("DELETE", f"{TOPICS}/{name}").status == 404


def test_a_deleted_topic_can_be_created_again(engine_server: Gateway) -> None:
    gw = engine_server
    name = gw.topic(partitions=2)
    gw.ok("DELETE", f"{TOPICS}/{name}")
    gw.ok("POST", TOPICS, {"name": name, "partitions": 1}, status=201)
    assert gw.describe(name)["partitions"] == 1
    assert gw.ok("POST", PRODUCE, {"topic": name, "content": "again"})["partition"] == 0


def test_a_topic_recreated_with_other_partitions_is_consumed(engine_server: Gateway) -> None:
    gw = engine_server
    for first, again in ((3, 1), (1, 2), (3, None)):
        name = gw.topic(partitions=first)
        gw.produce(name, "old")
        assert [m["content"] for m in gw.consume(name, "g", "c")] == ["old"]
        gw.ok("DELETE", f"{TOPICS}/{name}")
        if again is not None:
            gw.ok("POST", TOPICS, {"name": name, "partitions": again}, status=201)
        gw.produce(name, "new")  # created again automatically when `again` is None
        r = gw.consume_reply(name, "g", "c", timeout="20ms")
        assert r.status == 200, r.body
        got = r.json()["messages"] or gw.consume_until(name, "g", "c", 1)
        assert [m["content"] for m in got] == ["new"]


def test_a_topic_recreated_with_more_partitions_takes_messages_on_every_one(
    engine_server: Gateway,
) -> None:
    gw = engine_server
    name = gw.topic(partitions=1)
    gw.produce(name, "old")
    gw.ok("DELETE", f"{TOPICS}/{name}")
    gw.ok("POST", TOPICS, {"name": name, "partitions": 3}, status=201)
    # keys that land on each of the three: the engine must know the new partitions at once
    stored = [gw.produce(name, "new", key=f"k{i}") for i in range(12)]
    assert {m["partition"] for m in stored} == {0, 1, 2}
