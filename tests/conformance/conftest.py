"""The consumer-group conformance suite: one set of HTTP tests, run against every engine.

Every test takes ``engine_server`` (a running gateway with short durations) or ``gateway`` (a
factory for more, e.g. with other settings or restarted on the same data). Both are
parametrised by ``ENGINES``: adding an engine is adding its name and its environment to
``ENGINE_ENV``; nothing else in the suite names an engine.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import MakeServer, MqfastProcess, Reply

# Engine name -> the environment that selects it (and whatever it needs to reach its backend).
ENGINE_ENV: dict[str, dict[str, str]] = {
    "embedded": {"MESSAGE_QUEUE_ENGINE": "embedded"},
    # plus the addresses of the Kafka, PostgreSQL and Redis of the test session (cluster_env)
    "kafka": {"MESSAGE_QUEUE_ENGINE": "kafka"},
}
ENGINES = list(ENGINE_ENV)

# Short durations so that timing rules are observable within a test.
FAST_ENV: dict[str, str] = {
    "MESSAGE_QUEUE_VISIBILITY_TIMEOUT": "1s",
    "MESSAGE_QUEUE_DELIVERY_LIMIT": "3",
    "MESSAGE_QUEUE_RETRY_BACKOFF": "100ms",
    "MESSAGE_QUEUE_RETRY_BACKOFF_MAX": "400ms",
    "MESSAGE_QUEUE_CONSUMER_TIMEOUT": "2s",
    "MESSAGE_QUEUE_METRICS_INTERVAL": "1s",
}
VISIBILITY_MS = 1000
DELIVERY_LIMIT = 3
BACKOFF_MS = 100
BACKOFF_MAX_MS = 400
JITTER = 0.2

# Leases in tests that are not about expiry: long enough for a busy 2-core machine.
LONG_LEASE = "30s"
CONSUME = "/api/v1/messages/consume"
ACK = "/api/v1/messages/acknowledge"
ACK_BATCH = "/api/v1/messages/acknowledge/batch"
EXTEND = "/api/v1/messages/extend"
PRODUCE = "/api/v1/messages"
TOPICS = "/api/v1/topics"
CONSUMERS = "/api/v1/consumers"
DLQ_PREFIX = "x-mqfast-dlq-"

_ids = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}-{uuid.uuid4().hex[:6]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_for(
    check: Callable[[], Any], timeout: float = 15.0, every: float = 0.05, what: str = ""
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last {last!r}")


@dataclass
class Gateway:
    """A running gateway of one engine, with the calls of the consumer-group contract."""

    proc: MqfastProcess
    engine: str

    # ---- raw -------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, timeout: float = 15.0) -> Reply:
        return self.proc.request(method, path, body, timeout=timeout)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        r = self.call(method, path, body)
        assert r.status == status, f"{method} {path} {body!r} -> {r.status} {r.body!r}"
        return r.json()

    # ---- topics and produce ----------------------------------------------------------------

    def topic(self, partitions: int = 1, **settings: Any) -> str:
        name = unique("t")
        body = {"name": name, "partitions": partitions, **settings}
        self.ok("POST", TOPICS, body, status=201)
        return name

    def describe(self, topic: str) -> dict[str, Any]:
        out: dict[str, Any] = self.ok("GET", f"{TOPICS}/{topic}")
        return out

    def lag(self, topic: str, group: str) -> int | None:
        for g in self.describe(topic)["consumer_groups"]:
            if g["group_id"] == group:
                return int(g["lag"])
        return None

    def produce(self, topic: str, content: str = "x", **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = self.ok(
            "POST", PRODUCE, {"topic": topic, "content": content, **fields}
        )
        return out

    def produce_many(self, topic: str, n: int, **fields: Any) -> list[dict[str, Any]]:
        body = {"topic": topic, "messages": [{"content": f"m{i}", **fields} for i in range(n)]}
        out = self.ok("POST", "/api/v1/messages/batch", body)
        results: list[dict[str, Any]] = out["results"]
        assert all("error" not in x for x in results), results
        return results

    # ---- consume and acknowledge -----------------------------------------------------------

    def consume_reply(
        self,
        topic: str,
        group: str,
        consumer: str,
        max_messages: int = 10,
        timeout: str | int = "0s",
        visibility: str | int | None = LONG_LEASE,
    ) -> Reply:
        body: dict[str, Any] = {
            "topic": topic,
            "group_id": group,
            "consumer_id": consumer,
            "max_messages": max_messages,
            "timeout": timeout,
        }
        if visibility is not None:
            body["visibility_timeout"] = visibility
        return self.call("POST", CONSUME, body, timeout=60)

    def consume(self, *args: Any, **kw: Any) -> list[dict[str, Any]]:
        r = self.consume_reply(*args, **kw)
        assert r.status == 200, r.body
        out = r.json()
        assert out["count"] == len(out["messages"]), out
        msgs: list[dict[str, Any]] = out["messages"]
        return msgs

    def consume_until(
        self,
        topic: str,
        group: str,
        consumer: str,
        want: int,
        deadline_s: float = 20.0,
        ack: bool = False,
        **kw: Any,
    ) -> list[dict[str, Any]]:
        """Consume until ``want`` messages arrived (in several polls if need be)."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + deadline_s
        while len(got) < want and time.monotonic() < deadline:
            kw.setdefault("timeout", "1s")
            batch = self.consume(topic, group, consumer, max_messages=want - len(got), **kw)
            for m in batch:
                if ack:
                    self.ack(m["message_id"], group, topic=topic, consumer=consumer)
            got += batch
        assert len(got) >= want, f"got {len(got)} of {want} messages within {deadline_s}s"
        return got

    def ack_reply(
        self,
        message_id: str,
        group: str,
        success: bool = True,
        topic: str | None = None,
        consumer: str | None = None,
        **extra: Any,
    ) -> Reply:
        body: dict[str, Any] = {"message_id": message_id, "group_id": group, "success": success}
        if topic is not None:
            body["topic"] = topic
        if consumer is not None:
            body["consumer_id"] = consumer
        body.update(extra)
        return self.call("POST", ACK, body)

    def ack(self, *args: Any, **kw: Any) -> dict[str, Any]:
        r = self.ack_reply(*args, **kw)
        assert r.status == 200, r.body
        out: dict[str, Any] = r.json()
        return out

    def nack(self, message_id: str, group: str, **kw: Any) -> dict[str, Any]:
        return self.ack(message_id, group, success=False, **kw)

    # ---- side port -------------------------------------------------------------------------

    def metrics_text(self) -> str:
        r = self.proc.request("GET", "/metrics", port=self.proc.metrics_port)
        assert r.status == 200
        return r.body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample (0 when the series is absent)."""
        for line in self.metrics_text().splitlines():
            m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
            if m is None or m.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(m.group(4))
        return 0.0


class GatewayFactory:
    """Starts gateways of one engine: ``start(**env)``, ``restart(gw)`` on the same data."""

    def __init__(
        self, engine: str, make_server: MakeServer, backends: dict[str, str] | None = None
    ) -> None:
        self.engine = engine
        self._make = make_server
        self._backends = backends or {}

    def env(self, **env: str) -> dict[str, str]:
        return {**ENGINE_ENV[self.engine], **self._backends, **FAST_ENV, **env}

    def start(self, **env: str) -> Gateway:
        return Gateway(self._make(**self.env(**env)), self.engine)

    def restart(self, gw: Gateway, **env: str) -> Gateway:
        """A new gateway on the data of ``gw`` (which must be stopped or killed)."""
        return Gateway(self._make(data_dir=gw.proc.data_dir, **self.env(**env)), self.engine)


@pytest.fixture(params=ENGINES)
def gateway(request: pytest.FixtureRequest, make_server: MakeServer) -> GatewayFactory:
    backends: dict[str, str] = {}
    if request.param == "kafka":
        backends = request.getfixturevalue("cluster_env")
    return GatewayFactory(request.param, make_server, backends)


@pytest.fixture
def engine_server(gateway: GatewayFactory) -> Gateway:
    """A gateway of each engine with the short durations of ``FAST_ENV``."""
    return gateway.start()


class Background:
    """Run one blocking call on a thread; ``result()`` joins it."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._out: list[Any] = []
        self._err: list[BaseException] = []
        self.started = time.monotonic()
        self.finished: float | None = None

        def run() -> None:
            try:
                self._out.append(fn())
            except BaseException as e:
                self._err.append(e)
            self.finished = time.monotonic()

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()

    def done(self) -> bool:
        return not self._t.is_alive()

    def result(self, timeout: float = 60.0) -> Any:
        self._t.join(timeout)
        assert not self._t.is_alive(), "background call did not finish"
        if self._err:
            raise self._err[0]
        return self._out[0]
