"""Grants kept in PostgreSQL reach every replica of the Kafka engine (LISTEN/NOTIFY).

Two gateways share one Kafka, Redis and PostgreSQL. The subject's token is cached by both
before each change: the replica that did not make the change must drop it within seconds.
"""

from __future__ import annotations

from tests.cluster.conftest import Replicas
from tests.conformance.conftest import unique
from tests.integration.test_grants import ADMIN, GRANT_ACTIONS, G, audit, consume, produce, wait_for
from tests.integration.test_security import AUTH_ENV, call, token


def test_a_grant_created_and_deleted_through_one_replica_applies_on_the_other(
    replicas: Replicas,
) -> None:
    a, b = (gw.proc for gw in replicas(2, **AUTH_ENV))
    # The session's Kafka and PostgreSQL outlive this test: a topic and a subject of its own.
    topic, subject = f"orders.{unique('eu')}", unique("svc")
    svc = token(subject)
    assert call(a, "POST", "/api/v1/topics", {"name": topic}, ADMIN).status == 201
    for srv in (a, b):
        assert produce(srv, svc, topic) == 403
        assert consume(srv, svc, topic=topic).status == 403

    grant = {"subject": subject, "topics": "orders.*", "actions": ["produce", "consume"]}
    r = call(a, "POST", G, grant, ADMIN)
    assert r.status == 201, r.body
    grant_id = r.json()["id"]
    assert produce(a, svc, topic) == 200
    wait_for(lambda: produce(b, svc, topic) == 200, "replica B applies the new grant")
    got = consume(b, svc, topic=topic, timeout="5s")
    assert got.status == 200 and got.json()["count"] >= 1, got.body

    r = call(a, "DELETE", f"{G}/{grant_id}", tok=ADMIN)
    assert r.status == 200, r.body
    assert produce(a, svc, topic) == 403
    wait_for(lambda: produce(b, svc, topic) == 403, "replica B applies the deletion")
    assert consume(b, svc, topic=topic).status == 403
    assert call(b, "DELETE", f"{G}/{grant_id}", tok=ADMIN).status == 404

    def changes() -> list[tuple[str, str]]:
        return [
            (e["action"], e["outcome"])
            for e in audit(b)
            if e["action"] in GRANT_ACTIONS and e["target"] in (subject, str(grant_id))
        ]

    wait_for(
        lambda: (
            changes()
            == [
                ("POST /api/v1/grants", "ok"),
                ("DELETE /api/v1/grants/{grant_id}", "ok"),
                ("DELETE /api/v1/grants/{grant_id}", "failed"),
            ]
        ),
        "the changes in the shared audit log",
    )
