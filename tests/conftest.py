"""Shared fixtures: a real mqfast server over loopback, and small HTTP helpers.

End-to-end tests start ``mqfast serve`` as a subprocess (the real binary path: CLI, settings,
engine, listeners) on free loopback ports with a fresh data directory, and stop it with SIGTERM,
checking that it exits 0 as promised.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.backends"]


def free_port(span: int = 4) -> int:
    """A free loopback port whose next ``span - 1`` neighbours are free too.

    Workers serve their debug listeners on base + worker index, so consecutive picks must not
    be adjacent.
    """
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        wanted = set(range(base, base + span))
        if base + span >= 65536 or wanted & _HANDED_OUT:
            continue
        try:
            for port in range(base + 1, base + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.update(wanted)
        return base
    raise RuntimeError("no free port range")


_HANDED_OUT: set[int] = set()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class MqfastProcess:
    """A running ``mqfast serve`` on loopback."""

    port: int
    metrics_port: int
    pprof_port: int
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _conns: list[http.client.HTTPConnection] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> MqfastProcess:
        assert self.log_path is not None
        log = open(self.log_path, "ab")  # kept open for the child's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqfast.cli", "serve"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mqfast exited with {self.proc.returncode}: {self.logs()}")
            try:
                if self.request("GET", "/health/ready").status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"mqfast did not become ready: {self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        port: int | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        """One request on a fresh connection; ``body`` may be bytes, str or JSON-able."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            if body is not None and not isinstance(body, bytes | str):
                body = json.dumps(body)
            hdrs = {"Content-Type": "application/json"} if body is not None else {}
            hdrs.update(headers or {})
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def raw_exchange(
    port: int, data: bytes, *, timeout: float = 5.0, half_close: bool = False
) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout``); for framing tests."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


MakeServer = Callable[..., MqfastProcess]


def new_server(base: Path, data_dir: Path | None = None, **env: str) -> MqfastProcess:
    """A server (not started) with free loopback ports, its data and log under ``base``."""
    port, mport, pport = free_port(), free_port(), free_port()
    ddir = data_dir or base / "data"
    full_env = {
        **os.environ,
        "MESSAGE_QUEUE_PORT": str(port),
        "METRICS_ADDR": f"127.0.0.1:{mport}",
        "PPROF_ADDR": f"127.0.0.1:{pport}",
        "MESSAGE_QUEUE_DATA_DIR": str(ddir),
        "MESSAGE_QUEUE_SHUTDOWN_TIMEOUT": "10s",
        **env,
    }
    return MqfastProcess(port, mport, pport, ddir, full_env, log_path=base / "server.log")


def stop_server(srv: MqfastProcess) -> None:
    """SIGTERM and check the promised exit code 0."""
    code = srv.stop()
    assert code == 0, f"server exited {code} on SIGTERM:\n{srv.logs()[-3000:]}"


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqfastProcess]:
    """One default server shared by a test module."""
    srv = new_server(tmp_path_factory.mktemp("server")).start()
    yield srv
    stop_server(srv)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """Factory: ``make_server(**env)`` starts a server; all are stopped (SIGTERM) at teardown."""
    started: list[MqfastProcess] = []

    def make(data_dir: Path | None = None, start: bool = True, **env: str) -> MqfastProcess:
        base = tmp_path / f"server{len(started)}"
        base.mkdir()
        srv = new_server(base, data_dir, **env)
        started.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in started:
        if srv.proc is not None and srv.proc.poll() is None:
            stop_server(srv)


@pytest.fixture
def server(make_server: MakeServer) -> MqfastProcess:
    """One default server (embedded engine, auto-created topics)."""
    return make_server()


@pytest.fixture(scope="session")
def cluster_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that points mqfast at this session's Kafka, PostgreSQL and Redis.

    ``MQFAST_CLUSTER_ENV=<file of export lines>`` (what ``scripts/services.py up`` prints)
    reuses services that are already running instead of starting new ones.
    """
    path = os.environ.get("MQFAST_CLUSTER_ENV")
    if path:
        env = {}
        for line in Path(path).read_text().splitlines():
            name, sep, value = line.removeprefix("export ").partition("=")
            if sep:
                env[name.strip()] = value.strip()
        return env
    kafka = request.getfixturevalue("kafka")
    postgres = request.getfixturevalue("postgres")
    redis = request.getfixturevalue("redis")
    env_for: Callable[..., dict[str, str]] = request.getfixturevalue("services").env_for
    return env_for(kafka, postgres, redis)
