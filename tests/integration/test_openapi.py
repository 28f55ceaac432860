"""The OpenAPI document (src/mqfast/openapi.json) against the router and real responses.

The document is checked for structure (OpenAPI 3.1, every ``$ref`` resolves, exactly the routes of
``api.ROUTES``), the contract's example requests must validate against its request schemas, and
every (path, method, status) it documents is produced by a real server here and the body
validated against the documented schema (JSON Schema 2020-12, refs resolved in the document).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

Key = tuple[str, str, int]  # (path template, method, status)


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
    return path.replace("{name}", "some-topic")


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

    routed = {path: {m.lower() for m in methods} for path, methods in ROUTES}
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
            assert {p["name"] for p in params if p["in"] == "path"} == {"name"}

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
    # The document's own examples validate too.
    for path, validator in (
        ("/api/v1/messages", produce),
        ("/api/v1/topics", create),
        ("/api/v1/messages/batch", batch),
    ):
        media = DOC["paths"][path]["post"]["requestBody"]["content"][JSON]
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


# ---- real responses --------------------------------------------------------------------------

# What each scenario below drives; together they must be everything the document promises.
P, B, T, TN = (
    "/api/v1/messages",
    "/api/v1/messages/batch",
    "/api/v1/topics",
    "/api/v1/topics/{name}",
)
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
    "framing": {(p, m.upper(), s) for p, m in _operations() for s in (400, 405, 413, 431)},
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
    r = server.request("GET", "/api/v1/consumers")
    assert r.status == 404
    ptr, _ = _follow("/components/responses/NotFound")
    assert not _errors_of(_validator(f"{ptr}/content/{_esc(JSON)}/schema"), r.json())


def _ops_with(path: str, status: int) -> set[Key]:
    return {(p, m.upper(), status) for p, m in _operations() if p == path}


def test_framing_errors_on_every_route(server: MqfastProcess) -> None:
    seen: set[Key] = set()
    for path, methods in ROUTES:
        url = concrete(path)
        r = server.request("PATCH", url, {})
        for m in methods:
            seen.add(check(r, path, m, 405))
        assert set(r.headers["allow"].split(", ")) == set(methods)
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
    assert seen == COVERS["framing"]


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


@pytest.fixture
def engine_fault(make_server: MakeServer, tmp_path: Any) -> Iterator[list[MqfastProcess]]:
    """Four servers on one database whose WAL reader slots are locked: every engine call fails.

    Several servers so that the calls (each failing after SQLite's own retries) run in parallel.
    """
    first = make_server(data_dir=tmp_path / "faulty")
    assert first.request("POST", P, {"topic": "t", "content": "x"}).status == 200
    # Started after "t" exists, the others know it: their produce goes straight to the engine.
    servers = [first, *(make_server(data_dir=tmp_path / "faulty") for _ in range(3))]
    fd = os.open(tmp_path / "faulty" / "mqfast.db-shm", os.O_RDWR)
    start, count = WAL_READ_LOCKS
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, count, start)
    try:
        yield servers
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, count, start)
        os.close(fd)


def test_engine_unavailable(engine_fault: list[MqfastProcess]) -> None:
    s0, s1, s2, s3 = engine_fault
    calls = [
        (s0, "POST", P, P, {"topic": "t", "content": "x"}),
        (s0, "GET", T, T, None),
        (s1, "POST", B, B, {"topic": "t", "messages": [{"content": "x"}]}),
        (s1, "GET", "/api/v1/topics/t", TN, None),
        (s2, "POST", T, T, {"name": "new-topic"}),
        (s3, "DELETE", "/api/v1/topics/t", TN, None),
    ]
    lock = threading.Lock()
    seen: set[Key] = set()

    def call(args: tuple[MqfastProcess, str, str, str, Any]) -> None:
        srv, method, url, template, body = args
        r = srv.request(method, url, body, timeout=120)
        key = check(r, template, method, 503)
        assert r.json()["error"]["code"] == "engine_unavailable"
        with lock:
            seen.add(key)

    with ThreadPoolExecutor(len(calls)) as pool:
        list(pool.map(call, calls))
    # The failed writes leave the engine reported down until a write succeeds.
    h = s0.request("GET", "/health")
    seen.add(check(h, "/health", "GET", 503))
    assert h.json()["checks"]["engine"]["status"] == "down"
    seen.add(check(s0.request("GET", "/health/ready"), "/health/ready", "GET", 503))
    assert seen == COVERS["unavailable"]


def test_error_codes_match_the_code() -> None:
    from mqfast.errors import ErrorCode

    enum = DOC["components"]["schemas"]["ErrorCode"]["enum"]
    assert enum == [c.value for c in ErrorCode]
