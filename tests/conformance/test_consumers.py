"""Registered consumers: contract fields, heartbeat, max_concurrency, rate_limit, inactivity."""

from __future__ import annotations

import time
from typing import Any

from tests.conformance.conftest import (
    CONSUME,
    CONSUMERS,
    Background,
    Gateway,
    GatewayFactory,
    now_ms,
    unique,
    wait_for,
)


def register(gw: Gateway, status: int = 201, **fields: Any) -> dict[str, Any]:
    body = {"consumer_id": unique("c"), "group_id": "g", "topics": ["t"], **fields}
    out: dict[str, Any] = gw.ok("POST", CONSUMERS, body, status=status)
    return out


def test_register_get_list_heartbeat_delete(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic()
    # unique ids and groups: a cluster's metadata store outlives one gateway
    r1, r2, ga, gb = unique("reg"), unique("reg"), unique("ga"), unique("gb")
    before = now_ms()
    c = register(gw, consumer_id=r1, group_id=ga, topics=[t], max_concurrency=3)
    after = now_ms()
    assert c["consumer_id"] == r1
    assert c["group_id"] == ga
    assert c["topics"] == [t]
    assert c["max_concurrency"] == 3
    assert c["rate_limit"] is None
    assert c["active"] is True
    assert before <= c["registered_at"] <= after
    assert before <= c["last_seen"] <= after
    # registering again is idempotent (200) and may change the limits
    c2 = register(gw, status=200, consumer_id=r1, group_id=ga, topics=[t], rate_limit=5.0)
    assert c2["rate_limit"] == 5.0
    register(gw, consumer_id=r2, group_id=gb, topics=[t])

    got = gw.ok("GET", f"{CONSUMERS}/{r1}")
    assert got["consumer_id"] == r1 and got["group_id"] == ga
    listed = {x["consumer_id"] for x in gw.ok("GET", CONSUMERS)["consumers"]}
    assert {r1, r2} <= listed
    only = gw.ok("GET", f"{CONSUMERS}?group_id={gb}")["consumers"]
    assert [x["consumer_id"] for x in only] == [r2]

    hb = gw.ok("POST", f"{CONSUMERS}/{r1}/heartbeat")
    assert hb["consumer_id"] == r1 and hb["active"] is True
    assert hb["last_seen"] >= after
    assert gw.ok("GET", f"{CONSUMERS}/{r1}")["last_seen"] >= hb["last_seen"]

    out = gw.ok("DELETE", f"{CONSUMERS}/{r1}")
    assert out["deleted"] is True
    assert gw.call("GET", f"{CONSUMERS}/{r1}").status == 404
    assert gw.call("DELETE", f"{CONSUMERS}/{r1}").status == 404
    assert gw.call("POST", f"{CONSUMERS}/{r1}/heartbeat").status == 404
    assert gw.call("GET", f"{CONSUMERS}/never-registered").status == 404


def test_registration_is_validated(engine_server: Gateway) -> None:
    gw = engine_server
    base = {"consumer_id": "v", "group_id": "g", "topics": ["t"]}
    for bad in (
        {"topics": []},
        {"topics": ["bad name"]},
        {"max_concurrency": 0},
        {"rate_limit": 0},
        {"consumer_id": ""},
        {"group_id": ""},
        {"maxConcurrency": 2},
    ):
        r = gw.call("POST", CONSUMERS, {**base, **bad})
        assert r.status == 400, (bad, r.status, r.body)


def test_ids_are_any_characters_but_controls(engine_server: Gateway) -> None:
    # Found by schemathesis: the document allows every character but C0/C1 controls, the server
    # refused more (no-break space, format characters, unassigned code points).
    gw = engine_server
    for odd in ("a\u00a0b", "zero\u200bwidth", "\U0007641f", "ÇčļĳH", "x y"):
        cid, topic = f"{unique('c')}{odd}", gw.topic()
        out = register(gw, consumer_id=cid, group_id=odd, topics=[topic])
        assert out["consumer_id"] == cid and out["group_id"] == odd
        consume = {"topic": topic, "group_id": odd, "consumer_id": cid}
        assert gw.ok("POST", CONSUME, consume)["count"] == 0
    for bad in ("a\x00", "tab\t", "del\x7f", "c1\x85", "\x9f"):
        for field in ("consumer_id", "group_id"):
            body = {"consumer_id": "v", "group_id": "g", "topics": ["t"], field: bad}
            r = gw.call("POST", CONSUMERS, body)
            assert r.status == 400 and r.json()["error"]["field"] == field, (bad, r.body)


def test_consume_in_another_group_than_registered_is_409(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic()
    c = register(gw, group_id="home", topics=[t])
    gw.produce(t)
    r = gw.consume_reply(t, "elsewhere", c["consumer_id"], timeout="100ms")
    assert r.status == 409, r.body
    assert len(gw.consume(t, "home", c["consumer_id"], timeout="5s")) == 1


def test_max_concurrency_caps_unacknowledged_leases(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic(partitions=2)
    c = register(gw, group_id="g", topics=[t], max_concurrency=2)["consumer_id"]
    gw.produce_many(t, 6)
    first = gw.consume(t, "g", c, max_messages=10, timeout="5s")
    assert len(first) == 2
    assert gw.consume(t, "g", c, max_messages=10, timeout="300ms") == []
    # another consumer of the group is not limited by c's cap
    other = gw.consume(t, "g", "free", max_messages=1, timeout="5s")
    assert len(other) == 1
    # a long-poll at the cap is answered when an acknowledgement frees a slot
    poll = Background(lambda: gw.consume(t, "g", c, max_messages=10, timeout="15s"))
    time.sleep(0.3)
    gw.ack(first[0]["message_id"], "g", consumer=c)
    more = poll.result()
    assert len(more) == 1
    assert poll.finished is not None and poll.finished - poll.started < 12
    # a failed delivery frees its slot too
    gw.nack(first[1]["message_id"], "g", consumer=c)
    again = gw.consume_until(t, "g", c, 1)
    assert len(again) == 1
    assert gw.consume(t, "g", c, max_messages=10, timeout="300ms") == []


def test_rate_limit_caps_deliveries_per_second(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic()
    rate = 4.0
    c = register(gw, group_id="g", topics=[t], rate_limit=rate)["consumer_id"]
    gw.produce_many(t, 60)
    got = 0
    start = time.monotonic()
    while time.monotonic() - start < 2.5:
        batch = gw.consume(t, "g", c, max_messages=50, timeout="200ms")
        for m in batch:
            gw.ack(m["message_id"], "g")
        got += len(batch)
    elapsed = time.monotonic() - start
    # a bucket of one second's worth, refilled at the rate: a cap, not a speed
    assert got <= rate + rate * elapsed + 1, (got, elapsed)
    assert got >= 1
    # the limit is per consumer: an unregistered one takes the rest at once
    rest = gw.consume(t, "g", "unlimited", max_messages=100, timeout="2s")
    assert len(rest) == 60 - got


def test_silent_consumer_goes_inactive_and_its_leases_are_released(
    gateway: GatewayFactory,
) -> None:
    gw = gateway.start()  # alone on its server: the active-consumer gauge is exact
    t = gw.topic()
    quiet = register(gw, group_id="g", topics=[t])["consumer_id"]
    alive = register(gw, group_id="g", topics=[t])["consumer_id"]
    wait_for(
        lambda: gw.metric("message_queue_active_consumers") == 2,
        what="two active consumers",
    )
    p = gw.produce(t, "held")
    [m] = gw.consume(t, "g", quiet, timeout="5s", visibility="60s")
    assert m["message_id"] == p["message_id"]

    # `alive` keeps beating; `quiet` says nothing past the 2 s consumer timeout
    def beat_and_check() -> bool:
        gw.ok("POST", f"{CONSUMERS}/{alive}/heartbeat")
        return gw.ok("GET", f"{CONSUMERS}/{quiet}")["active"] is False

    wait_for(beat_and_check, timeout=20, every=0.3, what="the silent consumer inactive")
    assert gw.ok("GET", f"{CONSUMERS}/{alive}")["active"] is True
    wait_for(
        lambda: gw.metric("message_queue_active_consumers") == 1,
        every=0.2,
        what="the gauge to drop to one",
    )
    # its lease was released long before the 60 s visibility
    [again] = gw.consume(t, "g", alive, timeout="10s")
    assert again["message_id"] == m["message_id"]
    assert again["delivery_count"] >= 2
    assert gw.ack_reply(m["message_id"], "g", consumer=quiet).status == 409
    assert gw.ack(again["message_id"], "g", consumer=alive)["status"] == "acknowledged"

    # a heartbeat (or a consume) makes it active again
    gw.ok("POST", f"{CONSUMERS}/{quiet}/heartbeat")
    assert gw.ok("GET", f"{CONSUMERS}/{quiet}")["active"] is True


def test_deleting_a_consumer_releases_its_leases(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic()
    c = register(gw, group_id="g", topics=[t])["consumer_id"]
    gw.produce_many(t, 2)
    held = gw.consume_until(t, "g", c, 2, visibility="60s")
    out = gw.ok("DELETE", f"{CONSUMERS}/{c}")
    assert out["released"] == 2
    back = gw.consume_until(t, "g", "heir", 2)
    assert {m["message_id"] for m in back} == {m["message_id"] for m in held}


def test_health_reports_the_groups_behind(gateway: GatewayFactory) -> None:
    gw = gateway.start(MESSAGE_QUEUE_HEALTH_MAX_LAG="3")
    t = gw.topic()
    gw.produce_many(t, 5)
    [first] = gw.consume(t, "slow", "c1", max_messages=1, timeout="5s")
    gw.consume_until(t, "quick", "c1", 5, ack=True)
    started = gw.ok("GET", "/health")["consumer_groups"]["checked_at"] or ""

    def behind() -> dict[str, Any] | None:
        r = gw.call("GET", "/health")
        assert r.status == 200, r.body
        health: dict[str, Any] = r.json()["consumer_groups"]
        mine = [b for b in health.get("behind", []) if b["topic"] == t]
        # Both groups seen, after both consumed (the summary is refreshed every interval).
        seen = health.get("groups", 0) >= 2 and health["checked_at"] > started
        return health if health["status"] == "behind" and mine and seen else None

    health = wait_for(behind, timeout=20, every=0.3, what="group 'slow' listed behind")
    assert health["max_lag"] == 3
    [slow] = [b for b in health["behind"] if b["topic"] == t]
    assert (slow["group_id"], slow["lag"], slow["reasons"]) == ("slow", 5, ["lag"])
    assert slow["expired_leases"] == 0 and 0 <= slow["oldest_unacked_age_s"] < 300
    assert health["behind_total"] >= 1
    # Caught up: no longer listed.
    gw.ack(first["message_id"], "slow")
    gw.consume_until(t, "slow", "c1", 4, ack=True)
    wait_for(
        lambda: not [b for b in gw.ok("GET", "/health")["consumer_groups"].get("behind", [t])
                     if b == t or b["topic"] == t],
        timeout=20, every=0.3, what="group 'slow' caught up",
    )  # fmt: skip


def test_health_reports_old_unacknowledged_deliveries_and_expired_leases(
    gateway: GatewayFactory,
) -> None:
    gw = gateway.start(MESSAGE_QUEUE_HEALTH_MAX_UNACKED_AGE="1s")
    t = gw.topic()
    gw.produce_many(t, 3)
    leased = gw.consume(t, "stuck", "c1", max_messages=2, timeout="5s", visibility="1s")
    assert len(leased) == 2
    leased_at = now_ms()

    def stuck() -> dict[str, Any] | None:
        health: dict[str, Any] = gw.ok("GET", "/health")["consumer_groups"]
        mine = [b for b in health.get("behind", []) if b["topic"] == t]
        return mine[0] if mine and mine[0]["expired_leases"] == 2 else None

    # Nobody consumes in the group again, so the two expired leases stay unreclaimed.
    entry = wait_for(stuck, timeout=20, every=0.3, what="two expired leases reported")
    assert entry["group_id"] == "stuck" and entry["lag"] == 3
    assert entry["reasons"] == ["unacked_age", "expired_leases"]
    assert 1 < entry["oldest_unacked_age_s"] <= (now_ms() - leased_at) / 1000 + 1
    health = gw.ok("GET", "/health")
    assert health["status"] == "ok"  # the consumers' trouble, not the gateway's
    assert health["consumer_groups"]["expired_leases"] >= 2
    assert health["consumer_groups"]["max_unacked_age_s"] == 1
