"""scripts/services.py: real Kafka, PostgreSQL and Redis start, answer, stop, restart and die.

These run the real servers (installed on first use), so they check what the rest of the suite
relies on: a password login, data kept across a stop or a kill, a message produced and
consumed, a broker of three going away and coming back, and no process outliving its owner.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tests import backends
from tests.backends import SERVICES_PATH, services


def wait_until(cond: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- redis


def resp(host: str, port: int, *args: str) -> bytes | None:
    """One Redis command over a raw socket; the reply's payload (None for a nil bulk)."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        b = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(out)
        buf = b""
        while True:
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {buf!r}"
            buf += chunk
            head, sep, rest = buf.partition(b"\r\n")
            if not sep:
                continue
            if head[:1] != b"$":
                assert head[:1] in (b"+", b":"), head
                return head[1:]
            size = int(head[1:])
            if size < 0:
                return None
            if len(rest) >= size + 2:
                return rest[:size]


def test_redis_answers_ping_and_keeps_keys_across_stop_and_kill(redis: Any) -> None:
    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    assert resp(redis.host, redis.port, "PING") == b"PONG"
    key = f"k-{uuid.uuid4().hex}"
    assert resp(redis.host, redis.port, "SET", key, "before-stop") == b"OK"

    pid = redis.pid
    redis.stop()
    assert not redis.running and not services.pid_alive(pid)
    assert not services.port_open(redis.host, redis.port)
    redis.start()
    assert redis.pid != pid
    assert resp(redis.host, redis.port, "GET", key) == b"before-stop"

    # The append-only file is written before Redis replies, so a kill -9 right after the
    # reply keeps the key (fsync matters only if the machine goes down).
    assert resp(redis.host, redis.port, "SET", key, "before-kill") == b"OK"
    pid = redis.pid
    redis.kill()
    assert not services.pid_alive(pid)
    redis.start()
    assert resp(redis.host, redis.port, "GET", key) == b"before-kill"

    # What the autouse fixture does for whatever a test leaves stopped.
    redis.kill()
    backends._revive()
    assert resp(redis.host, redis.port, "GET", key) == b"before-kill"


def test_a_failed_start_raises_with_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = services.Redis(tmp_path, taken.getsockname()[1])
        with pytest.raises(services.ServiceError) as e:
            r.start()
    msg = str(e.value)
    assert "exited with code" in msg and "--- last" in msg
    assert "Address already in use" in msg or "bind" in msg.lower(), msg
    assert not r.running


def test_a_port_taken_between_pick_and_bind_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another test session on the machine may bind a picked port first: start elsewhere."""
    real = services.free_ports
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([[port]])
        monkeypatch.setattr(services, "free_ports", lambda n: next(picks, None) or real(n))
        r = services.start_redis(tmp_path)
    try:
        assert r.port != port and r.ping()
    finally:
        r.stop()


# --------------------------------------------------------------------------- postgres


def test_postgres_logs_in_with_the_password_and_keeps_data_across_restarts(
    postgres: Any,
) -> None:
    assert postgres.dsn == (f"postgresql://mqfast:mqfast@127.0.0.1:{postgres.port}/mqfast")
    table = f"t_{uuid.uuid4().hex[:12]}"

    async def write() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        try:
            assert await conn.fetchval("SELECT current_user") == "mqfast"
            await conn.execute(f"CREATE TABLE {table} (v text)")
            await conn.execute(f"INSERT INTO {table} VALUES ('kept')")
        finally:
            await conn.close()

    async def read() -> list[str]:
        conn = await asyncpg.connect(postgres.dsn)
        try:
            return [r["v"] for r in await conn.fetch(f"SELECT v FROM {table}")]
        finally:
            await conn.close()

    async def wrong_password() -> None:
        await asyncpg.connect(
            host=postgres.host,
            port=postgres.port,
            user=postgres.user,
            password="wrong",
            database=postgres.database,
        )

    asyncio.run(write())
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(wrong_password())

    pid = postgres.pid
    postgres.stop()
    assert not postgres.running and not services.pid_alive(pid)
    assert not services.port_open(postgres.host, postgres.port)
    postgres.start()
    assert asyncio.run(read()) == ["kept"]

    postgres.kill()  # crash recovery from the WAL
    postgres.start()
    assert asyncio.run(read()) == ["kept"]


# --------------------------------------------------------------------------- kafka


def create_topic(bootstrap: str, replication: int = -1) -> str:
    topic = f"t-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, replication)]).values():
        f.result(30)
    return topic


def produce(bootstrap: str, topic: str, value: bytes) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "message.timeout.ms": 30000})
    errors: list[Any] = []
    p.produce(topic, value, on_delivery=lambda err, _msg: err and errors.append(err))
    assert p.flush(40) == 0, "message not delivered"
    assert not errors, errors


def consume_all(bootstrap: str, topic: str, count: int) -> list[bytes]:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    got: list[bytes] = []
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            got.append(msg.value())
    finally:
        c.close()
    return got


def test_kafka_produces_and_consumes_and_keeps_messages_across_a_restart(kafka: Any) -> None:
    assert kafka.replication == 1 and len(kafka.nodes) == 1
    node = kafka.nodes[0]
    assert kafka.bootstrap == f"127.0.0.1:{node.port}"
    topic = create_topic(kafka.bootstrap)
    produce(kafka.bootstrap, topic, b"one")
    assert consume_all(kafka.bootstrap, topic, 1) == [b"one"]

    pid = node.pid
    kafka.stop_node(node.node_id)
    assert not node.running and not services.pid_alive(pid)
    assert not services.port_open(node.host, node.port)
    kafka.start_node(node.node_id)
    assert node.pid != pid and kafka.running
    produce(kafka.bootstrap, topic, b"two")
    assert consume_all(kafka.bootstrap, topic, 2) == [b"one", b"two"]


def test_three_brokers_replicate_and_survive_one_going_away(kafka3: Any) -> None:
    assert kafka3.replication == 3 and len(kafka3.nodes) == 3
    assert len(kafka3.bootstrap.split(",")) == 3
    topic = create_topic(kafka3.bootstrap)  # default replication factor: 3
    admin = AdminClient({"bootstrap.servers": kafka3.bootstrap})
    [part] = admin.list_topics(topic, timeout=10).topics[topic].partitions.values()
    assert sorted(part.replicas) == [1, 2, 3]

    victim = kafka3.nodes[1]
    kafka3.stop_node(victim.node_id)
    assert not victim.running
    # min.insync.replicas=2: acks=all still succeeds with two of three.
    produce(kafka3.bootstrap, topic, b"with-two")
    kafka3.start_node(victim.node_id)
    assert kafka3.running
    assert consume_all(kafka3.bootstrap, topic, 1) == [b"with-two"]


def test_env_for_points_mqfast_at_the_services(kafka: Any, postgres: Any, redis: Any) -> None:
    env = services.env_for(kafka, postgres, redis)
    assert env["KAFKA_BROKERS"] == kafka.bootstrap
    assert (env["DB_HOST"], env["DB_PORT"]) == ("127.0.0.1", str(postgres.port))
    assert (env["DB_USER"], env["DB_PASSWORD"], env["DB_NAME"]) == ("mqfast",) * 3
    assert (env["REDIS_HOST"], env["REDIS_PORT"]) == ("127.0.0.1", str(redis.port))
    assert services.env_for(None, None, None) == {}


def test_kafka_jars_are_cached_with_the_logging_binding() -> None:
    lib = services.kafka_lib()
    names = {p.name for p in lib.glob("*.jar")}
    version = services.kafka_version(lib)
    assert f"kafka_2.13-{version}.jar" in names
    assert any(n.startswith(("log4j-slf4j-impl-", "log4j-slf4j2-impl-")) for n in names)
    assert (lib.parent / "COMPLETE").exists()


def test_free_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = services.free_ports(6)
    assert len(set(ports)) == 6
    assert all(p < low for p in ports)
    assert not set(ports) & set(services.free_ports(6))


# --------------------------------------------------------------------------- CLI, ownership


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SERVICES_PATH), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_up_leaves_services_running_and_down_stops_them(tmp_path: Path) -> None:
    d = tmp_path / "svc"
    up = run_cli("up", "--only", "redis,postgres", "--dir", str(d))
    assert up.returncode == 0, up.stderr
    env = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
    env = {k: shlex.split(v)[0] for k, v in env.items()}
    assert set(env) >= {"DB_HOST", "DB_PORT", "DB_PASSWORD", "REDIS_HOST", "REDIS_PORT"}
    assert "KAFKA_BROKERS" not in env
    # `up` has exited: the services are on their own now.
    assert resp(env["REDIS_HOST"], int(env["REDIS_PORT"]), "PING") == b"PONG"
    assert services.port_open(env["DB_HOST"], int(env["DB_PORT"]))
    state = services._read_state(d)
    pids = [p["pid"] for p in state["processes"]]
    assert all(services.pid_alive(p) for p in pids)

    status = run_cli("status", "--dir", str(d))
    assert status.returncode == 0 and "running" in status.stdout, status
    assert run_cli("up", "--only", "redis", "--dir", str(d)).returncode == 1  # already up

    down = run_cli("down", "--dir", str(d))
    assert down.returncode == 0, down.stderr
    assert not any(services.pid_alive(p) for p in pids)
    for scratch in state["scratch"]:
        assert not Path(scratch).exists()
    assert run_cli("status", "--dir", str(d)).returncode == 1


OWNER = """
import importlib.util, os, signal, sys, threading, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("svc", {path!r})
svc = importlib.util.module_from_spec(spec)
sys.modules["svc"] = svc
spec.loader.exec_module(svc)
box = []
# Started from a thread that ends at once: the service must not die with that thread.
t = threading.Thread(target=lambda: box.append(svc.start_redis(Path(sys.argv[1]))))
t.start()
t.join()
print(box[0].pid, flush=True)
time.sleep(0.5)
print("alive" if box[0].running else "dead", flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_services_never_outlive_the_process_that_started_them(tmp_path: Path, end: str) -> None:
    """A normal exit stops them (atexit); a kill -9 too (parent-death signal)."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(OWNER.format(path=str(SERVICES_PATH))))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "redis"), end],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    expected = -signal.SIGKILL if end == "kill" else 0
    assert done.returncode == expected, done.stderr
    pid_line, state = done.stdout.split()
    assert state == "alive"
    pid = int(pid_line)
    wait_until(lambda: not services.pid_alive(pid), 10, f"redis pid {pid} to go")
    assert os.path.exists(tmp_path / "redis" / "redis.log")


def test_a_kafka_cluster_id_never_opens_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xf8 0x00...: base64 "-AAA..."; kafka-storage takes such an id for an option
    drawn = iter([uuid.UUID(bytes=b"\xf8" + b"\x00" * 15), uuid.UUID(int=1)])
    monkeypatch.setattr(services.uuid, "uuid4", lambda: next(drawn))
    cid = services._cluster_id()
    assert cid == "AAAAAAAAAAAAAAAAAAAAAQ"
