"""Settling a message is authorised against the topic it really belongs to, on every engine.

A caller granted ``consume`` on ``orders.*`` with group ``billing`` must not acknowledge, nack,
extend or batch-acknowledge a message of another topic leased in group ``billing``, whether or
not it names a topic: message ids are time-ordered and guessable, so the id is no secret.
"""

from __future__ import annotations

import socket
from typing import Any

from mqfast.auth import make_token
from mqfast.config import Settings
from tests.conformance.conftest import (
    ACK,
    ACK_BATCH,
    CONSUME,
    EXTEND,
    PRODUCE,
    TOPICS,
    Gateway,
    GatewayFactory,
    Reply,
    unique,
)

SECRET = "conformance-authz-secret-0123456789-0123456789"
AUTH_ENV = {"MESSAGE_QUEUE_JWT_SECRET": SECRET}
# Tokens are minted when the module is imported, at collection: they must outlive the whole
# suite (well over the 10 minutes a short life gave), or tests run late fail with 'token expired'.
TEST_TOKEN_TTL_S = 24 * 3600
GROUP = "billing"


def token(sub: str, roles: list[str] | None = None, grants: Any = None) -> dict[str, str]:
    tok = make_token(Settings.from_env(AUTH_ENV), sub, roles, grants, ttl_s=TEST_TOKEN_TTL_S)
    return {"Authorization": f"Bearer {tok}"}


ADMIN = token("ops", ["admin"])
ORDERS = token(
    "svc-orders",
    grants=[{"topics": "orders.*", "actions": ["produce", "consume"], "groups": [GROUP]}],
)


def call(gw: Gateway, path: str, body: Any, who: dict[str, str]) -> Reply:
    return gw.proc.request("POST", path, body, headers=who, timeout=30)


def ok(gw: Gateway, path: str, body: Any, who: dict[str, str] = ADMIN, status: int = 200) -> Any:
    r = call(gw, path, body, who)
    assert r.status == status, f"{path} {body!r} -> {r.status} {r.body!r}"
    return r.json()


def lease(gw: Gateway, topic: str, who: dict[str, str], visibility: str) -> dict[str, Any]:
    ask = {
        "topic": topic,
        "group_id": GROUP,
        "consumer_id": unique("c"),
        "max_messages": 1,
        "timeout": "10s",
        "visibility_timeout": visibility,
    }
    [m] = ok(gw, CONSUME, ask, who)["messages"]
    return dict(m)


def assert_forbidden(r: Reply) -> None:
    assert r.status == 403, r.body
    err = r.json()["error"]
    assert err["code"] == "forbidden"
    assert "'consume'" in err["message"] and GROUP in err["message"]


def test_settling_another_topics_message_is_403_with_or_without_topic(
    gateway: GatewayFactory,
) -> None:
    gw = gateway.start(**AUTH_ENV)
    secret, orders = unique("secret"), f"orders.{unique('o')}"
    for name in (secret, orders):
        ok(gw, TOPICS, {"name": name, "partitions": 1}, status=201)
    ok(gw, PRODUCE, {"topic": secret, "content": "held"})
    ok(gw, PRODUCE, {"topic": secret, "content": "short"})
    ok(gw, PRODUCE, {"topic": orders, "content": "mine"}, ORDERS)
    held = lease(gw, secret, ADMIN, "60s")
    short = lease(gw, secret, ADMIN, "2s")
    mine = lease(gw, orders, ORDERS, "60s")

    for topic in (None, secret):
        named = {} if topic is None else {"topic": topic}
        base = {"message_id": held["message_id"], "group_id": GROUP, **named}
        assert_forbidden(call(gw, ACK, base, ORDERS))
        assert_forbidden(call(gw, ACK, {**base, "success": False}, ORDERS))
        extend = {**base, "message_id": short["message_id"], "visibility_timeout": "1h"}
        assert_forbidden(call(gw, EXTEND, extend, ORDERS))
    # Named as a topic the caller may use, the message is not found there (and not settled).
    wrong = {"message_id": held["message_id"], "group_id": GROUP, "topic": orders}
    assert call(gw, ACK, wrong, ORDERS).status == 404

    # In a batch the caller's own message settles; the other topic's items are 403 items.
    batch = {
        "group_id": GROUP,
        "acks": [
            {"message_id": held["message_id"]},
            {"message_id": mine["message_id"]},
            {"message_id": short["message_id"], "success": False},
        ],
    }
    out = ok(gw, ACK_BATCH, batch, ORDERS)
    assert (out["succeeded"], out["failed"]) == (1, 2), out
    first, second, third = out["results"]
    assert second["status"] == "acknowledged" and second["topic"] == orders
    for item, m in ((first, held), (third, short)):
        assert item["message_id"] == m["message_id"]
        assert item["error"]["code"] == "forbidden", item
        assert secret not in item["error"]["message"]  # nor does it tell whose message it is
    # With topic named, the batch is refused as a whole, as before.
    assert_forbidden(call(gw, ACK_BATCH, {**batch, "topic": secret}, ORDERS))

    # Nothing of the secret topic changed: the held message is still leased (neither acked
    # nor nacked: it acknowledges now, at its first delivery), and the short lease was not
    # extended (it comes back once it runs out).
    r = ok(gw, ACK, {"message_id": held["message_id"], "group_id": GROUP})
    assert (r["status"], r["topic"], r["delivery_count"]) == ("acknowledged", secret, 1), r
    again = lease(gw, secret, ADMIN, "60s")
    assert (again["message_id"], again["delivery_count"]) == (short["message_id"], 2), again


def test_a_stream_needs_consume_on_its_topic_with_its_group(gateway: GatewayFactory) -> None:
    gw = gateway.start(**AUTH_ENV)
    orders, other = f"orders.{unique('t')}", unique("t")
    for name in (orders, other):
        ok(gw, TOPICS, {"name": name, "partitions": 1}, status=201)
    ok(gw, PRODUCE, {"topic": orders, "content": "x"})

    def stream(topic: str, group: str, who: dict[str, str] | None) -> int:
        url = f"/api/v1/messages/stream?topic={topic}&group_id={group}&consumer_id={unique('c')}"
        with socket.create_connection(("127.0.0.1", gw.proc.port), timeout=30) as s:
            auth = "".join(f"{k}: {v}\r\n" for k, v in (who or {}).items())
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(65536)
                assert chunk, head
                head += chunk
        return int(head.split(b" ", 2)[1])

    assert stream(orders, GROUP, ORDERS) == 200
    assert stream(orders, "other-group", ORDERS) == 403
    assert stream(other, GROUP, ORDERS) == 403
    assert stream(orders, GROUP, None) == 401
