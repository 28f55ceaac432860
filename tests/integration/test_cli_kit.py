"""``mqfast produce|consume|topics|dlq`` against a real server, as a shell user runs them."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.conftest import MakeServer, MqfastProcess


def mqfast(
    url: str, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    full = {**os.environ, "MQFAST_URL": url}
    full.pop("MQFAST_TOKEN", None)  # only a test's own token
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mqfast.cli", *args],
        input=stdin,
        capture_output=True,
        env=full,
        timeout=120,
    )


def lines(out: bytes) -> list[Any]:
    return [json.loads(line) for line in out.splitlines()]


def topic() -> str:
    return f"cli-{uuid.uuid4().hex[:10]}"


def no_traceback(done: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in done.stderr, done.stderr.decode()


def test_produce_lines_then_consume_prints_and_acknowledges(module_server: MqfastProcess) -> None:
    url, t = module_server.base_url, topic()
    text = "".join(f"line {i}\n" for i in range(2500))
    produced = mqfast(url, "produce", t, "--batch-size", "1000", stdin=text.encode())
    assert (produced.returncode, produced.stdout, produced.stderr) == (0, b"", b"")
    consumed = mqfast(url, "consume", t, "--group", "g", "--wait", "1")
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stderr == b""  # not a terminal: no progress line
    messages = lines(consumed.stdout)
    assert [m["content"] for m in messages] == [f"line {i}" for i in range(2500)]
    assert {m["delivery_count"] for m in messages} == {1}
    again = mqfast(url, "consume", t, "--group", "g", "--wait", "0")
    assert (again.returncode, again.stdout) == (0, b"")  # every one was acknowledged
    [info] = lines(mqfast(url, "topics", "get", t).stdout)
    assert info["consumer_groups"] == [{"group_id": "g", "lag": 0}]


def test_produce_json_lines_with_key_headers_priority(module_server: MqfastProcess) -> None:
    url, t = module_server.base_url, topic()
    rows = [
        {"content": "a", "key": "user-1", "headers": {"source": "cli"}, "priority": 7},
        {"content": '{"event":"login"}'},
    ]
    stdin = "\n".join(json.dumps(r) for r in rows).encode() + b"\n\n"
    produced = mqfast(url, "produce", t, "--format", "json", stdin=stdin)
    assert produced.returncode == 0, produced.stderr
    got = lines(mqfast(url, "consume", t, "--group", "g", "--max", "2").stdout)
    by_content = {m["content"]: m for m in got}
    assert set(by_content) == {"a", '{"event":"login"}'}
    assert by_content["a"]["key"] == "user-1"
    assert by_content["a"]["headers"] == {"source": "cli"}
    assert by_content["a"]["priority"] == 7


def test_max_stops_after_n_and_no_ack_leaves_them_to_be_delivered_again(
    module_server: MqfastProcess,
) -> None:
    url, t = module_server.base_url, topic()
    assert mqfast(url, "produce", t, stdin=b"a\nb\nc\nd\ne\n").returncode == 0
    peek = mqfast(url, "consume", t, "--group", "g", "--max", "2", "--no-ack")
    assert [m["content"] for m in lines(peek.stdout)] == ["a", "b"]
    rest = mqfast(url, "consume", t, "--group", "g", "--max", "5", "--wait", "5")
    got = lines(rest.stdout)
    assert sorted(m["content"] for m in got) == ["a", "b", "c", "d", "e"]
    assert {m["content"]: m["delivery_count"] for m in got if m["content"] in "ab"} == {
        "a": 2,
        "b": 2,
    }
    after = mqfast(url, "consume", t, "--group", "g", "--wait", "0")
    assert after.stdout == b""


def test_topics_create_get_list_delete(module_server: MqfastProcess) -> None:
    url, t = module_server.base_url, topic()
    created = mqfast(url, "topics", "create", t, "--partitions", "3", "--retention", "2h")
    assert created.returncode == 0, created.stderr
    [c] = lines(created.stdout)
    assert (c["name"], c["partitions"], c["retention"]) == (t, 3, 2 * 3600 * 10**9)
    [g] = lines(mqfast(url, "topics", "get", t).stdout)
    assert [p["partition"] for p in g["partition_stats"]] == [0, 1, 2]
    assert t in [x["name"] for x in lines(mqfast(url, "topics", "list").stdout)]
    # --url before the command works as well as after it
    listed = mqfast("http://127.0.0.1:1", "--url", url, "topics", "list")
    assert t in [x["name"] for x in lines(listed.stdout)]
    deleted = mqfast(url, "topics", "delete", t)
    assert lines(deleted.stdout) == [{"name": t, "deleted": True}]
    gone = mqfast(url, "topics", "get", t)
    assert gone.returncode == 1
    assert gone.stdout == b""
    assert gone.stderr.decode().startswith("mqfast topics: 404 unknown_topic: ")
    no_traceback(gone)


def test_dlq_redrive_moves_dead_letters_back(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_DELIVERY_LIMIT="1")
    url, t = srv.base_url, topic()
    assert mqfast(url, "produce", t, stdin=b"poison\n").returncode == 0
    r = srv.request("POST", "/api/v1/messages/consume", {"topic": t, "group_id": "g",
                                                          "consumer_id": "c"})  # fmt: skip
    [m] = r.json()["messages"]
    ack = {"group_id": "g", "acks": [{"message_id": m["message_id"], "success": False}]}
    assert (
        srv.request("POST", "/api/v1/messages/acknowledge/batch", ack).json()["results"][0][
            "status"
        ]
        == "dead_lettered"
    )
    dead = lines(mqfast(url, "consume", f"{t}.dlq", "--group", "look", "--max", "1").stdout)
    assert dead[0]["headers"]["x-mqfast-dlq-reason"] == "failed"
    redriven = mqfast(url, "dlq", "redrive", t)
    assert lines(redriven.stdout) == [{"topic": t, "moved": 1}]
    back = lines(mqfast(url, "consume", t, "--group", "g2", "--max", "2", "--wait", "2").stdout)
    assert [(x["content"], x["headers"].get("x-mqfast-redriven-from")) for x in back] == [
        ("poison", None),
        ("poison", f"{t}.dlq"),
    ]


def test_errors_are_one_line_with_the_servers_code_and_field(
    module_server: MqfastProcess,
) -> None:
    url, t = module_server.base_url, topic()
    bad = mqfast(url, "produce", t, "--format", "json",
                 stdin=b'{"content":"ok"}\n{"content":"x","priority":12}\n')  # fmt: skip
    assert bad.returncode == 1
    err = bad.stderr.decode()
    assert "line 2: 400 invalid_field: Expected `int` <= 9" in err
    assert "messages[" in err and "].priority" in err
    assert err.rstrip().endswith("1 of 2 messages refused")
    no_traceback(bad)
    malformed = mqfast(url, "produce", t, "--format", "json", stdin=b"{oops\n")
    assert malformed.returncode == 2
    assert malformed.stderr.decode().startswith("mqfast produce: line 1: ")
    no_traceback(malformed)
    missing = mqfast(url, "consume", topic(), "--group", "g", "--max", "1")
    assert missing.returncode == 1
    assert "404 unknown_topic" in missing.stderr.decode()
    no_traceback(missing)


def test_an_unreachable_server_is_an_error_line_not_a_traceback() -> None:
    done = mqfast("http://127.0.0.1:1", "topics", "list")
    assert done.returncode == 1
    assert done.stderr.decode().startswith("mqfast topics: GET /api/v1/topics: ")
    no_traceback(done)


def test_the_token_comes_from_the_environment(make_server: MakeServer) -> None:
    from mqfast.auth import make_token
    from mqfast.config import Settings

    secret = "cli-kit-" * 6
    srv = make_server(MESSAGE_QUEUE_JWT_SECRET=secret)
    refused = mqfast(srv.base_url, "topics", "list")
    assert refused.returncode == 1
    assert "401 unauthorized" in refused.stderr.decode()
    token = make_token(Settings(jwt_secret=secret), "ops", ["admin"])
    ok = mqfast(srv.base_url, "topics", "list", env={"MQFAST_TOKEN": token})
    assert (ok.returncode, ok.stderr) == (0, b"")


def on_a_terminal(url: str, *args: str, stdin: bytes) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pseudo-terminal: (exit status, stdout, what the terminal got)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "MQFAST_URL": url}
    env.pop("MQFAST_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqfast.cli", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    out, _ = proc.communicate(stdin, timeout=120)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    return proc.returncode, out, seen


@pytest.mark.parametrize("command", ["produce", "consume"])
def test_a_terminal_gets_a_progress_line_with_count_and_rate(
    module_server: MqfastProcess, command: str
) -> None:
    url, t = module_server.base_url, topic()
    stdin = b"".join(b"m%d\n" % i for i in range(3000))
    if command == "produce":
        code, out, tty = on_a_terminal(url, "produce", t, stdin=stdin)
    else:
        assert mqfast(url, "produce", t, stdin=stdin).returncode == 0
        code, out, tty = on_a_terminal(url, "consume", t, "--group", "g", "--max", "3000",
                                       stdin=b"")  # fmt: skip
        assert len(out.splitlines()) == 3000
    assert code == 0, tty
    last = tty.replace(b"\r\n", b"\n").split(b"\r")[-1].decode()
    verb = "produced" if command == "produce" else "consumed"
    assert f"{verb} 3,000 messages" in last and "msg/s" in last
    if command == "consume":
        assert "[########################] 100%" in last  # --max gives the bar its total


def readme_blocks(section: str, language: str) -> list[str]:
    from tests.integration.test_readme import README, blocks

    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.index("\n## ", start + 1)
    return [b.text for b in blocks(text[start:end]) if b.language == language]


def test_the_readmes_python_client_examples_run(module_server: MqfastProcess) -> None:
    env = {**os.environ, "MQFAST_URL": module_server.base_url}
    env.pop("MQFAST_TOKEN", None)
    outputs = []
    for code in readme_blocks("Python client", "python"):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr.decode()
        outputs.append(done.stdout.decode())
    blocking, asyncio_ = outputs
    assert blocking.startswith("ProduceResult(") and "offset=0" in blocking.splitlines()[0]
    assert blocking.splitlines()[-1] == "400 invalid_field priority"
    assert len(blocking.splitlines()) == 1 + 1000 + 1  # the result, each message, the error
    assert asyncio_.startswith("ProduceResult(message_id=")


def test_the_readmes_command_line_block_runs(module_server: MqfastProcess) -> None:
    [block] = readme_blocks("Command line", "bash")
    script = block.replace("http://127.0.0.1:8087", module_server.base_url)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("MQFAST_TOKEN", None)
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script], capture_output=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    out = done.stdout.decode().splitlines()
    assert json.loads(out[0])["name"] == "orders"
    consumed = [json.loads(line) for line in out[1:14]]
    assert len(consumed) == 13 and all("message_id" in m for m in consumed)
    assert int(out[14]) == 10001 - 10  # the rest of the 10,001 for billing
    assert json.loads(out[-2]) == {"topic": "orders", "moved": 0}
    assert json.loads(out[-1]) == {"name": "orders", "deleted": True}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_consume_cleanly(module_server: MqfastProcess, signum: int) -> None:
    url, t = module_server.base_url, topic()
    assert mqfast(url, "produce", t, stdin=b"a\nb\nc\nd\n").returncode == 0
    env = {**os.environ, "MQFAST_URL": url}
    env.pop("MQFAST_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqfast.cli", "consume", t, "--group", "g", "--max", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    # Printed, so queued for acknowledgement; then it long-polls for more.
    printed = [json.loads(proc.stdout.readline()) for _ in range(4)]
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert (out, err) == (b"", b"")
    assert [m["content"] for m in printed] == ["a", "b", "c", "d"]
    [info] = lines(mqfast(url, "topics", "get", t).stdout)
    assert info["consumer_groups"] == [{"group_id": "g", "lag": 0}]  # the acks were sent
