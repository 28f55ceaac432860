"""The OpenAPI document (src/mqfast/openapi.json) against the router and real responses.

The document is checked for structure (OpenAPI 3.1, every ``$ref`` resolves, exactly the routes of
``api.ROUTES`` but the web console's files), the contract's example requests must validate against
its request schemas, and every (path, method, status) it documents is produced by a real server
here and the body validated against the documented schema (JSON Schema 2020-12, refs resolved in
the document).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from mqfast import __version__
from mqfast.api import ROUTES
from tests.conftest import MakeServer, MqfastProcess, Reply

DOC: dict[str, Any] = json.loads(
    resources.files("mqfast").joinpath("openapi.json").read_text(encoding="utf-8")
)
BASE = "https://mqfast.invalid/openapi.json"
REGISTRY = Registry().with_resource(BASE, DRAFT202012.create_resource(DOC))
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
JSON = "application/json"

# The contract's example requests (docs: message-queue-service.md), verbatim.
CONTRACT_PRODUCE = {
    "topic": "user-events",
    "key": "user-123",
    "content": '{"event":"login","user_id":"123"}',
    "headers": {"source": "auth-service"},
    "priority": 1,
    "ttl": "3600000000000",
}
CONTRACT_CREATE_TOPIC = {
    "name": "user-events",
    "partitions": 3,
    "replication": 3,
    "retention": "604800000000000",
    "max_size": "1073741824",
}

CONTRACT_CONSUME = {
    "topic": "user-events",
    "group_id": "user-processor",
    "consumer_id": "consumer-1",
    "max_messages": 10,
    "timeout": "30000000000",
}
CONTRACT_ACK = {
    "message_id": "msg-12345",
    "topic": "user-events",
    "success": True,
    "group_id": "user-processor",
}
CONTRACT_REGISTER = {
    "consumer_id": "consumer-1",
    "group_id": "user-processor",
    "topics": ["user-events", "order-events"],
    "max_concurrency": 5,
    "rate_limit": 100,
}
CONTRACT_METRICS_QUERY = (
    "start_time=2024-01-01T00:00:00Z&end_time=2024-01-02T00:00:00Z&topic=user-events"
)
# The headers a dead letter carries (sinks/embedded_groups.py); the document must name them all.
DLQ_HEADERS = {
    f"x-mqfast-dlq-{h}"
    for h in (
        "topic",
        "partition",
        "offset",
        "message-id",
        "group",
        "delivery-count",
        "error",
        "reason",
        "time",
    )
}

Key = tuple[str, str, int]  # (path template, method, status)
# The routes the document describes: all but the web console's files (pages, not API).
API_ROUTES = [(path, methods) for path, methods in ROUTES if not path.startswith("/console")]


# ---- document helpers ------------------------------------------------------------------------


def _esc(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _at(pointer: str) -> Any:
    node: Any = DOC
    for raw in pointer.lstrip("/").split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _follow(pointer: str) -> tuple[str, Any]:
    """``(pointer, node)`` after following ``$ref`` chains from ``pointer``."""
    node = _at(pointer)
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        pointer = ref[1:]
        node = _at(pointer)
    return pointer, node


def _response(path: str, method: str, status: int) -> tuple[str, dict[str, Any]]:
    ptr = f"/paths/{_esc(path)}/{method.lower()}/responses/{status}"
    try:
        return _follow(ptr)
    except KeyError:
        raise AssertionError(f"{method} {path} -> {status} is not documented") from None


def _validator(schema_pointer: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"{BASE}#{schema_pointer}"},
        registry=REGISTRY,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def _errors_of(validator: Draft202012Validator, instance: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]


def _operations() -> list[tuple[str, str]]:
    return [(p, m) for p, item in DOC["paths"].items() for m in item if m in METHODS]


def documented() -> set[Key]:
    return {
        (p, m.upper(), int(s)) for p, m in _operations() for s in DOC["paths"][p][m]["responses"]
    }


def check(reply: Reply, path: str, method: str, status: int) -> Key:
    """Assert ``reply`` has ``status`` and matches the document; returns the key it covers."""
    assert reply.status == status, (method, path, reply.status, reply.body[:500])
    ptr, resp = _response(path, method, status)
    assert reply.headers.get("content-type") == JSON
    assert JSON in resp["content"], (path, method, status)
    errors = _errors_of(_validator(f"{ptr}/content/{_esc(JSON)}/schema"), json.loads(reply.body))
    assert not errors, (method, path, status, errors, reply.body[:500])
    for name, header in resp.get("headers", {}).items():
        _, header = _follow(f"{ptr}/headers/{_esc(name)}")
        if header.get("required") or name.lower() == "retry-after":
            assert name.lower() in reply.headers, (method, path, status, name, reply.headers)
    return (path, method, status)


# ---- raw HTTP --------------------------------------------------------------------------------


def parse_raw(data: bytes) -> Reply:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Reply(status, headers, rest[: int(headers["content-length"])])


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def raw(srv: MqfastProcess, data: bytes) -> Reply:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(data)
        return parse_raw(read_all(s))


def concrete(path: str) -> str:
    return (
        path.replace("{name}", "some-topic")
        .replace("{consumer_id}", "some-consumer")
        .replace("{grant_id}", "1")
    )


# ---- the document itself ---------------------------------------------------------------------


def test_served_document_is_the_packaged_file(server: MqfastProcess) -> None:
    r = server.request("GET", "/openapi.json")
    assert r.status == 200
    assert r.headers["content-type"] == JSON
    assert r.json() == DOC


def test_document_structure() -> None:
    assert DOC["openapi"] == "3.1.0"
    assert DOC["info"]["title"] == "mqfast"
    assert DOC["info"]["version"] == __version__
    assert DOC["servers"][0]["url"] == "http://localhost:8087"

    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(DOC)
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        _at(ref[1:])  # raises when it does not resolve

    routed = {path: {m.lower() for m in methods} for path, methods in API_ROUTES}
    in_doc = {p: {m for m in item if m in METHODS} for p, item in DOC["paths"].items()}
    assert in_doc == routed

    for name in DOC["components"]["schemas"]:
        Draft202012Validator.check_schema(DOC["components"]["schemas"][name])
    for path, method in _operations():
        op = DOC["paths"][path][method]
        assert op["responses"], (path, method)
        assert op.get("operationId"), (path, method)
        for status in op["responses"]:
            ptr, resp = _response(path, method, int(status))
            assert resp["description"]
            _validator(f"{ptr}/content/{_esc(JSON)}/schema")  # the schema pointer exists
            headers = {h.lower() for h in resp.get("headers", {})}
            if status == "405":
                assert "allow" in headers
            if status == "503" and path not in ("/health", "/health/ready"):
                assert "retry-after" in headers
        for param in op.get("parameters", []) + DOC["paths"][path].get("parameters", []):
            if "$ref" in param:
                _follow(param["$ref"][1:])
        if "{" in path:
            params = [_follow(p["$ref"][1:])[1] for p in DOC["paths"][path]["parameters"]]
            in_path = {p["name"] for p in params if p["in"] == "path"}
            assert in_path == set(re.findall(r"\{(\w+)\}", path)), path

    for path in ("/api/v1/messages", "/api/v1/messages/batch"):
        params = [_follow(p["$ref"][1:])[1] for p in DOC["paths"][path]["post"]["parameters"]]
        assert any(p["in"] == "header" and p["name"] == "Prefer" for p in params)


def _request_schema(path: str) -> Draft202012Validator:
    return _validator(f"/paths/{_esc(path)}/post/requestBody/content/{_esc(JSON)}/schema")


def test_contract_examples_validate_against_request_schemas() -> None:
    produce = _request_schema("/api/v1/messages")
    create = _request_schema("/api/v1/topics")
    batch = _request_schema("/api/v1/messages/batch")
    assert not _errors_of(produce, CONTRACT_PRODUCE)
    assert not _errors_of(produce, {"topic": "test", "content": "Hello World"})  # the curl one
    assert not _errors_of(create, CONTRACT_CREATE_TOPIC)
    # The document's own examples validate too, on every route with a body.
    for path, method in _operations():
        if "requestBody" not in DOC["paths"][path][method]:
            continue
        validator = _validator(
            f"/paths/{_esc(path)}/{method}/requestBody/content/{_esc(JSON)}/schema"
        )
        media = DOC["paths"][path][method]["requestBody"]["content"][JSON]
        assert media["examples"], (path, method)
        for name, example in media["examples"].items():
            assert not _errors_of(validator, example["value"]), (path, name)
    # The constraints the server enforces are in the schemas.
    for bad in (
        {**CONTRACT_PRODUCE, "priority": 10},
        {**CONTRACT_PRODUCE, "priority": -1},
        {**CONTRACT_PRODUCE, "priorty": 1},
        {**CONTRACT_PRODUCE, "ttl": "soon"},
        {**CONTRACT_PRODUCE, "ttl": -1},
        {**CONTRACT_PRODUCE, "topic": "bad name"},
        {"topic": "t"},
    ):
        assert _errors_of(produce, bad), bad
    for bad in (
        {**CONTRACT_CREATE_TOPIC, "partitions": 0},
        {**CONTRACT_CREATE_TOPIC, "partitions": 1025},
        {**CONTRACT_CREATE_TOPIC, "replication": 17},
        {**CONTRACT_CREATE_TOPIC, "retention": "1 week"},
        {**CONTRACT_CREATE_TOPIC, "extra": True},
        {"name": ".."},
    ):
        assert _errors_of(create, bad), bad
    assert _errors_of(batch, {"messages": []})
    assert _errors_of(batch, {"messages": [{"content": "x", "priority": 10}]})
    assert not _errors_of(batch, {"topic": "t", "messages": [{"content": "x", "ttl": "1h30m"}]})


def test_contract_examples_of_consumer_routes() -> None:
    consume = _request_schema("/api/v1/messages/consume")
    ack = _request_schema("/api/v1/messages/acknowledge")
    ack_batch = _request_schema("/api/v1/messages/acknowledge/batch")
    extend = _request_schema("/api/v1/messages/extend")
    register = _request_schema("/api/v1/consumers")
    redrive = _request_schema("/api/v1/topics/{name}/redrive")
    assert not _errors_of(consume, CONTRACT_CONSUME)
    assert not _errors_of(ack, CONTRACT_ACK)
    assert not _errors_of(register, CONTRACT_REGISTER)
    for example, path in (
        (CONTRACT_CONSUME, "/api/v1/messages/consume"),
        (CONTRACT_ACK, "/api/v1/messages/acknowledge"),
        (CONTRACT_REGISTER, "/api/v1/consumers"),
    ):
        media = DOC["paths"][path]["post"]["requestBody"]["content"][JSON]
        assert media["examples"]["contract"]["value"] == example, path
    # The metrics query: every parameter is documented and its value valid.
    params: dict[str, tuple[str, dict[str, Any]]] = {}
    for q in DOC["paths"]["/api/v1/metrics"]["get"]["parameters"]:
        ptr, param = _follow(q["$ref"][1:])
        params[param["name"]] = (ptr, param)
    for pair in CONTRACT_METRICS_QUERY.split("&"):
        name, _, value = pair.partition("=")
        ptr, param = params[name]
        assert param["in"] == "query", name
        assert not _errors_of(_validator(f"{ptr}/schema"), value), name
    assert _errors_of(_validator(f"{params['start_time'][0]}/schema"), "yesterday")
    assert _errors_of(_validator(f"{params['topic'][0]}/schema"), "bad name")
    # Durations in their three forms; the server's ranges.
    for timeout in (30_000_000_000, "30000000000", "30s", "1m30s", None):
        assert not _errors_of(consume, {**CONTRACT_CONSUME, "timeout": timeout}), timeout
    for bad in (
        {**CONTRACT_CONSUME, "max_messages": 0},
        {**CONTRACT_CONSUME, "max_messages": 1001},
        {**CONTRACT_CONSUME, "max_messages": None},
        {**CONTRACT_CONSUME, "timeout": "soon"},
        {**CONTRACT_CONSUME, "timeout": -1},
        {**CONTRACT_CONSUME, "visibility_timeout": "1 minute"},
        {**CONTRACT_CONSUME, "group": "g"},
        {**CONTRACT_CONSUME, "group_id": ""},
        {**CONTRACT_CONSUME, "topic": "bad name"},
        {"topic": "t", "group_id": "g"},
    ):
        assert _errors_of(consume, bad), bad
    assert not _errors_of(consume, {**CONTRACT_CONSUME, "max_messages": 1000})
    for bad in (
        {**CONTRACT_ACK, "succes": True},
        {**CONTRACT_ACK, "error": "x" * 4097},
        {**CONTRACT_ACK, "requeue_delay": "later"},
        {**CONTRACT_ACK, "success": None},
        {"message_id": "m"},
    ):
        assert _errors_of(ack, bad), bad
    assert not _errors_of(ack, {**CONTRACT_ACK, "success": False, "requeue_delay": "250ms"})
    assert not _errors_of(ack_batch, {"group_id": "g", "acks": [{"message_id": "m"}]})
    for bad in (
        {"group_id": "g", "acks": []},
        {"group_id": "g", "acks": [{"message_id": "m", "group_id": "g"}]},
        {"acks": [{"message_id": "m"}]},
    ):
        assert _errors_of(ack_batch, bad), bad
    assert not _errors_of(extend, {"message_id": "m", "group_id": "g", "visibility_timeout": "1m"})
    assert _errors_of(extend, {"message_id": "m", "group_id": "g"})
    for bad in (
        {**CONTRACT_REGISTER, "topics": []},
        {**CONTRACT_REGISTER, "topics": ["bad name"]},
        {**CONTRACT_REGISTER, "max_concurrency": 0},
        {**CONTRACT_REGISTER, "max_concurrency": 100_001},
        {**CONTRACT_REGISTER, "rate_limit": 0},
        {**CONTRACT_REGISTER, "extra": 1},
    ):
        assert _errors_of(register, bad), bad
    assert not _errors_of(redrive, {}) and not _errors_of(redrive, {"max_messages": 100_000})
    assert _errors_of(redrive, {"max_messages": 0}) and _errors_of(redrive, {"max": 1})


def test_semantics_are_described() -> None:
    consume = DOC["paths"]["/api/v1/messages/consume"]["post"]["description"]
    for header in DLQ_HEADERS:
        assert f"`{header}`" in consume, header
    for words in ("priority + 1", "lease", "visibility_timeout", "<topic>.dlq", "at-least-once"):
        assert words in consume, words
    ack = DOC["paths"]["/api/v1/messages/acknowledge"]["post"]["description"]
    assert "x-mqfast-dlq-reason" in ack and "MESSAGE_QUEUE_DELIVERY_LIMIT" in ack
    assert DOC["components"]["schemas"]["AckStatus"]["enum"] == [
        "acknowledged",
        "already_acknowledged",
        "requeued",
        "dead_lettered",
        "extended",
    ]


# ---- real responses --------------------------------------------------------------------------

# What each scenario below drives; together they must be everything the document promises.
P, B, T, TN = (
    "/api/v1/messages",
    "/api/v1/messages/batch",
    "/api/v1/topics",
    "/api/v1/topics/{name}",
)
C, A, AB, X, RD, DL = (
    "/api/v1/messages/consume",
    "/api/v1/messages/acknowledge",
    "/api/v1/messages/acknowledge/batch",
    "/api/v1/messages/extend",
    "/api/v1/topics/{name}/redrive",
    "/api/v1/topics/{name}/dlq",
)
S = "/api/v1/messages/stream"
CS, CI, HB, M, AU = (
    "/api/v1/consumers",
    "/api/v1/consumers/{consumer_id}",
    "/api/v1/consumers/{consumer_id}/heartbeat",
    "/api/v1/metrics",
    "/api/v1/audit",
)
GR, GI = "/api/v1/grants", "/api/v1/grants/{grant_id}"
COVERS: dict[str, set[Key]] = {
    "produce": {
        (P, "POST", 200),
        (P, "POST", 202),
        (P, "POST", 400),
        (P, "POST", 413),
        (B, "POST", 200),
        (B, "POST", 202),
        (B, "POST", 400),
        (B, "POST", 413),
    },
    "topics": {
        (T, "POST", 201),
        (T, "POST", 200),
        (T, "POST", 409),
        (T, "POST", 400),
        (T, "GET", 200),
        (TN, "GET", 200),
        (TN, "GET", 400),
        (TN, "GET", 404),
        (TN, "DELETE", 200),
        (TN, "DELETE", 400),
        (TN, "DELETE", 404),
    },
    "unknown_topic": {(P, "POST", 404), (B, "POST", 404)},
    "idempotency": {(P, "POST", 422), (B, "POST", 422)},
    # tests/cluster/test_idempotency.py: only the Kafka engine answers a retry in flight so
    "idempotency_in_flight": {(P, "POST", 409), (B, "POST", 409)},
    "consume": {
        (C, "POST", 200),
        (C, "POST", 400),
        (C, "POST", 404),
        (C, "POST", 409),
        (A, "POST", 200),
        (A, "POST", 400),
        (A, "POST", 404),
        (A, "POST", 409),
        (AB, "POST", 200),
        (AB, "POST", 400),
        (X, "POST", 200),
        (X, "POST", 400),
        (X, "POST", 404),
        (X, "POST", 409),
        (RD, "POST", 200),
        (RD, "POST", 400),
        (RD, "POST", 404),
        (DL, "GET", 200),
        (DL, "GET", 400),
        (DL, "GET", 404),
    },
    "stream": {(S, "GET", 200), (S, "GET", 400), (S, "GET", 404), (S, "GET", 409)},
    "consumers": {
        (CS, "POST", 201),
        (CS, "POST", 200),
        (CS, "POST", 400),
        (CS, "GET", 200),
        (CS, "GET", 400),
        (CI, "GET", 200),
        (CI, "GET", 404),
        (CI, "DELETE", 200),
        (CI, "DELETE", 404),
        (HB, "POST", 200),
        (HB, "POST", 404),
    },
    "metrics": {(M, "GET", 200), (M, "GET", 400)},
    "audit": {(AU, "GET", 200), (AU, "GET", 400), (AU, "GET", 401), (AU, "GET", 403)},
    "grants": {
        (GR, "POST", 201),
        (GR, "POST", 200),
        (GR, "POST", 400),
        (GR, "POST", 409),
        (GR, "GET", 200),
        (GR, "GET", 400),
        (GI, "DELETE", 200),
        (GI, "DELETE", 400),
        (GI, "DELETE", 404),
    },
    "health": {
        ("/health", "GET", 200),
        ("/health/live", "GET", 200),
        ("/health/ready", "GET", 200),
        ("/openapi.json", "GET", 200),
    },
    "unavailable": {
        (P, "POST", 503),
        (B, "POST", 503),
        (T, "GET", 503),
        (T, "POST", 503),
        (TN, "GET", 503),
        (TN, "DELETE", 503),
        ("/health", "GET", 503),
        ("/health/ready", "GET", 503),
    },
    "unavailable_consume": {
        (k, m, 503)
        for k, m in (
            (C, "POST"),
            (A, "POST"),
            (AB, "POST"),
            (X, "POST"),
            (RD, "POST"),
            (DL, "GET"),
            (S, "GET"),
            (CS, "GET"),
            (CS, "POST"),
            (CI, "GET"),
            (CI, "DELETE"),
            (HB, "POST"),
            (M, "GET"),
            (AU, "GET"),
            (GR, "GET"),
            (GR, "POST"),
            (GI, "DELETE"),
        )
    },
    # With authentication on: 401 without a token everywhere but the open routes, 403 where
    # a grant is missing (the lists filter instead; the audit route is covered above).
    "authorization": {
        (p, m.upper(), s)
        for p, m in _operations()
        if p not in ("/health", "/health/live", "/health/ready", "/openapi.json", AU)
        for s in (401, 403)
        if s == 401 or (p, m.upper()) not in ((T, "GET"), (CS, "GET"))
    },
    "framing": {
        (p, m.upper(), s) for p, m in _operations() for s in (400, 405, 413, 431, 501, 505)
    },
    "media": {(p, m.upper(), 415) for p, m in _operations() if m == "post"},
    "timeout": {(p, m.upper(), 408) for p, m in _operations()},
}


def test_scenarios_cover_every_documented_response() -> None:
    covered = set().union(*COVERS.values())
    assert covered == documented(), {
        "documented, never driven": documented() - covered,
        "driven, not documented": covered - documented(),
    }


def test_produce_responses(server: MqfastProcess) -> None:
    seen: set[Key] = set()
    r = server.request("POST", P, CONTRACT_PRODUCE)
    seen.add(check(r, P, "POST", 200))
    first = r.json()
    r = server.request("POST", P, CONTRACT_PRODUCE)
    seen.add(check(r, P, "POST", 200))
    assert r.json()["partition"] == first["partition"]  # same key, same partition
    assert r.json()["message_id"] > first["message_id"]  # UUIDv7: time-ordered
    r = server.request("POST", P, {"topic": "t", "content": "x"}, {"Prefer": "respond-async"})
    seen.add(check(r, P, "POST", 202))
    assert r.json()["offset"] is None
    for body, field in (
        ("{not json", None),
        ("", None),
        ({"topic": "t", "content": "x", "priority": 10}, "priority"),
        ({"topic": "t", "content": "x", "priorty": 1}, "priorty"),
        ({"topic": "t", "content": "x", "ttl": "soon"}, "ttl"),
        ({"topic": "bad name", "content": "x"}, "topic"),
        ({"topic": "t"}, "content"),
    ):
        r = server.request("POST", P, body)
        seen.add(check(r, P, "POST", 400))
        assert r.json()["error"].get("field") == field, r.body
    r = server.request("POST", P, {"topic": "t", "content": "x" * (1_048_576 + 1)})
    seen.add(check(r, P, "POST", 413))
    assert r.json()["error"]["field"] == "content"

    batch = {"topic": "t", "messages": [{"content": "a"}, {"topic": "u", "content": "b"}]}
    r = server.request("POST", B, batch)
    seen.add(check(r, B, "POST", 200))
    assert r.json()["succeeded"] == 2 and r.json()["failed"] == 0
    r = server.request("POST", B, batch, {"Prefer": "respond-async"})
    seen.add(check(r, B, "POST", 202))
    assert r.json()["accepted"] == 2
    for body, field in (
        ({"topic": "t", "messages": []}, "messages"),
        ({"messages": [{"content": "a"}]}, "messages[0].topic"),
        ({"topic": "t", "messages": [{"content": "a"}, {"content": "b", "priority": 99}]}, None),
        ("[1, 2", None),
    ):
        r = server.request("POST", B, body)
        seen.add(check(r, B, "POST", 400))
        if field is not None:
            assert r.json()["error"]["field"] == field, r.body
    big = {"topic": "t", "messages": [{"content": "a"}, {"content": "x" * (1_048_576 + 1)}]}
    r = server.request("POST", B, big)
    seen.add(check(r, B, "POST", 413))
    assert r.json()["error"]["field"] == "messages[1].content"
    # Atomic validation: the rejected batches wrote nothing.
    info = server.request("GET", "/api/v1/topics/t").json()
    assert info["messages"] == 3, info  # the async single, one of each accepted batch
    assert seen == COVERS["produce"]


def test_topic_responses(server: MqfastProcess) -> None:
    seen: set[Key] = set()
    body = {"name": "orders", "partitions": 3, "retention": "168h", "max_size": "1073741824"}
    seen.add(check(server.request("POST", T, body), T, "POST", 201))
    seen.add(check(server.request("POST", T, body), T, "POST", 200))
    r = server.request("POST", T, {**body, "partitions": 4})
    seen.add(check(r, T, "POST", 409))
    for bad, field in (
        (CONTRACT_CREATE_TOPIC, "replication"),  # the embedded engine keeps one copy
        ({**body, "partitions": 0}, "partitions"),
        ({**body, "replication": 17}, "replication"),
        ({**body, "retention": "1 week"}, "retention"),
        ({**body, "max_size": "big"}, "max_size"),
        ({**body, "extra": 1}, "extra"),
        ({**body, "name": "no/slash"}, "name"),
        ("{", None),
    ):
        r = server.request("POST", T, bad)
        seen.add(check(r, T, "POST", 400))
        assert r.json()["error"].get("field") == field, r.body
    server.request("POST", P, {"topic": "orders", "key": "k", "content": "x"})
    seen.add(check(server.request("GET", T), T, "GET", 200))
    r = server.request("GET", "/api/v1/topics/orders")
    seen.add(check(r, TN, "GET", 200))
    assert r.json()["messages"] == 1 and len(r.json()["partition_stats"]) == 3
    seen.add(check(server.request("GET", "/api/v1/topics/nope"), TN, "GET", 404))
    seen.add(check(server.request("GET", "/api/v1/topics/bad%20name"), TN, "GET", 400))
    seen.add(check(server.request("DELETE", "/api/v1/topics/orders"), TN, "DELETE", 200))
    seen.add(check(server.request("DELETE", "/api/v1/topics/orders"), TN, "DELETE", 404))
    seen.add(check(server.request("DELETE", "/api/v1/topics/bad%20name"), TN, "DELETE", 400))
    assert seen == COVERS["topics"]


def test_unknown_topic_responses(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_AUTO_CREATE_TOPICS="false")
    seen = {
        check(srv.request("POST", P, {"topic": "t", "content": "x"}), P, "POST", 404),
        check(
            srv.request("POST", B, {"topic": "t", "messages": [{"content": "x"}]}), B, "POST", 404
        ),
    }
    assert seen == COVERS["unknown_topic"]


def test_idempotency_responses(server: MqfastProcess) -> None:
    key = {"Idempotency-Key": f"openapi-{time.time_ns()}"}
    first = server.request("POST", P, {"topic": "idem", "content": "a"}, headers=key)
    again = server.request("POST", P, {"topic": "idem", "content": "a"}, headers=key)
    check(first, P, "POST", 200)
    check(again, P, "POST", 200)
    assert again.json() == first.json()
    check(server.request("POST", P, {"topic": "idem", "content": "b"}, headers=key), P, "POST", 422)
    # A key of its own: a single produce's fingerprint is its whole body, so the same key on a
    # batch message (another body) is a reuse, 422.
    batch = {
        "topic": "idem",
        "messages": [{"content": "a", "idempotency_key": f"openapi-batch-{time.time_ns()}"}],
    }
    check(server.request("POST", B, batch), B, "POST", 200)
    check(server.request("POST", B, batch), B, "POST", 200)  # the retry, answered the same
    batch["messages"][0]["content"] = "b"
    r = check(server.request("POST", B, batch), B, "POST", 422)
    assert r == (B, "POST", 422)


def test_batch_with_per_message_error(make_server: MakeServer, tmp_path: Any) -> None:
    # Two servers on one data directory: one still knows a topic the other deleted, so the
    # engine refuses that topic's messages while storing the others.
    a = make_server(data_dir=tmp_path / "shared")
    b = make_server(data_dir=tmp_path / "shared")
    for topic in ("kept", "gone"):
        assert a.request("POST", P, {"topic": topic, "content": "x"}).status == 200
    assert b.request("DELETE", "/api/v1/topics/gone").status == 200
    r = a.request(
        "POST",
        B,
        {"messages": [{"topic": "kept", "content": "y"}, {"topic": "gone", "content": "z"}]},
    )
    check(r, B, "POST", 200)
    body = r.json()
    assert (body["succeeded"], body["failed"]) == (1, 1)
    assert "offset" in body["results"][0] and body["results"][1]["error"]["code"] == "unknown_topic"


def test_health_and_meta_responses(server: MqfastProcess) -> None:
    seen = {
        check(server.request("GET", "/health"), "/health", "GET", 200),
        check(server.request("GET", "/health/"), "/health", "GET", 200),
        check(server.request("GET", "/health/live"), "/health/live", "GET", 200),
        check(server.request("GET", "/health/ready"), "/health/ready", "GET", 200),
        check(server.request("GET", "/openapi.json"), "/openapi.json", "GET", 200),
    }
    h = server.request("GET", "/health").json()
    assert h["status"] == "ok" and h["version"] == __version__
    assert seen == COVERS["health"]
    # A path no route matches: the shared NotFound response.
    r = server.request("GET", "/api/v1/queues")
    assert r.status == 404
    ptr, _ = _follow("/components/responses/NotFound")
    assert not _errors_of(_validator(f"{ptr}/content/{_esc(JSON)}/schema"), r.json())


def _produce(srv: MqfastProcess, topic: str, content: str, priority: int = 0) -> str:
    r = srv.request("POST", P, {"topic": topic, "content": content, "priority": priority})
    assert r.status == 200, r.body
    return str(r.json()["message_id"])


def _consume(srv: MqfastProcess, seen: set[Key], **body: Any) -> list[dict[str, Any]]:
    r = srv.request("POST", C, {"group_id": "g", "consumer_id": "c1", **body})
    seen.add(check(r, C, "POST", 200))
    assert r.json()["count"] == len(r.json()["messages"])
    return list(r.json()["messages"])


def test_consume_and_acknowledge_responses(make_server: MakeServer) -> None:
    srv = make_server(
        MESSAGE_QUEUE_VISIBILITY_TIMEOUT="1s",
        MESSAGE_QUEUE_RETRY_BACKOFF="50ms",
        MESSAGE_QUEUE_DELIVERY_LIMIT="2",
        MESSAGE_QUEUE_MAX_BATCH="5",
    )
    seen: set[Key] = set()
    low = _produce(srv, "jobs", "low", 0)
    high = _produce(srv, "jobs", "high", 9)

    # consume
    msgs = _consume(srv, seen, topic="jobs", max_messages=10, timeout="1s")
    assert [m["message_id"] for m in msgs] == [high, low]  # highest priority first
    assert all(m["delivery_count"] == 1 for m in msgs)
    assert _consume(srv, seen, topic="jobs", timeout=0) == []  # both are leased
    seen.add(check(srv.request("POST", C, {**CONTRACT_CONSUME, "topic": "nope"}), C, "POST", 404))
    for bad, field in (
        ({"max_messages": 0}, "max_messages"),
        ({"max_messages": 1001}, "max_messages"),
        ({"timeout": "soon"}, "timeout"),
        ({"timeout": "1h"}, "timeout"),  # beyond MESSAGE_QUEUE_MAX_POLL
        ({"visibility_timeout": "0s"}, "visibility_timeout"),
        ({"visibility_timeout": "13h"}, "visibility_timeout"),
        ({"group_id": ""}, "group_id"),
        ({"topic": "bad name"}, "topic"),
        ({"groupid": "g"}, "groupid"),
    ):
        r = srv.request("POST", C, {**CONTRACT_CONSUME, "topic": "jobs", **bad})
        seen.add(check(r, C, "POST", 400))
        assert r.json()["error"].get("field") == field, r.body
    r = srv.request("POST", C, "{")
    seen.add(check(r, C, "POST", 400))
    assert r.json()["error"]["code"] == "malformed_json"
    reg = {"consumer_id": "c9", "group_id": "g", "topics": ["jobs"]}
    assert srv.request("POST", CS, reg).status == 201
    r = srv.request("POST", C, {"topic": "jobs", "group_id": "other", "consumer_id": "c9"})
    seen.add(check(r, C, "POST", 409))
    assert r.json()["error"]["field"] == "group_id"

    # extend
    lease = {"message_id": high, "group_id": "g", "consumer_id": "c1"}
    r = srv.request("POST", X, {**lease, "visibility_timeout": "30s"})
    seen.add(check(r, X, "POST", 200))
    assert r.json()["lease_deadline"] > msgs[0]["lease_deadline"]
    for bad, field in (
        ({}, "visibility_timeout"),
        ({"visibility_timeout": "0s"}, "visibility_timeout"),
        ({"visibility_timeout": "13h"}, "visibility_timeout"),
        ({"visibility_timeout": "1m", "consumer_id": ""}, "consumer_id"),
    ):
        r = srv.request("POST", X, {**lease, **bad})
        seen.add(check(r, X, "POST", 400))
        assert r.json()["error"].get("field") == field, r.body
    unknown = {"message_id": str(uuid.uuid4()), "group_id": "g", "visibility_timeout": "1m"}
    seen.add(check(srv.request("POST", X, unknown), X, "POST", 404))

    # acknowledge
    r = srv.request("POST", A, {**lease, "consumer_id": "c2"})
    seen.add(check(r, A, "POST", 409))  # leased to another consumer
    assert r.json()["error"]["field"] == "consumer_id"
    r = srv.request("POST", A, lease)
    seen.add(check(r, A, "POST", 200))
    assert r.json()["status"] == "acknowledged"
    r = srv.request("POST", A, lease)
    seen.add(check(r, A, "POST", 200))
    assert r.json()["status"] == "already_acknowledged"
    seen.add(check(srv.request("POST", A, {**lease, "success": False}), A, "POST", 409))
    r = srv.request("POST", X, {**lease, "visibility_timeout": "1m"})
    seen.add(check(r, X, "POST", 409))  # complete: nothing to extend
    seen.add(check(srv.request("POST", A, CONTRACT_ACK), A, "POST", 404))
    for bad, field in (
        ({"group_id": None}, "group_id"),
        ({"error": "x" * 4097}, "error"),
        ({"success": False, "requeue_delay": "later"}, "requeue_delay"),
        ({"topic": "bad name"}, "topic"),
        ({"sucess": True}, "sucess"),
    ):
        r = srv.request("POST", A, {**CONTRACT_ACK, **bad})
        seen.add(check(r, A, "POST", 400))
        assert r.json()["error"].get("field") == field, r.body
    seen.add(check(srv.request("POST", A, ""), A, "POST", 400))
    nack = {"message_id": low, "group_id": "g", "success": False}
    r = srv.request("POST", A, {**nack, "requeue_delay": "0s"})
    seen.add(check(r, A, "POST", 200))
    assert r.json()["status"] == "requeued" and r.json()["delivery_count"] == 1
    [again] = _consume(srv, seen, topic="jobs", timeout="5s")
    assert (again["message_id"], again["delivery_count"]) == (low, 2)
    r = srv.request("POST", A, {**nack, "error": "boom"})
    seen.add(check(r, A, "POST", 200))
    assert r.json()["status"] == "dead_lettered"  # MESSAGE_QUEUE_DELIVERY_LIMIT=2

    # the dead letter carries the documented headers
    [dead] = _consume(srv, seen, topic="jobs.dlq")
    dlq_headers = {k: v for k, v in dead["headers"].items() if k.startswith("x-mqfast-dlq-")}
    assert set(dlq_headers) == DLQ_HEADERS
    assert dlq_headers["x-mqfast-dlq-message-id"] == low
    assert dlq_headers["x-mqfast-dlq-reason"] == "failed"
    assert dlq_headers["x-mqfast-dlq-error"] == "boom"
    assert dlq_headers["x-mqfast-dlq-delivery-count"] == "2"

    # an expired lease cannot be acknowledged
    late = _produce(srv, "jobs", "late")
    [m] = _consume(srv, seen, topic="jobs", visibility_timeout="1ms")
    assert m["message_id"] == late
    time.sleep(0.05)
    r = srv.request("POST", A, {"message_id": late, "group_id": "g"})
    seen.add(check(r, A, "POST", 409))
    assert r.json()["error"]["field"] == "message_id"

    # batch acknowledge
    ids = [_produce(srv, "batch", str(i)) for i in range(2)]
    assert len(_consume(srv, seen, topic="batch")) == 2
    acks = [
        {"message_id": ids[0]},
        {"message_id": ids[1], "success": False, "requeue_delay": "1h"},
        {"message_id": "nope"},
        {"message_id": late},  # its lease expired above
    ]
    r = srv.request("POST", AB, {"group_id": "g", "consumer_id": "c1", "acks": acks})
    seen.add(check(r, AB, "POST", 200))
    res = r.json()
    assert (res["succeeded"], res["failed"]) == (2, 2)
    assert [x.get("status") for x in res["results"][:2]] == ["acknowledged", "requeued"]
    codes = [x["error"]["code"] for x in res["results"][2:]]
    assert codes == ["not_found", "conflict"]
    for bad, field in (
        ({"acks": []}, "acks"),
        ({"acks": [{"message_id": "m"}] * 6}, "acks"),  # MESSAGE_QUEUE_MAX_BATCH=5
        ({"acks": [{"message_id": "m"}, {"message_id": "n", "requeue_delay": "x"}]}, None),
        ({"acks": [{"message_id": "m", "topic": "t"}]}, "acks[0].topic"),
    ):
        r = srv.request("POST", AB, {"group_id": "g", **bad})
        seen.add(check(r, AB, "POST", 400))
        if field is not None:
            assert r.json()["error"].get("field") == field, r.body
    assert r.json()["error"]["code"] == "invalid_field"

    # the dead letters, then a redrive of that one, then of the rest (none left)
    r = srv.request("GET", "/api/v1/topics/jobs/dlq")
    seen.add(check(r, DL, "GET", 200))
    [dead] = r.json()["messages"]
    assert (dead["content"], dead["reason"], dead["origin"]["message_id"]) == ("low", "failed", low)
    for url, field in (
        ("/api/v1/topics/jobs/dlq?limit=0", "limit"),
        ("/api/v1/topics/jobs/dlq?offset=x", "offset"),
        ("/api/v1/topics/jobs/dlq?group=g", "group"),
        ("/api/v1/topics/bad%20name/dlq", "name"),
    ):
        r = srv.request("GET", url)
        seen.add(check(r, DL, "GET", 400))
        assert r.json()["error"].get("field") == field, r.body
    seen.add(check(srv.request("GET", "/api/v1/topics/nope/dlq"), DL, "GET", 404))
    one = {"message_id": dead["message_id"]}
    r = srv.request("POST", "/api/v1/topics/jobs/redrive", one)
    seen.add(check(r, RD, "POST", 200))
    assert r.json() == {"topic": "jobs", "moved": 1, **one}
    r = srv.request("POST", "/api/v1/topics/jobs/redrive", one)
    seen.add(check(r, RD, "POST", 404))
    assert r.json()["error"]["code"] == "not_found"
    r = srv.request("POST", "/api/v1/topics/jobs/redrive", {"max_messages": 10})
    seen.add(check(r, RD, "POST", 200))
    assert r.json() == {"topic": "jobs", "moved": 0}
    r = srv.request("POST", "/api/v1/topics/jobs/redrive")
    seen.add(check(r, RD, "POST", 200))
    assert r.json()["moved"] == 0
    # (the lease of "late" above may have run out meanwhile: it comes back too)
    got = _consume(srv, seen, topic="jobs", timeout="5s")
    [back] = [m for m in got if m["content"] != "late"]
    assert back["content"] == "low" and back["delivery_count"] == 1
    assert back["headers"] == {"x-mqfast-redriven-from": "jobs.dlq"}
    for url, body, field in (
        ("/api/v1/topics/bad%20name/redrive", None, "name"),
        ("/api/v1/topics/jobs/redrive", {"max_messages": 0}, "max_messages"),
        ("/api/v1/topics/jobs/redrive", {"max_messages": 100_001}, "max_messages"),
        ("/api/v1/topics/jobs/redrive", {"limit": 1}, "limit"),
        ("/api/v1/topics/jobs/redrive", "[1", None),
    ):
        r = srv.request("POST", url, body)
        seen.add(check(r, RD, "POST", 400))
        assert r.json()["error"].get("field") == field, r.body
    r = srv.request("POST", "/api/v1/topics/nope/redrive")
    seen.add(check(r, RD, "POST", 404))
    assert seen == COVERS["consume"]


def test_stream_responses(server: MqfastProcess) -> None:
    seen: set[Key] = set()
    assert server.request("POST", T, {"name": "streamed"}).status == 201
    mid = _produce(server, "streamed", "hello")
    base = f"{S}?topic=streamed&group_id=g&consumer_id=s1"
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(f"GET {base}&heartbeat=1s HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\n: heartbeat\n" not in data:  # the message, then a heartbeat
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    _, resp = _response(S, "GET", 200)
    assert b"\r\ncontent-type: text/event-stream\r\n" in head
    assert "text/event-stream" in resp["content"]
    [event] = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
    message = json.loads(event[len(b"data: ") :])
    assert message["message_id"] == mid
    schema = resp["content"]["text/event-stream"]["x-event-data"]["$ref"].split("#", 1)[1]
    assert not _errors_of(_validator(schema), message)
    seen.add((S, "GET", 200))
    r = server.request("GET", f"{base}&max_inflight=0")
    seen.add(check(r, S, "GET", 400))
    assert r.json()["error"]["field"] == "max_inflight"
    r = server.request("GET", f"{S}?topic=nope&group_id=g&consumer_id=s1")
    seen.add(check(r, S, "GET", 404))
    reg = {"consumer_id": "s9", "group_id": "g", "topics": ["streamed"]}
    assert server.request("POST", CS, reg).status == 201
    r = server.request("GET", f"{S}?topic=streamed&group_id=other&consumer_id=s9")
    seen.add(check(r, S, "GET", 409))
    assert seen == COVERS["stream"]


def test_consumer_responses(server: MqfastProcess) -> None:
    seen: set[Key] = set()
    r = server.request("POST", CS, CONTRACT_REGISTER)
    seen.add(check(r, CS, "POST", 201))
    assert r.json()["registered_at"] == r.json()["last_seen"]
    r = server.request("POST", CS, {**CONTRACT_REGISTER, "max_concurrency": None})
    seen.add(check(r, CS, "POST", 200))
    assert r.json()["max_concurrency"] is None and r.json()["rate_limit"] == 100
    for bad, field in (
        ({"topics": []}, "topics"),
        ({"topics": ["ok", "bad name"]}, "topics[1]"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"consumer_id": ""}, "consumer_id"),
        ({"group": "g"}, "group"),
    ):
        r = server.request("POST", CS, {**CONTRACT_REGISTER, **bad})
        seen.add(check(r, CS, "POST", 400))
        assert r.json()["error"].get("field") == field, r.body
    seen.add(check(server.request("POST", CS, "{"), CS, "POST", 400))
    other = {"consumer_id": "consumer-2", "group_id": "other", "topics": ["t"]}
    assert server.request("POST", CS, other).status == 201

    r = server.request("GET", CS)
    seen.add(check(r, CS, "GET", 200))
    assert [c["consumer_id"] for c in r.json()["consumers"]] == ["consumer-1", "consumer-2"]
    r = server.request("GET", CS + "?group_id=user-processor")
    seen.add(check(r, CS, "GET", 200))
    assert [c["consumer_id"] for c in r.json()["consumers"]] == ["consumer-1"]
    r = server.request("GET", CS + "?group=x")
    seen.add(check(r, CS, "GET", 400))
    assert r.json()["error"] == {**r.json()["error"], "code": "invalid_query", "field": "group"}

    r = server.request("GET", "/api/v1/consumers/consumer-1")
    seen.add(check(r, CI, "GET", 200))
    assert r.json()["group_id"] == "user-processor" and r.json()["active"] is True
    seen.add(check(server.request("GET", "/api/v1/consumers/nope"), CI, "GET", 404))
    r = server.request("POST", "/api/v1/consumers/consumer-1/heartbeat")
    seen.add(check(r, HB, "POST", 200))
    seen.add(check(server.request("POST", "/api/v1/consumers/nope/heartbeat"), HB, "POST", 404))

    # Deleting a consumer releases its leases.
    _produce(server, "user-events", "x")
    r = server.request("POST", C, CONTRACT_CONSUME)
    assert r.status == 200 and r.json()["count"] == 1, r.body
    r = server.request("DELETE", "/api/v1/consumers/consumer-1")
    seen.add(check(r, CI, "DELETE", 200))
    assert r.json() == {"consumer_id": "consumer-1", "deleted": True, "released": 1}
    seen.add(check(server.request("DELETE", "/api/v1/consumers/consumer-1"), CI, "DELETE", 404))
    assert seen == COVERS["consumers"]


def test_audit_log_responses(make_server: MakeServer) -> None:
    from mqfast.auth import make_token
    from mqfast.config import Settings

    secret = {"MESSAGE_QUEUE_JWT_SECRET": "openapi-secret-0123456789-0123456789-01"}
    srv = make_server(**secret)
    settings = Settings.from_env(secret)
    admin = {"Authorization": "Bearer " + make_token(settings, "ops", ["admin"])}
    producer = {"Authorization": "Bearer " + make_token(settings, "svc", ["producer"])}
    seen: set[Key] = set()
    seen.add(check(srv.request("GET", AU), AU, "GET", 401))
    seen.add(check(srv.request("GET", AU, headers=producer), AU, "GET", 403))
    # Entries reach the store in the background, just after the answer: wait for both.
    deadline = time.monotonic() + 15
    while True:
        r = srv.request("GET", f"{AU}?limit=10", headers=admin)
        outcomes = [e["outcome"] for e in r.json()["entries"]] if r.status == 200 else None
        if outcomes == ["denied", "denied"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    seen.add(check(r, AU, "GET", 200))
    assert [e["outcome"] for e in r.json()["entries"]] == ["denied", "denied"]
    r = srv.request("GET", f"{AU}?limit=0", headers=admin)
    seen.add(check(r, AU, "GET", 400))
    assert r.json()["error"]["field"] == "limit"
    assert seen == COVERS["audit"]


def test_grant_responses(server: MqfastProcess) -> None:
    seen: set[Key] = set()
    body = {"subject": "svc-orders", "topics": "orders.*", "actions": ["produce", "consume"]}
    r = server.request("POST", GR, {**body, "groups": ["billing"]})
    seen.add(check(r, GR, "POST", 201))
    grant = r.json()
    r = server.request("POST", GR, {**body, "groups": ["billing"]})
    seen.add(check(r, GR, "POST", 200))
    assert r.json() == grant
    for bad, field in (
        ({**body, "actions": ["publish"]}, "actions[0]"),
        ({**body, "topics": "orders.[eu"}, "topics"),
        ({"topics": "orders.*", "actions": ["produce"]}, "subject"),
        ("{", None),
    ):
        r = server.request("POST", GR, bad)
        seen.add(check(r, GR, "POST", 400))
        assert r.json()["error"].get("field") == field, r.body
    for i in range(255):  # the first is stored already
        r = server.request("POST", GR, {**body, "topics": f"t{i}"})
        assert r.status == 201, r.body
    r = server.request("POST", GR, {**body, "topics": "one-more"})
    seen.add(check(r, GR, "POST", 409))
    assert r.json()["error"]["field"] == "subject"
    r = server.request("GET", f"{GR}?subject=svc-orders")
    seen.add(check(r, GR, "GET", 200))
    assert len(r.json()["grants"]) == 256 and r.json()["grants"][0] == grant
    seen.add(check(server.request("GET", f"{GR}?subjects=x"), GR, "GET", 400))
    r = server.request("DELETE", f"{GR}/{grant['id']}")
    seen.add(check(r, GI, "DELETE", 200))
    assert r.json() == {"id": grant["id"], "subject": "svc-orders", "deleted": True}
    seen.add(check(server.request("DELETE", f"{GR}/{grant['id']}"), GI, "DELETE", 404))
    seen.add(check(server.request("DELETE", f"{GR}/x1"), GI, "DELETE", 400))
    assert seen == COVERS["grants"]


def test_authorization_responses(make_server: MakeServer) -> None:
    from mqfast.auth import make_token
    from mqfast.config import Settings

    secret = {"MESSAGE_QUEUE_JWT_SECRET": "openapi-secret-0123456789-0123456789-01"}
    srv = make_server(**secret)
    settings = Settings.from_env(secret)

    def bearer(sub: str, roles: list[str] | None = None, grants: Any = None) -> dict[str, str]:
        return {"Authorization": "Bearer " + make_token(settings, sub, roles, grants)}

    admin, nobody = bearer("ops", ["admin"]), bearer("nobody")
    # consumes group g, but on another topic: refused per message, once the message is found
    elsewhere = bearer("svc", grants=[{"topics": "other", "actions": ["consume"], "groups": ["g"]}])
    assert srv.request("POST", T, {"name": "t"}, headers=admin).status == 201
    assert srv.request("POST", P, {"topic": "t", "content": "x"}, headers=admin).status == 200
    reg = {"consumer_id": "c1", "group_id": "g", "topics": ["t"]}
    assert srv.request("POST", CS, reg, headers=admin).status == 201
    ask = {"topic": "t", "group_id": "g", "consumer_id": "c1", "timeout": "5s"}
    [m] = srv.request("POST", C, ask, headers=admin).json()["messages"]
    mid = m["message_id"]
    calls: list[tuple[str, str, str, Any, dict[str, str]]] = [
        (P, "POST", P, {"topic": "t", "content": "x"}, nobody),
        (P, "POST", P, {"topic": "new", "content": "x"}, bearer("p", ["producer"])),
        (B, "POST", B, {"messages": [{"topic": "t", "content": "x"}]}, nobody),
        (C, "POST", C, ask, nobody),
        (A, "POST", A, {"message_id": mid, "group_id": "g"}, elsewhere),
        (AB, "POST", AB, {"group_id": "g", "acks": [{"message_id": mid}]}, nobody),
        (X, "POST", X, {"message_id": mid, "group_id": "g", "visibility_timeout": "9s"}, elsewhere),
        (T, "POST", T, {"name": "new"}, nobody),
        (TN, "GET", f"{T}/t", None, nobody),
        (TN, "DELETE", f"{T}/t", None, nobody),
        (RD, "POST", f"{T}/t/redrive", None, nobody),
        (DL, "GET", f"{T}/t/dlq", None, nobody),
        (CS, "POST", CS, {**reg, "consumer_id": "c2"}, nobody),
        (CI, "GET", f"{CS}/c1", None, nobody),
        (CI, "DELETE", f"{CS}/c1", None, nobody),
        (HB, "POST", f"{CS}/c1/heartbeat", None, nobody),
        (M, "GET", f"{M}?topic=t", None, nobody),
        (GR, "GET", GR, None, nobody),
        (GR, "POST", GR, {"subject": "s", "topics": "t", "actions": ["produce"]}, nobody),
        (GI, "DELETE", f"{GR}/1", None, nobody),
        (S, "GET", f"{S}?topic=t&group_id=g&consumer_id=c1", None, nobody),
    ]
    seen: set[Key] = set()
    for path, method, url, body, who in calls:
        seen.add(check(srv.request(method, url, body, headers=who), path, method, 403))
    for path, method in _operations():
        if ((path, method.upper(), 401)) in COVERS["authorization"]:
            r = srv.request(method.upper(), concrete(path))
            seen.add(check(r, path, method.upper(), 401))
    # the refused settles left the message leased: it acknowledges now, at its first delivery
    r = srv.request("POST", A, {"message_id": mid, "group_id": "g"}, headers=admin)
    assert r.json()["status"] == "acknowledged", r.body
    assert seen == COVERS["authorization"]


def test_metric_history_responses(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_METRICS_INTERVAL="200ms")
    seen: set[Key] = set()
    r = srv.request("GET", f"{M}?{CONTRACT_METRICS_QUERY}")
    seen.add(check(r, M, "GET", 200))
    body = r.json()
    assert (body["start_time"], body["end_time"]) == (
        "2024-01-01T00:00:00.000Z",
        "2024-01-02T00:00:00.000Z",
    )
    assert body["topic"] == "user-events" and body["points"] == []
    # Points appear once an interval with traffic has been recorded.
    _produce(srv, "t", "x")
    deadline = time.monotonic() + 30
    while True:
        r = srv.request("GET", M)
        seen.add(check(r, M, "GET", 200))
        if r.json()["points"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(p["topic"] == "t" and p["produced"] >= 1 for p in r.json()["points"]), r.body
    for query, field in (
        ("start_time=yesterday", "start_time"),
        ("start_time=2024-01-02T00:00:00Z&end_time=2024-01-01T00:00:00Z", "end_time"),
        ("step=60", "step"),  # 60 ns: below the recording interval
        ("topic=a&topic=b", "topic"),
        ("topic=bad%20name", "topic"),
        ("since=1h", "since"),
    ):
        r = srv.request("GET", f"{M}?{query}")
        seen.add(check(r, M, "GET", 400))
        assert r.json()["error"] == {**r.json()["error"], "code": "invalid_query", "field": field}
    assert seen == COVERS["metrics"]


def _ops_with(path: str, status: int) -> set[Key]:
    return {(p, m.upper(), status) for p, m in _operations() if p == path}


def test_framing_errors_on_every_route(server: MqfastProcess) -> None:
    seen: set[Key] = set()
    for path, methods in API_ROUTES:
        url = concrete(path)
        r = server.request("PATCH", url, {})
        for m in methods:
            seen.add(check(r, path, m, 405))
        # HEAD is served wherever GET is (the document describes it, not as an operation)
        head = {"HEAD"} if "GET" in methods else set()
        assert set(r.headers["allow"].split(", ")) == set(methods) | head
        for method in methods:
            r = raw(server, f"{method} {url} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode())
            seen.add(check(r, path, method, 400))
            assert r.json()["error"]["code"] == "malformed_http"
            r = raw(
                server,
                f"{method} {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n".encode(),
            )
            seen.add(check(r, path, method, 413))
            big = "a" * 20_000
            r = raw(server, f"{method} {url} HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n".encode())
            seen.add(check(r, path, method, 431))
            r = raw(
                server,
                f"{method} {url} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
                "\r\n0\r\n\r\n".encode(),
            )
            seen.add(check(r, path, method, 501))
            r = raw(server, f"{method} {url} HTTP/2.0\r\nHost: x\r\n\r\n".encode())
            seen.add(check(r, path, method, 505))
    assert seen == COVERS["framing"]


def test_media_type_errors_on_every_post_route(server: MqfastProcess) -> None:
    seen: set[Key] = set()
    for path, method in _operations():
        if method != "post":
            continue
        r = server.request("POST", concrete(path), "{}", headers={"Content-Type": "text/plain"})
        seen.add(check(r, path, "POST", 415))
        assert r.json()["error"]["code"] == "unsupported_media_type"
    assert seen == COVERS["media"]


def test_request_timeout_on_every_route(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_HEADER_TIMEOUT="1s")
    socks: list[tuple[str, str, socket.socket]] = []
    try:
        for path, method in _operations():
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
            # Headers complete, body announced but never sent.
            s.sendall(
                f"{method.upper()} {concrete(path)} HTTP/1.1\r\nHost: x\r\n"
                "Content-Length: 10\r\n\r\n{".encode()
            )
            socks.append((path, method.upper(), s))
        seen = {check(parse_raw(read_all(s)), p, m, 408) for p, m, s in socks}
    finally:
        for _, _, s in socks:
            s.close()
    assert seen == COVERS["timeout"]


WAL_READ_LOCKS = (123, 5)  # byte offset and count of SQLite's WAL reader locks in the -shm file


@contextmanager
def faulty_servers(make_server: MakeServer, tmp_path: Any, n: int) -> Iterator[list[MqfastProcess]]:
    """``n`` servers on one database whose WAL reader slots are locked: every engine call fails.

    Several servers so that the calls (each failing after SQLite's own retries, on the one
    thread of the engine, the consumer groups or the metadata store) run in parallel.
    """
    first = make_server(data_dir=tmp_path / "faulty")
    assert first.request("POST", P, {"topic": "t", "content": "x"}).status == 200
    # Started after "t" exists, the others know it: their produce goes straight to the engine.
    servers = [first, *(make_server(data_dir=tmp_path / "faulty") for _ in range(n - 1))]
    fd = os.open(tmp_path / "faulty" / "mqfast.db-shm", os.O_RDWR)
    start, count = WAL_READ_LOCKS
    # A server may be inside a short read transaction (the metric history) at this moment.
    for attempt in range(200):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, count, start)
            break
        except BlockingIOError:
            if attempt == 199:
                raise
            time.sleep(0.01)
    try:
        yield servers
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, count, start)
        os.close(fd)


@pytest.fixture
def engine_fault(make_server: MakeServer, tmp_path: Any) -> Iterator[list[MqfastProcess]]:
    with faulty_servers(make_server, tmp_path, 4) as servers:
        yield servers


Call = tuple[MqfastProcess, str, str, str, Any]


def _all_unavailable(calls: list[Call]) -> set[Key]:
    """Run ``calls`` in parallel; each must be a documented 503 ``engine_unavailable``."""
    lock = threading.Lock()
    seen: set[Key] = set()

    def call(args: Call) -> None:
        srv, method, url, template, body = args
        r = srv.request(method, url, body, timeout=120)
        key = check(r, template, method, 503)
        assert r.json()["error"]["code"] == "engine_unavailable"
        with lock:
            seen.add(key)

    with ThreadPoolExecutor(len(calls)) as pool:
        list(pool.map(call, calls))
    return seen


def test_engine_unavailable(engine_fault: list[MqfastProcess]) -> None:
    s0, s1, s2, s3 = engine_fault
    calls: list[Call] = [
        (s0, "POST", P, P, {"topic": "t", "content": "x"}),
        (s0, "GET", T, T, None),
        (s1, "POST", B, B, {"topic": "t", "messages": [{"content": "x"}]}),
        (s1, "GET", "/api/v1/topics/t", TN, None),
        (s2, "POST", T, T, {"name": "new-topic"}),
        (s3, "DELETE", "/api/v1/topics/t", TN, None),
    ]
    seen = _all_unavailable(calls)
    # The failed writes leave the engine reported down until a write succeeds.
    h = s0.request("GET", "/health")
    seen.add(check(h, "/health", "GET", 503))
    assert h.json()["checks"]["engine"]["status"] == "down"
    seen.add(check(s0.request("GET", "/health/ready"), "/health/ready", "GET", 503))
    assert seen == COVERS["unavailable"]


def test_consume_routes_unavailable(make_server: MakeServer, tmp_path: Any) -> None:
    # The metadata store (consumers, metric history; consume looks its consumer up there) and
    # the consumer groups each run on one thread per server: one call of each per server.
    meta_calls = [
        ("POST", C, C, {"topic": "t", "group_id": "g", "consumer_id": "c"}),
        ("GET", CS, CS, None),
        ("POST", CS, CS, {"consumer_id": "c", "group_id": "g", "topics": ["t"]}),
        ("GET", "/api/v1/consumers/c", CI, None),
        ("DELETE", "/api/v1/consumers/c", CI, None),
        ("POST", "/api/v1/consumers/c/heartbeat", HB, None),
        ("GET", M, M, None),
        ("GET", AU, AU, None),
        ("GET", GR, GR, None),
        ("POST", GR, GR, {"subject": "s", "topics": "t", "actions": ["produce"]}),
        ("DELETE", "/api/v1/grants/1", GI, None),
    ]
    group_calls = [
        ("POST", A, A, {"message_id": "m", "group_id": "g"}),
        ("POST", AB, AB, {"group_id": "g", "acks": [{"message_id": "m"}]}),
        ("POST", X, X, {"message_id": "m", "group_id": "g", "visibility_timeout": "1m"}),
        ("POST", "/api/v1/topics/t/redrive", RD, None),
        ("GET", "/api/v1/topics/t/dlq", DL, None),
        ("GET", f"{S}?topic=t&group_id=g&consumer_id=c", S, None),
    ]
    with faulty_servers(make_server, tmp_path, len(meta_calls)) as servers:
        calls: list[Call] = [(srv, *c) for srv, c in zip(servers, meta_calls, strict=True)]
        calls += [(srv, *c) for srv, c in zip(servers, group_calls, strict=False)]
        seen = _all_unavailable(calls)
    assert seen == COVERS["unavailable_consume"]


def test_error_codes_match_the_code() -> None:
    from mqfast.errors import ErrorCode

    enum = DOC["components"]["schemas"]["ErrorCode"]["enum"]
    assert enum == [c.value for c in ErrorCode]


def test_health_with_groups_behind_matches_the_document(make_server: MakeServer) -> None:
    srv = make_server(
        MESSAGE_QUEUE_METRICS_INTERVAL="200ms",
        MESSAGE_QUEUE_HEALTH_MAX_LAG="1",
        MESSAGE_QUEUE_HEALTH_MAX_UNACKED_AGE="100ms",
    )
    for i in range(3):
        _produce(srv, "late", f"m{i}")
    r = srv.request("POST", C, {"topic": "late", "group_id": "g", "consumer_id": "c1",
                                "visibility_timeout": "200ms"})  # fmt: skip
    assert r.status == 200 and r.json()["count"] >= 1, r.body
    deadline = time.monotonic() + 20
    while True:
        r = srv.request("GET", "/health")
        check(r, "/health", "GET", 200)
        groups = r.json()["consumer_groups"]
        if groups["status"] == "behind" and groups["behind"][0]["expired_leases"]:
            break
        assert time.monotonic() < deadline, groups
        time.sleep(0.1)
    assert groups["behind"][0]["reasons"] == ["lag", "unacked_age", "expired_leases"]
