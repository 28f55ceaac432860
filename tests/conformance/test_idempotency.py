"""Idempotent produce (the ``Idempotency-Key`` header, a batch message's ``idempotency_key``).

A retry with the same key within MESSAGE_QUEUE_IDEMPOTENCY_WINDOW answers the original result
and stores nothing new; the same key with another message is a 422 naming the field; a retry
while the first attempt is in flight gets the first one's outcome; keys survive a restart.
"""

from __future__ import annotations

import time
from typing import Any

from tests.conformance.conftest import (
    PRODUCE,
    Background,
    Gateway,
    GatewayFactory,
    unique,
)
from tests.conftest import Reply

BATCH = "/api/v1/messages/batch"
RESULT_FIELDS = ("message_id", "topic", "partition", "offset", "timestamp")


def send(gw: Gateway, key: str | None, body: dict[str, Any], path: str = PRODUCE) -> Reply:
    headers = {} if key is None else {"Idempotency-Key": key}
    return gw.proc.request("POST", path, body, headers=headers, timeout=30)


def result(r: Reply) -> dict[str, Any]:
    assert r.status == 200, (r.status, r.body)
    out: dict[str, Any] = r.json()
    return {k: out[k] for k in RESULT_FIELDS}


def stored(gw: Gateway, topic: str) -> int:
    return int(gw.describe(topic)["messages"])


def test_a_retry_with_the_same_key_answers_the_original_and_stores_nothing(
    engine_server: Gateway,
) -> None:
    gw = engine_server
    t = gw.topic(partitions=3)
    body = {"topic": t, "content": "pay 10", "headers": {"a": "b"}, "priority": 2}
    first = result(send(gw, "order-1", body))
    for _ in range(3):
        assert result(send(gw, "order-1", body)) == first
    other = result(send(gw, "order-2", body))  # another key is another message
    assert other["message_id"] != first["message_id"]
    assert stored(gw, t) == 2
    [m1, m2] = gw.consume_until(t, "g", "c", 2)
    assert {m1["message_id"], m2["message_id"]} == {first["message_id"], other["message_id"]}
    assert gw.consume(t, "g", "c", timeout="1s") == []


def test_the_same_key_with_another_message_is_422_naming_the_header(
    engine_server: Gateway,
) -> None:
    gw = engine_server
    t = gw.topic()
    first = result(send(gw, "k", {"topic": t, "content": "a"}))
    for changed in ({"content": "b"}, {"content": "a", "key": "x"}, {"content": "a", "ttl": "5m"}):
        r = send(gw, "k", {"topic": t, **changed})
        assert r.status == 422, (r.status, r.body)
        err = r.json()["error"]
        assert err["code"] == "idempotency_key_reused"
        assert err["field"] == "Idempotency-Key"
    assert result(send(gw, "k", {"topic": t, "content": "a"})) == first
    assert stored(gw, t) == 1


def test_keys_are_per_topic(engine_server: Gateway) -> None:
    gw = engine_server
    t1, t2 = gw.topic(), gw.topic()
    a = result(send(gw, "same", {"topic": t1, "content": "x"}))
    b = result(send(gw, "same", {"topic": t2, "content": "y"}))
    assert a["topic"] == t1 and b["topic"] == t2
    assert stored(gw, t1) == stored(gw, t2) == 1


def test_a_bad_key_is_400_naming_the_field(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic()
    for bad in ("has space", "x" * 256, "é"):
        r = send(gw, bad, {"topic": t, "content": "x"})
        assert r.status == 400, (bad, r.status, r.body)
        assert r.json()["error"]["field"] == "Idempotency-Key"
    r = send(gw, None, {"topic": t, "messages": [{"content": "x", "idempotency_key": ""}]}, BATCH)
    assert r.status == 400 and r.json()["error"]["field"] == "messages[0].idempotency_key"
    assert stored(gw, t) == 0


def test_concurrent_retries_while_the_first_is_in_flight_get_its_outcome(
    engine_server: Gateway,
) -> None:
    gw = engine_server
    t = gw.topic(partitions=4)
    body = {"topic": t, "content": "once"}
    calls = [Background(lambda: send(gw, "race", body)) for _ in range(8)]
    results = [result(c.result()) for c in calls]
    assert all(r == results[0] for r in results), results
    assert stored(gw, t) == 1


def test_a_batch_with_per_message_keys_mixes_new_and_seen(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic(partitions=2)
    first = send(
        gw,
        None,
        {
            "topic": t,
            "messages": [
                {"content": "a", "idempotency_key": "a"},
                {"content": "b", "idempotency_key": "b"},
            ],
        },
        BATCH,
    )
    assert first.status == 200, first.body
    [ra, rb] = first.json()["results"]
    again = send(
        gw,
        None,
        {
            "topic": t,
            "messages": [
                {"content": "b", "idempotency_key": "b"},  # seen
                {"content": "c", "idempotency_key": "c"},  # new
                {"content": "plain"},  # no key: always stored
                {"content": "a", "idempotency_key": "a"},  # seen
                {"content": "other", "idempotency_key": "a2"},  # new
            ],
        },
        BATCH,
    )
    assert again.status == 200, again.body
    out = again.json()
    assert out["succeeded"] == 5 and out["failed"] == 0
    res = out["results"]
    assert res[0] == rb and res[3] == ra
    assert len({r["message_id"] for r in res}) == 5
    assert stored(gw, t) == 5  # a, b, c, plain, other
    # the same key with another message fails alone, naming nothing else
    mixed = send(
        gw,
        None,
        {
            "topic": t,
            "messages": [
                {"content": "changed", "idempotency_key": "a"},
                {"content": "d", "idempotency_key": "d"},
            ],
        },
        BATCH,
    ).json()
    assert mixed["failed"] == 1 and mixed["succeeded"] == 1
    assert mixed["results"][0]["error"]["code"] == "idempotency_key_reused"
    assert stored(gw, t) == 6
    # a batch of nothing but reused keys is the 422, naming the message's field
    r = send(gw, None, {"topic": t, "messages": [{"content": "x", "idempotency_key": "b"}]}, BATCH)
    assert r.status == 422, r.body
    assert r.json()["error"]["field"] == "messages[0].idempotency_key"


def test_the_header_on_a_batch_keys_the_batch_as_a_whole(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic(partitions=2)
    body: dict[str, Any] = {"topic": t, "messages": [{"content": f"m{i}"} for i in range(5)]}
    r1 = send(gw, "batch-1", body, BATCH)
    assert r1.status == 200, r1.body
    r2 = send(gw, "batch-1", body, BATCH)
    assert r2.status == 200 and r2.json() == r1.json()
    assert stored(gw, t) == 5
    body["messages"][2]["content"] = "changed"  # another batch under the same key
    r3 = send(gw, "batch-1", body, BATCH)
    assert r3.status == 422, r3.body
    assert r3.json()["error"]["field"] == "Idempotency-Key"
    assert stored(gw, t) == 5
    # a message with its own key is keyed by it, not by the header
    own = {"topic": t, "messages": [{"content": "x", "idempotency_key": "own"}, {"content": "y"}]}
    r4 = send(gw, "batch-2", own, BATCH).json()
    r5 = send(
        gw, "batch-3", own | {"messages": [{"content": "x", "idempotency_key": "own"}]}, BATCH
    )
    assert r5.json()["results"][0] == r4["results"][0]
    assert stored(gw, t) == 7


def test_respond_async_is_ignored_with_a_key(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic()
    hdrs = {"Idempotency-Key": "async", "Prefer": "respond-async"}
    r1 = gw.proc.request("POST", PRODUCE, {"topic": t, "content": "x"}, headers=hdrs)
    r2 = gw.proc.request("POST", PRODUCE, {"topic": t, "content": "x"}, headers=hdrs)
    assert result(r1) == result(r2)
    assert r1.json()["offset"] is not None
    assert stored(gw, t) == 1


def test_a_key_is_new_again_after_the_window(gateway: GatewayFactory) -> None:
    gw = gateway.start(MESSAGE_QUEUE_IDEMPOTENCY_WINDOW="2s")
    t = gw.topic()
    body = {"topic": t, "content": "x"}
    first = result(send(gw, "short", body))
    assert result(send(gw, "short", body)) == first
    time.sleep(2.5)
    later = result(send(gw, "short", body))
    assert later["message_id"] != first["message_id"]
    assert stored(gw, t) == 2
    # ... and that one is remembered in its turn
    assert result(send(gw, "short", body)) == later


def test_keys_survive_a_restart(gateway: GatewayFactory) -> None:
    gw = gateway.start()
    t = gw.topic(partitions=2)
    body = {"topic": t, "content": "durable"}
    first = result(send(gw, unique("k"), body | {"content": "one"}))
    key = unique("k")
    original = result(send(gw, key, body))
    gw.proc.stop()
    again = gateway.restart(gw)
    assert result(send(again, key, body)) == original
    assert stored(again, t) == 2
    assert first["message_id"] != original["message_id"]
    r = send(again, key, body | {"content": "changed"})
    assert r.status == 422, r.body
