"""Health endpoints, graceful SIGTERM with requests in flight, and ``--workers 2``."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mqfast.config import Settings
from tests.conftest import MakeServer, MqfastProcess

PRODUCE = "/api/v1/messages"


def stored_ids(data_dir: Path, topic: str) -> set[str]:
    conn = sqlite3.connect(f"file:{data_dir / 'mqfast.db'}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT message_id FROM messages WHERE topic = ?", (topic,))
        return {r[0] for r in rows}
    finally:
        conn.close()


def read_reply(f: object) -> tuple[int, dict[str, str], bytes]:
    readline = f.readline  # type: ignore[attr-defined]
    status = int(readline().split()[1])
    headers: dict[str, str] = {}
    while True:
        line = readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    return status, headers, f.read(n)  # type: ignore[attr-defined]


# ---- health --------------------------------------------------------------------------------


def test_health(server: MqfastProcess) -> None:
    r = server.request("GET", "/health")
    assert r.status == 200, r.body
    assert r.headers["content-type"].startswith("application/json")
    h = r.json()
    assert h["status"] == "ok"
    assert h["checks"]["engine"]["status"] == "up"
    assert h["engine"] == "embedded"
    assert isinstance(h["version"], str) and h["version"]
    assert h["uptime_s"] >= 0


def test_health_live_and_ready(server: MqfastProcess) -> None:
    r = server.request("GET", "/health/live")
    assert r.status == 200 and r.json()["status"] == "ok", r.body
    r = server.request("GET", "/health/ready")
    assert r.status == 200 and r.json()["status"] == "ready", r.body


def test_health_stays_up_after_bad_requests(server: MqfastProcess) -> None:
    for body in (b"{", {"topic": "x", "content": 1}, {"topic": "bad name", "content": "x"}):
        assert server.request("POST", PRODUCE, body).status == 400
    r = server.request("GET", "/health")
    assert r.status == 200 and r.json()["checks"]["engine"]["status"] == "up"


# ---- graceful SIGTERM ----------------------------------------------------------------------


def test_sigterm_answers_a_request_in_flight_and_exits_0(make_server: MakeServer) -> None:
    srv = make_server()
    assert srv.request("POST", PRODUCE, {"topic": "inflight", "content": "warm"}).status == 200
    body = json.dumps({"topic": "inflight", "content": "sent across the SIGTERM"}).encode()
    head = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s, s.makefile("rb") as f:
        s.sendall(head + body[:10])  # the request is in flight: head read, body half-sent
        time.sleep(0.3)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert srv.proc.poll() is None, "exited with a request in flight"
        # An idle keep-alive connection is closed at once.
        idle.settimeout(2)
        assert idle.recv(1) == b""
        # New connections are refused once the listener is closed.
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=1):
                refused = False
        except OSError:
            refused = True
        assert refused, "the listener still accepts connections after SIGTERM"
        s.sendall(body[10:])
        status, headers, answer = read_reply(f)
        assert status == 200, answer
        assert headers.get("connection", "").lower() == "close"
        mid = json.loads(answer)["message_id"]
        assert f.read() == b""
    idle.close()
    assert srv.proc.wait(15) == 0, srv.logs()[-3000:]
    assert mid in stored_ids(srv.data_dir, "inflight")


def test_sigterm_under_load_answers_everything_and_exits_0(make_server: MakeServer) -> None:
    srv = make_server()
    acked: list[str] = []
    statuses: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def producer(n: int) -> None:
        conn: http.client.HTTPConnection | None = None
        i = 0
        while not stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            sent = False
            try:
                payload = json.dumps({"topic": "term-load", "content": f"{n}-{i}"})
                conn.request("POST", PRODUCE, payload, {"Content-Type": "application/json"})
                sent = True
                r = conn.getresponse()
                data = r.read()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                # Refused, or closed before any byte of an answer (the server closed an idle
                # keep-alive connection as the request went out): how a stopping server says
                # no. A torn answer (part of a response) is never acceptable.
                benign = (
                    ConnectionRefusedError,
                    http.client.RemoteDisconnected,
                    BrokenPipeError,
                    ConnectionResetError,
                )
                if sent and not isinstance(e, benign):
                    with lock:
                        errors.append(repr(e))
                conn.close()
                conn = None
                if isinstance(e, ConnectionRefusedError):
                    return
                continue
            i += 1
            with lock:
                statuses.append(r.status)
                if r.status == 200:
                    acked.append(json.loads(data)["message_id"])
                else:
                    body = json.loads(data)
                    if r.status != 503 or "error" not in body:
                        errors.append(f"{r.status} {data[:200]!r}")
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.8)
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(15)
    stop.set()
    for t in threads:
        t.join(10)
    assert code == 0, srv.logs()[-3000:]
    assert not errors, errors[:10]
    assert len(acked) > 0
    missing = set(acked) - stored_ids(srv.data_dir, "term-load")
    assert not missing, f"{len(missing)} acknowledged messages lost on SIGTERM"


# ---- workers -------------------------------------------------------------------------------


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _debug_pid(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/", timeout=5) as r:
        first = r.read().decode().splitlines()[0]
    return int(first.rsplit(" ", 1)[-1])


def _produced(text: str, topic: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'message_queue_messages_produced_total{{topic="{topic}"}}'):
            return float(line.split()[-1])
    return 0.0


def _free_pair(avoid: set[int]) -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free, outside the ephemeral range (so that the
    fixture's own port picks cannot land on ``p + 1``)."""
    rng = random.Random()
    while True:
        p = rng.randrange(20000, 30000)
        if p in avoid or p + 1 in avoid:
            continue
        try:
            for q in (p, p + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p


def test_two_workers_share_the_port(make_server: MakeServer) -> None:
    # Debug ports are base + worker index: give the listener a base whose + 1 is free too.
    pport = _free_pair(set())
    srv = make_server(MESSAGE_QUEUE_WORKERS="2", PPROF_ADDR=f"127.0.0.1:{pport}")
    srv.pprof_port = pport
    # Wait for both workers' debug listeners.
    deadline = time.monotonic() + 15
    while True:
        try:
            pids = {_debug_pid(srv.pprof_port + i) for i in range(2)}
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert len(pids) == 2, "each worker serves its own debug listener"

    results: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(10):  # a fresh connection per request: the kernel spreads them
            r = srv.request("POST", PRODUCE, {"topic": "workers", "content": f"{n}-{i}"})
            with lock:
                results.append((r.status, r.json()))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 200
    assert all(s == 200 for s, _ in results), [b for s, b in results if s != 200][:5]
    ids = [b["message_id"] for _, b in results]
    offsets = [b["offset"] for _, b in results]
    assert len(set(ids)) == 200
    assert sorted(offsets) == list(range(200)), "offsets must be unique across workers"
    info = srv.request("GET", "/api/v1/topics/workers").json()
    assert info["messages"] == 200
    assert stored_ids(srv.data_dir, "workers") == set(ids)

    # One scrape of the pod's metrics listener counts both workers' produces.
    assert _produced(_metrics(srv.metrics_port), "workers") == 200

    assert srv.stop() == 0, srv.logs()[-3000:]
    for port in (srv.metrics_port, srv.pprof_port, srv.pprof_port + 1):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
            still_up = True
        except urllib.error.HTTPError:
            still_up = True
        except OSError:
            still_up = False
        assert not still_up, f"port {port} still answers after SIGTERM"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # exited, not reaped yet by whoever inherited it


def test_workers_stop_when_the_supervisor_is_killed(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_WORKERS="2")
    assert srv.proc is not None
    me = srv.proc.pid
    deadline = time.monotonic() + 15
    while len(workers := Path(f"/proc/{me}/task/{me}/children").read_text().split()) < 2:
        assert time.monotonic() < deadline, workers
        time.sleep(0.1)
    srv.kill9()
    # The kernel sends each worker SIGTERM (PR_SET_PDEATHSIG): they drain and exit, and the
    # ports they held are free again.
    deadline = time.monotonic() + 30
    while not all(_gone(int(pid)) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their supervisor"
        time.sleep(0.1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", srv.port))


# ---- make run ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _make_run(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``make run`` in the repository, with this interpreter's environment as its ``.venv``
    and the install step taken as done (``-o``), so only the run recipe executes."""
    make = shutil.which("make")
    assert make, "make is needed by the README's `make run`"
    venv = Path(sys.prefix)
    return subprocess.Popen(
        [make, "--no-print-directory", "-C", str(REPO), f"VENV={venv}", "-o",
         str(venv / ".installed"), "run"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def test_make_run_listens_on_the_port_of_the_environment(make_server: MakeServer) -> None:
    srv = make_server(start=False)  # free ports and a fresh data directory, not started
    assert srv.log_path is not None
    proc = _make_run(srv.env, srv.log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, srv.logs()
            try:
                if srv.request("GET", "/health/ready").status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not listening on {srv.port}: {srv.logs()}"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_make_run_sets_no_variable_so_the_default_port_applies() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGE_QUEUE_")}
    make = shutil.which("make")
    assert make
    venv = Path(sys.prefix)
    out = subprocess.run(
        [make, "-n", "--no-print-directory", "-C", str(REPO), f"VENV={venv}", "-o",
         str(venv / ".installed"), "run"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == f"{venv}/bin/mqfast serve"
    assert Settings.from_env({}).port == 8087


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("var", ["METRICS_ADDR", "PPROF_ADDR", "MESSAGE_QUEUE_PORT"])
def test_a_listener_address_in_use_stops_start_naming_the_variable(
    var: str, workers: str, make_server: MakeServer
) -> None:
    # With two workers the supervisor binds METRICS_ADDR, each worker the others.
    srv = make_server(start=False, MESSAGE_QUEUE_WORKERS=workers)
    port = {"METRICS_ADDR": srv.metrics_port, "PPROF_ADDR": srv.pprof_port}.get(var, srv.port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        if workers == "1":
            with pytest.raises(RuntimeError, match="exited with 2"):
                srv.start()
        else:
            # Worker 1 may answer ready before worker 0 fails on PPROF_ADDR; either way the
            # supervisor stops them all and exits 2.
            with contextlib.suppress(RuntimeError):
                srv.start()
            assert srv.proc is not None and srv.proc.wait(30) == 2, srv.logs()[-3000:]
    errors = [json.loads(line) for line in srv.logs().splitlines() if line.startswith("{")]
    errors = [e for e in errors if e["level"] == "error"]
    assert errors, srv.logs()
    named = [
        e
        for e in errors
        if e.get("error", "").startswith(f"{var}: cannot listen on 127.0.0.1:{port}: ")
    ]
    assert named, errors
