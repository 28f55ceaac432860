"""Grants kept in the metadata store, over HTTP, on the embedded engine (SQLite).

Two gateway processes share one data directory (as ``--workers 2`` do, but each on its own port
so that a test can tell which one answers): a grant created or deleted through one is applied
there before it answers, and by the other within seconds (the change counter it reads about
once a second), although the subject's token is cached in both by then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import MakeServer, MqfastProcess
from tests.integration.test_security import AUTH_ENV, call, token

G = "/api/v1/grants"
P = "/api/v1/messages"
C = "/api/v1/messages/consume"
ADMIN = token("ops", ["admin"])
SVC = token("svc-orders")  # no roles, no grants claim
GRANT_ACTIONS = ("POST /api/v1/grants", "DELETE /api/v1/grants/{grant_id}")
GRANT = {"subject": "svc-orders", "topics": "orders.*", "actions": ["produce", "consume"]}


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not in {timeout}s: {what}"
        time.sleep(0.05)


def produce(srv: MqfastProcess, tok: str, topic: str = "orders.eu") -> int:
    return int(call(srv, "POST", P, {"topic": topic, "content": "x"}, tok).status)


def consume(
    srv: MqfastProcess,
    tok: str,
    group: str = "billing",
    topic: str = "orders.eu",
    timeout: str = "0s",
) -> Any:
    ask = {"topic": topic, "group_id": group, "consumer_id": "c1", "timeout": timeout}
    return call(srv, "POST", C, ask, tok)


def audit(srv: MqfastProcess) -> list[dict[str, Any]]:
    r = call(srv, "GET", "/api/v1/audit?limit=10000", tok=ADMIN)
    assert r.status == 200, r.body
    entries: list[dict[str, Any]] = r.json()["entries"]
    return entries


def test_a_stored_grant_applies_on_every_process_and_its_deletion_too(
    make_server: MakeServer, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    a = make_server(data_dir=shared, **AUTH_ENV)
    b = make_server(data_dir=shared, **AUTH_ENV)
    assert call(a, "POST", "/api/v1/topics", {"name": "orders.eu"}, ADMIN).status == 201
    assert call(b, "POST", "/api/v1/topics", {"name": "orders.eu"}, ADMIN).status == 200
    # Refused on both, and the token is now cached by both.
    for srv in (a, b):
        assert produce(srv, SVC) == 403
        assert consume(srv, SVC).status == 403
        assert call(srv, "GET", G, tok=SVC).status == 403  # managing grants: admins only

    r = call(a, "POST", G, {**GRANT, "groups": ["billing"]}, ADMIN)
    assert r.status == 201, r.body
    grant = r.json()
    assert grant["subject"] == "svc-orders" and grant["created_by"] == "ops"
    assert grant["actions"] == ["produce", "consume"] and grant["groups"] == ["billing"]
    # The same grant again is the one stored (actions in another order are the same grant).
    again = {**GRANT, "actions": ["consume", "produce"], "groups": ["billing"]}
    r = call(b, "POST", G, again, ADMIN)
    assert (r.status, r.json()) == (200, grant)
    assert call(b, "GET", f"{G}?subject=svc-orders", tok=ADMIN).json() == {"grants": [grant]}
    assert call(b, "GET", f"{G}?subject=nobody", tok=ADMIN).json() == {"grants": []}

    assert produce(a, SVC) == 200  # the process that made the change, at once
    wait_for(lambda: produce(b, SVC) == 200, "the other process applies the new grant")
    r = consume(b, SVC)
    assert r.status == 200 and r.json()["count"] == 2, r.body
    assert consume(b, SVC, group="other").status == 403  # limited to its groups
    assert produce(b, SVC, topic="payments") == 403  # and to its topics

    r = call(b, "DELETE", f"{G}/{grant['id']}", tok=ADMIN)
    assert r.status == 200, r.body
    assert r.json() == {"id": grant["id"], "subject": "svc-orders", "deleted": True}
    assert produce(b, SVC) == 403
    wait_for(lambda: produce(a, SVC) == 403, "the other process applies the deletion")
    assert consume(a, SVC).status == 403
    r = call(a, "DELETE", f"{G}/{grant['id']}", tok=ADMIN)
    assert r.status == 404 and r.json()["error"]["field"] == "grant_id", r.body
    assert call(a, "GET", G, tok=ADMIN).json() == {"grants": []}

    # Every change is in the audit log, whichever process made it (they share the store).
    def changes() -> list[tuple[str, str, str]]:
        return [
            (e["action"], e["target"], e["outcome"])
            for e in audit(a)
            if e["action"] in GRANT_ACTIONS
        ]

    want = [
        ("POST /api/v1/grants", "svc-orders", "ok"),
        ("POST /api/v1/grants", "svc-orders", "ok"),
        ("DELETE /api/v1/grants/{grant_id}", "svc-orders", "ok"),
        ("DELETE /api/v1/grants/{grant_id}", str(grant["id"]), "failed"),
    ]
    wait_for(lambda: changes() == want, "the grant changes in the audit log")
    entries = [e for e in audit(a) if e["action"] in GRANT_ACTIONS]
    created, same, deleted, missing = entries
    assert created["actor"] == "ops" and created["detail"]["status"] == 201
    assert created["detail"]["grant"] == grant
    assert same["detail"]["status"] == 200
    assert deleted["detail"]["grant"] == grant
    assert missing["detail"]["status"] == 404
    refused = [e for e in audit(a) if e["actor"] == "svc-orders" and e["outcome"] == "denied"]
    assert {e["action"] for e in refused} >= {P, C, G}


def test_bad_grants_are_400_naming_the_field(make_server: MakeServer) -> None:
    srv = make_server(**AUTH_ENV)
    for body, field in (
        ({"topics": "orders.*", "actions": ["produce"]}, "subject"),
        ({**GRANT, "subject": ""}, "subject"),
        ({**GRANT, "subject": "a\nb"}, "subject"),
        ({**GRANT, "actions": ["produce", "publish"]}, "actions[1]"),
        ({**GRANT, "actions": []}, "actions"),
        ({**GRANT, "actions": "produce"}, "actions"),
        ({**GRANT, "topics": "orders.[eu"}, "topics"),
        ({**GRANT, "topics": "orders/eu"}, "topics"),
        ({**GRANT, "topics": ""}, "topics"),
        ({**GRANT, "groups": []}, "groups"),
        ({**GRANT, "groups": ["ok", ""]}, "groups[1]"),
        ({**GRANT, "group": ["billing"]}, "group"),
    ):
        r = call(srv, "POST", G, body, ADMIN)
        assert r.status == 400, (body, r.body)
        assert r.json()["error"]["field"] == field, (body, r.body)
    r = call(srv, "DELETE", f"{G}/abc", tok=ADMIN)
    assert r.status == 400 and r.json()["error"]["field"] == "grant_id", r.body
    r = call(srv, "GET", f"{G}?who=x", tok=ADMIN)
    assert r.status == 400 and r.json()["error"]["field"] == "who", r.body
    assert call(srv, "GET", G, tok=ADMIN).json() == {"grants": []}


def test_claim_and_stored_grants_are_a_union(make_server: MakeServer) -> None:
    srv = make_server(**AUTH_ENV)
    for name in ("logs", "orders.eu"):
        assert call(srv, "POST", "/api/v1/topics", {"name": name}, ADMIN).status == 201
    claims = token("mixed", grants=[{"topics": "logs", "actions": ["produce"]}])
    assert (produce(srv, claims, "logs"), produce(srv, claims, "orders.eu")) == (200, 403)
    stored = {"subject": "mixed", "topics": "orders.eu", "actions": ["produce"]}
    r = call(srv, "POST", G, stored, ADMIN)
    assert r.status == 201, r.body
    assert (produce(srv, claims, "logs"), produce(srv, claims, "orders.eu")) == (200, 200)
    # Deleting the stored grant takes away what it gave, and only that.
    assert call(srv, "DELETE", f"{G}/{r.json()['id']}", tok=ADMIN).status == 200
    assert (produce(srv, claims, "logs"), produce(srv, claims, "orders.eu")) == (200, 403)
    # A stored grant of admin on every topic is cluster-wide administration, as in a claim.
    r = call(srv, "POST", G, {"subject": "mixed", "topics": "*", "actions": ["admin"]}, ADMIN)
    assert r.status == 201, r.body
    assert call(srv, "GET", G, tok=claims).status == 200
