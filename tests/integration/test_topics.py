"""Topic management: create (idempotent), conflicts, info, list, delete, validation."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import MqfastProcess, Reply

TOPICS = "/api/v1/topics"
PRODUCE = "/api/v1/messages"
NS = 1_000_000_000
WEEK_NS = 7 * 24 * 3600 * NS
TWENTY_YEARS_NS = 20 * 365 * 24 * 3600 * NS


@pytest.fixture(scope="module")
def srv(module_server: MqfastProcess) -> MqfastProcess:
    """One default server shared by the module (embedded engine, auto-created topics)."""
    return module_server


def assert_error(r: Reply, status: int, code: str | None = None, field: str | None = None) -> dict:
    assert r.status == status, (r.status, r.body)
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err.get("code"), str) and isinstance(err.get("message"), str), body
    if code is not None:
        assert err["code"] == code, body
    if field is not None:
        assert err.get("field") == field, body
    return err


def names(srv: MqfastProcess) -> list[str]:
    r = srv.request("GET", TOPICS)
    assert r.status == 200, r.body
    return [t["name"] for t in r.json()["topics"]]


def test_create_contract_example_then_idempotent(srv: MqfastProcess) -> None:
    body = {
        "name": "user-events",
        "partitions": 3,
        "replication": 1,
        "retention": "604800000000000",
        "max_size": "1073741824",
    }
    r = srv.request("POST", TOPICS, body)
    assert r.status == 201, r.body
    created = r.json()
    assert created["name"] == "user-events"
    assert created["partitions"] == 3
    assert created["replication"] == 1
    assert created["retention"] == WEEK_NS
    assert created["max_size"] == 1073741824
    assert isinstance(created["created_at"], int) and created["created_at"] > 0

    again = srv.request("POST", TOPICS, body)
    assert again.status == 200, again.body
    assert again.json() == created
    # The same settings in other spellings are the same topic.
    same = {**body, "retention": WEEK_NS, "max_size": 1073741824}
    r = srv.request("POST", TOPICS, same)
    assert r.status == 200, r.body
    r = srv.request("POST", TOPICS, {**body, "retention": "168h"})
    assert r.status == 200, r.body


def test_create_with_go_duration_retention(srv: MqfastProcess) -> None:
    r = srv.request("POST", TOPICS, {"name": "day-topic", "partitions": 2, "retention": "24h"})
    assert r.status == 201, r.body
    assert r.json()["retention"] == 24 * 3600 * NS
    r = srv.request(
        "POST", TOPICS, {"name": "day-topic", "partitions": 2, "retention": str(24 * 3600 * NS)}
    )
    assert r.status == 200, r.body


def test_create_with_defaults(srv: MqfastProcess) -> None:
    r = srv.request("POST", TOPICS, {"name": "defaults"})
    assert r.status == 201, r.body
    out = r.json()
    assert out["partitions"] == 1
    assert out["replication"] == 1
    assert out["retention"] == WEEK_NS  # MESSAGE_QUEUE_RETENTION default 168h
    assert out["max_size"] == 0


@pytest.mark.parametrize(
    "change",
    [{"partitions": 4}, {"retention": "1h"}, {"max_size": "1024"}],
    ids=["partitions", "retention", "max_size"],
)
def test_create_with_different_settings_is_409(srv: MqfastProcess, change: dict[str, Any]) -> None:
    base = {"name": "conflicted", "partitions": 2, "retention": "24h", "max_size": "2048"}
    r = srv.request("POST", TOPICS, base)
    assert r.status in (200, 201), r.body
    r = srv.request("POST", TOPICS, {**base, **change})
    assert_error(r, 409, "topic_exists")
    # The stored settings are unchanged.
    info = srv.request("GET", f"{TOPICS}/conflicted").json()
    assert (info["partitions"], info["retention"], info["max_size"]) == (2, 24 * 3600 * NS, 2048)


def test_get_topic_info(srv: MqfastProcess) -> None:
    r = srv.request("POST", TOPICS, {"name": "info", "partitions": 4})
    assert r.status == 201, r.body
    produced = []
    for i in range(8):
        r = srv.request("POST", PRODUCE, {"topic": "info", "key": f"k{i}", "content": "hello"})
        assert r.status == 200, r.body
        produced.append(r.json()["partition"])
    r = srv.request("GET", f"{TOPICS}/info")
    assert r.status == 200, r.body
    info = r.json()
    for key in ("name", "partitions", "replication", "retention", "max_size", "created_at"):
        assert key in info, info
    assert info["name"] == "info" and info["partitions"] == 4 and info["replication"] == 1
    assert info["messages"] == 8
    assert info["bytes"] == 8 * (len("hello") + len("k0"))
    stats = info["partition_stats"]
    assert [s["partition"] for s in stats] == [0, 1, 2, 3]
    for s in stats:
        assert s["messages"] == produced.count(s["partition"])
        assert s["bytes"] == s["messages"] * 7
        assert s["high_offset"] - s["low_offset"] == s["messages"]
    assert info["consumer_groups"] == []


def test_list_topics(srv: MqfastProcess) -> None:
    for n in ("list-b", "list-a", "list-c"):
        assert srv.request("POST", TOPICS, {"name": n}).status in (200, 201)
    r = srv.request("GET", TOPICS)
    assert r.status == 200
    topics = r.json()["topics"]
    listed = [t["name"] for t in topics]
    assert {"list-a", "list-b", "list-c"} <= set(listed)
    assert listed == sorted(listed)
    entry = next(t for t in topics if t["name"] == "list-a")
    assert entry["partitions"] == 1 and entry["replication"] == 1


def test_delete_topic(srv: MqfastProcess) -> None:
    assert srv.request("POST", TOPICS, {"name": "doomed", "partitions": 2}).status == 201
    for i in range(3):
        assert srv.request("POST", PRODUCE, {"topic": "doomed", "content": f"{i}"}).status == 200
    r = srv.request("DELETE", f"{TOPICS}/doomed")
    assert r.status == 200, r.body
    assert r.json() == {"name": "doomed", "deleted": True}
    assert_error(srv.request("GET", f"{TOPICS}/doomed"), 404, "unknown_topic")
    assert "doomed" not in names(srv)
    assert_error(srv.request("DELETE", f"{TOPICS}/doomed"), 404, "unknown_topic")


def test_recreate_after_delete_starts_fresh(srv: MqfastProcess) -> None:
    assert srv.request("POST", TOPICS, {"name": "phoenix", "partitions": 2}).status == 201
    for i in range(5):
        assert srv.request("POST", PRODUCE, {"topic": "phoenix", "content": f"{i}"}).status == 200
    assert srv.request("DELETE", f"{TOPICS}/phoenix").status == 200
    r = srv.request("POST", TOPICS, {"name": "phoenix", "partitions": 5})
    assert r.status == 201, r.body
    parts = set()
    for i in range(40):
        r = srv.request("POST", PRODUCE, {"topic": "phoenix", "key": f"key-{i}", "content": "x"})
        assert r.status == 200, r.body
        parts.add(r.json()["partition"])
    assert parts <= set(range(5))
    assert max(parts) >= 2, "the hot path still uses the old partition count"
    info = srv.request("GET", f"{TOPICS}/phoenix").json()
    assert info["partitions"] == 5 and info["messages"] == 40


def test_produce_after_delete_auto_creates_again(srv: MqfastProcess) -> None:
    assert srv.request("POST", PRODUCE, {"topic": "again", "content": "1"}).status == 200
    assert srv.request("DELETE", f"{TOPICS}/again").status == 200
    r = srv.request("POST", PRODUCE, {"topic": "again", "content": "2"})
    assert r.status == 200, r.body
    assert r.json()["offset"] == 0
    assert srv.request("GET", f"{TOPICS}/again").json()["messages"] == 1


def test_replication_above_one_on_embedded_engine(srv: MqfastProcess) -> None:
    r = srv.request("POST", TOPICS, {"name": "replicated", "partitions": 3, "replication": 3})
    assert_error(r, 400, "invalid_field", "replication")
    assert "replicated" not in names(srv)


@pytest.mark.parametrize(
    "name",
    ["bad name", "a/b", "x" * 250, ".", "..", "", "ümlaut", "a*b"],
    ids=["space", "slash", "250-chars", "dot", "dotdot", "empty", "non-ascii", "star"],
)
def test_create_invalid_name(srv: MqfastProcess, name: str) -> None:
    assert_error(srv.request("POST", TOPICS, {"name": name}), 400, "invalid_field", "name")
    assert name not in names(srv)


def test_longest_valid_name(srv: MqfastProcess) -> None:
    assert srv.request("POST", TOPICS, {"name": "n" * 249}).status == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "v", "partitions": 0}, "partitions"),
        ({"name": "v", "partitions": -1}, "partitions"),
        ({"name": "v", "partitions": 1025}, "partitions"),
        ({"name": "v", "partitions": "3"}, "partitions"),
        ({"name": "v", "partitions": 1.5}, "partitions"),
        ({"name": "v", "replication": 0}, "replication"),
        ({"name": "v", "replication": "1"}, "replication"),
        ({"name": "v", "retention": "-1s"}, "retention"),
        ({"name": "v", "retention": -1}, "retention"),
        ({"name": "v", "retention": "abc"}, "retention"),
        ({"name": "v", "retention": TWENTY_YEARS_NS}, "retention"),
        ({"name": "v", "retention": "175200h"}, "retention"),
        ({"name": "v", "retention": 1.5}, "retention"),
        ({"name": "v", "max_size": "abc"}, "max_size"),
        ({"name": "v", "max_size": -1}, "max_size"),
        ({"name": "v", "max_size": "-1"}, "max_size"),
        ({"name": "v", "max_size": 1.5}, "max_size"),
        ({"name": "v", "max_size": "²"}, "max_size"),  # str.isdigit() is true, int() fails
        ({"name": "v", "retention": "²"}, "retention"),
        ({"name": 5}, "name"),
        ({"partitions": 1}, "name"),
        ({"name": "v", "partitons": 1}, "partitons"),
    ],
)
def test_create_invalid_settings(srv: MqfastProcess, body: dict[str, Any], field: str) -> None:
    assert_error(srv.request("POST", TOPICS, body), 400, "invalid_field", field)
    assert "v" not in names(srv)


@pytest.mark.parametrize("body", [b"{", b"nope", b""])
def test_create_malformed_json(srv: MqfastProcess, body: bytes) -> None:
    assert_error(srv.request("POST", TOPICS, body), 400, "malformed_json")


def test_get_unknown_topic(srv: MqfastProcess) -> None:
    assert_error(srv.request("GET", f"{TOPICS}/no-such-topic"), 404, "unknown_topic")


@pytest.mark.parametrize("path", ["bad%20name", "a%2Fb", "x" * 250, "%C3%BC"])
def test_get_and_delete_with_invalid_name(srv: MqfastProcess, path: str) -> None:
    assert_error(srv.request("GET", f"{TOPICS}/{path}"), 400, "invalid_field")
    assert_error(srv.request("DELETE", f"{TOPICS}/{path}"), 400, "invalid_field")
