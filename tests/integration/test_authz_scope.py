"""What a caller may not read it may not see; what it may not create it may not create.

With authentication on, lists and history show only what the principal has a permission on,
registered consumers belong to their group's grants, and producing to a topic that does not
exist creates it only for a caller that may administer it. With authentication off, everything
stays visible and producing still creates topics.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import MakeServer, MqfastProcess
from tests.integration.test_security import AUTH_ENV, audit_lines, call, token

ADMIN = token("ops", ["admin"])
# produce and consume on orders.* in group billing: the caller of the issue
ORDERS = token(
    "svc-orders",
    grants=[{"topics": "orders.*", "actions": ["produce", "consume"], "groups": ["billing"]}],
)


@pytest.fixture
def secured(make_server: MakeServer) -> MqfastProcess:
    srv = make_server(**AUTH_ENV, MESSAGE_QUEUE_METRICS_INTERVAL="200ms")
    for name in ("orders.eu", "secret"):
        assert call(srv, "POST", "/api/v1/topics", {"name": name}, tok=ADMIN).status == 201
    return srv


def ok(srv: MqfastProcess, method: str, path: str, body: Any = None, tok: str = ADMIN) -> Any:
    r = call(srv, method, path, body, tok=tok)
    assert r.status in (200, 201), f"{method} {path} -> {r.status} {r.body!r}"
    return r.json()


def forbidden(srv: MqfastProcess, method: str, path: str, body: Any = None) -> str:
    r = call(srv, method, path, body, tok=ORDERS)
    assert r.status == 403, f"{method} {path} -> {r.status} {r.body!r}"
    err = r.json()["error"]
    assert err["code"] == "forbidden"
    return str(err["message"])


def names(out: dict[str, Any]) -> set[str]:
    return {t["name"] for t in out["topics"]}


def test_topic_list_shows_only_topics_with_a_grant(secured: MqfastProcess) -> None:
    assert names(ok(secured, "GET", "/api/v1/topics", tok=ORDERS)) == {"orders.eu"}
    assert names(ok(secured, "GET", "/api/v1/topics")) == {"orders.eu", "secret"}
    assert ok(secured, "GET", "/api/v1/topics", tok=token("nobody"))["topics"] == []


def test_metric_history_of_a_topic_without_a_grant_is_403_and_the_rest_is_filtered(
    secured: MqfastProcess,
) -> None:
    for topic in ("orders.eu", "secret"):
        ok(secured, "POST", "/api/v1/messages", {"topic": topic, "content": "x"})
    deadline = time.monotonic() + 15
    while True:
        points = ok(secured, "GET", "/api/v1/metrics")["points"]
        if {"orders.eu", "secret"} <= {p["topic"] for p in points}:
            break
        assert time.monotonic() < deadline, points
        time.sleep(0.1)
    message = forbidden(secured, "GET", "/api/v1/metrics?topic=secret")
    assert "'secret'" in message and "permission" in message
    mine = ok(secured, "GET", "/api/v1/metrics", tok=ORDERS)["points"]
    assert mine and {p["topic"] for p in mine} == {"orders.eu"}
    assert ok(secured, "GET", "/api/v1/metrics?topic=orders.eu", tok=ORDERS)["points"]


def test_consumers_belong_to_their_groups_grants(secured: MqfastProcess) -> None:
    regs = {
        "c-billing": ("billing", ["orders.eu"]),
        "c-billing-secret": ("billing", ["secret"]),  # the group, but not the topic
        "c-analytics": ("analytics", ["orders.eu"]),  # the topic, but not the group
    }
    for cid, (group, topics) in regs.items():
        body = {"consumer_id": cid, "group_id": group, "topics": topics}
        ok(secured, "POST", "/api/v1/consumers", body)
    listed = ok(secured, "GET", "/api/v1/consumers", tok=ORDERS)["consumers"]
    assert [c["consumer_id"] for c in listed] == ["c-billing"]
    by_group = ok(secured, "GET", "/api/v1/consumers?group_id=analytics", tok=ORDERS)
    assert by_group["consumers"] == []
    everyone = ok(secured, "GET", "/api/v1/consumers")["consumers"]
    assert {c["consumer_id"] for c in everyone} == set(regs)
    ok(secured, "GET", "/api/v1/consumers/c-billing", tok=ORDERS)
    ok(secured, "POST", "/api/v1/consumers/c-billing/heartbeat", tok=ORDERS)
    for cid in ("c-billing-secret", "c-analytics"):
        assert cid in forbidden(secured, "GET", f"/api/v1/consumers/{cid}")
        forbidden(secured, "POST", f"/api/v1/consumers/{cid}/heartbeat")
    # a topic admin sees the consumers of its topics
    orders_admin = token("orders-admin", grants=[{"topics": "orders.*", "actions": ["admin"]}])
    listed = ok(secured, "GET", "/api/v1/consumers", tok=orders_admin)["consumers"]
    assert {c["consumer_id"] for c in listed} == {"c-billing", "c-analytics"}


def test_without_authentication_everything_stays_visible(make_server: MakeServer) -> None:
    srv = make_server()
    for name in ("orders.eu", "secret"):
        assert srv.request("POST", "/api/v1/topics", {"name": name}).status == 201
    reg = {"consumer_id": "c", "group_id": "g", "topics": ["secret"]}
    assert srv.request("POST", "/api/v1/consumers", reg).status == 201
    assert names(srv.request("GET", "/api/v1/topics").json()) == {"orders.eu", "secret"}
    assert len(srv.request("GET", "/api/v1/consumers").json()["consumers"]) == 1
    assert srv.request("GET", "/api/v1/consumers/c").status == 200
    assert srv.request("GET", "/api/v1/metrics?topic=secret").status == 200


def test_producing_to_a_new_topic_creates_it_only_with_admin(secured: MqfastProcess) -> None:
    producer = token("svc-p", ["producer"])
    for tok in (ORDERS, producer):
        r = call(
            secured, "POST", "/api/v1/messages", {"topic": "orders.new", "content": "x"}, tok=tok
        )
        assert r.status == 403, r.body
        err = r.json()["error"]
        assert err["code"] == "forbidden" and "'admin'" in err["message"], err
        assert "orders.new" in err["message"] and err["field"] == "topic"
        batch = {"messages": [{"topic": "orders.eu", "content": "x"}], "topic": "orders.new"}
        batch["messages"].append({"content": "y"})
        r = call(secured, "POST", "/api/v1/messages/batch", batch, tok=tok)
        assert r.status == 403, r.body
    assert call(secured, "GET", "/api/v1/topics/orders.new", tok=ADMIN).status == 404
    assert names(ok(secured, "GET", "/api/v1/topics")) == {"orders.eu", "secret"}
    # existing topics are produced to as before
    ok(secured, "POST", "/api/v1/messages", {"topic": "orders.eu", "content": "x"}, tok=producer)
    # with admin on the topic, producing creates it
    creator = token("svc-c", grants=[{"topics": "orders.*", "actions": ["produce", "admin"]}])
    ok(secured, "POST", "/api/v1/messages", {"topic": "orders.new", "content": "x"}, tok=creator)
    assert ok(secured, "GET", "/api/v1/topics/orders.new")["messages"] == 1
    # the refusals are in the audit log, with the topic as their target
    denied = [x for x in audit_lines(secured) if x.get("outcome") == "denied"]
    assert ("svc-p", "/api/v1/messages", "orders.new") in {
        (x["actor"], x["action"], x["target"]) for x in denied
    }


def test_a_denied_produce_is_audited_with_its_topic(secured: MqfastProcess) -> None:
    r = call(secured, "POST", "/api/v1/messages", {"topic": "secret", "content": "x"}, tok=ORDERS)
    assert r.status == 403
    denied = [x for x in audit_lines(secured) if x.get("outcome") == "denied"]
    assert [(x["actor"], x["action"], x["target"]) for x in denied] == [
        ("svc-orders", "/api/v1/messages", "secret")
    ]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/messages/acknowledge", {"message_id": "", "group_id": "g"}, "message_id"),
        (
            "/api/v1/messages/extend",
            {"message_id": "", "group_id": "g", "visibility_timeout": "10s"},
            "message_id",
        ),
        (
            "/api/v1/messages/acknowledge/batch",
            {"group_id": "g", "acks": [{"message_id": "m"}, {"message_id": ""}]},
            "acks[1].message_id",
        ),
    ],
)
def test_an_empty_message_id_is_400_naming_it(
    make_server: MakeServer, path: str, body: dict[str, Any], field: str
) -> None:
    r = make_server().request("POST", path, body)
    assert r.status == 400, r.body
    assert r.json()["error"]["field"] == field


def test_a_consumer_registers_for_at_most_100_topics(secured: MqfastProcess) -> None:
    many = [f"orders.t{i}" for i in range(101)]
    body = {"consumer_id": "c-many", "group_id": "billing", "topics": many}
    r = call(secured, "POST", "/api/v1/consumers", body, tok=ADMIN)
    assert r.status == 400, r.body
    err = r.json()["error"]
    assert err["field"] == "topics" and "100" in err["message"], err
    ok(secured, "POST", "/api/v1/consumers", {**body, "topics": many[:100]})
    # each topic is still checked: admin on orders.* does not cover secret
    orders_admin = token("orders-admin", grants=[{"topics": "orders.*", "actions": ["admin"]}])
    body = {"consumer_id": "c-two", "group_id": "billing", "topics": ["orders.eu", "secret"]}
    r = call(secured, "POST", "/api/v1/consumers", body, tok=orders_admin)
    assert r.status == 403 and "'secret'" in r.json()["error"]["message"], r.body


def test_a_consume_in_another_group_is_no_heartbeat_of_its_consumer(
    secured: MqfastProcess,
) -> None:
    body = {"consumer_id": "c-analytics", "group_id": "analytics", "topics": ["orders.eu"]}
    before = ok(secured, "POST", "/api/v1/consumers", body)["last_seen"]
    time.sleep(0.05)
    ask = {"topic": "orders.eu", "group_id": "billing", "consumer_id": "c-analytics"}
    r = call(secured, "POST", "/api/v1/messages/consume", ask, tok=ORDERS)
    assert r.status == 409, r.body
    assert ok(secured, "GET", "/api/v1/consumers/c-analytics")["last_seen"] == before
    # its own group's consume is a heartbeat, as before
    ok(secured, "POST", "/api/v1/messages/consume", {**ask, "group_id": "analytics"})
    assert ok(secured, "GET", "/api/v1/consumers/c-analytics")["last_seen"] > before


def test_refused_items_of_a_batch_acknowledgement_are_audited(secured: MqfastProcess) -> None:
    ok(secured, "POST", "/api/v1/messages", {"topic": "secret", "content": "x"})
    ask = {"topic": "secret", "group_id": "billing", "consumer_id": "c1", "timeout": "5s"}
    [m] = ok(secured, "POST", "/api/v1/messages/consume", ask)["messages"]
    batch = {"group_id": "billing", "acks": [{"message_id": m["message_id"]}]}
    out = ok(secured, "POST", "/api/v1/messages/acknowledge/batch", batch, tok=ORDERS)
    assert out["results"][0]["error"]["code"] == "forbidden"
    [line] = [x for x in audit_lines(secured) if x.get("outcome") == "denied"]
    assert (line["actor"], line["action"], line["target"]) == (
        "svc-orders",
        "/api/v1/messages/acknowledge/batch",
        "secret",
    )
    assert line["detail"]["refused"] == 1
