"""A checker under faults: nothing produced is lost, nothing acknowledged comes back.

Three replicas of the Kafka engine share a 3-broker Kafka (replication 3, min ISR 2), Redis and
PostgreSQL. Every request goes to a random replica. Producers produce single messages and
batches with unique contents; consumers consume, acknowledge (singly and in batches, in any
order), nack a fraction with a short requeue delay, and abandon a few leases to let them expire.
Meanwhile a replica is killed with -9 and restarted, a broker is killed and restarted, and Redis
is killed with -9 and restarted (its append-only file is written before it answers, so a crash of
the process keeps every step it confirmed; ``scripts/services.py``).

An answer other than 2xx to a produce (a 503 saying ``X-Mqfast-Outcome: unknown``, a connection
error, a replica killed under it) means "maybe produced": such a message may turn up, and is not
required to; a plain 503 means "not written", and such a message must never be delivered. At
the end, after a drain: every message whose produce was answered 2xx is acknowledged (a 2xx
acknowledgement) or in ``<topic>.dlq`` (lost = 0), and no delivery was asked for after a 2xx
acknowledgement of the same message (duplicates after ack = 0).
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.cluster.test_faults import read_back
from tests.conformance.conftest import (
    ACK,
    ACK_BATCH,
    CONSUME,
    DLQ_PREFIX,
    FAST_ENV,
    PRODUCE,
    TOPICS,
    Gateway,
)
from tests.conftest import MakeServer, Reply

PARTITIONS = 3
GROUP = "checker"
PRODUCERS = 2
CONSUMERS = 4
VISIBILITY = "2s"
NACK_SHARE = 0.08
ABANDON_SHARE = 0.02  # leases left to expire: redeliveries without a fault
BATCH_SHARE = 0.5
SETTLE_PATIENCE_S = 30.0  # how long an acknowledgement is retried through 503s and outages
DRAIN_S = 120.0  # a dead letter whose writer died is handed out again after 30 s


class Cluster:
    """Sends each request to a random replica; ``None`` when the answer never came."""

    def __init__(self, gws: list[Gateway], seed: int) -> None:
        self.gws = gws
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def send(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Reply | None:
        with self._lock:
            gw = self._rng.choice(self.gws)
        try:
            return gw.call(method, path, body, timeout)
        except (OSError, http.client.HTTPException):
            return None  # refused, reset, timed out: the replica is down or died meanwhile


@dataclass
class Ledger:
    """What the clients saw, from every thread."""

    produced: dict[str, str] = field(default_factory=dict)  # id -> content, produce got a 2xx
    # id -> partition, offset and when its produce was answered (for the report of a loss)
    where: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    maybe: set[str] = field(default_factory=set)  # contents whose produce got no 2xx
    refused: set[str] = field(default_factory=set)  # a 503 that says nothing was written
    deliveries: list[tuple[str, str, int, float]] = field(default_factory=list)
    acked: dict[str, float] = field(default_factory=dict)  # id -> when its first 2xx ack came
    nacked: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    faults: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, what: str, r: Reply | None) -> None:
        with self.lock:
            self.answers[f"{what} {r.status if r is not None else 'no answer'}"] += 1


@dataclass
class Load:
    cluster: Cluster
    topic: str
    ledger: Ledger
    stop_producing: threading.Event = field(default_factory=threading.Event)
    draining: threading.Event = field(default_factory=threading.Event)
    stop_consuming: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def guarded(self, fn: Callable[[int], None]) -> Callable[[int], None]:
        def run(i: int) -> None:
            try:
                fn(i)
            except BaseException as e:  # a thread's failure fails the test, with its reason
                self.errors.append(f"{fn.__name__}[{i}]: {e!r}")
                raise

        return run

    # ---- producers -------------------------------------------------------------------------

    def produce(self, i: int) -> None:
        rng = random.Random(1000 + i)
        seq = 0
        while not self.stop_producing.is_set():
            n = rng.choice([1, 1, rng.randint(2, 25)])
            contents = [f"p{i}-{seq + k}" for k in range(n)]
            seq += n
            if n == 1:
                r = self.cluster.send(
                    "POST", PRODUCE, {"topic": self.topic, "content": contents[0]}
                )
                results: list[dict[str, Any]] = []
                if r is not None and r.status == 200:
                    results = [r.json()]
            else:
                body = {"topic": self.topic, "messages": [{"content": c} for c in contents]}
                r = self.cluster.send("POST", "/api/v1/messages/batch", body)
                results = r.json()["results"] if r is not None and r.status == 200 else []
            self.ledger.answer("produce", r)
            if r is not None:
                assert r.status in (200, 503), (r.status, r.body)
            # A 503 is "not written" unless it says the outcome is unknown (a delivery timeout).
            refused = (
                n == 1
                and r is not None
                and r.status == 503
                and r.headers.get("x-mqfast-outcome") != "unknown"
            )
            with self.ledger.lock:
                for k, content in enumerate(contents):
                    if refused:
                        self.ledger.refused.add(content)
                    elif k >= len(results) or "error" in results[k]:
                        self.ledger.maybe.add(content)
                    else:
                        mid = results[k]["message_id"]
                        self.ledger.produced[mid] = content
                        self.ledger.where[mid] = (
                            results[k]["partition"],
                            results[k]["offset"],
                            time.monotonic(),
                        )
            time.sleep(rng.uniform(0.005, 0.03))

    # ---- consumers -------------------------------------------------------------------------

    def consume(self, i: int) -> None:
        rng = random.Random(2000 + i)
        consumer = f"c{i}"
        while not self.stop_consuming.is_set():
            asked = time.monotonic()
            body = {
                "topic": self.topic,
                "group_id": GROUP,
                "consumer_id": consumer,
                "max_messages": rng.randint(1, 40),
                "timeout": "300ms",
                "visibility_timeout": VISIBILITY,
            }
            r = self.cluster.send("POST", CONSUME, body)
            self.ledger.answer("consume", r)
            if r is None or r.status == 503:
                time.sleep(0.1)
                continue
            assert r.status == 200, (r.status, r.body)
            msgs = r.json()["messages"]
            with self.ledger.lock:
                for m in msgs:
                    self.ledger.deliveries.append(
                        (m["message_id"], m["content"], m["delivery_count"], asked)
                    )
            draining = self.draining.is_set()
            todo: list[tuple[str, bool]] = []
            for m in msgs:
                roll = rng.random()
                if not draining and roll < ABANDON_SHARE:
                    continue
                todo.append((m["message_id"], draining or roll >= ABANDON_SHARE + NACK_SHARE))
            rng.shuffle(todo)  # acknowledgements arrive in any order, parts of a run at a time
            while todo:
                k = rng.randint(1, len(todo)) if rng.random() < BATCH_SHARE else 1
                self.settle(consumer, todo[:k])
                todo = todo[k:]

    def settle(self, consumer: str, items: list[tuple[str, bool]]) -> None:
        """Acknowledge (``True``) or nack items, retried until the answer is known."""
        if len(items) == 1:
            [(mid, ok)] = items
            path = ACK
            body: dict[str, Any] = {"message_id": mid, "group_id": GROUP, "success": ok}
            if not ok:
                body["requeue_delay"] = "100ms"
        else:
            path = ACK_BATCH
            acks = [
                {"message_id": mid, "success": ok, **({} if ok else {"requeue_delay": "100ms"})}
                for mid, ok in items
            ]
            body = {"group_id": GROUP, "acks": acks}
        body.update(topic=self.topic, consumer_id=consumer)
        deadline = time.monotonic() + SETTLE_PATIENCE_S
        while True:
            r = self.cluster.send("POST", path, body)
            self.ledger.answer("ack" if len(items) == 1 else "ack batch", r)
            if r is not None and r.status != 503:
                break
            if time.monotonic() > deadline:
                return  # never known: the lease expires and the message comes again
            time.sleep(0.1)
        came = time.monotonic()
        if path == ACK:
            # 409: the lease expired, or another consumer holds it now
            assert r.status in (200, 409), (r.status, r.body)
            results = [r.json() if r.status == 200 else {"error": r.json()["error"]}]
        else:
            assert r.status == 200, (r.status, r.body)
            results = r.json()["results"]
        with self.ledger.lock:
            for (mid, ok), res in zip(items, results, strict=True):
                if "error" in res:
                    assert res["error"]["code"] == "conflict", (mid, res)
                elif ok:
                    assert res["status"] in ("acknowledged", "already_acknowledged"), res
                    self.ledger.acked.setdefault(mid, came)
                else:
                    assert res["status"] in ("requeued", "dead_lettered"), res
                    self.ledger.nacked += 1


def dead_letters(cluster: Cluster, bootstrap: str, topic: str) -> set[str]:
    """The ids (in ``topic``) of the messages in ``<topic>.dlq``, read from Kafka."""
    dlq = topic + ".dlq"
    while True:
        r = cluster.send("GET", f"{TOPICS}/{dlq}")
        if r is not None and r.status in (200, 404):
            break
        time.sleep(0.2)
    if r.status == 404:
        return set()
    return read_back(bootstrap, dlq, 1, header=DLQ_PREFIX + "message-id")


def explain_lost(lost: set[str], ledger: Ledger, started: float, url: str, topic: str) -> str:
    """Where each lost message was written, what was delivered of it, and the group's state
    of its partition in Redis: what a failure report needs to be worth a look."""
    import redis as redis_client

    lines = []
    seen: dict[str, list[int]] = {}
    for mid, _, n, _ in ledger.deliveries:
        seen.setdefault(mid, []).append(n)
    parts: set[int] = set()
    for mid in sorted(lost, key=lambda m: ledger.where.get(m, (0, 0, 0.0))):
        p, off, at = ledger.where.get(mid, (-1, -1, 0.0))
        parts.add(p)
        lines.append(
            f"  {mid} p{p}@{off} produced at {at - started:.1f}s deliveries {seen.get(mid, [])}"
        )
    r = redis_client.Redis.from_url(url)
    try:
        pos = r.hgetall(f"mq:{{{GROUP}}}:pos:{topic}")
        cur = r.hgetall(f"mq:{{{GROUP}}}:cur:{topic}")
        runs = sorted(r.hkeys(f"mq:{{{GROUP}}}:run:{topic}"))
        lines.append(f"  redis pos {pos} cur {cur}")
        lines.append(f"  redis runs ({len(runs)}): {runs[:40]}")
    except Exception as e:  # the report must not hide the failure it explains
        lines.append(f"  redis state unreadable: {e!r}")
    lines.append("  faults: " + "; ".join(ledger.faults))
    return "\n".join(lines)


@pytest.fixture
def checked_services(kafka3: Any, postgres: Any, redis: Any) -> Iterator[None]:
    yield
    kafka3.ensure_running()
    if not redis.running:
        redis.start()


@pytest.mark.timeout(420)
def test_checker_under_faults_loses_nothing_and_never_redelivers_after_an_ack(
    make_server: MakeServer,
    kafka3: Any,
    postgres: Any,
    redis: Any,
    services: Any,
    checked_services: None,
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    env = {
        "MESSAGE_QUEUE_ENGINE": "kafka",
        **services.env_for(kafka3, postgres, redis),
        **FAST_ENV,
    }
    gws = [Gateway(make_server(**env), "kafka") for _ in range(3)]
    topic = gws[0].topic(partitions=PARTITIONS, replication=3)
    ledger = Ledger()
    cluster = Cluster(gws, seed=7)
    load = Load(cluster, topic, ledger)
    producers = [
        threading.Thread(target=load.guarded(load.produce), args=(i,), daemon=True)
        for i in range(PRODUCERS)
    ]
    consumers = [
        threading.Thread(target=load.guarded(load.consume), args=(i,), daemon=True)
        for i in range(CONSUMERS)
    ]

    def fault(what: str) -> None:
        ledger.faults.append(f"{time.monotonic() - started:.0f}s {what}")

    try:
        for th in producers + consumers:
            th.start()
        time.sleep(4)
        victim = gws[1].proc
        victim.kill9()
        fault("replica killed -9")
        time.sleep(2)
        victim.start(timeout=60)
        fault("replica restarted")
        time.sleep(3)
        broker = kafka3.nodes[1].node_id
        kafka3.kill_node(broker)
        fault(f"broker {broker} killed -9")
        time.sleep(6)
        kafka3.start_node(broker)
        fault(f"broker {broker} restarted")
        time.sleep(3)
        redis.kill()
        fault("redis killed -9")
        time.sleep(1)
        redis.start()
        fault("redis restarted")
        time.sleep(4)
    finally:
        load.stop_producing.set()
        for th in producers:
            th.join(60)
        load.draining.set()

    # ---- drain: everything produced is acknowledged or dead-lettered -----------------------
    dlq: set[str] = set()
    deadline = time.monotonic() + DRAIN_S
    try:
        while time.monotonic() < deadline and not load.errors:
            time.sleep(3)
            dlq = dead_letters(cluster, kafka3.bootstrap, topic)
            with ledger.lock:
                pending = set(ledger.produced) - set(ledger.acked) - dlq
            if not pending:
                break
        # Longer than a lease: anything still coming back after the acknowledgements shows now.
        time.sleep(3)
    finally:
        load.stop_consuming.set()
        for th in consumers:
            th.join(60)
    dlq = dead_letters(cluster, kafka3.bootstrap, topic)

    with ledger.lock:
        produced = set(ledger.produced)
        acked = dict(ledger.acked)
        deliveries = list(ledger.deliveries)
    lost = produced - set(acked) - dlq
    after_ack = [(mid, n, t) for mid, _, n, t in deliveries if mid in acked and t > acked[mid]]
    known = set(ledger.produced.values()) | ledger.maybe
    phantoms = {c for _, c, _, _ in deliveries if c not in known}
    refused_delivered = {c for _, c, _, _ in deliveries if c in ledger.refused}
    counts = {
        "produced": len(produced),
        "maybe_produced": len(ledger.maybe),
        "refused": len(ledger.refused),
        "delivered": len(deliveries),
        "redelivered": sum(1 for _, _, n, _ in deliveries if n > 1),
        "acknowledged": len(acked),
        "nacked": ledger.nacked,
        "dead_lettered": len(dlq),
        "lost": len(lost),
        "duplicates_after_ack": len(after_ack),
        "acked_and_dead_lettered": len(set(acked) & dlq),
        "phantoms": len(phantoms),
        "refused_but_delivered": len(refused_delivered),
        "faults": len(ledger.faults),
        "seconds": round(time.monotonic() - started),
    }
    for name, value in counts.items():
        record_property(name, value)
    record_property("fault_log", "; ".join(ledger.faults))
    with capsys.disabled():
        print(
            "\nchecker: " + " ".join(f"{k}={v}" for k, v in counts.items()),
            "\nchecker faults: " + "; ".join(ledger.faults),
            "\nchecker answers: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(ledger.answers.items())),
        )
    assert not load.errors, load.errors
    assert len(ledger.faults) == 6, ledger.faults
    assert produced, "nothing was produced"
    assert counts["redelivered"] > 0, "no redelivery happened: the run checked too little"
    assert not lost, (
        f"{len(lost)} messages lost, e.g. {sorted(lost)[:5]} ({counts})\n"
        + explain_lost(lost, ledger, started, redis.url, topic)
    )
    assert not after_ack, f"delivered again after a 2xx acknowledgement: {after_ack[:5]} ({counts})"
    assert not set(acked) & dlq, f"acknowledged and dead-lettered ({counts})"
    assert not phantoms, f"delivered but never produced: {sorted(phantoms)[:5]}"
    assert not refused_delivered, f"refused with a 503, yet delivered: {sorted(refused_delivered)}"
