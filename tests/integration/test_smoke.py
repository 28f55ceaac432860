"""The contract's curl examples, as printed in the README, against a started server."""

from __future__ import annotations

from tests.conftest import MqfastProcess


def test_contract_produce_example(server: MqfastProcess) -> None:
    r = server.request("POST", "/api/v1/messages", {"topic": "test", "content": "Hello World"})
    assert r.status == 200, r.body
    body = r.json()
    assert body["topic"] == "test" and body["partition"] == 0 and body["offset"] == 0
    assert len(body["message_id"]) == 36
    h = server.request("GET", "/health")
    assert h.status == 200 and h.json()["status"] == "ok"
