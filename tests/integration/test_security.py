"""Authentication and authorisation over HTTP: tokens, roles, grants, audit, secure by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mqfast.auth import make_token
from mqfast.config import Settings
from tests.conftest import MakeServer, MqfastProcess, new_server

SECRET = "test-secret-0123456789-0123456789-abcdef"
AUTH_ENV = {"MESSAGE_QUEUE_JWT_SECRET": SECRET}
SETTINGS = Settings.from_env(AUTH_ENV)
# Tokens are minted when the module is imported, at collection: they must outlive the whole
# suite (well over the 10 minutes a short life gave), or tests run late fail with 'token expired'.
TEST_TOKEN_TTL_S = 24 * 3600


def token(
    sub: str, roles: list[str] | None = None, grants: list[dict[str, Any]] | None = None
) -> str:
    return make_token(SETTINGS, sub, roles, grants, ttl_s=TEST_TOKEN_TTL_S)


def call(
    srv: MqfastProcess, method: str, path: str, body: Any = None, tok: str | None = None
) -> Any:
    headers = {"Authorization": f"Bearer {tok}"} if tok is not None else {}
    return srv.request(method, path, body, headers=headers)


def audit_lines(srv: MqfastProcess) -> list[dict[str, Any]]:
    out = []
    for line in srv.logs().splitlines():
        if line.startswith("{") and '"logger":"mqfast.audit"' in line:
            out.append(json.loads(line))
    return out


@pytest.fixture
def secured(make_server: MakeServer) -> MqfastProcess:
    return make_server(**AUTH_ENV)


def test_no_token_is_401_with_www_authenticate_and_health_stays_open(
    secured: MqfastProcess,
) -> None:
    r = call(secured, "POST", "/api/v1/messages", {"topic": "t", "content": "x"})
    assert r.status == 401, r.body
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "unauthorized"
    for path in ("/health", "/health/live", "/health/ready", "/openapi.json"):
        assert call(secured, "GET", path).status == 200, path
    bad = call(secured, "GET", "/api/v1/topics", tok="not.a.token")
    assert bad.status == 401 and "www-authenticate" in bad.headers
    forged = make_token(Settings.from_env({"MESSAGE_QUEUE_JWT_SECRET": "x" * 40}), "eve", ["admin"])
    assert call(secured, "GET", "/api/v1/topics", tok=forged).status == 401


def test_roles_and_grants_decide_each_route(secured: MqfastProcess) -> None:
    admin = token("ops", ["admin"])
    producer = token("svc-a", grants=[{"topics": "orders.*", "actions": ["produce"]}])
    consumer = token(
        "svc-b", grants=[{"topics": "orders.*", "actions": ["consume"], "groups": ["billing"]}]
    )
    msg = {"topic": "orders.eu", "content": "x"}
    # topic management needs admin
    r = call(secured, "POST", "/api/v1/topics", {"name": "orders.eu"}, tok=producer)
    assert r.status == 403 and "admin" in r.json()["error"]["message"]
    assert call(secured, "POST", "/api/v1/topics", {"name": "orders.eu"}, tok=admin).status == 201
    # produce: only where granted (single and batch)
    assert call(secured, "POST", "/api/v1/messages", msg, tok=producer).status == 200
    r = call(secured, "POST", "/api/v1/messages", {**msg, "topic": "payments"}, tok=producer)
    assert r.status == 403 and "produce" in r.json()["error"]["message"]
    assert call(secured, "POST", "/api/v1/messages", msg, tok=consumer).status == 403
    batch = {"messages": [msg, {**msg, "topic": "payments"}]}
    assert call(secured, "POST", "/api/v1/messages/batch", batch, tok=producer).status == 403
    # consume: only with the granted group
    ask = {"topic": "orders.eu", "group_id": "billing", "consumer_id": "c1", "timeout": "1s"}
    r = call(secured, "POST", "/api/v1/messages/consume", ask, tok=consumer)
    assert r.status == 200, r.body
    [m] = r.json()["messages"]
    other = {**ask, "group_id": "analytics"}
    r = call(secured, "POST", "/api/v1/messages/consume", other, tok=consumer)
    assert r.status == 403 and "analytics" in r.json()["error"]["message"]
    ack = {"message_id": m["message_id"], "group_id": "billing"}
    assert call(secured, "POST", "/api/v1/messages/acknowledge", ack, tok=producer).status == 403
    r = call(secured, "POST", "/api/v1/messages/acknowledge", ack, tok=consumer)
    assert r.status == 200, r.body
    # consumer registration needs admin on its topics
    reg = {"consumer_id": "c1", "group_id": "billing", "topics": ["orders.eu"]}
    assert call(secured, "POST", "/api/v1/consumers", reg, tok=consumer).status == 403
    assert call(secured, "POST", "/api/v1/consumers", reg, tok=admin).status == 201
    # describe: any permission on the topic
    assert call(secured, "GET", "/api/v1/topics/orders.eu", tok=consumer).status == 200
    nobody = token("nobody")
    assert call(secured, "GET", "/api/v1/topics/orders.eu", tok=nobody).status == 403
    assert call(secured, "DELETE", "/api/v1/topics/orders.eu", tok=producer).status == 403
    assert call(secured, "DELETE", "/api/v1/topics/orders.eu", tok=admin).status == 200


def test_audit_log_records_decisions_and_admin_actions_without_content(
    secured: MqfastProcess,
) -> None:
    admin = token("ops", ["admin"])
    producer = token("svc-a", ["producer"])
    secret_content = "card-number-4111"
    call(secured, "POST", "/api/v1/messages", {"topic": "t", "content": secret_content})
    call(secured, "POST", "/api/v1/topics", {"name": "audited"}, tok=producer)
    call(secured, "POST", "/api/v1/topics", {"name": "audited"}, tok=admin)
    call(
        secured,
        "POST",
        "/api/v1/messages",
        {"topic": "audited", "content": secret_content},
        tok=producer,
    )
    lines = audit_lines(secured)
    outcomes = [(x.get("actor"), x.get("action"), x.get("outcome")) for x in lines]
    assert ("", "authenticate", "denied") in outcomes
    assert ("svc-a", "/api/v1/topics", "denied") in outcomes
    assert ("ops", "POST /api/v1/topics", "ok") in outcomes
    assert len(lines) == 3  # the granted produce is not an administrative action
    assert all(x.get("remote_addr", "").startswith("127.0.0.1:") for x in lines)
    assert secret_content not in secured.logs()


def test_reachable_from_other_machines_without_auth_refuses_to_start(tmp_path: Path) -> None:
    srv = new_server(tmp_path, MESSAGE_QUEUE_HOST="0.0.0.0")
    out = subprocess.run(
        [sys.executable, "-m", "mqfast.cli", "serve"],
        env=srv.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "MESSAGE_QUEUE_INSECURE" in out.stderr


def test_insecure_opt_in_starts_and_warns(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_HOST="0.0.0.0", MESSAGE_QUEUE_INSECURE="1")
    assert srv.request("POST", "/api/v1/messages", {"topic": "t", "content": "x"}).status == 200
    assert "authentication is off" in srv.logs()


def test_mqfast_token_prints_a_token_the_server_accepts(secured: MqfastProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mqfast.cli", "token", "--sub", "dev", "--role", "admin"],
        env={**os.environ, **AUTH_ENV},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    tok = out.stdout.strip()
    assert call(secured, "GET", "/api/v1/topics", tok=tok).status == 200
    none = subprocess.run(
        [sys.executable, "-m", "mqfast.cli", "token", "--sub", "dev"],
        env={k: v for k, v in os.environ.items() if not k.startswith("MESSAGE_QUEUE_JWT")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert none.returncode == 2 and "MESSAGE_QUEUE_JWT_SECRET" in none.stderr


def test_produce_quota_per_subject_answers_429_with_retry_after(make_server: MakeServer) -> None:
    import time

    srv = make_server(**AUTH_ENV, MESSAGE_QUEUE_QUOTA_MESSAGES="5", MESSAGE_QUEUE_QUOTA_BURST="1s")
    a, b = token("svc-a", ["producer"]), token("svc-b", ["producer"])
    # a producer may not create topics: an admin does
    assert (
        call(srv, "POST", "/api/v1/topics", {"name": "q"}, tok=token("ops", ["admin"])).status
        == 201
    )
    started = time.monotonic()
    answers = [
        call(srv, "POST", "/api/v1/messages", {"topic": "q", "content": "x"}, tok=a)
        for _ in range(20)
    ]
    elapsed = time.monotonic() - started
    ok = [r for r in answers if r.status == 200]
    limited = [r for r in answers if r.status == 429]
    assert len(ok) + len(limited) == 20, [r.status for r in answers]
    assert 1 <= len(ok) <= 5 + 5 * elapsed + 1  # burst + rate over the time it took
    assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
    assert limited[0].json()["error"]["code"] == "rate_limited"
    # another subject has its own allowance
    assert (
        call(srv, "POST", "/api/v1/messages", {"topic": "q", "content": "x"}, tok=b).status == 200
    )
    # a batch counts every message
    batch = {"messages": [{"topic": "q", "content": "x"}] * 10}
    assert call(srv, "POST", "/api/v1/messages/batch", batch, tok=b).status == 429
    # a request refused as bad input spends none of the allowance
    c = token("svc-c", ["producer"])
    bad = {"topic": "q", "content": "x", "ttl": "soon"}
    bad_batch = {"messages": [{"topic": "q", "content": "x"}] * 3 + [bad]}
    for _ in range(5):
        assert call(srv, "POST", "/api/v1/messages", bad, tok=c).status == 400
        assert call(srv, "POST", "/api/v1/messages/batch", bad_batch, tok=c).status == 400
    good = {"topic": "q", "content": "x"}
    assert [call(srv, "POST", "/api/v1/messages", good, tok=c).status for _ in range(3)] == [
        200
    ] * 3
